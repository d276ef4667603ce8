"""`vconvert export` end to end: the table, --json, --compact, --ring, and each failure it must handle."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from conftest import assert_one_sentence_error, compress_resnet8, write_user_package
from typer.testing import CliRunner

from vconvert.cli.app import app

ARCH = "sample_models.resnet_cifar:resnet8"
SHAPE = "2,3,32,32"


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet8 converted in the default (learned) mode."""
    return compress_resnet8(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def spatial_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet8 converted in spatial mode (nested masks)."""
    return compress_resnet8(tmp_path_factory.mktemp("spatial"), "--mode", "spatial")


def test_export_prints_the_table_and_writes_one_verified_file(checkpoint: Path, tmp_path: Path) -> None:
    output = tmp_path / "model.onnx"
    result = invoke("export", checkpoint, "-o", output)
    assert result.exit_code == 0, result.output + result.stderr
    text = " ".join(result.output.split())
    for fragment in ("original", "exported", "stored parameters", "MACs", "latency", "fused", "top-1 identical"):
        assert fragment in text, text
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    props = {p.key: p.value for p in onnx.load(str(output)).metadata_props}
    assert json.loads(props["vconvert.preprocessing"])["input_size"] == [32, 32]


def test_export_compact_json(checkpoint: Path, tmp_path: Path) -> None:
    compact = tmp_path / "compact.onnx"
    result = invoke("export", checkpoint, "-o", compact, "--compact", "--json", "--no-fold-bn", "--no-compare")
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.stdout)
    assert report["compact"] and report["compact_vs_dense_max_abs_diff"] <= 1e-6
    rows = {row["model"]: row for row in report["table"]}
    assert report["graph"]["bn_folded"] == [] and compact.stat().st_size == rows["exported"]["file_bytes"]
    assert rows["exported"]["file_bytes"] < rows["dense fold"]["file_bytes"]  # measured side by side in the run
    ops = {node.op_type for node in onnx.load(str(compact)).graph.node}
    assert {"BitShift", "BitwiseAnd", "Gather", "BatchNormalization"} <= ops


def test_export_ring_json(spatial_checkpoint: Path, tmp_path: Path) -> None:
    output = tmp_path / "ring.onnx"
    result = invoke("export", spatial_checkpoint, "-o", output, "--ring", "--json")
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.stdout)
    rows = {row["model"]: row for row in report["table"]}
    assert (
        report["graph"]["ring"] and report["parity"]["top1_agree"] and report["metadata"]["vconvert.format"] == "ring"
    )
    assert rows["exported"]["macs"] < 0.75 * rows["original"]["macs"]
    assert [p.name for p in tmp_path.iterdir()] == ["ring.onnx"]


@pytest.mark.parametrize("case", ["with-compact", "no-spatial-layer"])
def test_ring_it_cannot_honour_exits_2(case: str, checkpoint: Path, spatial_checkpoint: Path, tmp_path: Path) -> None:
    output = tmp_path / "ring.onnx"
    if case == "with-compact":
        result = invoke("export", spatial_checkpoint, "-o", output, "--ring", "--compact")
        assert_one_sentence_error(result, 2, "--ring cannot be combined with --compact")
    else:
        result = invoke("export", checkpoint, "-o", output, "--ring")
        assert_one_sentence_error(result, 2, "spatial mode", "learned", "without --ring")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["missing-folder", "parent-is-a-file", "output-is-a-directory", "overwrite-input"])
def test_unwritable_output(case: str, checkpoint: Path, tmp_path: Path) -> None:
    output = {
        "missing-folder": tmp_path / "no" / "such" / "m.onnx",
        "parent-is-a-file": tmp_path / "file.txt" / "m.onnx",
        "output-is-a-directory": tmp_path,
        "overwrite-input": checkpoint,
    }[case]
    (tmp_path / "file.txt").write_text("x")
    before = checkpoint.read_bytes()
    result = invoke("export", checkpoint, "-o", output)
    assert_one_sentence_error(result, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
    assert checkpoint.read_bytes() == before


def _user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, body: str):
    """A user package ``name`` (each test its own: Python caches imported modules) holding TinyNet."""
    tiny_net = write_user_package(tmp_path, monkeypatch, name, body)

    torch.manual_seed(0)
    model_file = tmp_path / "tiny.pt"
    torch.save(tiny_net().eval(), model_file)
    checkpoint = tmp_path / "tiny.vc.pt"
    result = invoke("compress", model_file, "--input-shape", "1,3,8,8", "-o", checkpoint, "--trust", "--init", "naive")
    assert result.exit_code == 0, result.output + result.stderr
    return checkpoint


def test_checkpoint_whose_base_needs_trust(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = _user_package(tmp_path, monkeypatch, "trustpkg", "return self.b(self.a(x)).mean((2, 3))")
    output = tmp_path / "tiny.onnx"
    refused = invoke("export", checkpoint, "-o", output)
    assert_one_sentence_error(refused, 2, "--trust", "trustpkg.nets.TinyNet")
    assert not output.exists()
    trusted = invoke("export", checkpoint, "-o", output, "--trust", "--compact")
    assert trusted.exit_code == 0, trusted.output + trusted.stderr
    assert output.exists()


def test_parity_failure_exits_1_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = "y = self.b(self.a(x)).mean((2, 3)); return y + 0.5 if torch.compiler.is_exporting() else y"
    checkpoint = _user_package(tmp_path, monkeypatch, "paritypkg", body)
    before = {p.name for p in tmp_path.iterdir()}
    output = tmp_path / "tiny.onnx"
    result = invoke("export", checkpoint, "-o", output, "--trust")
    assert_one_sentence_error(result, 1, "max abs difference 0.5", "nothing was written")
    assert {p.name for p in tmp_path.iterdir()} == before
