"""Export: BN folding, the compact encoding, and onnxruntime parity on real torchvision networks."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision.models as tvm
from torch import nn

from vconvert import VersatileConv2d, fold_model
from vconvert.errors import BadInputError, CheckFailedError
from vconvert.export import OPSET, export, find_conv_bn_pairs, ort_session, prepare_for_export
from vconvert.onnx_compact import decode_layer, encode_layer, pack_bits, unpack_bits
from vconvert.report import model_stored_bits

MODES = [
    {"mode": "learned", "secondary": 2},
    {"mode": "spatial"},
    {"mode": "channel", "secondary": 2},
    {"mode": "spatial+channel", "secondary": 2},
    {"mode": "learned", "secondary": 3, "mask_sharing": "shared", "scale": False},
]


def _applies(options: dict, conv: nn.Conv2d) -> bool:
    if options["mode"].startswith("spatial") and min(conv.kernel_size) < 3:
        return False
    if "channel" in options["mode"] and conv.in_channels < 4:
        return False
    return True


def versatile_everywhere(model: nn.Module, seed: int = 0) -> tuple[nn.Module, set[str]]:
    """Every groups=1 Conv2d but the stem becomes versatile, cycling through the modes that apply to it.

    Naive init (fit quality does not matter for parity), then random binary masks so that every mask
    row differs, and perturbed BN statistics so that BN folding is not a no-op.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
    convs = [(n, m) for n, m in model.named_modules() if type(m) is nn.Conv2d and m.groups == 1][1:]
    cycle = itertools.cycle(MODES)
    used = set()
    for name, conv in convs:
        options = next(o for o in (next(cycle) for _ in range(len(MODES))) if _applies(o, conv))
        layer = VersatileConv2d.from_conv(conv, init="naive", **options)
        if layer.mask_proxy is not None:
            with torch.no_grad():
                on = torch.rand(layer.mask_proxy.shape, generator=generator) < 0.7
                layer.mask_proxy.copy_(torch.where(on, 0.75, 0.25))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        used.add(options["mode"] + ("/shared" if options.get("mask_sharing") == "shared" else ""))
    return model.eval(), used


@dataclass(frozen=True)
class Arch:
    name: str
    size: int = 64
    modes: int = 5  # how many of MODES apply somewhere in it

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        return getattr(tvm, self.name)(weights=None).eval()


ARCHS = [
    Arch("resnet18"),
    Arch("mobilenet_v2", modes=3),  # 1x1 convs only outside the stem: no spatial modes
    Arch("efficientnet_b0", modes=3),
    Arch("densenet121"),
    Arch("vgg11_bn", size=32),
    Arch("regnet_y_400mf", modes=3),  # its 3x3 convs are grouped: only 1x1 convs convert
    Arch("convnext_tiny", modes=3),  # 2x2 downsampling convs only: no spatial modes
]
SLOW = {"densenet121", "convnext_tiny", "efficientnet_b0", "regnet_y_400mf"}


@pytest.mark.parametrize(
    "arch", [pytest.param(a, marks=[pytest.mark.slow] if a.name in SLOW else []) for a in ARCHS], ids=lambda a: a.name
)
def test_onnxruntime_parity_dense_and_compact(arch: Arch, tmp_path: Path) -> None:
    model, used = versatile_everywhere(arch.build())
    assert len(used) == arch.modes, used
    output = tmp_path / f"{arch.name}.onnx"
    report = export(model, output, input_shape=[1, 3, arch.size, arch.size], compact=True, measure=False)

    # export() verified both files against the folded PyTorch model at batch 1 and 4 (it raises otherwise)
    assert report.parity["batches"] == [1, 4] and report.parity["top1_agree"]
    assert report.parity["max_abs_diff"] <= 1e-4 * report.parity["output_scale"]
    assert report.compact_vs_dense_max_abs_diff is not None and report.compact_vs_dense_max_abs_diff <= 1e-6
    # check independently here too, on a fresh input, from the file on disk
    assert [p.name for p in tmp_path.iterdir()] == [output.name], "one file, no .onnx.data sidecar"
    session = ort_session(str(output))
    x = torch.randn(4, 3, arch.size, arch.size)
    with torch.no_grad():
        expected = fold_model(model)(x)
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert torch.equal(got.argmax(1), expected.argmax(1))

    dense_bytes = next(r["file_bytes"] for r in report.table if r["model"] == "dense fold")
    ratio = model_stored_bits(arch.build()) / model_stored_bits(model)
    assert report.file_bytes <= 1.05 * dense_bytes / ratio, (report.file_bytes, dense_bytes / ratio)


