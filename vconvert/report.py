"""Accounting (stored bits, MACs) and the tables vconvert prints."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from rich.table import Table
from torch import nn

from vconvert.layers import VersatileConv2d

KIB = 8 * 1024  # bits per KiB


def module_stored_bits(module: nn.Module) -> int:
    """Bits ``module`` itself stores (not its children): a VersatileConv2d counts its compressed form;
    any other module its floating-point parameters and persistent buffers."""
    if isinstance(module, VersatileConv2d):
        return module.stored_bits()
    bits = 0
    for tensor in [*module.parameters(recurse=False), *_persistent_buffers(module)]:
        if tensor is not None and tensor.is_floating_point():
            bits += tensor.numel() * tensor.element_size() * 8
    return bits


def _persistent_buffers(module: nn.Module) -> Iterable[torch.Tensor]:
    for name, buffer in module.named_buffers(recurse=False):
        if name not in module._non_persistent_buffers_set:
            yield buffer


def model_stored_bits(model: nn.Module) -> int:
    """Bits the whole model stores: its weights, with every VersatileConv2d in compressed form."""
    return sum(module_stored_bits(module) for module in model.modules())


def conv_macs(output_shape: Iterable[int], in_channels: int, kernel_size: tuple[int, int], groups: int = 1) -> int:
    """Multiply-accumulates of one conv call per sample: output elements x (c/groups) x kh x kw."""
    _, out_channels, height, width = list(output_shape)
    return out_channels * height * width * (in_channels // groups) * kernel_size[0] * kernel_size[1]


def format_kib(bits: float) -> str:
    """Bits as KiB with one decimal."""
    return f"{bits / KIB:,.1f}"


def layer_table(rows: list[dict], title: str) -> Table:
    """A rich table of per-layer rows (dicts with the keys of ``ConversionPlan.table_rows``)."""
    table = Table(title=title, show_lines=False)
    for column, justify in [
        ("layer", "left"),
        ("shape", "left"),
        ("decision", "left"),
        ("mode", "left"),
        ("s", "right"),
        ("KiB before", "right"),
        ("KiB after", "right"),
        ("ratio", "right"),
        ("fit error", "right"),
        ("mask density", "right"),
    ]:
        table.add_column(column, justify=justify)
    for row in rows:
        table.add_row(
            row["name"],
            row["shape"],
            row["decision"],
            row.get("mode") or "",
            str(row["secondary"]) if row.get("secondary") else "",
            format_kib(row["dense_bits"]),
            format_kib(row["stored_bits"]),
            f"{row['dense_bits'] / row['stored_bits']:.2f}x" if row.get("stored_bits") else "",
            f"{row['fit_error']:.3f}" if row.get("fit_error") is not None else "",
            f"{row['mask_density']:.2f}" if row.get("mask_density") is not None else "",
        )
    return table
