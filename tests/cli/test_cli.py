"""The command line: its entry points (console script, ``python -m vconvert``) print the package's version, every
option the README shows exists on the command it is shown with, and each command's ``--help`` lists exactly
the options its function declares."""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import vconvert
from vconvert.cli.app import app

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
GROUP = typer.main.get_command(app)
COMMANDS = sorted(GROUP.commands)
OPTION = re.compile(r"--?[A-Za-z][\w-]*")
# Options the README gives to other programs than vconvert: torchrun's, and the benchmark scripts' (checked below
# against the scripts' own argument parsers).
NOT_VCONVERT = {"--nproc_per_node": None, "--quick": "benchmarks/cifar10.py", "--base": "benchmarks/cifar10.py",
                "--work": "benchmarks/pareto.py", "--rows": "benchmarks/pareto.py",
                "--peers": "benchmarks/reconstruct.py"}  # fmt: skip
# The command each row of the README's "Options that matter" table is about, keyed by the row's first option.
TABLE_COMMAND = {
    "--mode": "compress",
    "--secondary": "compress",
    "--target-ratio": "compress",
    "--target-size": "compress",
    "--skip": "compress",
    "--calib-seed": "compress",
    "--masks": "finetune",
    "--loader": "finetune",
    "--distill": "finetune",
    "--precision": "finetune",
    "--ema": "finetune",
    "--label-smoothing": "finetune",
    "--feature-distill": "finetune",
    "--weight-bits": "finetune",
    "--compact": "export",
    "--quantize": "export",
    "--calib-data": "export",
    "--ring": "export",
}


def _declared(command) -> set[str]:
    """Every option name (long, short, the --no- of a flag) a click command declares, --help included."""
    names = {"--help"}
    for param in command.params:
        if param.param_type_name == "option":
            names |= {*param.opts, *param.secondary_opts}
    return names


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def _listed_options(help_text: str) -> set[str]:
    """The option names in the first column of ``--help``'s option panels (not those its help texts mention)."""
    assert "Options ─" in help_text, help_text
    names: set[str] = set()
    for line in help_text.splitlines():
        row = re.match(r"│\s{1,4}(?:\*\s+)?(-{1,2}[A-Za-z][\w-]*(?:\s+-{1,2}[A-Za-z][\w-]*)*)", line)
        if row:
            names |= set(row.group(1).split())
    return names


def _readme_invocations() -> list[tuple[str, list[str]]]:
    """(command, option names) of every vconvert invocation the README shows: each line of its bash blocks,
    and each inline code span that starts with ``vconvert <command>`` or ``<command> --option``."""
    texts = [line.split("  #")[0] for block in re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
             for line in block.splitlines()]  # fmt: skip
    texts += re.findall(r"(?<!`)`([^`]+)`(?!`)", README)
    invocations = []
    for text in texts:
        words = text.split()
        if "vconvert" in words and words.index("vconvert") + 1 < len(words):
            words = words[words.index("vconvert") + 1 :]
        elif not (len(words) > 1 and words[0] in COMMANDS and words[1].startswith("-")):
            continue
        if words[0] in COMMANDS or not words[0].startswith("-"):
            invocations.append((words[0], [word for word in words[1:] if OPTION.fullmatch(word)]))
    return invocations


