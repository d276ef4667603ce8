"""Data-free initialisation of a VersatileConv2d from a pretrained dense weight (docs/FIT.md).

The entry points: :func:`initialise_from_weight` fits a layer to a dense weight with one of ``METHODS``
and writes the result into it, :func:`from_conv` builds and initialises a layer from a conv. The fit
itself is pure tensor functions, one module per concept: :mod:`vconvert.fit.weight` (the fit, the naive
baseline and the projection onto a fixed grouping), :mod:`vconvert.fit.slots`,
:mod:`vconvert.fit.grouping`, :mod:`vconvert.fit.pairing`, :mod:`vconvert.fit.closed_form` and
:mod:`vconvert.fit.metric`. The names other packages use are importable from here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vconvert.fit.metric import DEFAULT_SPATIAL_CORRELATION
from vconvert.fit.slots import SlotLayout, slot_layout
from vconvert.fit.weight import fit_weight, naive_fit, project_onto_groups
from vconvert.nn.versatile import PROXY_OFF, PROXY_ON, VersatileConv2d

__all__ = ["METHODS", "from_conv", "initialise_from_weight", "project_onto_groups", "relative_error"]

METHODS = ("fit", "fit-plain", "naive")  # fit-plain: fit with spatial_correlation 0


def relative_error(approx: Tensor, weight: Tensor) -> float:
    """‖approx − weight‖_F / ‖weight‖_F (0 for an all-zero weight approximated exactly)."""
    reference = weight.norm().item()
    difference = (approx - weight).norm().item()
    if reference == 0.0:
        return 0.0 if difference == 0.0 else math.inf
    return difference / reference


@torch.no_grad()
def initialise_from_weight(
    layer: VersatileConv2d,
    weight: Tensor,
    bias: Tensor | None,
    method: str = "fit",
    *,
    iterations: int | None = None,
    spatial_correlation: float = DEFAULT_SPATIAL_CORRELATION,
) -> float:
    """Initialise ``layer`` in place from a dense conv weight (N, c, kh, kw) and bias; no data needed.

    ``method`` "fit" groups similar filters and alternates masks, primaries, scales and slot
    assignment (docs/FIT.md §4-§7); "fit-plain" is "fit" with ``spatial_correlation`` 0; "naive" is the
    baseline (consecutive groups, first filter as primary, masks on). With learned per-filter masks
    and scales, "fit" ends by minimising the error under a prior of spatially smooth inputs
    (``spatial_correlation`` ρ of neighbouring pixels, scaled by the layer's dilation; 0 keeps the
    plain Frobenius error). Writes primary, primary_index/secondary_index (and the derived fixed
    structure), mask_proxy (0.75 on, 0.25 off), scale and bias. Returns the plain ‖W_layer − W‖_F / ‖W‖_F.
    """
    if not 0.0 <= spatial_correlation < 1.0:
        raise ValueError(f"spatial_correlation must be in [0, 1); got {spatial_correlation!r}.")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}.")
    if method == "fit-plain":
        method, spatial_correlation = "fit", 0.0
    expected = (layer.out_channels, layer.in_channels, *layer.kernel_size)
    if tuple(weight.shape) != expected:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, but the layer needs {expected}.")
    if (bias is None) != (layer.bias is None):
        raise ValueError("bias must be given exactly when the layer has a bias.")
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    target = weight.detach().to(device=layer.primary.device, dtype=dtype)
    layout = slot_layout(layer)
    layout = SlotLayout(
        layout.cells, layout.offsets, layout.rings.to(dtype), layout.window, layout.kernel_size, layout.learned
    )
    use_scale = layer.scale is not None
    if method == "fit":
        result = fit_weight(
            target,
            layout,
            use_scale=use_scale,
            iterations=iterations,
            spatial_correlation=spatial_correlation,
            dilation=tuple(layer.dilation),
        )
    else:
        result = naive_fit(target, layout, use_scale=use_scale)
    layer.primary.copy_(result.primary.view_as(layer.primary))
    layer.primary_index.copy_(result.primary_index)
    layer.secondary_index.copy_(result.secondary_index)
    layer.derive_fixed_structure()
    if layer.mask_proxy is not None:
        on = result.mask.view_as(layer.mask_proxy) > 0.5
        layer.mask_proxy.copy_(torch.where(on, PROXY_ON, PROXY_OFF))
    if layer.scale is not None:
        layer.scale.copy_(result.scale)
    if bias is not None:
        layer.bias.copy_(bias)
    return relative_error(layer.dense_weight().to(dtype), target)


def from_conv(conv: nn.Conv2d, *, init: str = "fit", **options) -> VersatileConv2d:
    """A versatile layer with ``conv``'s geometry, dtype and device, initialised from its weights.

    ``init="fit"`` groups similar filters and fits masks, primaries and scales to the dense weight
    (:func:`initialise_from_weight`); ``init="naive"`` is the baseline (each primary filter is the first
    filter of its consecutive group, masks on, least-squares scales). ``options`` are the layer's
    (mode, secondary, channel_window, channel_stride, mask_sharing, scale).
    """
    layer = VersatileConv2d.shaped_like(conv, **options)
    initialise_from_weight(layer, conv.weight, conv.bias, init)
    return layer
