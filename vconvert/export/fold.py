"""Fold versatile layers into plain Conv2d and fuse each BatchNorm2d that directly follows a conv.

Conv→BN pairs come from the model's structure (:func:`vconvert.convert.discover.trace_or_hooks`: an FX
trace, else forward hooks); a fold found by hooks is checked numerically and dropped, with a note, if it
changes the output. Each versatile layer folds to the dense conv its masks define (docs/ALGEBRA.md §8).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from vconvert.convert.discover import trace_or_hooks
from vconvert.export.onnx_file import output_tensors
from vconvert.export.verify import max_abs_difference
from vconvert.nn.versatile import fold_model, versatile_layers


# --------------------------------------------------------------------------- fold (+ BN)
def bn_factor(bn: nn.modules.batchnorm._BatchNorm) -> Tensor:
    """The per-channel factor ``fuse_conv_bn_weights`` multiplies a conv weight by: γ · rsqrt(var + ε)."""
    weight = bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)
    return (weight * torch.rsqrt(bn.running_var + bn.eps)).detach()


def _fusable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and isinstance(bn, nn.BatchNorm2d)
        and bn.running_mean is not None
        and bn.running_var is not None
        and conv.out_channels == bn.num_features
    )


def _pairs_from_fx(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) names where the BN's only input is the conv's output and nothing else reads it."""
    graph = fx.Tracer().trace(model)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        source = node.args[0]
        if source.op != "call_module" or len(source.users) != 1 or calls[node.target] != 1 or calls[source.target] != 1:
            continue
        if _fusable(model.get_submodule(source.target), model.get_submodule(node.target)):
            pairs.append((str(source.target), str(node.target)))
    return pairs


def _pairs_from_hooks(model: nn.Module, example: Tensor) -> list[tuple[str, str]]:
    """(conv, bn) names where the BN was called on the very tensor the conv returned (one call each)."""
    produced: dict[int, str] = {}
    consumed: list[tuple[str, int]] = []
    calls: dict[str, int] = {}
    handles = []

    def on_conv(name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
            calls[name] = calls.get(name, 0) + 1
            produced[id(output)] = name

        return hook

    def on_bn(name: str) -> Callable:
        def hook(_module: nn.Module, inputs: tuple) -> None:
            calls[name] = calls.get(name, 0) + 1
            consumed.append((name, id(inputs[0])))

        return hook

    for name, module in model.named_modules():
        if type(module) is nn.Conv2d:
            handles.append(module.register_forward_hook(on_conv(name)))
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(on_bn(name)))
    outputs = []
    try:
        with torch.no_grad():
            outputs.append(model(example))  # keep outputs alive so tensor ids stay unique
    finally:
        for handle in handles:
            handle.remove()
    pairs = []
    for bn_name, tensor_id in consumed:
        conv_name = produced.get(tensor_id)
        if conv_name and calls.get(conv_name) == 1 and calls.get(bn_name) == 1:
            if _fusable(model.get_submodule(conv_name), model.get_submodule(bn_name)):
                pairs.append((conv_name, bn_name))
    return pairs


def find_conv_bn_pairs(model: nn.Module, example: Tensor) -> tuple[list[tuple[str, str]], str]:
    """Conv→BatchNorm2d pairs that can be fused, and how they were found ("fx" or "hooks")."""
    pairs, found_with, _ = trace_or_hooks(lambda: _pairs_from_fx(model), lambda: _pairs_from_hooks(model, example))
    return pairs, found_with


@dataclass
class FoldResult:
    """What :func:`prepare_for_export` did to the graph (plain data, plus the tensors compact needs)."""

    versatile: list[str]
    bn_folded: list[tuple[str, str]] = field(default_factory=list)
    bn_left: list[str] = field(default_factory=list)
    found_with: str = "fx"
    note: str = ""
    ring: list[str] = field(default_factory=list)
    ring_left_dense: dict[str, str] = field(default_factory=dict)
    bn_scales: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def describe(self) -> str:
        """One sentence on how the graph changed."""
        text = f"folded {len(self.versatile)} versatile conv(s) into dense Conv2d"
        if self.bn_folded or self.bn_left:
            text += f"; fused {len(self.bn_folded)} BatchNorm2d into the preceding conv"
            if self.bn_left:
                text += f", {len(self.bn_left)} left as BatchNormalization (no conv right before them)"
        if self.ring:
            text += f"; ran {len(self.ring)} spatial conv(s) as one cropped conv per ring size"
            if self.ring_left_dense:
                name, why = next(iter(self.ring_left_dense.items()))
                text += f" ({len(self.ring_left_dense)} left dense, e.g. {name}: {why})"
        if self.note:
            text += f"; {self.note}"
        return text

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("bn_scales")
        return data


def prepare_for_export(model: nn.Module, example: Tensor, fold_bn: bool = True) -> tuple[nn.Module, FoldResult]:
    """A folded deep copy (eval mode) of ``model``: plain Conv2d only, BN fused when ``fold_bn``.

    The input model is not modified.
    """
    versatile = [name for name, _ in versatile_layers(model)]
    folded = fold_model(model)
    result = FoldResult(versatile=versatile)
    if not fold_bn:
        return folded, result
    pairs, found_with = find_conv_bn_pairs(folded, example)
    result.found_with = found_with
    fused = copy.deepcopy(folded) if found_with == "hooks" else folded  # hooks: keep the original to check
    for conv_name, bn_name in pairs:
        conv, bn = fused.get_submodule(conv_name), fused.get_submodule(bn_name)
        result.bn_scales[conv_name] = bn_factor(bn)
        fused.set_submodule(conv_name, fuse_conv_bn_eval(conv, bn))
        fused.set_submodule(bn_name, nn.Identity())
    if found_with == "hooks" and pairs:
        with torch.no_grad():
            before, after = output_tensors(folded(example)), output_tensors(fused(example))
        scale = max(float(t.abs().max()) for t in before) or 1.0
        if max_abs_difference(before, after) > 1e-4 * scale:
            result.note = (
                "torch.fx could not trace the model and the BN pairs found by hooks changed its output, "
                "so no BN was fused"
            )
            result.bn_scales = {}
            return folded, result
        result.note = "torch.fx could not trace the model; conv→BN pairs were found by forward hooks and checked"
    result.bn_folded = pairs
    fused_bns = {bn for _, bn in pairs}
    result.bn_left = [n for n, m in fused.named_modules() if isinstance(m, nn.BatchNorm2d) and n not in fused_bns]
    return fused, result
