"""The restricted unpickler for torch.save(model) files and the offline builders (security issue 27).

Real models of torchvision, timm and the shipped samples must rebuild bit for bit; every pickle that
calls something torch.save never calls (a constructor, a reader, eval, a tensor-subclass rebuild with a
module class as its function), sets hooks, expands a view or claims more bytes than the file holds is
refused before anything runs or is allocated.
"""

from __future__ import annotations

import functools
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

from sample_models.resnet_cifar import resnet8
from vconvert.errors import BadInputError, UntrustedCodeError
from vconvert.io.architectures import build_arch, offline_kwargs
from vconvert.io.untrusted import BaseSpec, load_model

ZOO = {  # builder, input side
    "torchvision-resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 64),
    "torchvision-mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), 64),
    "torchvision-efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), 64),
    "timm-mobilenetv3_small_050": (lambda: timm.create_model("mobilenetv3_small_050", num_classes=10), 64),
    "timm-vit_tiny": (
        lambda: timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8),
        32,
    ),
    "sample-resnet8": (resnet8, 32),
}


def _saved(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


class _Calls:
    """An object whose pickle is "call ``function(*args)``" (pickle's REDUCE), as a hostile file writes it."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize(("build", "size"), ZOO.values(), ids=ZOO.keys())
def test_pickled_models_of_known_libraries_rebuild_exactly(build, size: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    original = build().eval()
    loaded, spec = load_model(_saved(original, tmp_path / "model.pt"))
    assert type(loaded) is type(original) and spec.pickled is not None
    expected, got = original.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    x = torch.randn(1, 3, size, size)
    assert torch.equal(original(x), loaded(x))


HOSTILE_CALLS = {
    "module-constructor": lambda marker: _Calls(nn.Linear, 30000, 30000),
    "partial-of-os-system": lambda marker: _Calls(functools.partial, os.system, f"touch {marker}"),
    "eval": lambda marker: _Calls(eval, f"open({str(marker)!r}, 'w')"),
    "tensor-subclass-rebuild-calling-a-module": lambda marker: _Calls(
        torch._tensor._rebuild_from_type_v2, nn.Linear, torch.Tensor, (30000, 30000), {}
    ),
    "timm-reader-writing-a-folder": lambda marker: _Calls(
        __import__("timm.data.readers.reader_image_in_tar", fromlist=["x"]).ReaderImageInTar, str(marker)
    ),
    "torchvision-builder-downloading": lambda marker: _Calls(torchvision.models.resnet18, "DEFAULT"),
}


@pytest.mark.parametrize("make", HOSTILE_CALLS.values(), ids=HOSTILE_CALLS.keys())
def test_a_pickle_that_calls_anything_is_refused_before_the_call(make, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = _saved({"model": make(marker)}, tmp_path / "hostile.pt")
    with pytest.raises(UntrustedCodeError, match="trust"):
        load_model(path)
    assert not marker.exists()


def test_a_module_inside_a_model_built_by_a_constructor_call_is_refused(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3))
    model._modules["bomb"] = _Calls(nn.Linear, 30000, 30000)  # type: ignore[assignment]
    with pytest.raises(UntrustedCodeError, match=r"constructor of torch\.nn\.modules\.linear\.Linear"):
        load_model(_saved(model, tmp_path / "hostile.pt"))


def test_trust_loads_a_constructor_call(tmp_path: Path) -> None:
    model, _ = load_model(_saved(_Calls(nn.Linear, 3, 4), tmp_path / "calls.pt"), trust=True)
    assert isinstance(model, nn.Linear) and model.weight.shape == (4, 3)


def test_hooks_from_a_file_are_refused(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    model._forward_hooks[0] = nn.Identity  # a callable the forward pass would call
    with pytest.raises(UntrustedCodeError, match="hooks"):
        load_model(_saved(model, tmp_path / "hooked.pt"))


def test_a_view_larger_than_its_storage_is_refused(tmp_path: Path) -> None:
    model = nn.Module()
    model.register_buffer("expanded", torch.zeros(1).expand(10**6))
    with pytest.raises(UntrustedCodeError, match="view larger"):
        load_model(_saved(model, tmp_path / "expanded.pt"))


def _rewrite_members(path: Path, change) -> None:
    with zipfile.ZipFile(path) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in members:
            change(archive, info, data)


def test_a_storage_claiming_more_than_its_record_is_refused(tmp_path: Path) -> None:
    path = _saved(nn.Linear(64, 64), tmp_path / "short.pt")
    _rewrite_members(
        path, lambda archive, info, data: archive.writestr(info, data[:8] if "/data/" in info.filename else data)
    )
    with pytest.raises(UntrustedCodeError, match="claims more bytes"):
        load_model(path)


def test_a_zip_member_that_inflates_absurdly_is_refused_before_inflating(tmp_path: Path) -> None:
    path = _saved(nn.Linear(2, 2), tmp_path / "bomb.pt")

    def add_bomb(archive: zipfile.ZipFile, info: zipfile.ZipInfo, data: bytes) -> None:
        archive.writestr(info, data)
        if info.filename.endswith("data.pkl"):
            archive.writestr(info.filename.replace("data.pkl", "data/99"), bytes(50_000_000), zipfile.ZIP_DEFLATED)

    _rewrite_members(path, add_bomb)
    assert path.stat().st_size < 200_000
    with pytest.raises(BadInputError, match="inflate"):
        load_model(path)


def test_members_larger_than_the_memory_budget_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _saved(nn.Linear(512, 512), tmp_path / "big.pt")
    monkeypatch.setenv("VCONVERT_MEMORY_BUDGET", "0.0005")  # 0.5 MB: the weight alone is 1 MB
    with pytest.raises(BadInputError, match="memory budget"):
        load_model(path)


def test_builders_never_download_their_default_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_download(*args, **kwargs):
        raise AssertionError("a builder tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    spec = "torchvision.models.segmentation:lraspp_mobilenet_v3_large"
    with torch.device("meta"):
        model = build_arch(spec, {}, trust=False, typed_by_user=False, origin="a.vc.pt")
    assert isinstance(model, nn.Module)
    builder = torchvision.models.segmentation.lraspp_mobilenet_v3_large
    assert offline_kwargs(builder, {}) == {"weights": None, "weights_backbone": None}
    get_model = offline_kwargs(torchvision.models.get_model, {"name": "fasterrcnn_resnet50_fpn"})
    assert get_model["weights_backbone"] is None
    assert offline_kwargs(timm.create_model, {"model_name": "resnet18"})["pretrained"] is False


def test_a_typed_download_argument_needs_trust() -> None:
    with pytest.raises(UntrustedCodeError, match="downloads weights"):
        build_arch("torchvision.models:resnet18", {"weights": "DEFAULT"}, trust=False, typed_by_user=True, origin=None)


def test_arch_kwargs_nested_deeper_than_the_limit_are_refused_without_recursion_error() -> None:
    nested: dict = {}
    inner = nested
    for _ in range(5000):
        inner["a"] = {}
        inner = inner["a"]
    with pytest.raises(BadInputError, match="malformed"):
        BaseSpec.from_dict({"arch": "sample_models.resnet_cifar:resnet8", "arch_kwargs": nested, "pickled": None})


def test_a_fifo_given_as_model_file_is_refused_without_opening_it(tmp_path: Path) -> None:
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    with pytest.raises(BadInputError, match="not a regular file"):
        load_model(fifo)


def test_state_dicts_still_load_with_torch_weights_only(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(resnet8().state_dict(), buffer)
    (tmp_path / "w.pt").write_bytes(buffer.getvalue())
    model, spec = load_model(tmp_path / "w.pt", arch="sample_models.resnet_cifar:resnet8")
    assert spec.arch == "sample_models.resnet_cifar:resnet8" and isinstance(model, nn.Module)


MYNET = """import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.conv2(self.conv(x)).mean((2, 3)))
"""


def _vconvert(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """The installed CLI run in ``folder`` as a user runs it (a fresh interpreter, no PYTHONPATH)."""
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    command = [str(Path(sys.executable).with_name("vconvert")), *args]
    return subprocess.run(command, cwd=folder, env=environment, capture_output=True, text=True, timeout=600)


def test_trust_imports_a_pickled_models_class_from_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "mynet.py").write_text(MYNET)
    save = "import torch, mynet; torch.save(mynet.Net(), 'mynet_full.pt')"
    subprocess.run([sys.executable, "-c", save], cwd=tmp_path, check=True, env={**os.environ, "PYTHONPATH": "."})
    refused = _vconvert(tmp_path, "inspect", "mynet_full.pt")
    assert refused.returncode == 2 and "mynet.Net" in refused.stderr and "--trust" in refused.stderr
    trusted = _vconvert(tmp_path, "inspect", "mynet_full.pt", "--trust", "--input-shape", "1,3,16,16")
    assert trusted.returncode == 0, trusted.stderr


def test_a_class_defined_in_the_saving_script_is_explained_in_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(MYNET + "\ntorch.save(Net(), 'net.pt')\n")
    subprocess.run([sys.executable, "train.py"], cwd=tmp_path, check=True)
    result = _vconvert(tmp_path, "inspect", "net.pt", "--trust", "--input-shape", "1,3,16,16")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "defined in the script that saved it" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("command", ["inspect", "export", "finetune"])
def test_an_onnx_file_given_for_a_checkpoint_says_so(command: str, tmp_path: Path) -> None:
    from conftest import assert_one_sentence_error, invoke

    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"\x08\x07\x12\x07pytorch")  # the start of a serialised ModelProto
    result = invoke(command, onnx_file, *([] if command == "inspect" else ["-o", tmp_path / f"out.{command}"]))
    assert_one_sentence_error(result, 2, "looks like an ONNX file", ".vc.pt")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx"]
