"""Find every Conv2d call site of a model: call counts, order, users and shapes.

An FX trace finds the call sites; a model FX cannot trace falls back to forward hooks for the same facts
(:func:`trace_or_hooks`, the rule export's BatchNorm folding uses too). One forward of the example records
shapes and each conv's multiply-accumulates (torch's ``FlopCounterMode``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from vconvert.convert.report import macs_by_module
from vconvert.errors import BadInputError, first_line
from vconvert.nn.versatile import VersatileConv2d

Found = TypeVar("Found")


def trace_or_hooks(from_fx: Callable[[], Found], from_hooks: Callable[[], Found]) -> tuple[Found, str, str]:
    """``from_fx()`` when torch.fx can trace the model, else ``from_hooks()``: (what was found, "fx" or
    "hooks", why FX failed or "")."""
    try:
        return from_fx(), "fx", ""
    except Exception as error:  # FX raises many types for untraceable Python (TraceError, TypeError, ...)
        return from_hooks(), "hooks", first_line(error)


class _ConvSiteTracer(fx.Tracer):
    """Keeps every Conv2d (subclasses too) a leaf so that each call site shows up as one node."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (nn.Conv2d, VersatileConv2d)) or super().is_leaf_module(module, qualified_name)


@dataclass
class _ConvSite:
    calls: int = 0
    users: list[str] = field(default_factory=list)
    input_shape: list[int] | None = None
    output_shape: list[int] | None = None
    macs: int | None = None  # per forward of the example, all calls together


def _trace_conv_sites(model: nn.Module) -> dict[str, _ConvSite]:
    """Conv call sites in execution order from an FX trace; raises whatever FX raises."""
    graph = _ConvSiteTracer().trace(model)
    sites: dict[str, _ConvSite] = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(model.get_submodule(node.target), nn.Conv2d):
            site = sites.setdefault(node.target, _ConvSite())
            site.calls += 1
            site.users.extend(user.name for user in node.users)
    return sites


def _record_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, _ConvSite]:
    """Run one forward with hooks on every Conv2d: call counts, order, shapes and multiply-accumulates."""
    sites: dict[str, _ConvSite] = {}
    handles = []

    def hook(name: str) -> Callable:
        def record(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            site = sites.setdefault(name, _ConvSite())
            site.calls += 1
            site.input_shape = list(inputs[0].shape)
            site.output_shape = list(output.shape)

        return record

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example)
    except Exception as error:  # the user's model raised: report it as bad input, not a traceback
        reason = first_line(error, None)
        raise BadInputError(
            f"The model rejects an input of shape {list(example.shape)} ({reason}); "
            "pass the shape it expects with `input_shape`."
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    macs = macs_by_module(counter, model)
    for name, site in sites.items():
        site.macs = macs.get(name)
    return sites


def analyse(model: nn.Module, example: torch.Tensor) -> tuple[dict[str, _ConvSite], str, str]:
    """Conv call sites (execution order) with shapes; FX when it can trace, forward hooks otherwise."""
    observed = _record_shapes(model, example)

    def from_fx() -> dict[str, _ConvSite]:
        sites = _trace_conv_sites(model)
        for name, site in sites.items():
            if name in observed:
                seen = observed[name]
                site.input_shape, site.output_shape, site.macs = seen.input_shape, seen.output_shape, seen.macs
        return sites

    sites, traced_with, why = trace_or_hooks(from_fx, lambda: observed)
    if traced_with == "fx":
        return sites, traced_with, "traced with torch.fx"
    return sites, traced_with, f"torch.fx could not trace the model ({why}); convs were found by forward hooks instead"
