"""Export: BN folding, the compact encoding, ring convs, and onnxruntime parity on real torchvision networks.

Each network is exported once (torch.onnx's exporter dominates the cost: ~10 s for resnet18, ~40 s for
densenet121 on 2 cores) with every applicable mode cycled through its layers, and that one export is
checked dense and compact at batch 1 and 4, at the smallest input the network accepts (32x32).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision.models as tvm
from torch import nn

from vconvert import VersatileConv2d, fold_model
from vconvert import load as vconvert_load
from vconvert.convert.compress import compress
from vconvert.convert.report import count_macs, model_stored_bits
from vconvert.errors import BadInputError, CheckFailedError
from vconvert.export.compact import decode_layer, encode_layer, pack_bits, unpack_bits
from vconvert.export.fold import find_conv_bn_pairs, prepare_for_export
from vconvert.export.onnx_file import OPSET, to_onnx
from vconvert.export.pipeline import export
from vconvert.export.ring import RingConv2d, crop_per_output, numeric_padding, ring_convs
from vconvert.export.verify import ort_session
from vconvert.fit.initialise import from_conv

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
        layer = from_conv(conv, init="naive", **options)
        if layer.mask_proxy is not None:
            with torch.no_grad():
                on = torch.rand(layer.mask_proxy.shape, generator=generator) < 0.7
                layer.mask_proxy.copy_(torch.where(on, 0.75, 0.25))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        used.add(options["mode"] + ("/shared" if options.get("mask_sharing") == "shared" else ""))
    return model.eval(), used


def small_vgg_head(model: nn.Module) -> nn.Module:
    """vgg's 25088→4096→4096 classifier (120M weights, no conv) at width 512→256→256: same layer types,
    a fraction of the export time. At 32x32 input its features end at 1x1, so pool to 1x1."""
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier[0], model.classifier[3], model.classifier[6] = (
        nn.Linear(512, 256),
        nn.Linear(256, 256),
        nn.Linear(256, 1000),
    )
    return model


@dataclass(frozen=True)
class Arch:
    name: str
    size: int = 32
    modes: int = 5  # how many of MODES apply somewhere in it

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        model = getattr(tvm, self.name)(weights=None)
        return (small_vgg_head(model) if self.name.startswith("vgg") else model).eval()


ARCHS = [
    Arch("resnet18"),
    Arch("mobilenet_v2", modes=3),  # 1x1 convs only outside the stem: no spatial modes
    Arch("efficientnet_b0", modes=3),
    Arch("densenet121"),
    Arch("vgg11_bn"),
    Arch("regnet_y_400mf", modes=3),  # its 3x3 convs are grouped: only 1x1 convs convert
    Arch("convnext_tiny", modes=3),  # 2x2 downsampling convs only: no spatial modes
]
SLOW = {"densenet121", "convnext_tiny", "efficientnet_b0", "regnet_y_400mf", "mobilenet_v2"}


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


def spatial_resnet18() -> nn.Module:
    """torchvision resnet18 compressed in spatial mode (naive init), perturbed BN statistics, and two of its
    convs swapped for other modes: one spatial+channel (ringed too) and one learned (folded densely)."""
    torch.manual_seed(0)
    base = tvm.resnet18(weights=None).eval()
    for module in base.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    model, _ = compress(base, torch.randn(1, 3, 32, 32), mode="spatial", init="naive")
    for name, options in (("layer1.0.conv1", {"mode": "spatial+channel"}), ("layer2.0.conv2", {"mode": "learned"})):
        conv = fold_model(model.get_submodule(name))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, from_conv(conv, init="naive", **options).eval())
    return model.eval()


def test_ring_export_parity_fewer_macs_and_file_format(tmp_path: Path) -> None:
    model = spatial_resnet18()
    output = tmp_path / "ring.onnx"
    preprocessing = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "input_size": [32, 32]}
    metadata = {"vconvert.preprocessing": preprocessing}
    report = export(model, output, input_shape=[1, 3, 32, 32], ring=True, measure=False, metadata=metadata)

    spatial = [n for n, m in model.named_modules() if isinstance(m, VersatileConv2d) and m.mode.startswith("spatial")]
    assert sorted(report.graph["ring"]) == sorted(spatial) and "layer2.0.conv2" not in spatial
    assert "one cropped conv per ring size" in report.graph_note
    assert report.parity["batches"] == [1, 4] and report.parity["top1_agree"]
    assert report.parity["max_abs_diff"] <= 1e-4 * report.parity["output_scale"]
    x = torch.randn(1, 3, 32, 32)
    dense_macs = count_macs(fold_model(model), x)
    assert report.table[0]["macs"] < 0.75 * dense_macs, (report.table[0]["macs"], dense_macs)

    # the file on disk, checked independently: one file, opset, names, dynamic batch, metadata, the ring ops
    assert [p.name for p in tmp_path.iterdir()] == [output.name], "one file, no .onnx.data sidecar"
    proto = onnx.load(str(output))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == OPSET >= 17
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["output"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["vconvert.format"] == "ring" and json.loads(props["vconvert.preprocessing"]) == preprocessing
    ops = [n.op_type for n in proto.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Gather") >= len(spatial)
    kernels = {
        tuple(a.ints) for n in proto.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "kernel_shape"
    }
    assert {(1, 1), (3, 3)} <= kernels
    session = ort_session(str(output))
    for batch in (1, 4, 7):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = fold_model(model)(x)
        got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
        assert torch.equal(got.argmax(1), expected.argmax(1))


def test_ring_export_refuses_what_it_cannot_honour(tmp_path: Path) -> None:
    spatial = nn.Sequential(VersatileConv2d(3, 8, 3, padding=1, mode="spatial")).eval()
    with pytest.raises(BadInputError, match="`ring=True` cannot be combined with `compact=True`"):
        export(spatial, tmp_path / "m.onnx", input_shape=[1, 3, 8, 8], ring=True, compact=True)
    learned = nn.Sequential(VersatileConv2d(3, 8, 3, padding=1, mode="learned")).eval()
    with pytest.raises(BadInputError, match="spatial mode and this model has none"):
        export(learned, tmp_path / "m.onnx", input_shape=[1, 3, 8, 8], ring=True)
    unpadded = nn.Sequential(VersatileConv2d(3, 8, 3, padding=0, mode="spatial")).eval()
    with pytest.raises(BadInputError, match="padding allows no crop"):
        export(unpadded, tmp_path / "m.onnx", input_shape=[1, 3, 8, 8], ring=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("geometry", "kernels"),
    [
        ({"kernel_size": 3, "padding": 1}, [(1, 1), (3, 3)]),
        ({"kernel_size": 5, "padding": 2, "stride": 2, "bias": False}, [(1, 1), (3, 3), (5, 5)]),
        ({"kernel_size": 5, "padding": 1}, [(3, 3), (5, 5)]),  # the padding allows one crop: the 1x1 slot runs 3x3
        ({"kernel_size": 3, "padding": 2, "dilation": 2}, [(1, 1), (3, 3)]),
        ({"kernel_size": (5, 3), "padding": (2, 1), "stride": (1, 2)}, [(3, 1), (5, 3)]),
        ({"kernel_size": 3, "padding": "same"}, [(1, 1), (3, 3)]),
    ],
    ids=["3x3", "5x5-stride2-nobias", "5x5-pad1", "dilation2", "5x3", "same"],
)
def test_ring_conv_computes_the_dense_conv(geometry: dict, kernels: list) -> None:
    torch.manual_seed(0)
    layer = VersatileConv2d(6, 12, mode="spatial", **geometry).eval()
    dense = layer.fold()
    padding = numeric_padding(dense)
    assert padding is not None
    ring = RingConv2d(dense, crop_per_output(layer.secondary_index % layer.spatial_masks, padding, dense.dilation))
    x = torch.randn(2, 6, 11, 9)  # odd, non-square
    with torch.no_grad():
        assert torch.allclose(ring.eval()(x), dense(x), atol=1e-5)
    assert sorted(conv.kernel_size for conv in ring.convs) == kernels
    assert count_macs(ring, x) < count_macs(dense, x)


def test_ring_conv_refuses_weights_outside_the_ring() -> None:
    layer = VersatileConv2d(4, 8, 3, padding=1, mode="spatial").eval()
    dense = layer.fold()
    with torch.no_grad():
        dense.weight[1, 0, 0, 0] = 1.0  # output 1 is a 1x1-slot output: its border must be zero
    with pytest.raises(CheckFailedError, match="outside the ring"):
        RingConv2d(dense, layer.secondary_index % 2)


def test_ring_convs_leave_other_layers_dense() -> None:
    model = nn.Sequential(
        VersatileConv2d(3, 8, 3, padding=1, mode="spatial"),
        VersatileConv2d(8, 8, 3, padding=0, mode="spatial"),
        VersatileConv2d(8, 8, 3, padding=1, mode="learned"),
    ).eval()
    folded = fold_model(model)
    result = ring_convs(folded, dict(model.named_children()))
    assert result.ringed == ["0"] and list(result.left_dense) == ["1"]
    assert isinstance(folded[0], RingConv2d) and type(folded[1]) is nn.Conv2d and type(folded[2]) is nn.Conv2d


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
    layer = from_conv(conv, init="naive", **options).eval()
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
    model.head = from_conv(model.head, init="naive").eval()
    output = tmp_path / "bad.onnx"
    with pytest.raises(CheckFailedError, match=r"max abs difference 0\.01") as caught:
        export(model, output, input_shape=[1, 3, 16, 16])
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == [], "no file under the requested name, no temp file"


def test_value_dependent_control_flow_falls_back_to_the_tracer_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import invoke, write_user_package

    body = "y = self.b(self.a(x)).mean((2, 3)); return y if x.mean() > -10 else -y"
    tiny_net = write_user_package(tmp_path, monkeypatch, "branchpkg", body)
    torch.manual_seed(0)
    torch.save(tiny_net().eval(), tmp_path / "tiny.pt")
    checkpoint = tmp_path / "tiny.vc.pt"
    compressed = invoke("compress", tmp_path / "tiny.pt", "--input-shape", "1,3,8,8", "-o", checkpoint, "--trust")
    assert compressed.exit_code == 0, compressed.stderr
    output = tmp_path / "tiny.onnx"
    result = invoke("export", checkpoint, "-o", output, "--trust")
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "TorchScript tracer" in warnings[0] and "branch" in warnings[0], result.stderr
    assert "GraphModule" not in result.output + result.stderr  # no exporter dump
    session = ort_session(output)
    x = torch.randn(2, 3, 8, 8)
    folded = fold_model(vconvert_load(checkpoint, trust=True))
    expected = folded(x).detach().numpy()
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, rtol=1e-4, atol=1e-5)


def test_the_runtime_is_warmed_before_a_session_start_is_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime's one-time set-up must not be billed to the first file timed (the export table's "session
    start" of the dense fold looked 10x the original's): a tiny session starts first, once per process."""
    import vconvert.export.verify as verify

    started: list[int] = []
    real = verify.ort_session

    def counted(model, *args, **kwargs):
        started.append(len(model))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(verify, "ort_session", counted)
    verify.warm_runtime.cache_clear()
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    data = to_onnx(model, torch.randn(1, 3, 8, 8)).SerializeToString()
    verify.start_session(data)
    verify.start_session(data)
    assert len(started) == 3 and started[0] < 200 and started[1:] == [len(data), len(data)]
