"""What the CLI prints of a file (security issue 27, part 6): names, notes, class names and messages read from
a file come out escaped (no raw control character can clear the screen, move the cursor or start a line of its
own), as plain text (rich markup in them is shown, not applied) and capped in length."""

from __future__ import annotations

import io
import logging
import shutil
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import converted_checkpoint, error_message, invoke

from vconvert.cli.common import MESSAGE_LIMIT, SafeConsole, info_lines, one_line_warnings
from vconvert.errors import SHOWN_LIMIT, VConvertWarning, shown

EVIL = "\x1b[2J\nforged line\r\x9b31m[red]x[/red]"
RAW = ("\x1b", "\x9b", "\r", "\x07")  # ESC, CSI, carriage return, bell: never printed as they are


def assert_harmless(text: str) -> None:
    """No raw control character and no line that the file started."""
    for character in RAW:
        assert character not in text, repr(text)
    for line in text.splitlines():
        assert not line.lstrip().startswith("forged line"), repr(text)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return converted_checkpoint(tmp_path_factory.mktemp("escaping") / "good.vc.pt")


def _hostile_copy(good: Path, folder: Path, change) -> Path:
    payload = torch.load(good, weights_only=True)
    change(payload)
    path = folder / "hostile.vc.pt"
    torch.save(payload, path)
    return path


def _names_and_notes(payload: dict) -> None:
    stem = payload["plan"]["layers"][0]  # the stem is skipped: its name is not looked up in the model
    stem["name"], stem["decision"] = "conv1" + EVIL, "skipped: " + EVIL
    payload["plan"]["traced_with"], payload["plan"]["trace_note"] = "hooks", "traced by hooks " + EVIL
    payload["metadata"]["data"] = {"source": "/data" + EVIL, "input_size": [32, 32], "channels": 1,
                                   "mean": [0.5], "std": [0.5], "classes": ["class" + EVIL] * 10}  # fmt: skip
    payload["metadata"]["finetune"] = {"val_top1": 50.0, "epochs_done": EVIL, "config": {"epochs": 3, "masks": EVIL}}


# --------------------------------------------------------------------------- the pure function
def test_shown_escapes_every_control_and_non_printable_character() -> None:
    assert shown("a\x1b[2J\nb\rc\td\x9b\x7f\x00") == "a\\x1b[2J\\nb\\rc\\td\\x9b\\x7f\\x00"
    assert shown("bidi \u202e and \u2028 line") == "bidi \\u202e and \\u2028 line"
    assert shown("plain ünïcode → [red]x[/red]") == "plain ünïcode → [red]x[/red]"  # printable: unchanged
    assert shown(Path("a\x1bb")) == "a\\x1bb"


def test_shown_caps_a_long_value_without_splitting_an_escape() -> None:
    arch = "package.module:" + "x" * 2_000_000
    assert len(shown(arch)) == SHOWN_LIMIT and shown(arch).endswith("...")
    cut = shown("\x1b" * 100, limit=20)
    assert cut == "\\x1b" * 4 + "..."
    kept = shown("a" * 1000 + " pass --trust.", limit=60, tail=14)
    assert len(kept) == 60 and kept.endswith("... pass --trust.")
    assert shown("short", limit=None) == "short" and shown("\x1b" * 10, limit=None) == "\\x1b" * 10


# --------------------------------------------------------------------------- what commands print
def test_inspect_shows_hostile_names_and_notes_escaped(good: Path, tmp_path: Path) -> None:
    result = invoke("inspect", _hostile_copy(good, tmp_path, _names_and_notes))
    assert result.exit_code == 0, result.output + result.stderr
    assert_harmless(result.output + result.stderr)
    assert "note: traced by hooks \\x1b[2J\\nforged line\\r\\x9b31m[red]x[/red]" in result.output  # markup shown
    assert "on /data\\x1b[2J\\nforged line" in result.output and "masks \\x1b[2J" in result.output
    assert "conv1\\x1b[2J" in result.output


def test_a_file_name_with_control_characters_is_escaped(good: Path, tmp_path: Path) -> None:
    named = tmp_path / "a\x1b[2J\rforged line[red].vc.pt"
    shutil.copy(good, named)
    result = invoke("inspect", named)
    assert result.exit_code == 0, result.output + result.stderr
    assert_harmless(result.output + result.stderr)
    assert "a\\x1b[2J\\rforged line[red].vc.pt" in result.output
    missing = invoke("inspect", tmp_path / "gone\x1b]0;title\x07\nforged line.vc.pt")
    assert missing.exit_code == 2
    assert_harmless(missing.output + missing.stderr)
    assert "\n" not in error_message(missing)


