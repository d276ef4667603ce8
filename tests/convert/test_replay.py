"""Replaying a network from one swapped conv on gives exactly what the whole swapped network gives, and the
``--target-size`` measurement built on it equals the one that runs the whole network for every swap."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision import models

from sample_models.resnet_cifar import resnet8
from vconvert.convert import target_size
from vconvert.convert.replay import LayerReplay

ARCHITECTURES = {
    "resnet8-cifar": (resnet8, 32),
    "torchvision-resnet18": (lambda: models.resnet18(num_classes=10), 64),
    "torchvision-mobilenet_v3_small": (lambda: models.mobilenet_v3_small(num_classes=10), 64),
    "torchvision-densenet121": (lambda: models.densenet121(num_classes=10), 64),
}


def _convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}


def _perturbed(conv: nn.Conv2d) -> nn.Conv2d:
    swapped = copy.deepcopy(conv)
    with torch.no_grad():
        swapped.weight.mul_(1.5).add_(0.01)
    return swapped


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=str)
def test_replaying_after_a_swapped_conv_equals_the_whole_swapped_network(arch: str) -> None:
    build, size = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = build().eval()
    images = torch.randn(2, 3, size, size)
    replay = LayerReplay(model)
    with torch.no_grad():
        values = replay.record(images)
        assert torch.equal(replay.output(values), model(images))
        convs = _convs(model)
        for name in [*list(convs)[:2], *list(convs)[len(convs) // 2 :][:2], list(convs)[-1]]:
            swapped = _perturbed(convs[name])
            replayed = replay.run_with(values, name, swapped)
            model.set_submodule(name, swapped)
            whole = model(images)
            model.set_submodule(name, convs[name])
            scale = whole.abs().max()
            assert (replayed - whole).abs().max() <= 1e-5 * scale, name
            assert (replayed - replay.output(values)).abs().max() > 1e-3 * scale, f"{name}: the swap changed nothing"


def test_replay_recomputes_only_what_follows_the_conv() -> None:
    model = resnet8().eval()
    replay = LayerReplay(model)
    nodes = replay.nodes
    convs = list(_convs(model))
    first, last = replay.downstream(convs[0]), replay.downstream(convs[-1])
    assert len(last) < len(first) < len(nodes)
    assert all(node.op != "placeholder" for node in first)
    start = next(i for i, node in enumerate(nodes) if node.op == "call_module" and node.target == convs[-1])
    assert set(last) <= set(nodes[start:])


class _Untraceable(nn.Module):
    """Control flow on a tensor's value: FX cannot trace it, so the measurement runs the whole network."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if x.mean() > 100:  # data-dependent branch
            x = -x
        return self.fc(self.conv2(torch.relu(x)).mean((2, 3)))


@pytest.mark.parametrize("model_name", ["resnet8", "untraceable"], ids=str)
def test_measuring_by_replay_equals_running_the_whole_network(model_name: str, monkeypatch) -> None:
    torch.manual_seed(0)
    model = (resnet8() if model_name == "resnet8" else _Untraceable()).eval()
    convs = dict(list(_convs(model).items())[1:4])
    allowed = {name: (1, 2) for name in convs}
    base = {"mode": "learned"}
    images = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    replayed = target_size.measure_candidates(model, convs, allowed, base, images)

    def untraceable(_model: nn.Module) -> LayerReplay:
        raise TypeError("not traceable")

    monkeypatch.setattr(target_size, "LayerReplay", untraceable)
    whole = target_size.measure_candidates(model, convs, allowed, base, images)
    assert list(replayed) == list(whole) == list(convs)
    for name in convs:
        assert [c.choice for c in replayed[name]] == [c.choice for c in whole[name]]
        for ours, theirs in zip(replayed[name], whole[name], strict=True):
            assert ours.divergence == pytest.approx(theirs.divergence, rel=1e-4, abs=1e-9)
        assert max(c.divergence for c in whole[name]) > 0
    assert all(isinstance(m, nn.Conv2d) for m in _convs(model).values())  # the model is left as it was
