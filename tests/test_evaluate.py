"""`vconvert evaluate`: accuracy measured on the artifact itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import error_message
from typer.testing import CliRunner

import sample_models
from sample_models.resnet_cifar import resnet8, resnet20
from vconvert import compress, save
from vconvert.cli.app import app
from vconvert.data.datasets import open_split
from vconvert.errors import BadInputError
from vconvert.evaluate import evaluate_file, evaluate_model
from vconvert.io.metadata import CheckpointMetadata
from vconvert.io.untrusted import BaseSpec


def _files(tmp_path: Path) -> tuple[Path, Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = resnet8(in_channels=1).eval()
    state = tmp_path / "plain.pt"
    torch.save(model.state_dict(), state)
    converted, plan = compress(model, torch.randn(1, 1, 32, 32))
    base = BaseSpec("sample_models.resnet_cifar:resnet8", {"in_channels": 1}, None, str(state))
    checkpoint = tmp_path / "m.vc.pt"
    save(checkpoint, converted, plan, base, model, CheckpointMetadata(input_shape=[1, 1, 32, 32]))
    return state, checkpoint, converted


def test_evaluate_checkpoint_equals_direct_measurement(tmp_path: Path) -> None:
    _, checkpoint, converted = _files(tmp_path)
    dataset, _, _ = open_split("digits", False)
    top1, top5, images = evaluate_model(converted, dataset, torch.device("cpu"), workers=0)
    result = evaluate_file(checkpoint, "digits")
    assert (result.top1, result.top5, result.images) == (top1, top5, images) and images == 360
    assert result.kind == "vconvert checkpoint"


WEIGHTS = Path(sample_models.__file__).resolve().parent / "weights"
RESNET8 = "sample_models.resnet_cifar:resnet8"
RANKING = [3, 7, 1, 9, 0, 5, 2, 8, 4, 6]  # the constant model's classes, best score first


def _constant_model(ranking: list[int] = RANKING) -> torch.nn.Module:
    """A resnet8 whose classifier ignores the image: the same scores for every input, ranked as ``ranking``."""
    torch.manual_seed(0)
    model = resnet8(in_channels=1).eval()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([float(len(ranking) - ranking.index(label)) for label in range(10)]))
    return model


def _test_labels() -> list[int]:
    dataset, _, _ = open_split("digits", False)
    return [int(label) for _, label in dataset]


def _known_accuracy() -> tuple[float, float, int]:
    """(top-1 %, top-5 %, images) the constant model must score on the test digits: the share of RANKING[0]
    and of RANKING[:5] among their labels, counted here by hand."""
    labels = _test_labels()
    top1 = 100.0 * sum(label == RANKING[0] for label in labels) / len(labels)
    top5 = 100.0 * sum(label in RANKING[:5] for label in labels) / len(labels)
    assert 0 < top1 < top5 < 100, "the class shares must tell a right count from a wrong one"
    return top1, top5, len(labels)


def test_evaluate_cli_on_plain_model_and_limit(tmp_path: Path) -> None:
    """``--limit 50`` on ten constant models, model c ranking c, c+1, ... (mod 10) first: model c's top-1 counts
    the images of class c among the 50, so the ten counts are whole, sum to 50, fit in the split's class
    counts, and each model's top-5 is the sum of the counts of its five first classes."""
    counts, top5s = [], []
    for first in range(10):
        ranking = [(first + step) % 10 for step in range(10)]
        state = tmp_path / f"constant{first}.pt"
        torch.save(_constant_model(ranking).state_dict(), state)
        result = CliRunner().invoke(
            app,
            ["evaluate", str(state), "--arch", RESNET8, "--arch-kwargs", '{"in_channels": 1}', "--input-shape",
             "1,1,32,32", "--limit", "50", "--json", "--data", "digits"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output + result.stderr
        report = json.loads(result.stdout)
        assert {key: report[key] for key in ("file", "kind", "data", "images")} == {
            "file": str(state),
            "kind": "model",
            "data": "digits",
            "images": 50,
        }
        assert set(report) == {"file", "kind", "data", "images", "top1", "top5"}
        counts.append(report["top1"] * 50 / 100)
        top5s.append(report["top5"])
    assert all(count == pytest.approx(round(count), abs=1e-9) for count in counts), counts
    counts = [round(count) for count in counts]
    assert sum(counts) == 50, counts
    in_split = [_test_labels().count(label) for label in range(10)]
    assert all(count <= available for count, available in zip(counts, in_split, strict=True)), (counts, in_split)
    for first, top5 in enumerate(top5s):
        assert top5 == pytest.approx(100.0 * sum(counts[(first + step) % 10] for step in range(5)) / 50, abs=1e-9)


def test_constant_model_scores_the_class_shares_as_checkpoint_and_onnx(tmp_path: Path) -> None:
    model = _constant_model()
    state = tmp_path / "constant.pt"
    torch.save(model.state_dict(), state)
    converted, plan = compress(model, torch.randn(1, 1, 32, 32))
    assert plan.converted, "the checkpoint holds versatile layers"
    checkpoint = tmp_path / "constant.vc.pt"
    base = BaseSpec(RESNET8, {"in_channels": 1}, None, str(state))
    save(checkpoint, converted, plan, base, model, CheckpointMetadata(input_shape=[1, 1, 32, 32]))
    onnx_file = tmp_path / "constant.onnx"
    exported = CliRunner().invoke(app, ["export", str(checkpoint), "-o", str(onnx_file), "--no-compare"])
    assert exported.exit_code == 0, exported.output + exported.stderr
    top1, top5, images = _known_accuracy()
    for path, kind in ((state, "model"), (checkpoint, "vconvert checkpoint"), (onnx_file, "onnx")):
        arch = {"arch": RESNET8, "arch_kwargs": {"in_channels": 1}} if kind == "model" else {}
        result = evaluate_file(path, "digits", **arch)
        assert (result.kind, result.images) == (kind, images) and images == 360
        assert result.top1 == pytest.approx(top1, abs=1e-9), kind
        assert result.top5 == pytest.approx(top5, abs=1e-9), kind


def _sample_record() -> dict:
    return json.loads((WEIGHTS / "resnet20_digits.json").read_text())


def test_shipped_sample_model_scores_its_recorded_accuracy() -> None:
    """The trained ResNet-20 on the 360 test digits: the accuracy its training run recorded (99.44%), so
    images, labels, normalisation and scoring all line up."""
    record = _sample_record()
    result = evaluate_file(
        WEIGHTS / "resnet20_digits.pt", "digits", arch=record["arch"], arch_kwargs=record["arch_kwargs"]
    )
    assert (result.kind, result.images) == ("model", record["test_images"])
    assert round(result.top1, 2) == record["test_top1"]
    assert result.top1 <= result.top5 <= 100.0


def test_onnx_export_scores_as_the_checkpoint_it_came_from(tmp_path: Path) -> None:
    """The compressed trained ResNet-20, measured in PyTorch (.vc.pt) and in onnxruntime (its export) on the
    same digits, with the preprocessing the checkpoint records: identical top-1 and top-5."""
    record = _sample_record()
    model = resnet20(**record["arch_kwargs"]).eval()
    model.load_state_dict(torch.load(WEIGHTS / "resnet20_digits.pt", weights_only=True))
    converted, plan = compress(model, torch.randn(1, 1, 32, 32))
    checkpoint = tmp_path / "r20.vc.pt"
    preprocessing = {key: record["data"][key] for key in ("mean", "std", "input_size")}
    base = BaseSpec(record["arch"], record["arch_kwargs"], None, str(WEIGHTS / "resnet20_digits.pt"))
    save(
        checkpoint,
        converted,
        plan,
        base,
        model,
        CheckpointMetadata(input_shape=[1, 1, 32, 32], preprocessing=preprocessing),
    )
    onnx_file = tmp_path / "r20.onnx"
    exported = CliRunner().invoke(app, ["export", str(checkpoint), "-o", str(onnx_file), "--compact", "--no-compare"])
    assert exported.exit_code == 0, exported.output + exported.stderr
    result = CliRunner().invoke(app, ["evaluate", str(onnx_file), "--data", "digits", "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    onnx_report = json.loads(result.stdout)
    torch_result = evaluate_file(checkpoint, "digits")
    assert onnx_report["kind"] == "onnx" and torch_result.kind == "vconvert checkpoint"
    assert onnx_report["images"] == torch_result.images == 360
    assert (onnx_report["top1"], onnx_report["top5"]) == (torch_result.top1, torch_result.top5)
    assert onnx_report["top5"] >= onnx_report["top1"] > 90.0, "a trained model, compressed without data"


def test_evaluate_bad_inputs(tmp_path: Path) -> None:
    missing = CliRunner().invoke(app, ["evaluate", str(tmp_path / "nope.onnx")])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(b"\x00\x01 not onnx")
    broken = CliRunner().invoke(app, ["evaluate", str(fake)])
    assert broken.exit_code == 2 and "not a readable ONNX file" in broken.stderr, broken.stderr


def test_evaluate_model_that_rejects_the_images_is_one_sentence(tmp_path: Path) -> None:
    state, _, _ = _files(tmp_path)  # a 1-channel model, evaluated on 3-channel images
    result = CliRunner().invoke(
        app,
        ["evaluate", str(state), "--arch", "sample_models.resnet_cifar:resnet8", "--arch-kwargs",
         '{"in_channels": 1}', "--input-shape", "1,3,32,32", "--limit", "8", "--data", "digits"],
    )  # fmt: skip
    assert result.exit_code == 2 and "rejects the evaluation images" in result.stderr, result.output + result.stderr
    assert error_message(result) and "Traceback" not in result.stderr


def test_a_small_memory_budget_evaluates_in_smaller_batches_with_the_same_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vconvert.io.budget import forward_peak_bytes

    _, checkpoint, converted = _files(tmp_path)
    full = evaluate_file(checkpoint, "digits", limit=32, batch=32)
    peak = forward_peak_bytes(converted.eval(), [8, 1, 32, 32])
    monkeypatch.setenv("VCONVERT_MEMORY_BUDGET", str(2 * peak / 1024**3))  # batch 8 fits, 16 does not
    assert evaluate_file(checkpoint, "digits", limit=32, batch=32) == full
    monkeypatch.setenv("VCONVERT_MEMORY_BUDGET", "0.002")  # the file and its check fit; one 256x256 image not
    with pytest.raises(BadInputError, match=r"^Evaluating .* 1x256x256 in batches of 1 needs"):
        evaluate_file(checkpoint, "digits", limit=32, input_shape=[1, 1, 256, 256])
