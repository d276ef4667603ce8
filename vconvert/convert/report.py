"""Accounting (stored bits, MACs) and the tables vconvert prints."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from rich import box
from rich.table import Table
from rich.text import Text
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vconvert.errors import shown
from vconvert.nn.versatile import VersatileConv2d

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


def macs_by_module(counter: FlopCounterMode, model: nn.Module) -> dict[str, int]:
    """Multiply-accumulates ``counter`` saw while ``model`` ran, per qualified module name ("" is the whole
    model; a module's count includes its children's): torch's ``FlopCounterMode`` FLOPs / 2."""
    root = type(model).__name__
    macs: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        name = "" if key == root else key.removeprefix(root + ".")
        macs[name] = sum(ops.values()) // 2
    return macs


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward of ``example`` (convolutions and matrix products)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    return counter.get_total_flops() // 2


def format_kib(bits: float) -> str:
    """Bits as KiB with one decimal."""
    return f"{bits / KIB:,.1f}"


LAYER_TABLE_CAPTION = (
    "KiB: weights stored before→after. fit err: relative weight error ‖W − Ŵ‖/‖W‖ of the data-free fit "
    "(compress time). masks: fraction of mask bits that are 1."
)


def layer_table(rows: list[dict], title: str) -> Table:
    """A rich table of per-layer rows (dicts with the keys of ``ConversionPlan.table_rows``) that fits an
    80-column terminal: long names and skip reasons wrap instead of being cut. Names, shapes, decisions and
    the title may come from a file: they are shown as plain text, escaped and capped (:func:`shown`)."""
    table = Table(
        title=Text(shown(title)),
        caption=LAYER_TABLE_CAPTION,
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
        caption_justify="left",
    )
    longest = max((len(shown(row["name"])) for row in rows), default=5)
    table.add_column("layer", no_wrap=longest <= 32, min_width=min(longest, 32), overflow="fold")
    table.add_column("shape", no_wrap=True)
    table.add_column("decision", overflow="fold", min_width=10)
    for column in ("KiB", "ratio", "fit err", "masks"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in rows:
        mode = row.get("mode") or ""
        if mode == "channel" and row.get("secondary") == 1:
            mode = "dense"
        elif mode and row.get("secondary"):
            mode += f" s={row['secondary']}" + (" shared masks" if row.get("shared") else "")
        if mode and row.get("bits"):
            mode += f" {row['bits']}-bit"
        table.add_row(
            Text(shown(row["name"])),
            Text(shown(row["shape"])),
            Text(shown(mode or row["decision"])),
            f"{format_kib(row['dense_bits'])}→{format_kib(row['stored_bits'] or row['dense_bits'])}",
            f"{row['dense_bits'] / row['stored_bits']:.2f}x" if row.get("stored_bits") else "",
            f"{row['fit_error']:.3f}" if row.get("fit_error") is not None else "",
            f"{row['mask_density']:.2f}" if row.get("mask_density") is not None else "",
        )
    return table