def test_written_file_has_opset_dynamic_batch_names_and_metadata(tmp_path: Path) -> None:
    model, _ = versatile_everywhere(tvm.resnet18(weights=None).eval())
    output = tmp_path / "m.onnx"
    preprocessing = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "input_size": [64, 64]}
    export(model, output, input_shape=[1, 3, 64, 64], measure=False, metadata={"vconvert.preprocessing": preprocessing})
    proto = onnx.load(str(output))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == OPSET >= 17
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["output"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["vconvert.format"] == "dense"
    import json

    assert json.loads(props["vconvert.preprocessing"]) == preprocessing
    assert "BatchNormalization" not in {n.op_type for n in proto.graph.node}
    session = ort_session(str(output))
    assert session.run(None, {"input": np.zeros((7, 3, 64, 64), np.float32)})[0].shape == (7, 1000)


# --------------------------------------------------------------------------- BN folding
class TwoUsers(nn.Module):
    """conv_a → bn_a is fusable; conv_b's output is read twice, so bn_b must stay; bn_c has no conv."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_c = nn.BatchNorm2d(3)
        self.conv_a, self.bn_a = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv_b, self.bn_b = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_b(self.bn_a(self.conv_a(self.bn_c(x))))
        return self.bn_b(y) + y


class Untraceable(TwoUsers):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.mean()) > 100:  # data-dependent control flow: torch.fx cannot trace this
            return x
        return super().forward(x)


def _randomise_bn(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 2)
    return model.eval()


def test_conv_bn_pairs_from_fx_respect_other_users() -> None:
    model = _randomise_bn(TwoUsers())
    pairs, how = find_conv_bn_pairs(model, torch.randn(1, 3, 8, 8))
    assert how == "fx" and pairs == [("conv_a", "bn_a")]


def test_untraceable_model_falls_back_to_hooks_and_checks_the_fold(tmp_path: Path) -> None:
    model = _randomise_bn(Untraceable())
    x = torch.randn(2, 3, 8, 8)
    folded, result = prepare_for_export(model, x)
    assert result.found_with == "hooks" and "hooks" in result.note
    # hooks cannot see that conv_b's output has two readers, so they pair it; the numeric check catches that
    assert result.bn_folded == [] and "no BN was fused" in result.note
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)


def test_bn_fold_matches_and_removes_batchnorm_nodes() -> None:
    model = _randomise_bn(TwoUsers())
    x = torch.randn(2, 3, 8, 8)
    folded, result = prepare_for_export(model, x)
    assert result.bn_folded == [("conv_a", "bn_a")] and sorted(result.bn_left) == ["bn_b", "bn_c"]
    assert isinstance(folded.bn_a, nn.Identity) and "fused 1 BatchNorm2d" in result.describe()
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)
    unfused, kept = prepare_for_export(model, x, fold_bn=False)
    assert kept.bn_folded == [] and isinstance(unfused.bn_a, nn.BatchNorm2d)


# --------------------------------------------------------------------------- compact encoding (pure)
def test_pack_bits_round_trip() -> None:
    bits = (torch.rand(1001) < 0.5).numpy().astype(np.uint8)
    packed = pack_bits(bits)
    assert packed.dtype == np.uint8 and packed.size == 126
    assert np.array_equal(unpack_bits(packed, 1001), bits)


@pytest.mark.parametrize("options", MODES, ids=lambda o: o["mode"] + ("-shared" if "mask_sharing" in o else ""))
def test_encoding_rebuilds_the_folded_weight_bit_exactly(options: dict) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 24, 5, padding=2, bias=True)
    layer = VersatileConv2d.from_conv(conv, init="naive", **options).eval()
    if layer.mask_proxy is not None:
        with torch.no_grad():
            layer.mask_proxy.uniform_()
    bn_scale = torch.rand(24) + 0.5
    encoded = encode_layer(layer, bn_scale)
    with torch.no_grad():
        expected = layer.fold().weight * bn_scale.view(-1, 1, 1, 1)
    assert np.array_equal(decode_layer(encoded), expected.numpy())
    if options["mode"].startswith("spatial"):
        assert encoded.mask_shape is not None and encoded.mask_shape[0] == 3, "three nested 5x5 masks, stored once"
    dense_bytes = expected.numel() * 4
    assert encoded.nbytes() < 0.75 * dense_bytes


# --------------------------------------------------------------------------- failures
def test_model_in_train_mode_is_refused(tmp_path: Path) -> None:
    model, _ = versatile_everywhere(_randomise_bn(TwoUsers()))
    with pytest.raises(BadInputError, match="train mode"):
        export(model.train(), tmp_path / "m.onnx", input_shape=[1, 3, 8, 8])
    assert list(tmp_path.iterdir()) == []


class ExportsDifferently(nn.Module):
    """Adds 0.01 only while torch.onnx exports it: the ONNX file really disagrees with PyTorch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.conv(x)).mean((2, 3))
        return y + 0.01 if torch.compiler.is_exporting() else y


def test_parity_failure_says_how_much_and_writes_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ExportsDifferently().eval()
    model.head = VersatileConv2d.from_conv(model.head, init="naive").eval()
    output = tmp_path / "bad.onnx"
    with pytest.raises(CheckFailedError, match=r"max abs difference 0\.01") as caught:
        export(model, output, input_shape=[1, 3, 16, 16])
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == [], "no file under the requested name, no temp file"