def test_an_error_naming_a_pickled_class_is_escaped(tmp_path: Path) -> None:
    evil = "\x1b[2J\rforged line\x9b31m[red]x[/red]"  # a pickle's class name cannot hold "\n"
    pickled = b"\x80\x02c" + f"evil{evil}".encode() + b"\nThing" + evil.encode() + b"\n)\x81."
    model = tmp_path / "model.pt"
    torch.save({"a": 1}, model)  # a torch.save archive whose pickle is replaced by the one above
    with zipfile.ZipFile(model) as archive:
        members = {info: archive.read(info) for info in archive.infolist()}
    with zipfile.ZipFile(model, "w") as archive:
        for info, data in members.items():
            archive.writestr(info, pickled if info.filename.endswith("/data.pkl") else data)
    result = invoke("inspect", model, "--input-shape", "1,1,32,32")
    assert result.exit_code == 2, result.output + result.stderr
    assert_harmless(result.output + result.stderr)
    message = error_message(result)
    assert "evil\\x1b[2J\\rforged line\\x9b31m[red]x[/red]" in message, message


def test_a_huge_value_in_an_error_is_capped(good: Path, tmp_path: Path) -> None:
    def huge_arch(payload: dict) -> None:
        payload["base"]["arch"] = "sample_models.resnet_cifar:" + "x" * 2_000_000 + "\x1b[2J"

    result = invoke("inspect", _hostile_copy(good, tmp_path, huge_arch))
    assert result.exit_code == 2, result.output[:2000] + result.stderr[:2000]
    assert_harmless(result.output + result.stderr)
    message = error_message(result)
    assert len(message) <= len("error: ") + MESSAGE_LIMIT and message.endswith("."), message


def test_a_huge_note_is_capped(good: Path, tmp_path: Path) -> None:
    def huge_note(payload: dict) -> None:
        payload["plan"]["traced_with"], payload["plan"]["trace_note"] = "hooks", "n" * 2_000_000

    result = invoke("inspect", _hostile_copy(good, tmp_path, huge_note))
    if result.exit_code == 0:  # a file may also be refused for it: then the error is capped (above)
        (note,) = [line for line in result.output.splitlines() if line.startswith("note:")]
        assert len(note) <= len("note: ") + MESSAGE_LIMIT
    assert len(result.output + result.stderr) < 20_000


# --------------------------------------------------------------------------- the one place that prints messages
def test_warnings_and_info_lines_are_one_escaped_line(capsys: pytest.CaptureFixture[str]) -> None:
    with one_line_warnings(), info_lines():
        warnings.warn("images in /data" + EVIL + " were skipped", VConvertWarning, stacklevel=1)
        logging.getLogger("vconvert").info("reading /data" + EVIL)
    err = capsys.readouterr().err
    assert_harmless(err)
    assert err.splitlines() == [
        "warning: images in /data\\x1b[2J\\nforged line\\r\\x9b31m[red]x[/red] were skipped",
        "reading /data\\x1b[2J\\nforged line\\r\\x9b31m[red]x[/red]",
    ]


def test_the_consoles_escape_control_characters_a_command_forgot() -> None:
    """The safety net under every command's output: text with ESC or CSI comes out escaped, while rich's own
    styles and cursor moves (a progress bar's) still reach the terminal."""
    from rich.progress import Progress

    out = io.StringIO()
    terminal = SafeConsole(file=out, width=80, force_terminal=True)
    terminal.print("from /data\x1b[2J\x9b31m [bold]styled[/]", highlight=False)
    with Progress(console=terminal, transient=True) as progress:
        progress.add_task("layer\x1b]0;title\x07", total=1)
    text = out.getvalue()
    assert "/data\\x1b[2J\\x9b31m" in text and "layer\\x1b]0;title" in text
    assert "\x1b[1mstyled\x1b[0m" in text and "\x1b[2K" in text  # rich's own codes pass
    assert "\x1b[2J" not in text.replace("\\x1b[2J", "") and "\x9b" not in text
