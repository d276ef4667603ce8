"""A new user's first hour (issue 20): the CLI run as a user runs it on their own RGB model and a small
image folder, checking what each stage says about its input, and the refusals that replace crashes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import error_message
from PIL import Image
from typer.testing import CliRunner

from sample_models.resnet_cifar import resnet8
from vconvert.cli.app import app

ARCH = "sample_models.resnet_cifar:resnet8"
MEAN, STD = "0.49,0.48,0.45", "0.25,0.24,0.26"


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def said(result) -> str:
    """What the user saw, stdout and stderr interleaved, as one line of words (rich wraps long lines)."""
    return " ".join(result.output.split())


def assert_refused(result, *fragments: str) -> None:
    assert result.exit_code == 2, said(result)
    assert "Traceback" not in said(result)
    error = error_message(result)
    for fragment in fragments:
        assert fragment in error, error


def image_folder(root: Path, side: int, classes: int, per_class: int = 2) -> Path:
    for split in ("train", "val"):
        for label in range(classes):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True)
            for index in range(per_class):
                Image.new("RGB", (side, side), (label * 20, index * 90, 60)).save(folder / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A user's RGB 10-class model for 32x32 images, its 32x32 folder, and its .vc.pt compressed at 32x32."""
    root = tmp_path_factory.mktemp("user")
    torch.manual_seed(0)
    torch.save(resnet8().state_dict(), root / "net.pt")
    image_folder(root / "images", 32, classes=10)
    result = invoke(
        "compress", root / "net.pt", "--arch", ARCH, "--input-shape", "1,3,32,32", "--mean", MEAN, "--std", STD,
        "-o", root / "net.vc.pt",
    )  # fmt: skip
    assert result.exit_code == 0, said(result)
    return {"root": root, "model": root / "net.pt", "data": root / "images", "checkpoint": root / "net.vc.pt"}


def test_compress_says_what_it_records_and_where_it_came_from(user: dict[str, Path], tmp_path: Path) -> None:
    result = invoke("compress", user["model"], "--arch", ARCH, "-o", tmp_path / "default.vc.pt")
    assert result.exit_code == 0, said(result)
    assert "input recorded: 224x224 RGB images (size: the default 1,3,224,224; --input-shape sets it)" in said(result)
    assert "ImageNet's, the default for RGB" in said(result)
    given = invoke("compress", user["model"], "--arch", ARCH, "--input-shape", "1,3,32,32", "--mean", MEAN,
                   "--std", STD, "-o", tmp_path / "given.vc.pt")  # fmt: skip
    assert "input recorded: 32x32 RGB images (size: --input-shape), normalised with mean 0.49,0.48,0.45" in said(given)
    assert "(--mean/--std)" in said(given)


@pytest.mark.parametrize("command", ["finetune", "evaluate"])
def test_a_checkpoint_that_records_no_data_needs_data_instead_of_crashing_on_digits(
    user: dict[str, Path], command: str, tmp_path: Path
) -> None:
    output = tmp_path / "out.vc.pt"
    args = ["-o", output, "--epochs", "1"] if command == "finetune" else []
    assert_refused(invoke(command, user["checkpoint"], *args), "Pass --data", "net.vc.pt records no data set")
    assert not output.exists()


@pytest.mark.parametrize("kind", ["onnx", "plain-model"])
def test_evaluate_of_a_file_that_records_no_data_needs_data(user: dict[str, Path], kind: str, tmp_path: Path) -> None:
    if kind == "onnx":
        onnx = tmp_path / "net.onnx"
        assert invoke("export", user["checkpoint"], "-o", onnx, "--no-compare").exit_code == 0
        assert_refused(invoke("evaluate", onnx), "Pass --data")
    else:
        assert_refused(invoke("evaluate", user["model"], "--arch", ARCH), "Pass --data")


