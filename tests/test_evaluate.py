"""`vconvert evaluate`: accuracy measured on the artifact itself."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import error_message
from typer.testing import CliRunner

from sample_models.resnet_cifar import resnet8
from vconvert import compress, save
from vconvert.cli import app
from vconvert.data import open_split
from vconvert.evaluate import evaluate_file
from vconvert.finetune import evaluate_model
from vconvert.io import BaseSpec


def _files(tmp_path: Path) -> tuple[Path, Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = resnet8(in_channels=1).eval()
    state = tmp_path / "plain.pt"
    torch.save(model.state_dict(), state)
    converted, plan = compress(model, torch.randn(1, 1, 32, 32))
    base = BaseSpec("sample_models.resnet_cifar:resnet8", {"in_channels": 1}, None, str(state))
    checkpoint = tmp_path / "m.vc.pt"
    save(checkpoint, converted, plan, base, model, {"input_shape": [1, 1, 32, 32]})
    return state, checkpoint, converted


def test_evaluate_checkpoint_equals_direct_measurement(tmp_path: Path) -> None:
    _, checkpoint, converted = _files(tmp_path)
    dataset, _, _ = open_split("digits", False)
    top1, top5, images = evaluate_model(converted, dataset, torch.device("cpu"), workers=0)
    result = evaluate_file(checkpoint, "digits")
    assert (result.top1, result.top5, result.images) == (top1, top5, images) and images == 360
    assert result.kind == "vconvert checkpoint"


def test_evaluate_cli_on_plain_model_and_limit(tmp_path: Path) -> None:
    state, _, _ = _files(tmp_path)
    result = CliRunner().invoke(
        app,
        ["evaluate", str(state), "--arch", "sample_models.resnet_cifar:resnet8", "--arch-kwargs",
         '{"in_channels": 1}', "--input-shape", "1,1,32,32", "--limit", "50", "--json", "--data", "digits"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == 50 and report["kind"] == "model" and 0.0 <= report["top1"] <= 100.0


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
