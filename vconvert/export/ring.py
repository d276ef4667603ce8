"""``--ring``: spatial versatile convs exported as one cropped conv per ring size (docs/ALGEBRA.md §9).

In the spatial modes the mask of output o keeps the centred window of its kernel shrunk by its slot
j_o = secondary_index_o mod s on each side, so the folded (and BN-fused) dense weight of that output
is exactly zero outside that window. Such an output is therefore also computed by a conv with the
cropped (kh - 2j) x (kw - 2j) kernel and padding reduced by j·dilation: same stride, same output
size, same sums (the dropped terms are zeros). The ring form runs one such conv per slot, concatenates
their outputs and restores the channel order with one Gather, so a 3x3 layer with two slots costs
5/9 of the dense fold's MACs. This is the form benchmarks/ring_export.py measured faster than the
dense fold in onnxruntime; the "centre plus one ring at a time" form (docs/ALGEBRA.md §9) shares a little more
arithmetic but needs non-rectangular kernels, which no standard conv op runs.

A slot cannot be cropped by more than the padding allows (padding ≥ j·dilation); such outputs are
cropped as far as the padding allows, and a layer whose padding allows no crop stays dense.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from vconvert.errors import CheckFailedError
from vconvert.nn.versatile import VersatileConv2d

__all__ = ["RingConv2d", "RingResult", "crop_per_output", "numeric_padding", "ring_convs", "spatial_layers"]


def spatial_layers(layers: Mapping[str, VersatileConv2d]) -> dict[str, VersatileConv2d]:
    """The layers with nested spatial masks (modes ``spatial`` and ``spatial+channel``)."""
    return {name: layer for name, layer in layers.items() if layer.mode.startswith("spatial")}


def numeric_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """``conv``'s zero padding per side as two ints; None when it is asymmetric (``'same'`` with even kernels)."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        spans = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation, strict=True)]
        return None if any(span % 2 for span in spans) else (spans[0] // 2, spans[1] // 2)
    return (int(conv.padding[0]), int(conv.padding[1]))


def crop_per_output(slots: Tensor, padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    """How far each output's kernel is cropped per side: its slot, capped where the padding runs out."""
    limit = min(padding[0] // dilation[0], padding[1] // dilation[1])
    return slots.clamp(max=limit)


class RingConv2d(nn.Module):
    """A dense conv whose outputs have nested zero borders, run as one cropped conv per crop size.

    ``crops[o]`` says how many rows and columns on each side of output o's kernel are zero (the
    constructor checks it). Outputs come back in the original channel order.
    """

    def __init__(self, conv: nn.Conv2d, crops: Tensor) -> None:
        super().__init__()
        padding = numeric_padding(conv)
        if padding is None or conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError("a ring conv needs groups=1, zero padding and a symmetric padding per side")
        kh, kw = conv.kernel_size
        self.convs = nn.ModuleList()
        order = []
        for crop in sorted(int(c) for c in crops.unique()):
            index = torch.nonzero(crops == crop).flatten()
            weight = conv.weight.detach()[index]
            cropped = weight[:, :, crop : kh - crop, crop : kw - crop]
            border = weight.clone()
            border[:, :, crop : kh - crop, crop : kw - crop] = 0
            if bool(border.any()):
                raise CheckFailedError(
                    f"A spatial versatile conv has non-zero weights outside the ring of its slot {crop}, so it "
                    "cannot be exported as rings; export without `ring=True` and report this."
                )
            ring = nn.Conv2d(
                conv.in_channels,
                index.numel(),
                (kh - 2 * crop, kw - 2 * crop),
                conv.stride,
                (padding[0] - crop * conv.dilation[0], padding[1] - crop * conv.dilation[1]),
                conv.dilation,
                bias=conv.bias is not None,
                device=weight.device,
                dtype=weight.dtype,
            )
            with torch.no_grad():
                ring.weight.copy_(cropped)
                if conv.bias is not None:
                    ring.bias.copy_(conv.bias.detach()[index])
            self.convs.append(ring.eval())
            order.append(index)
        restore = torch.argsort(torch.cat(order))
        identity = torch.equal(restore, torch.arange(restore.numel(), device=restore.device))
        self.restore: Tensor | None
        self.register_buffer("restore", None if identity else restore)

    def forward(self, x: Tensor) -> Tensor:
        y = self.convs[0](x) if len(self.convs) == 1 else torch.cat([conv(x) for conv in self.convs], dim=1)
        return y if self.restore is None else y.index_select(1, self.restore)


@dataclass
class RingResult:
    """Which spatial convs became ring convs, and why the others stayed dense (plain data)."""

    ringed: list[str] = field(default_factory=list)
    left_dense: dict[str, str] = field(default_factory=dict)


def ring_convs(folded: nn.Module, layers: Mapping[str, VersatileConv2d]) -> RingResult:
    """Replace, in place in ``folded``, the dense conv of every spatial layer in ``layers`` by a RingConv2d.

    ``folded`` is the model after :func:`vconvert.export.pipeline.prepare_for_export` (same module names, BN
    possibly fused into the convs); ``layers`` are the versatile layers it was folded from.
    """
    result = RingResult()
    for name, layer in spatial_layers(layers).items():
        conv = folded.get_submodule(name)
        padding = numeric_padding(conv) if type(conv) is nn.Conv2d else None
        if padding is None:
            result.left_dense[name] = "its padding is not symmetric"
            continue
        slots = (layer.secondary_index % layer.spatial_masks).to(conv.weight.device)
        crops = crop_per_output(slots, padding, conv.dilation)
        if int(crops.max()) == 0:
            result.left_dense[name] = "its padding allows no crop"
            continue
        folded.set_submodule(name, RingConv2d(conv, crops))
        result.ringed.append(name)
    return result
