"""The EMA of weights behind ``finetune --ema``: its decay warm-up, what it averages and what it copies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sample_models.resnet_cifar import resnet8
from vconvert import compress
from vconvert.train.ema import WeightAverage, ema_decay, is_averaged


@pytest.mark.parametrize(("decay", "updates", "expected"), [(0.999, 1, 2 / 11), (0.999, 90, 0.91), (0.9, 10_000, 0.9)])
def test_ema_decay_warms_up_then_holds(decay: float, updates: int, expected: float) -> None:
    assert ema_decay(decay, updates) == pytest.approx(expected)


def _versatile_model(mode: str) -> nn.Module:
    torch.manual_seed(0)
    model, _ = compress(resnet8().eval(), torch.randn(2, 3, 32, 32), mode=mode)
    return model.train()


@pytest.mark.parametrize("mode", ["learned", "spatial"])
def test_update_averages_weights_and_bn_statistics_but_copies_masks(mode: str) -> None:
    model = _versatile_model(mode)
    average = WeightAverage(model, decay=0.5)
    start = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and "mask" not in name:
                tensor.add_(1.0)
            elif "mask" in name:
                tensor.copy_(1.0 - tensor)  # every mask bit flipped
            else:
                tensor.add_(3)  # BatchNorm's num_batches_tracked
    average.update(model)  # update 1: decay min(0.5, 2/11) = 2/11, so weight 9/11 on the live model
    averaged = average.model.state_dict()
    names = {"averaged": 0, "copied": 0}
    for name, live in model.state_dict().items():
        if is_averaged(name, live):
            torch.testing.assert_close(averaged[name], start[name] + 9 / 11, msg=name)
            names["averaged"] += 1
        else:
            assert torch.equal(averaged[name], live), name
            names["copied"] += 1
    assert names["averaged"] > 0 and names["copied"] > 0
    assert any(name.endswith(("mask_proxy", "fixed_mask")) for name in averaged)
    assert not any(is_averaged(name, t) for name, t in averaged.items() if name.endswith(("mask_proxy", "fixed_mask")))


def test_average_converges_to_constant_weights_and_round_trips_its_state() -> None:
    model = _versatile_model("learned")
    average = WeightAverage(model, decay=0.9)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(0.25)
    for _ in range(300):
        average.update(model)
    for name, parameter in average.model.named_parameters():
        if not name.endswith("mask_proxy"):
            torch.testing.assert_close(parameter, torch.full_like(parameter, 0.25), atol=1e-6, rtol=0, msg=name)
    assert not any(parameter.requires_grad for parameter in average.model.parameters())
    restored = WeightAverage(_versatile_model("learned"), decay=0.9)
    restored.load_state_dict(average.state_dict())
    assert restored.updates == 300
    for name, tensor in average.model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[name], tensor), name


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_decay_outside_the_open_unit_interval_is_refused(decay: float) -> None:
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(nn.Linear(2, 2), decay)
