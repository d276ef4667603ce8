"""Fake-quantised primary filters: the quantizer's values and gradients, and the layer that uses it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vconvert.fit.initialise import from_conv
from vconvert.nn.quantize import (
    check_bits,
    fake_quantize,
    integers,
    largest_level,
    minmax_step,
    storage_bits,
)
from vconvert.nn.versatile import (
    layer_widths,
    materialise_weight,
    set_weight_bits_,
    set_weight_quantization_,
    weight_quantization,
)

MODES = {
    "learned-s2": {"mode": "learned", "secondary": 2},
    "learned-s4-shared": {"mode": "learned", "secondary": 4, "mask_sharing": "shared"},
    "spatial": {"mode": "spatial"},
    "channel-s1": {"mode": "channel", "secondary": 1},
    "channel-s2-no-scale": {"mode": "channel", "secondary": 2, "scale": False},
}


# --------------------------------------------------------------------------- the quantizer
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fake_quantize_is_exactly_integers_times_step(bits: int) -> None:
    torch.manual_seed(bits)
    weight = torch.randn(6, 3, 3, 3) * torch.rand(6, 1, 1, 1) * 3
    step = minmax_step(weight, bits) * torch.tensor([1.0, 0.5, 0.3, 1.0, 2.0, 0.7])  # some rows clip
    values = integers(weight, step, bits)
    level = largest_level(bits)
    assert values.abs().max() <= level and torch.equal(values, values.round())
    assert torch.equal(fake_quantize(weight, step, bits), values * step.view(-1, 1, 1, 1))
    assert torch.equal(fake_quantize(weight, step.requires_grad_(), bits), values * step.detach().view(-1, 1, 1, 1))


def test_minmax_step_maps_each_rows_largest_magnitude_to_the_top_level() -> None:
    weight = torch.tensor([[0.5, -1.4], [0.0, 0.0], [0.07, 0.01]])
    step = minmax_step(weight, 4)
    assert torch.allclose(step, torch.tensor([0.2, 1.0, 0.01]))
    assert integers(weight, step, 4).tolist() == [[2.0, -7.0], [0.0, 0.0], [7.0, 1.0]]


def test_straight_through_and_lsq_gradients() -> None:
    """d/dw is 1 inside the range and 0 where it clips; d/dt is (round(v) − v) inside and ±Q outside, times
    LSQ's 1/√(numel·Q) (Esser et al. 2020, eq. 3 and §2.2)."""
    weight = torch.tensor([[0.26, -0.1, 2.0, -3.0]], requires_grad=True)
    step = torch.tensor([0.2], requires_grad=True)
    fake_quantize(weight, step, 4).sum().backward()
    v = weight.detach() / 0.2
    inside = v.abs() <= 7
    assert weight.grad.tolist() == inside.float().tolist()
    expected = torch.where(inside, v.round() - v, torch.sign(v) * 7).sum() / math.sqrt(4 * 7)
    assert torch.allclose(step.grad, expected.view(1))


@pytest.mark.parametrize("bits", [1, 9, True, 4.0, None])
def test_bits_outside_2_to_8_are_refused(bits) -> None:
    with pytest.raises(ValueError, match="weight bits must be an integer from 2 to 8"):
        check_bits(bits)


def test_storage_width() -> None:
    assert [storage_bits(b) for b in (2, 3, 4, 5, 8)] == [2, 3, 4, 5, 8]


# --------------------------------------------------------------------------- the layer
def _layer(options: dict) -> nn.Module:
    torch.manual_seed(0)
    layer = from_conv(nn.Conv2d(8, 12, 3, padding=1), init="naive", **options)
    with torch.no_grad():
        if layer.mask_proxy is not None:
            layer.mask_proxy.uniform_()
    return layer


@pytest.mark.parametrize("quantizer", ["lsq", "minmax"])
@pytest.mark.parametrize("options", MODES.values(), ids=MODES.keys())
def test_quantized_layer_computes_its_integers_times_steps(options: dict, quantizer: str) -> None:
    layer = _layer(options)
    x = torch.randn(2, 8, 6, 6)
    float_out, float_bits = layer(x), layer.stored_bits()
    layer.set_weight_bits(4, quantizer)
    assert ("primary_step" in layer.state_dict()) == (quantizer == "lsq")
    values, steps = layer.primary_integers()
    assert values.dtype == torch.int8 and values.abs().max() <= 7
    primary = values.float() * steps.view(-1, 1, 1, 1)
    weight = materialise_weight(primary, layer.primary_index, layer.output_mask(), layer.scale, layer.channel_offset, 8)
    expected = nn.functional.conv2d(x, weight, layer.bias, padding=1)
    assert torch.equal(layer(x), expected)
    assert torch.equal(layer.fold()(x), expected)
    assert not torch.equal(expected, float_out)
    assert layer.stored_bits() == float_bits - layer.primary.numel() * (32 - 4)
    layer.set_weight_bits(None)
    assert torch.equal(layer(x), float_out) and "primary_step" not in layer.state_dict()


def test_lsq_steps_learn_and_the_latent_weight_of_the_project_rule_takes_the_weight_gradient() -> None:
    layer = _layer(MODES["learned-s2"])
    layer.set_weight_bits(4, "lsq")
    layer.register_parameter("latent_weight", nn.Parameter(layer.dense_weight().detach().clone()))
    for parameter in (layer.primary, layer.scale, layer.mask_proxy):
        parameter.requires_grad_(False)
    before = layer(torch.ones(1, 8, 4, 4)).detach()
    layer(torch.randn(2, 8, 4, 4)).square().sum().backward()
    assert layer.primary_step.grad is not None and layer.primary_step.grad.abs().sum() > 0
    assert layer.latent_weight.grad is not None and layer.latent_weight.grad.abs().sum() > 0
    assert torch.equal(layer(torch.ones(1, 8, 4, 4)).detach(), before), "the gradient paths add exact zeros"


def test_a_model_records_one_width_or_each_layers_width() -> None:
    model = nn.Sequential(_layer(MODES["learned-s2"]), nn.ReLU(), _layer(MODES["spatial"]))
    assert weight_quantization(model) is None
    assert set_weight_bits_(model, 4, "minmax") == 2
    assert weight_quantization(model) == {"bits": 4, "quantizer": "minmax"}
    model[2].set_weight_bits(None)
    mixed = weight_quantization(model)
    assert mixed == {"bits": 4, "quantizer": "minmax", "layers": {"0": 4, "2": None}}
    restored = nn.Sequential(_layer(MODES["learned-s2"]), nn.ReLU(), _layer(MODES["spatial"]))
    set_weight_quantization_(restored, mixed)
    assert layer_widths(restored) == {"0": 4, "2": None} and weight_quantization(restored) == mixed
    assert set_weight_bits_(restored, {"2": 3}, "minmax") == 1 and layer_widths(restored) == {"0": 4, "2": 3}
    with pytest.raises(ValueError, match="no versatile layer is named '1'"):
        set_weight_bits_(restored, {"1": 3})
    model[2].set_weight_bits(8, "lsq")
    with pytest.raises(ValueError, match="different quantizers"):
        weight_quantization(model)


def test_a_learned_step_pushed_to_zero_or_below_stays_positive() -> None:
    layer = _layer(MODES["learned-s2"])
    layer.set_weight_bits(4, "lsq")
    with torch.no_grad():
        layer.primary_step[0] = 0.0
        layer.primary_step[1] = -0.5
    assert bool((layer.primary_steps() > 0).all()) and bool(torch.isfinite(layer(torch.randn(1, 8, 4, 4))).all())
