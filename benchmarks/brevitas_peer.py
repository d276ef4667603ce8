"""A quantization-aware peer from an established library: brevitas 4-bit weight-only QAT (issue 30).

The Pareto benchmark's own QAT peers fine-tune the dense ResNet-20 with vconvert's quantizer. This row trains
the same convs (:func:`benchmarks.pareto.quantizable_convs`) with brevitas instead, under the same budget, loop,
data and distillation, and then hands the trained integers and scales to vconvert's int8 exporter, so the file
differs from the in-house peer only in how training found them.

Quantizer: ``brevitas.quant.Int8WeightPerChannelFloatMSE`` at ``weight_bit_width=bits``: signed narrow-range
integers (−(2^(b−1)−1)..2^(b−1)−1, −7..7 at 4 bits: exactly vconvert's symmetric range, so no integer is lost in
the hand-over; brevitas's NarrowIntQuant, its default for weights), one floating-point scale per output channel,
*learned* (``PARAMETER_FROM_STATS``: an nn.Parameter trained through the rounding (straight through) and the
clamping, as in LSQ without its gradient scaling) and initialised by brevitas's MSE grid search over the
pretrained weights. Of brevitas's stock weight quantizers it is the per-channel one with a learned scale:
``Int8WeightPerChannelFloat`` (and the max-statistics per-channel quantizer of brevitas's ImageNet QAT examples)
recomputes the scale from max|w| at every step instead, and the decoupled and accumulator-aware ones are marked
experimental or target other problems. The MSE start clips the largest weights where that lowers the rounding
error, which matters at 4 bits: a better start than the in-house quantizer's (a learned step started at max|w|/Q),
so the comparison does not favour vconvert. Activations stay float, as in every other trained row: the export
quantizes them to uint8 with calibration.
"""

from __future__ import annotations

import torch
from torch import nn

QUANTIZER_NAME = "brevitas.quant.Int8WeightPerChannelFloatMSE"  # for the row's record


def brevitas_weight_quantizer() -> type:
    """The brevitas weight quantizer of this peer (see the module docstring)."""
    from brevitas.quant import Int8WeightPerChannelFloatMSE

    return Int8WeightPerChannelFloatMSE


def as_brevitas_qat(model: nn.Module, convs: list[str], bits: int = 4) -> nn.Module:
    """``model`` with each nn.Conv2d named in ``convs`` replaced by a ``brevitas.nn.QuantConv2d`` with ``bits``-bit
    narrow-range weights and a learned per-output-channel scale, holding the conv's weights and bias; the scales
    are initialised here, from the pretrained weights. Activations and the bias stay float."""
    from brevitas.nn import QuantConv2d

    for name in convs:
        conv = model.get_submodule(name)
        if type(conv) is not nn.Conv2d:
            raise TypeError(f"{name} is a {type(conv).__name__}, not an nn.Conv2d.")
        quantized = QuantConv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.padding_mode, bias=conv.bias is not None, weight_quant=brevitas_weight_quantizer(),
            weight_bit_width=bits, device=conv.weight.device, dtype=conv.weight.dtype,
        )  # fmt: skip
        with torch.no_grad():
            quantized.weight.copy_(conv.weight)
            if conv.bias is not None:
                quantized.bias.copy_(conv.bias)
            quantized.quant_weight()  # the learned scale takes its MSE start from these weights, not random ones
        quantized.train(conv.training)
        model.set_submodule(name, quantized)
    return model


def brevitas_integers(conv: nn.Module) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(integers (N, C, kh, kw) float, scales (N,), bit width) of a brevitas QuantConv2d's quantized weight."""
    quantized = conv.quant_weight()
    bits = int(quantized.bit_width.item())
    if not quantized.signed or float(quantized.zero_point.abs().max()) != 0.0:
        raise ValueError("the brevitas weights are not signed and symmetric (zero point 0).")
    scales = quantized.scale.detach()
    if scales.numel() != conv.out_channels:
        raise ValueError(f"expected one scale per output channel, got {scales.numel()} for {conv.out_channels}.")
    return quantized.int().detach().float(), scales.flatten(), bits


@torch.no_grad()
def to_vconvert_quantized(model: nn.Module, convs: list[str], bits: int, keep_latent: bool = True) -> nn.Module:
    """``model`` with each brevitas QuantConv2d named in ``convs`` replaced by a versatile conv with one secondary
    per primary (mode channel: a dense conv, per-output scale 1) whose ``bits``-bit fake-quantised weight is the
    brevitas quantized weight: the same integers times the same per-channel scales (checked to be equal, float
    tolerance 0), so that vconvert's int8 exporter packs what brevitas trained. ``keep_latent``: the primaries are
    brevitas's float weights (QAT: the latent weights training rounds to nearest); False: the quantized weights
    themselves (post-training rounding such as GPTQ's or a learned rounding chose integers that rounding the
    float weights to nearest need not give)."""
    from vconvert import from_conv
    from vconvert.nn.quantize import largest_level

    for name in convs:
        trained = model.get_submodule(name)
        integers, scales, trained_bits = brevitas_integers(trained)
        if trained_bits != bits:
            raise ValueError(f"{name} was trained at {trained_bits} bits, not {bits}.")
        if float(integers.abs().max()) > largest_level(bits):
            raise ValueError(f"{name}'s integers exceed vconvert's symmetric range ±{largest_level(bits)}.")
        plain = nn.Conv2d(
            trained.in_channels, trained.out_channels, trained.kernel_size, trained.stride, trained.padding,
            trained.dilation, trained.groups, bias=trained.bias is not None,
            device=trained.weight.device, dtype=trained.weight.dtype,
        )  # fmt: skip
        expected = integers * scales.view(-1, 1, 1, 1)
        latent = trained.weight if keep_latent else expected
        plain.weight.copy_(latent)
        if trained.bias is not None:
            plain.bias.copy_(trained.bias)
        layer = from_conv(plain, init="naive", mode="channel", secondary=1)  # naive: primary p is output p's filter
        outputs = torch.arange(trained.out_channels, device=layer.primary_index.device)
        if not torch.equal(layer.primary_index, outputs) or layer.scale is None:
            raise ValueError(f"{name}: expected one primary filter and one scale per output channel.")
        layer.primary.copy_(latent)  # the step rounds them to brevitas's integers
        layer.scale.fill_(1.0)
        layer.set_weight_bits(bits, "lsq")
        layer.primary_step.copy_(scales)
        layer.train(trained.training)
        vconvert_integers, vconvert_steps = layer.primary_integers()
        if not (
            torch.equal(vconvert_integers.float(), integers)
            and torch.equal(vconvert_steps, scales)
            and torch.equal(layer.dense_weight(), expected)
        ):
            raise AssertionError(f"{name}: vconvert's {bits}-bit weight differs from brevitas's quantized weight.")
        model.set_submodule(name, layer)
    return model