def test_version_flag_prints_package_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    installed = importlib.metadata.version("vconvert")
    assert result.output == f"vconvert {installed}\n" and vconvert.__version__ == installed
    declared = re.search(r'^\[project\]$.*?^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    assert declared and installed == declared.group(1), "the installed metadata is pyproject.toml's (reinstall)"


@pytest.mark.parametrize("how", ["python -m vconvert", "console script"])
def test_entry_points_print_the_version(how: str) -> None:
    program = [sys.executable, "-m", "vconvert"] if how == "python -m vconvert" else [
        str(Path(sys.executable).parent / "vconvert")]  # fmt: skip
    completed = subprocess.run([*program, "--version"], capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == f"vconvert {vconvert.__version__}\n" and not completed.stderr


def test_help_lists_exactly_the_commands_and_the_group_options() -> None:
    text = _help()
    listed = {row.group(1) for line in text.splitlines() if (row := re.match(r"│ ([a-z][\w-]*)\s", line))}
    assert listed == set(COMMANDS) and {"compress", "inspect", "finetune", "export", "evaluate"} <= listed
    assert _listed_options(text) == _declared(GROUP) == {"--version", "--help"}


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_lists_exactly_the_options_its_function_declares(command: str) -> None:
    click_command = GROUP.commands[command]
    function = inspect.signature(click_command.callback).parameters
    declared = [name for name, param in function.items() if param.annotation not in ("typer.Context", typer.Context)]
    assert [param.name for param in click_command.params] == declared, "one CLI parameter per argument"
    assert not any(getattr(param, "hidden", False) for param in click_command.params)
    assert _listed_options(_help(command)) == _declared(click_command)


def test_every_option_a_readme_command_shows_exists_on_that_command() -> None:
    invocations = _readme_invocations()
    shown = {command for command, _ in invocations}
    assert {"compress", "inspect", "finetune", "export", "evaluate"} <= shown, shown
    for command, options in invocations:
        assert command in COMMANDS, f"the README runs `vconvert {command}`, which does not exist"
        missing = set(options) - _declared(GROUP.commands[command])
        assert not missing, f"the README gives `vconvert {command}` {sorted(missing)}, which it does not declare"


def test_every_option_of_the_readme_table_exists_on_its_command() -> None:
    section = README.split("## Options that matter")[1].split("\n\n")[1]
    rows = [line for line in section.splitlines() if line.startswith("| `-")]
    firsts = [re.search(r"--[\w-]+", row).group(0) for row in rows]
    assert firsts == list(TABLE_COMMAND), "a row was added or moved: say which command it is about in TABLE_COMMAND"
    for first, row in zip(firsts, rows, strict=True):
        command = TABLE_COMMAND[first]
        missing = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", row)) - _declared(GROUP.commands[command])
        assert not missing, f"the README's table gives `vconvert {command}` {sorted(missing)}"


def test_every_option_the_readme_names_is_a_vconvert_option() -> None:
    everywhere = set().union(_declared(GROUP), *(_declared(GROUP.commands[command]) for command in COMMANDS))
    named = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", README))
    assert named - everywhere <= set(NOT_VCONVERT), sorted(named - everywhere - set(NOT_VCONVERT))
    for option, script in NOT_VCONVERT.items():
        assert option not in everywhere, f"{option} is a vconvert option now"
        if script:
            assert f'"{option}"' in (ROOT / script).read_text(), f"{script} has no {option} option"


# --------------------------------------------------------------------------- finetune -o never overwrites its input
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import converted_checkpoint

    return converted_checkpoint(tmp_path_factory.mktemp("finetune-output") / "in.vc.pt")


def _tiny_checkpoint(made: Path, folder: Path) -> Path:
    return Path(shutil.copy(made, folder / "in.vc.pt"))


def _linked(how: str, target: Path, link: Path) -> Path:
    if how == "symlink":
        link.symlink_to(target)
    else:
        os.link(target, link)
    return link


@pytest.mark.parametrize(
    "case", ["same path", "dotted path", "symlink", "hard link", "the run's best file", "the run's metrics file"]
)
def test_finetune_refuses_an_output_that_would_overwrite_its_input(
    case: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from conftest import error_message

    source = _tiny_checkpoint(tiny_checkpoint, tmp_path)
    if case in ("symlink", "hard link"):
        source = _linked(case.split()[0], source, tmp_path / "linked.vc.pt")
    elif case == "the run's best file":  # finetune run.best.vc.pt -o run.vc.pt would write run.best.vc.pt
        source = source.rename(tmp_path / "run.best.vc.pt")
    elif case == "the run's metrics file":
        source = source.rename(tmp_path / "run.metrics.jsonl")
    output = {
        "same path": source,
        "dotted path": tmp_path / "sub" / ".." / source.name,
        "symlink": tmp_path / "in.vc.pt",
        "hard link": tmp_path / "in.vc.pt",
        "the run's best file": tmp_path / "run.vc.pt",
        "the run's metrics file": tmp_path / "run.vc.pt",
    }[case]
    (tmp_path / "sub").mkdir()
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}
    result = CliRunner().invoke(app, ["finetune", str(source), "-o", str(output), "--data", "digits"])
    assert result.exit_code == 2, result.output + result.stderr
    message = error_message(result)
    assert "would overwrite its input checkpoint" in message and "choose another --output" in message, message
    assert "epoch 1" not in result.output + result.stderr  # refused before any training
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == before


def test_finetune_refuses_run_files_that_are_one_file(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from conftest import error_message

    source = _tiny_checkpoint(tiny_checkpoint, tmp_path)
    (tmp_path / "run.best.vc.pt").symlink_to(tmp_path / "run.vc.pt")
    (tmp_path / "run.vc.pt").write_bytes(b"last")
    result = CliRunner().invoke(app, ["finetune", str(source), "-o", str(tmp_path / "run.vc.pt"), "--data", "digits"])
    assert result.exit_code == 2 and "are one file" in error_message(result), result.output + result.stderr
    assert (tmp_path / "run.vc.pt").read_bytes() == b"last"


def test_finetune_resume_may_name_its_output_as_input(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """--resume reads OUTPUT's last epoch, not FILE: FILE == OUTPUT is how a run is resumed."""
    from conftest import error_message

    source = _tiny_checkpoint(tiny_checkpoint, tmp_path)
    result = CliRunner().invoke(app, ["finetune", str(source), "-o", str(source), "--resume", "--data", "digits"])
    assert result.exit_code == 2, result.output + result.stderr
    assert "holds no fine-tuning state" in error_message(result)


def test_each_vconvert_warning_shows_once_even_when_a_library_resets_the_filters(capsys) -> None:
    import warnings

    from vconvert.cli.common import one_line_warnings
    from vconvert.errors import VConvertWarning

    with one_line_warnings():
        for _ in range(3):
            with warnings.catch_warnings():  # what onnxruntime, torch.onnx and Pillow wrappers do
                pass
            warnings.warn("the images are upsampled 4x", VConvertWarning, stacklevel=1)
    assert capsys.readouterr().err.count("the images are upsampled 4x") == 1


def test_help_version_and_usage_errors_import_no_heavy_library() -> None:
    """`vconvert --help`, `--version` and a usage error must not wait for torch & co. (issue 29 item 8): only
    the commands that need them import them. Checked by what is imported, not by wall time."""
    import subprocess
    import sys

    heavy = ("torch", "onnx", "onnxruntime", "torchvision", "sklearn", "numpy", "PIL", "timm")
    for args in (["--version"], ["--help"], ["export", "--help"], ["compress"]):
        probe = (
            f"import sys\nfrom vconvert.cli import app\ntry:\n    app({args!r})\nexcept SystemExit:\n    pass\n"
            f"print([m for m in {heavy!r} if m in sys.modules])"
        )
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        assert done.stdout.strip().splitlines()[-1] == "[]", (args, done.stdout[-500:], done.stderr[-500:])


def test_a_table_piped_to_a_file_keeps_every_column_and_each_reason_on_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    import torch

    from sample_models.resnet_cifar import resnet8

    torch.save(resnet8().state_dict(), tmp_path / "net.pt")
    command = [sys.executable, "-m", "vconvert", "inspect", "net.pt", "--arch", "sample_models.resnet_cifar:resnet8",
               "--input-shape", "1,3,32,32"]  # fmt: skip
    environment = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    with (tmp_path / "table.txt").open("w") as sink:  # a file, as `vconvert inspect ... > table.txt` gives it
        subprocess.run(command, cwd=tmp_path, stdout=sink, env=environment, check=True, timeout=300)
    lines = (tmp_path / "table.txt").read_text().splitlines()
    assert any("masks" in line and "fit err" in line for line in lines), lines[:4]
    stem = [line for line in lines if line.strip().startswith("conv1 ")]
    assert len(stem) == 1 and "skipped: stem (--convert-first)" in stem[0], lines[:6]
