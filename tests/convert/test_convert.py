"""The compress pass on real torchvision architectures and on the awkward cases a pass must survive."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
from torch import fx, nn

from vconvert import VersatileConv2d, fold_model, load, save
from vconvert.convert.compress import compress
from vconvert.convert.plan import ConversionPlan, apply_plan
from vconvert.convert.report import model_stored_bits
from vconvert.convert.select import ladder_floor
from vconvert.errors import BadInputError
from vconvert.io.metadata import CheckpointMetadata
from vconvert.io.untrusted import BaseSpec


@dataclass(frozen=True)
class Arch:
    name: str
    size: int = 64
    converts: bool = True  # False: "nothing much to convert" controls

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        return getattr(tvm, self.name)(weights=None).eval()


ARCHS = [
    Arch("resnet18"),
    Arch("resnet50"),
    Arch("resnext50_32x4d"),
    Arch("wide_resnet50_2"),
    Arch("vgg11_bn", 32),
    Arch("mobilenet_v2"),
    Arch("mobilenet_v3_large"),
    Arch("efficientnet_b0"),
    Arch("efficientnet_v2_s"),
    Arch("densenet121"),
    Arch("regnet_y_400mf"),
    Arch("convnext_tiny"),
    Arch("shufflenet_v2_x1_0"),
    Arch("squeezenet1_1"),
    Arch("googlenet"),
    Arch("inception_v3", 96),
    Arch("mnasnet1_0"),
    Arch("alexnet"),
    Arch("vit_b_16", 224, converts=False),
    Arch("swin_t", 64, converts=False),
]
HEAVY = {"resnet50", "resnext50_32x4d", "wide_resnet50_2", "efficientnet_v2_s", "densenet121", "vit_b_16"}


def _close(actual: torch.Tensor, expected: torch.Tensor, relative: float) -> bool:
    scale = expected.abs().max().clamp_min(1e-6)
    return bool((actual - expected).abs().max() <= relative * scale)


@pytest.mark.parametrize(
    "arch",
    [pytest.param(a, id=a.name, marks=[pytest.mark.slow] if a.name in HEAVY else []) for a in ARCHS],
)
def test_torchvision_architecture_converts_folds_and_round_trips(arch: Arch, tmp_path: Path) -> None:
    model = arch.build()
    example = torch.randn(1, 3, arch.size, arch.size)
    reference = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    converted, plan = compress(model, example)

    assert plan.traced_with == "fx"
    assert type(converted) is type(model) and not isinstance(converted, fx.GraphModule)
    assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items()), "input model was modified"
    assert not any(isinstance(m, VersatileConv2d) for m in model.modules())
    layers = dict(converted.named_modules())
    for decision in plan.layers:
        assert isinstance(layers[decision.name], VersatileConv2d) == decision.converted, decision.name
    assert model_stored_bits(converted) == plan.model_stored_bits

    if arch.converts:
        assert len(plan.converted) >= 3
        assert plan.ratio > 1.0 and model_stored_bits(converted) < model_stored_bits(model)
        assert all(d.fit_error is not None and d.fit_error < 1.0 for d in plan.converted)
    else:
        assert len(plan.converted) == 0 and plan.ratio == 1.0

    with torch.no_grad():
        expected = converted(example)
        assert _close(fold_model(converted)(example), expected, 1e-4)

    # the checkpoint round-trips: save → load (rebuild the base, re-apply the plan, strict load)
    path = tmp_path / f"{arch.name}.vc.pt"
    base = BaseSpec(f"torchvision.models:{arch.name}", {}, None, "test")
    save(path, converted, plan, base, model, CheckpointMetadata(input_shape=list(example.shape)))
    with torch.no_grad():
        assert torch.equal(load(path)(example), expected)


class Untraceable(nn.Module):
    """Python control flow on a tensor value: FX cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Conv2d(32, 32, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.stem(x))
        if x.mean() > 0:
            x = x * 2
        return self.head(x)


class CustomConv(nn.Conv2d):
    """A Conv2d subclass: its forward may differ from Conv2d's, so it is left alone."""