def test_finetune_prints_its_input_once_and_evaluate_reads_the_recorded_data(
    user: dict[str, Path], tmp_path: Path
) -> None:
    tuned = tmp_path / "tuned.vc.pt"
    result = invoke("finetune", user["checkpoint"], "--data", user["data"], "--epochs", "1", "--batch-size", "8",
                    "--recalibrate-images", "0", "-o", tuned)  # fmt: skip
    assert result.exit_code == 0, said(result)
    line = (f"data {user['data']} (--data): 32x32 RGB images (size: the input shape net.vc.pt records), normalised "
            f"with mean 0.49,0.48,0.45 and std 0.25,0.24,0.26 (recorded in net.vc.pt).")  # fmt: skip
    assert said(result).count(line) == 1, said(result)
    assert "warning:" not in said(result)
    recorded = invoke("evaluate", tuned, "--json")  # no --data: the folder tuned.vc.pt records
    assert recorded.exit_code == 0, said(recorded)
    assert json.loads(recorded.stdout)["data"] == str(user["data"])
    assert f"data {user['data']} (recorded in tuned.vc.pt): 32x32 RGB" in " ".join(recorded.stderr.split())
    renamed = image_folder(tmp_path / "renamed", 32, classes=10, per_class=1)
    for split in ("train", "val"):
        for folder in sorted((renamed / split).iterdir()):
            folder.rename(folder.with_name("k" + folder.name))
    other_names = invoke("evaluate", tuned, "--data", renamed)
    assert other_names.exit_code == 0, said(other_names)
    assert "warning: The class folders of" in said(other_names)
    assert "are not the classes tuned.vc.pt was fine-tuned on (c0, c1, c2, ...)" in said(other_names)
    exported = tmp_path / "tuned.onnx"
    assert invoke("export", tuned, "-o", exported).exit_code == 0
    onnx_other_names = invoke("evaluate", exported, "--data", renamed)  # the ONNX file records the classes too
    assert onnx_other_names.exit_code == 0, said(onnx_other_names)
    assert "are not the classes tuned.onnx was fine-tuned on (c0, c1, c2, ...)" in said(onnx_other_names)


def test_a_folder_far_from_the_recorded_size_gets_one_warning(user: dict[str, Path], tmp_path: Path) -> None:
    """The README path a user took before: compressed at the default 224 for 32x32 images."""
    at_224 = tmp_path / "at224.vc.pt"
    assert invoke("compress", user["model"], "--arch", ARCH, "-o", at_224).exit_code == 0
    result = invoke("evaluate", at_224, "--data", user["data"], "--limit", "4")
    assert result.exit_code == 0, said(result)
    assert said(result).count("warning:") == 1
    assert re.search(r"images in \S+ are about 32x32 pixels but are resized to 224x224 \(the input shape at224\.vc\.pt "
                     r"records\).*--input-shape N,C,32,32", said(result)), said(result)  # fmt: skip


def test_a_plain_model_without_input_shape_says_it_uses_224_and_warns(user: dict[str, Path]) -> None:
    result = invoke("evaluate", user["model"], "--arch", ARCH, "--data", user["data"], "--limit", "4")
    assert result.exit_code == 0, said(result)
    assert "224x224 RGB images (size: the default for folders, 224x224; --input-shape sets it)" in said(result)
    assert "ImageNet's, the default for folders" in said(result) and "warning:" in said(result)
    fitting = invoke("evaluate", user["model"], "--arch", ARCH, "--data", user["data"], "--input-shape", "1,3,32,32")
    assert fitting.exit_code == 0 and "warning:" not in said(fitting), said(fitting)
    assert "32x32 RGB images (size: --input-shape)" in said(fitting)


@pytest.mark.parametrize("classes", [2, 12], ids=["fewer-classes", "more-classes"])
@pytest.mark.parametrize("kind", ["checkpoint", "onnx", "plain-model"])
def test_evaluate_refuses_data_whose_classes_the_model_does_not_score(
    user: dict[str, Path], classes: int, kind: str, tmp_path: Path
) -> None:
    data = image_folder(tmp_path / "other", 32, classes=classes, per_class=1)
    if kind == "checkpoint":
        args = [user["checkpoint"]]
    elif kind == "onnx":
        assert invoke("export", user["checkpoint"], "-o", tmp_path / "net.onnx", "--no-compare").exit_code == 0
        args = [tmp_path / "net.onnx"]
    else:
        args = [user["model"], "--arch", ARCH, "--input-shape", "1,3,32,32"]
    assert_refused(invoke("evaluate", *args, "--data", data), f"The data has {classes} classes but the model scores 10")


def test_export_of_a_checkpoint_never_fine_tuned_says_so_and_hints_compact(
    user: dict[str, Path], tmp_path: Path
) -> None:
    result = invoke("export", user["checkpoint"], "-o", tmp_path / "dense.onnx", "--no-compare")
    assert result.exit_code == 0, said(result)
    assert "net.vc.pt is not fine-tuned: its accuracy is the data-free fit's" in said(result)
    assert "--compact stores the primary filters and bit-packed masks" in said(result)
    compact = invoke("export", user["checkpoint"], "-o", tmp_path / "compact.onnx", "--no-compare", "--compact")
    assert compact.exit_code == 0 and "--compact stores" not in said(compact), said(compact)


