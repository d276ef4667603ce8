"""Hostile image folders (issue 27, part 4): every entry of a folder is untrusted input.

Each case builds a real folder on disk and reads it through the real readers (``open_split`` for
``--data``, ``image_folder`` for ``--calib-data``) in a thread with a deadline, so that a regression
fails instead of hanging the suite. Each asserts the samples kept, and that what was left out is told in
exactly one warning line per folder (no control characters, no Pillow warning).
"""

from __future__ import annotations

import os
import resource
import struct
import threading
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import EpsImagePlugin, Image

from vconvert.data.datasets import open_split
from vconvert.data.image_files import MAX_IMAGE_PIXELS, load_image
from vconvert.data.image_folders import UnreadableImagesWarning, image_folder
from vconvert.errors import BadInputError, VConvertWarning

DEADLINE = 60.0  # seconds; a healthy case takes well under one
PER_CLASS = 2
POSTSCRIPT = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n{} loop\nshowpage\n"


# --------------------------------------------------------------------------- helpers
def _folder(root: Path) -> Path:
    """``root`` with train/ and val/, classes a and b of PER_CLASS small PNGs each; returns train/a."""
    for split in ("train", "val"):
        for label, name in enumerate("ab"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(PER_CLASS):
                Image.new("RGB", (12, 12), (40 + 100 * label, 20 * index, 90)).save(folder / f"{index}.png")
    return root / "train" / "a"


def _within(action: Callable[[], Any], fifos: tuple[Path, ...] = ()) -> Any:
    """``action()`` run in a thread that must finish within DEADLINE seconds; on a hang each FIFO of
    ``fifos`` is opened for writing (which frees a reader blocked on it) and the test fails."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = action()
        except BaseException as error:  # handed to the test thread
            outcome["error"] = error

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(DEADLINE)
    if worker.is_alive():
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        pytest.fail(f"reading the folder did not finish within {DEADLINE:.0f} s (it hangs)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _read(
    root: Path, reader: str, fifos: tuple[Path, ...] = (), **options: Any
) -> tuple[list[tuple[str, int]], list[str]]:
    """The samples of ``root``'s training images read by ``reader`` (``--data`` or ``--calib-data``'s
    reader) within the deadline, and the messages of its UnreadableImagesWarnings; fails on any warning
    but VConvertWarnings."""

    def read() -> tuple[Any, list[warnings.WarningMessage]]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if reader == "open_split":
                options.update(input_size=[12, 12], augment=False, check_size=False)
                dataset = open_split(str(root), True, **options)[0]
            else:
                dataset = image_folder(root, **options)
        return dataset, caught

    dataset, caught = _within(read, fifos)
    others = [f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, VConvertWarning)]
    assert not others, others
    messages = [str(w.message) for w in caught if issubclass(w.category, UnreadableImagesWarning)]
    for message in messages:
        assert message.isprintable(), repr(message)  # one line, no control characters
    return dataset.samples, messages


def _names(samples: list[tuple[str, int]]) -> list[str]:
    return [os.path.relpath(path, os.path.dirname(os.path.dirname(path))) for path, _ in samples]


GOOD = [f"{name}/{index}.png" for name in "ab" for index in range(PER_CLASS)]
READERS = pytest.mark.parametrize("reader", ["open_split", "image_folder"])


# --------------------------------------------------------------------------- one test per hostile case
@READERS
def test_fifo_named_png_is_never_opened(reader: str, tmp_path: Path) -> None:
    class_a = _folder(tmp_path / "data")
    os.mkfifo(class_a / "fifo.png")  # opening it for reading would block until a writer comes
    samples, messages = _read(tmp_path / "data", reader, (class_a / "fifo.png",))
    assert _names(samples) == GOOD
    assert len(messages) == 1 and "1 special file(s)" in messages[0], messages
    assert str(class_a / "fifo.png") in messages[0]


def test_loading_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """The loader itself (a FIFO swapped in after the folder was listed) refuses it with one sentence."""
    os.mkfifo(tmp_path / "fifo.png")
    with pytest.raises(BadInputError, match="is not a regular file") as refused:
        _within(lambda: load_image(str(tmp_path / "fifo.png")), (tmp_path / "fifo.png",))
    assert "\n" not in str(refused.value)


@READERS
def test_two_links_to_the_class_folder_itself_neither_hang_nor_repeat_samples(reader: str, tmp_path: Path) -> None:
    class_a = _folder(tmp_path / "data")
    os.symlink(".", class_a / "again")
    os.symlink(".", class_a / "and-again")
    samples, messages = _read(tmp_path / "data", reader)
    assert _names(samples) == GOOD
    assert len(messages) == 1 and "2 linked folder(s), never followed" in messages[0], messages


@READERS
def test_link_loops_do_not_multiply_samples(reader: str, tmp_path: Path) -> None:
    class_a = _folder(tmp_path / "data")
    os.symlink("../a", class_a / "sub")  # a folder loop
    os.symlink("loop-2.png", class_a / "loop-1.png")  # a file loop: neither resolves
    os.symlink("loop-1.png", class_a / "loop-2.png")
    samples, messages = _read(tmp_path / "data", reader)
    assert _names(samples) == GOOD
    assert len(messages) == 1, messages
    assert "2 link(s) out of the data folder, dangling or looping" in messages[0]
    assert "1 linked folder(s)" in messages[0]


@READERS
def test_links_leading_out_of_the_data_folder_are_not_followed(reader: str, tmp_path: Path) -> None:
    class_a = _folder(tmp_path / "data")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.new("RGB", (12, 12)).save(outside / "secret.png")  # a real image: only its place is wrong
    os.symlink(outside / "secret.png", class_a / "leak.png")
    os.symlink("../../../elsewhere", class_a / "out")  # a linked folder leading out
    os.symlink(os.devnull, class_a / "device.png")  # a device, out of the folder too
    os.symlink("../b/0.png", class_a / "same-as-b0.png")  # inside the data folder: taken
    samples, messages = _read(tmp_path / "data", reader)
    assert _names(samples) == [*GOOD[:PER_CLASS], "a/same-as-b0.png", *GOOD[PER_CLASS:]]
    assert len(messages) == 1, messages
    assert "2 link(s) out of the data folder" in messages[0] and "1 linked folder(s)" in messages[0]
    assert str(class_a / "device.png") in messages[0]  # the first of them, in listing order


def test_postscript_named_png_never_reaches_the_eps_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class_a = _folder(tmp_path / "data")
    (class_a / "page.png").write_bytes(POSTSCRIPT)
    asked: list[str] = []
    real_open = EpsImagePlugin.EpsImageFile._open

    def spy(self: Any) -> None:
        asked.append("eps")
        real_open(self)

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", spy)
    with Image.open(class_a / "page.png"):  # the spy is real: Pillow unrestricted takes it for EPS
        pass
    assert asked == ["eps"]
    asked.clear()
    samples, messages = _read(tmp_path / "data", "open_split")
    assert _names(samples) == GOOD
    assert len(messages) == 1 and "1 file(s) that do not decode as images" in messages[0], messages
    with pytest.raises(Image.UnidentifiedImageError):
        load_image(str(class_a / "page.png"))
    assert asked == []


def _blank_png(path: Path, side: int) -> None:
    """A grey PNG of side x side pixels, all 0, written row by row (a 12000² one takes ~150 KB and no
    memory to write)."""
    squeeze = zlib.compressobj(9)
    row = bytes(side + 1)  # the filter byte, then the row
    data = b"".join(squeeze.compress(row) for _ in range(side)) + squeeze.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_images_over_the_pixel_budget_are_not_decoded(tmp_path: Path) -> None:
    """Two 12000² PNGs (144 megapixels, past Pillow's own bomb warning): one line, no Pillow warning,
    nothing decoded."""
    class_a = _folder(tmp_path / "data")
    for name in ("huge-1.png", "huge-2.png"):
        _blank_png(class_a / name, 12000)
    assert 12000**2 > Image.MAX_IMAGE_PIXELS > MAX_IMAGE_PIXELS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    samples, messages = _read(tmp_path / "data", "open_split")  # fails on any DecompressionBombWarning
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
    assert _names(samples) == GOOD
    assert len(messages) == 1 and f"2 image(s) over the budget of {MAX_IMAGE_PIXELS:,} pixels" in messages[0], messages
    assert str(class_a / "huge-1.png") in messages[0]
    assert grown < 64 << 10, f"the peak memory grew by {grown >> 10} MiB"


@READERS
def test_the_pixel_budget_is_a_parameter(reader: str, tmp_path: Path) -> None:
    class_a = _folder(tmp_path / "data")
    Image.new("RGB", (13, 13)).save(class_a / "large.png")
    samples, messages = _read(tmp_path / "data", reader, max_pixels=12 * 12)
    assert _names(samples) == GOOD
    assert len(messages) == 1 and "1 image(s) over the budget of 144 pixels" in messages[0], messages
    with pytest.raises(BadInputError, match=r"large.png is 13x13 pixels, more than the 144 pixels"):
        load_image(str(class_a / "large.png"), max_pixels=144)


def test_control_characters_in_names_are_escaped(tmp_path: Path) -> None:
    class_a = _folder(tmp_path / "data")
    (class_a / "\x1b[2Jcleared\nforged line.png").write_bytes(b"not an image")
    samples, messages = _read(tmp_path / "data", "open_split")
    assert _names(samples) == GOOD
    assert len(messages) == 1 and "\\x1b[2Jcleared\\nforged line.png" in messages[0], messages
    (tmp_path / "data" / "train" / "\x1b]0;title\x07").mkdir()  # an empty class folder: refused
    with pytest.raises(BadInputError) as refused:
        _read(tmp_path / "data", "open_split")
    assert str(refused.value).isprintable() and "\\x1b]0;title\\x07" in str(refused.value)


def test_every_kind_at_once_is_one_line(tmp_path: Path) -> None:
    class_a = _folder(tmp_path / "data")
    os.mkfifo(class_a / "fifo.png")
    os.symlink(".", class_a / "self")
    os.symlink(os.devnull, class_a / "null.png")
    (class_a / "page.png").write_bytes(POSTSCRIPT)
    Image.new("L", (13, 13)).save(class_a / "large.png")
    samples, messages = _read(tmp_path / "data", "open_split", (class_a / "fifo.png",), max_pixels=12 * 12)
    assert _names(samples) == GOOD
    assert len(messages) == 1, messages
    for part in ("1 file(s) that do not decode", "1 image(s) over", "1 special file(s)", "1 link(s)", "1 linked"):
        assert part in messages[0], messages[0]


@pytest.mark.parametrize("where", ["class", "split"])
def test_linked_class_or_split_folders_are_refused(where: str, tmp_path: Path) -> None:
    """Following one could repeat the data or leave it; leaving it out would renumber the classes."""
    _folder(tmp_path / "data")
    if where == "class":
        os.symlink("b", tmp_path / "data" / "train" / "c")
    else:
        os.rename(tmp_path / "data" / "val", tmp_path / "data" / "real-val")
        os.symlink("real-val", tmp_path / "data" / "val")
    for reader in ("open_split", "image_folder") if where == "class" else ("open_split",):
        with pytest.raises(BadInputError, match="is a link to a folder") as refused:
            if reader == "open_split":
                open_split(str(tmp_path / "data"), where == "class", input_size=[12, 12])
            else:
                image_folder(tmp_path / "data")
        assert "\n" not in str(refused.value)


def test_reading_leaves_pillow_and_the_warning_filters_as_they_were(tmp_path: Path) -> None:
    """No global limit changed, and no warning filter touched (touching one makes Python show again
    every warning it had shown once)."""
    _folder(tmp_path / "data")
    _blank_png(tmp_path / "data" / "train" / "a" / "huge.png", 12000)
    _read(tmp_path / "data", "open_split")  # imports done
    limit, filters = Image.MAX_IMAGE_PIXELS, list(warnings.filters)

    def say() -> None:
        warnings.warn("shown once", UserWarning, stacklevel=1)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        say()
        open_split(str(tmp_path / "data"), True, input_size=[12, 12], augment=False, check_size=False)
        say()
    assert [str(w.message) for w in caught if w.category is UserWarning] == ["shown once"]
    assert Image.MAX_IMAGE_PIXELS == limit and list(warnings.filters) == filters


def test_compress_calib_data_on_a_hostile_folder_prints_one_warning_line(tmp_path: Path) -> None:
    """What a user sees: compress --calib-data finishes, one "warning:" line, no Pillow warning, no ESC."""
    import torch
    from conftest import RESNET8_ARCH, invoke

    from sample_models.resnet_cifar import resnet8

    class_a = _folder(tmp_path / "data")
    os.mkfifo(class_a / "fifo.png")
    os.symlink(".", class_a / "self")
    (class_a / "\x1b[2Jpage.png").write_bytes(POSTSCRIPT)
    _blank_png(class_a / "huge.png", 12000)
    weights = tmp_path / "resnet8.pt"
    torch.save(resnet8().state_dict(), weights)
    args = ["compress", weights, "--arch", RESNET8_ARCH, "--input-shape", "1,3,16,16", "--init", "naive"]
    result = _within(lambda: invoke(*args, "--calib-data", tmp_path / "data", "-o", tmp_path / "out.vc.pt"))
    assert result.exit_code == 0, result.output + result.stderr
    lines = result.stderr.splitlines()
    assert len([line for line in lines if line.startswith("warning:")]) == 1, result.stderr
    assert sum("Skipped in" in line for line in lines) == 1 and "\x1b" not in result.stderr, result.stderr
    assert "DecompressionBomb" not in result.output + result.stderr
