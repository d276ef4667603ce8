"""Deployable files carry no trace of the exporting machine: no absolute paths, stack traces or source text."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest
import torch
from conftest import write_user_package
from typer.testing import CliRunner

import vconvert
from vconvert.cli.app import app

FORMS = {
    "dense": [],
    "dense-no-bn-fold": ["--no-fold-bn"],
    "compact": ["--compact"],
    "ring": ["--ring"],
}


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def user_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A spatial-mode .vc.pt of a model defined in the user's own source folder (an absolute tmp path)."""
    folder = tmp_path_factory.mktemp("user_source_folder")
    monkeypatch = pytest.MonkeyPatch()
    try:
        net = write_user_package(folder, monkeypatch, "tracepkg", "return self.b(torch.relu(self.a(x)))")
        torch.manual_seed(0)
        weights = folder / "net.pt"
        torch.save(net().state_dict(), weights)
        output = folder / "net.vc.pt"
        result = invoke(
            "compress", weights, "--arch", "tracepkg.nets:TinyNet", "--input-shape", "1,3,16,16",
            "--mode", "spatial", "--convert-first", "--min-params", "0", "--init", "naive", "-o", output,
        )  # fmt: skip
        assert result.exit_code == 0, result.output + result.stderr
        yield folder, output
    finally:
        monkeypatch.undo()


def machine_paths(*extra: Path) -> list[str]:
    """Absolute paths of this machine that an exported file could leak."""
    paths = {
        str(Path.cwd()),
        sys.prefix,
        str(Path(vconvert.__file__).resolve().parent),
        str(Path(torch.__file__).resolve().parent),
        str(Path(onnx.__file__).resolve().parent),
        *(str(path) for path in extra),
    }
    return sorted(path for path in paths if len(path) > 1)


@pytest.mark.parametrize("options", FORMS.values(), ids=FORMS.keys())
def test_exported_file_has_no_trace_of_the_machine(
    user_checkpoint: tuple[Path, Path], options: list[str], tmp_path: Path
) -> None:
    source_folder, checkpoint = user_checkpoint
    output = tmp_path / "model.onnx"
    result = invoke("export", checkpoint, "-o", output, "--no-compare", "--trust", *options)
    assert result.exit_code == 0, result.output + result.stderr
    data = output.read_bytes()
    for path in machine_paths(source_folder, tmp_path):
        assert path.encode() not in data, f"{path} is in the exported file"
    for text in (b"tracepkg", b"Traceback", b"site-packages", b"torch.nn.modules", b"aten."):
        assert text not in data, text
    model = onnx.load_from_string(data)
    assert all(not node.metadata_props and not node.doc_string for node in model.graph.node)
    assert not model.graph.value_info and not model.doc_string
    assert not model.graph.metadata_props, "torch.export's graph signature (a line per parameter) is stripped"
    assert {prop.key.split(".")[0] for prop in model.metadata_props} == {"vconvert"}