@pytest.mark.parametrize("command", ["compress", "inspect", "finetune", "evaluate", "export", "demo"])
def test_help_shows_flags_as_flags(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "160")
    result = invoke(command, "--help")
    assert result.exit_code == 0
    flags = [line for line in result.output.splitlines() if re.search(r"--(trust|json|debug|compact|resume)\b", line)]
    assert flags, result.output
    assert not any("<bool>" in line for line in flags), "\n".join(flags)


@pytest.mark.parametrize(
    ("side", "size", "warned"),
    [(32, 224, True), (100, 224, True), (120, 224, False), (400, 224, False), (1700, 224, False), (1900, 224, True),
     (32, 32, False), (256, 32, False), (300, 32, True)],
    ids=lambda value: str(value),
)  # fmt: skip
def test_image_size_warning_is_for_upsampling_and_extreme_shrinking(
    side: int, size: int, warned: bool, tmp_path: Path
) -> None:
    """A 224 model on ordinary photos (a few hundred pixels) is the normal case; 32x32 images fed at 224 are not."""
    import warnings

    from vconvert.data.datasets import ImageSizeWarning, check_image_size

    paths = []
    for index in range(3):
        path = tmp_path / f"{index}.png"
        Image.new("RGB", (side, side), (index, 0, 0)).save(path)
        paths.append(str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_image_size(tmp_path, paths, [size, size], "the test")
    assert any(issubclass(w.category, ImageSizeWarning) for w in caught) is warned


@pytest.mark.parametrize(
    ("command", "mean", "std", "fragment"),
    [
        ("compress", "125,123,114", "63,62,66", "--mean 0.4902,0.4824,0.4471"),
        ("compress", "0.49,0.48,0.45", "0,0.2,0.2", "--std must be numbers from 1e-06 to 1"),
        ("finetune", "125,123,114", STD, "looks like the 0-255 scale"),
        ("finetune", MEAN, "63,62,66", "--std 0.2471,0.2431,0.2588"),
    ],
    ids=["compress-0-255", "compress-zero-std", "finetune-mean-0-255", "finetune-std-0-255"],
)
def test_normalisation_on_the_0_255_scale_is_refused_with_the_fix(
    user: dict[str, Path], tmp_path: Path, command: str, mean: str, std: str, fragment: str
) -> None:
    output = tmp_path / "out.vc.pt"
    source = ["compress", user["model"], "--arch", ARCH, "--input-shape", "1,3,32,32", "--calib-data", user["data"]]
    start = source if command == "compress" else ["finetune", user["checkpoint"], "--data", user["data"]]
    assert_refused(invoke(*start, "--mean", mean, "--std", std, "-o", output), fragment)
    assert not output.exists()


def test_recorded_data_paths_are_absolute_so_later_stages_run_from_any_folder(
    user: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(user["root"])
    compressed = tmp_path / "rel.vc.pt"
    result = invoke(
        "compress", "net.pt", "--arch", ARCH, "--input-shape", "1,3,32,32", "--mean", MEAN, "--std", STD,
        "--calib-data", "images", "-o", compressed,
    )  # fmt: skip
    assert result.exit_code == 0, said(result)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    evaluated = invoke("evaluate", compressed, "--json")
    assert evaluated.exit_code == 0, said(evaluated)
    assert str(user["data"].resolve()) in said(evaluated)


def test_a_recorded_folder_that_is_gone_is_named(user: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    data = shutil.copytree(user["data"], tmp_path / "moved")
    compressed = tmp_path / "gone.vc.pt"
    result = invoke(
        "compress", user["model"], "--arch", ARCH, "--input-shape", "1,3,32,32", "--mean", MEAN, "--std", STD,
        "--calib-data", data, "-o", compressed,
    )  # fmt: skip
    assert result.exit_code == 0, said(result)
    shutil.rmtree(data)
    assert_refused(invoke("evaluate", compressed), f"records {data}, which is not a folder here", "--data")


@pytest.mark.parametrize("kind", ["plain-model", "onnx"])
def test_evaluate_takes_the_normalisation_the_model_was_trained_with(
    user: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    target = user["model"]
    arch = ["--arch", ARCH, "--input-shape", "1,3,32,32"]
    if kind == "onnx":
        target, arch = tmp_path / "net.onnx", []
        assert invoke("export", user["checkpoint"], "-o", target).exit_code == 0
    given = invoke("evaluate", target, *arch, "--data", user["data"], "--mean", "0.1,0.2,0.3", "--std", "0.3,0.2,0.1")
    assert given.exit_code == 0, said(given)
    assert "normalised with mean 0.1,0.2,0.3 and std 0.3,0.2,0.1 (--mean/--std)" in said(given)
    assert_refused(
        invoke("evaluate", target, *arch, "--data", user["data"], "--mean", "0.5", "--std", "0.2"),
        "one value per input channel",
    )