class Awkward(nn.Module):
    """A shared conv called twice, a Conv2d subclass, a grouped conv and reflect padding."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.shared = nn.Conv2d(16, 16, 3, padding=1)
        self.custom = CustomConv(16, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.reflect = nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect")
        self.plain = nn.Conv2d(16, 32, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shared(self.shared(self.stem(x)))
        return self.plain(self.reflect(self.grouped(self.custom(x))))


def test_plan_is_plain_data_that_rebuilds_the_model() -> None:
    model, example = tvm.resnet18(weights=None).eval(), torch.randn(1, 3, 32, 32)
    converted, plan = compress(model, example)
    rebuilt = apply_plan(tvm.resnet18(weights=None), ConversionPlan.from_dict(json.loads(json.dumps(plan.to_dict()))))
    rebuilt.load_state_dict(converted.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(example), converted(example))


def test_untraceable_model_falls_back_to_hooks() -> None:
    torch.manual_seed(0)
    model, example = Untraceable().eval(), torch.randn(2, 3, 12, 12)
    converted, plan = compress(model, example)
    assert plan.traced_with == "hooks" and "could not trace" in plan.trace_note
    assert [d.name for d in plan.converted] == ["body", "head"]
    assert plan.layers[0].decision.startswith("skipped: stem")
    assert all(d.macs > 0 for d in plan.layers), "MACs come from the hooks' shapes"
    with torch.no_grad():
        assert _close(fold_model(converted)(example), converted(example), 1e-5)


def test_awkward_model_converts_what_it_can_and_reports_the_rest() -> None:
    torch.manual_seed(0)
    converted, plan = compress(Awkward().eval(), torch.randn(1, 3, 10, 10))
    reasons = {d.name: d.decision for d in plan.layers}
    assert reasons == {
        "stem": "skipped: stem (--convert-first)",
        "shared": "skipped: called at 2 sites",
        "custom": "skipped: Conv2d subclass CustomConv",
        "grouped": "skipped: grouped (groups=4)",
        "reflect": "skipped: padding_mode='reflect'",
        "plain": "converted",
    }
    assert isinstance(converted.plain, VersatileConv2d) and type(converted.custom) is CustomConv
    assert plan.layers[1].users, "FX records who consumes each conv's output"


def test_options_select_layers() -> None:
    model, example = tvm.resnet18(weights=None).eval(), torch.randn(1, 3, 64, 64)
    _, plan = compress(model, example, convert_first=True, skip=[r"downsample"], min_params=40_000, dry_run=True)
    reasons = Counter(d.decision.split(" (")[0].split(" '")[0] for d in plan.layers)
    assert reasons["skipped: matched --skip"] == 3
    assert reasons["skipped: too small"] == 5  # conv1 (9,408 weights) and layer1's four 64x64x3x3 convs (36,864)
    assert not any(d.decision.startswith("skipped: stem") for d in plan.layers)


def test_skip_pattern_that_matches_nothing_is_an_error() -> None:
    with pytest.raises(BadInputError, match="matches no Conv2d"):
        compress(tvm.resnet18(weights=None), torch.randn(1, 3, 32, 32), skip=["no_such_layer"])


def test_input_shape_the_model_rejects_is_bad_input() -> None:
    with pytest.raises(BadInputError, match="rejects an input of shape"):
        compress(tvm.resnet18(weights=None), torch.randn(1, 1, 32, 32))


def test_dry_run_predicts_the_real_sizes() -> None:
    model, example = tvm.resnet18(weights=None).eval(), torch.randn(1, 3, 32, 32)
    untouched, predicted = compress(model, example, dry_run=True)
    assert not any(isinstance(m, VersatileConv2d) for m in untouched.modules())
    _, real = compress(model, example)
    assert predicted.model_stored_bits == real.model_stored_bits
    assert [d.decision for d in predicted.layers] == [d.decision for d in real.layers]


@pytest.mark.parametrize("target", [1.5, 2.5], ids=["target-1.5x", "target-2.5x"])
def test_target_ratio_is_met_with_mixed_secondary_counts(target: float) -> None:
    model, example = tvm.resnet18(weights=None).eval(), torch.randn(1, 3, 32, 32)
    converted, plan = compress(model, example, target_ratio=target)
    assert plan.ratio >= target
    assert model_stored_bits(model) / model_stored_bits(converted) >= target
    assert "--target-ratio" in plan.choice_note


def test_target_ratio_out_of_reach_is_bad_input_before_any_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fit(*args, **kwargs):
        raise AssertionError("fitted a layer for a ratio the shapes already rule out")

    monkeypatch.setattr("vconvert.convert.compress.initialise_from_weight", no_fit)
    with pytest.raises(BadInputError, match=r"out of reach: .* gives \d+\.\d+x"):
        compress(tvm.resnet18(weights=None), torch.randn(1, 3, 32, 32), target_ratio=50.0)


@pytest.mark.parametrize(
    ("steps", "floor"),
    [([60, 40, 30], 30), ([60, 70, 30], 60), ([], 100), ([100, 50], 100)],
    ids=["every-step-saves", "stops-at-a-step-that-grows", "no-candidate", "first-step-saves-nothing"],
)
def test_ladder_floor_is_where_the_greedy_stops(steps: list[int], floor: int) -> None:
    assert ladder_floor(100, steps) == floor


@pytest.mark.parametrize(
    "options",
    [
        {"mode": "spatial"},
        {"mode": "channel", "secondary": 2},
        {"mode": "spatial+channel", "secondary": 2},
        {"mode": "learned", "secondary": 4, "mask_sharing": "shared"},
    ],
    ids=["spatial", "channel", "spatial+channel", "learned-s4-shared"],
)
def test_modes_on_resnet18(options: dict) -> None:
    model, example = tvm.resnet18(weights=None).eval(), torch.randn(1, 3, 32, 32)
    converted, plan = compress(model, example, **options)
    assert plan.converted and plan.ratio > 1.0
    assert all(d.options["mode"] == options["mode"] for d in plan.converted)
    with torch.no_grad():
        assert _close(fold_model(converted)(example), converted(example), 1e-4)


def test_bad_mode_is_bad_input() -> None:
    with pytest.raises(BadInputError, match="mode must be one of"):
        compress(tvm.resnet18(weights=None), torch.randn(1, 3, 32, 32), mode="sparse")


def _small_plan(**options: object) -> tuple[nn.Module, ConversionPlan]:
    """A two-conv network and its compressed plan, one converted layer's options replaced by ``options``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    _, plan = compress(net, torch.randn(1, 3, 16, 16), convert_first=True, init="naive")
    data = plan.to_dict()
    layer = next(item for item in data["layers"] if item["decision"] == "converted")
    layer["options"].update(options)
    return net, ConversionPlan.from_dict(data)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"secondary": 5_000_000, "mask_sharing": "shared"}, "secondary 5000000, more than its 16 output channels"),
        ({"secondary": 2_000_000_000}, "secondary 2000000000, more than its 16 output channels"),
        ({"mode": "channel", "channel_window": 4096, "secondary": 2}, "channel_window 4096, more than its"),
    ],
    ids=["shared-5e6", "per-filter-2e9", "channel-window"],
)
def test_apply_plan_refuses_options_beyond_the_convs_shape(options: dict, fragment: str) -> None:
    net, plan = _small_plan(**options)
    with pytest.raises(BadInputError, match=fragment):
        apply_plan(net, plan)


def test_apply_plan_sizes_its_layers_against_the_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    net, plan = _small_plan()
    monkeypatch.setenv("VCONVERT_MEMORY_BUDGET", "0.000001")  # 1 KB: the layers take a few KB
    with pytest.raises(BadInputError, match=r"^The checkpoint's plan \(\d versatile layers, the largest '\d'\) needs"):
        apply_plan(net, plan)
    monkeypatch.setenv("VCONVERT_MEMORY_BUDGET", "1")
    assert sum(isinstance(m, VersatileConv2d) for m in apply_plan(net, plan).modules()) == len(plan.converted)
