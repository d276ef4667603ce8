"""Fake quantization of primary filters: symmetric, one step per filter, gradients straight through.

A primary filter P_p with step t_p holds the integers

    k = clip(round(P_p / t_p), −Q, Q)        Q = 2^(bits−1) − 1   (7 at 4 bits, 127 at 8)

and the forward pass uses k · t_p. The step is either ``minmax`` (t_p = max|P_p| / Q, recomputed from the
filter at every forward, no gradient) or ``lsq`` (a learned parameter, Esser et al. 2020: its gradient is
(round(v) − v) inside the range and ±Q outside, scaled by 1/√(numel·Q)). Rounding has a straight-through
gradient and returns exactly ``round``, so the forward value is exactly k · t_p: the integers an export
stores are the ones the network was trained with (docs/ALGEBRA.md §12).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

WEIGHT_BITS = tuple(range(2, 9))  # what the CLI offers, as the library (int8 files store each width packed)
QUANTIZERS = ("lsq", "minmax")


def check_bits(bits: int) -> int:
    """``bits`` when it is an integer 2..8, else ValueError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"weight bits must be an integer from 2 to 8; got {bits!r}.")
    return bits


def largest_level(bits: int) -> int:
    """Q = 2^(bits−1) − 1: the integers run over −Q..Q (symmetric, so a negated filter stays in range)."""
    return 2 ** (check_bits(bits) - 1) - 1


def storage_bits(bits: int) -> int:
    """Bits each stored integer takes in a file: exactly its width (the int8 export packs 2 to 7 bits at their
    true width, 8 as int8)."""
    return check_bits(bits)


def minmax_step(weight: Tensor, bits: int) -> Tensor:
    """(rows,) step max|w_row| / Q for each row of ``weight`` (dim 0); 1 for an all-zero row."""
    top = weight.detach().flatten(1).abs().amax(dim=1)
    step = top / largest_level(bits)
    return torch.where(step > 0, step, torch.ones_like(step))


class _RoundStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: Tensor) -> Tensor:
        return torch.round(value)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class _ScaleGradient(torch.autograd.Function):
    """Identity forward (exactly), gradient multiplied by ``factor``."""

    @staticmethod
    def forward(ctx, value: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


def integers(weight: Tensor, step: Tensor, bits: int) -> Tensor:
    """The integers k = clip(round(w / t), −Q, Q) per row (float tensor of whole numbers, no gradient)."""
    level = largest_level(bits)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return torch.clamp(torch.round(weight.detach() / step.detach().view(shape)), -level, level)


def fake_quantize(weight: Tensor, step: Tensor, bits: int) -> Tensor:
    """k · t per row of ``weight`` (exactly the value :func:`integers` times the step), with straight-through
    gradients to ``weight`` and LSQ gradients to ``step`` when it requires them."""
    level = largest_level(bits)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    if step.requires_grad:
        step = _ScaleGradient.apply(step, 1.0 / math.sqrt(weight[0].numel() * level))
    step = step.view(shape)
    scaled = torch.clamp(weight / step, -level, level)
    return _RoundStraightThrough.apply(scaled) * step
