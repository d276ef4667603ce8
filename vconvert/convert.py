"""The compress pass: find every Conv2d call site, decide per conv, swap in VersatileConv2d, fit.

Reads like ``torch.fx.experimental.optimization.fuse``: deep copy, trace, match exact types, replace.
The FX trace is used to *find* convs (call sites, order, users); the rewrite swaps modules by
qualified name, so the converted model keeps the user's classes and attribute names (no
GraphModule). Models FX cannot trace fall back to forward hooks for the same facts.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import fx, nn

from vconvert.errors import BadInputError
from vconvert.fit import METHODS, initialise_from_weight
from vconvert.layers import VersatileConv2d
from vconvert.report import conv_macs, model_stored_bits
from vconvert.validate import (
    check_fields,
    check_float,
    check_input_shape,
    check_int,
    check_int_list,
    check_str,
)

CONVERTED = "converted"
SECONDARY_CANDIDATES = (2, 3, 4, 6, 8)


@dataclass
class ConvOptions:
    """How eligible convs are converted (the keyword options of VersatileConv2d)."""

    mode: str = "learned"
    secondary: int = 2
    channel_window: int | None = None
    channel_stride: int = 1
    mask_sharing: str = "per-filter"
    scale: bool = True

    def layer_kwargs(self) -> dict:
        kwargs = asdict(self)
        if self.mode not in ("channel", "spatial+channel"):
            kwargs.pop("channel_window")
        return kwargs


@dataclass
class LayerDecision:
    """One Conv2d of the model: what it is, where it runs, and whether (and how) it was converted."""

    name: str
    decision: str  # CONVERTED or the reason it was skipped
    in_channels: int
    out_channels: int
    kernel_size: list[int]
    groups: int
    call_sites: int
    input_shape: list[int] | None = None
    output_shape: list[int] | None = None
    users: list[str] = field(default_factory=list)
    macs: int = 0
    dense_bits: int = 0
    stored_bits: int = 0
    options: dict | None = None  # VersatileConv2d keyword options when converted
    fit_error: float | None = None
    mask_density: float | None = None

    @property
    def converted(self) -> bool:
        return self.decision == CONVERTED

    @classmethod
    def from_dict(cls, data: object, where: str) -> LayerDecision:
        """Inverse of ``asdict`` with strict types and bounds; a damaged entry raises BadInputError."""
        values = check_fields(data, where, tuple(item.name for item in fields(cls)))
        if isinstance(values["name"], str):
            where = f"{where} ({values['name']!r})"
        decision = cls(
            name=check_str(values["name"], f"{where}'s name"),
            decision=check_str(values["decision"], f"{where}'s decision"),
            in_channels=check_int(values["in_channels"], f"{where}'s in_channels", 1),
            out_channels=check_int(values["out_channels"], f"{where}'s out_channels", 1),
            kernel_size=check_int_list(values["kernel_size"], f"{where}'s kernel_size", 2, 1),
            groups=check_int(values["groups"], f"{where}'s groups", 1),
            call_sites=check_int(values["call_sites"], f"{where}'s call_sites"),
            input_shape=_optional(values["input_shape"], lambda v: check_int_list(v, f"{where}'s input_shape")),
            output_shape=_optional(values["output_shape"], lambda v: check_int_list(v, f"{where}'s output_shape")),
            users=_strings(values["users"], f"{where}'s users"),
            macs=check_int(values["macs"], f"{where}'s macs"),
            dense_bits=check_int(values["dense_bits"], f"{where}'s dense_bits"),
            stored_bits=check_int(values["stored_bits"], f"{where}'s stored_bits"),
            options=_optional(values["options"], lambda v: _check_options(v, f"{where}'s options")),
            fit_error=_optional(values["fit_error"], lambda v: check_float(v, f"{where}'s fit_error", finite=False)),
            mask_density=_optional(
                values["mask_density"], lambda v: check_float(v, f"{where}'s mask_density", finite=False)
            ),
        )
        if decision.converted and decision.options is None:
            raise BadInputError(f"{where} is converted but records no options: the file is damaged.")
        return decision


def _optional(value: object, check: Callable[[object], Any]) -> Any:
    return None if value is None else check(value)


def _strings(value: object, where: str) -> list[str]:
    if not isinstance(value, list):
        raise BadInputError(f"{where} must be a list of strings: the file is damaged.")
    return [check_str(item, where) for item in value]


_OPTION_LIMIT = 2**31 - 1


def _check_options(value: object, where: str) -> dict:
    """VersatileConv2d keyword options as ConvOptions.layer_kwargs() writes them, types checked (the
    layer itself checks how they fit the conv)."""
    required = ("mode", "secondary", "channel_stride", "mask_sharing", "scale")
    options = check_fields(value, where, required, ("channel_window",))
    checked: dict[str, Any] = {
        "mode": check_str(options["mode"], f"{where} mode"),
        "secondary": check_int(options["secondary"], f"{where} secondary", 1, _OPTION_LIMIT),
        "channel_stride": check_int(options["channel_stride"], f"{where} channel_stride", 1, _OPTION_LIMIT),
        "mask_sharing": check_str(options["mask_sharing"], f"{where} mask_sharing"),
    }
    if not isinstance(options["scale"], bool):
        raise BadInputError(f"{where} scale must be true or false: the file is damaged.")
    checked["scale"] = options["scale"]
    window = options.get("channel_window")
    if window is not None:
        checked["channel_window"] = check_int(window, f"{where} channel_window", 1, _OPTION_LIMIT)
    elif "channel_window" in options:
        checked["channel_window"] = None
    return checked


@dataclass
class ConversionPlan:
    """Plain data (JSON-able): every conv's decision, how the model was analysed, and the totals."""

    layers: list[LayerDecision]
    traced_with: str  # "fx" or "hooks"
    trace_note: str
    input_shape: list[int]
    init: str
    target_ratio: float | None = None
    model_dense_bits: int = 0
    model_stored_bits: int = 0
    choice_note: str = ""

    @property
    def converted(self) -> list[LayerDecision]:
        return [layer for layer in self.layers if layer.converted]

    @property
    def ratio(self) -> float:
        """Whole-model stored-size ratio (dense bits / stored bits)."""
        return self.model_dense_bits / self.model_stored_bits if self.model_stored_bits else 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object, where: str = "The checkpoint's plan") -> ConversionPlan:
        """Inverse of :meth:`to_dict` with strict types and bounded values: a damaged plan (a field
        missing, unknown or of the wrong type, a layer named twice) raises BadInputError."""
        values = check_fields(data, where, tuple(item.name for item in fields(cls)))
        if not isinstance(values["layers"], list):
            raise BadInputError(f"{where}'s layers must be a list: the file is damaged.")
        layers = [LayerDecision.from_dict(layer, f"{where}'s layer {i}") for i, layer in enumerate(values["layers"])]
        names = [layer.name for layer in layers]
        repeated = next((name for name in names if names.count(name) > 1), None)
        if repeated is not None:
            raise BadInputError(f"{where} names layer {repeated!r} twice: the file is damaged.")
        ratio = values["target_ratio"]
        return cls(
            layers=layers,
            traced_with=check_str(values["traced_with"], f"{where}'s traced_with"),
            trace_note=check_str(values["trace_note"], f"{where}'s trace_note"),
            input_shape=check_input_shape(values["input_shape"], f"{where}'s input_shape"),
            init=check_str(values["init"], f"{where}'s init"),
            target_ratio=None if ratio is None else check_float(ratio, f"{where}'s target_ratio", positive=True),
            model_dense_bits=check_int(values["model_dense_bits"], f"{where}'s model_dense_bits"),
            model_stored_bits=check_int(values["model_stored_bits"], f"{where}'s model_stored_bits"),
            choice_note=check_str(values["choice_note"], f"{where}'s choice_note"),
        )

    def table_rows(self) -> list[dict]:
        rows = []
        for layer in self.layers:
            kh, kw = layer.kernel_size
            options = layer.options or {}
            rows.append(
                {
                    "name": layer.name,
                    "shape": f"{layer.out_channels}x{layer.in_channels // layer.groups}x{kh}x{kw}",
                    "decision": layer.decision,
                    "mode": options.get("mode"),
                    "secondary": options.get("secondary") if options.get("mode") == "learned" else None,
                    "dense_bits": layer.dense_bits,
                    "stored_bits": layer.stored_bits or layer.dense_bits,
                    "fit_error": layer.fit_error,
                    "mask_density": layer.mask_density,
                }
            )
        return rows


# --------------------------------------------------------------------------- analysis
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


def _trace_conv_sites(model: nn.Module) -> tuple[dict[str, _ConvSite], str]:
    """Conv call sites in execution order from an FX trace; raises whatever FX raises."""
    graph = _ConvSiteTracer().trace(model)
    sites: dict[str, _ConvSite] = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(model.get_submodule(node.target), nn.Conv2d):
            site = sites.setdefault(node.target, _ConvSite())
            site.calls += 1
            site.users.extend(user.name for user in node.users)
    return sites, "traced with torch.fx"


def _record_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, _ConvSite]:
    """Run one forward with hooks on every Conv2d: call counts, order and shapes."""
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
        with torch.no_grad():
            model(example)
    except Exception as error:  # the user's model raised: report it as bad input, not a traceback
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BadInputError(
            f"The model rejects an input of shape {list(example.shape)} ({first_line}); "
            "pass the shape it expects with --input-shape."
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    return sites


def analyse(model: nn.Module, example: torch.Tensor) -> tuple[dict[str, _ConvSite], str, str]:
    """Conv call sites (execution order) with shapes; FX when it can trace, forward hooks otherwise."""
    observed = _record_shapes(model, example)
    try:
        sites, note = _trace_conv_sites(model)
        traced_with = "fx"
    except Exception as error:  # FX raises many types for untraceable Python (TraceError, TypeError, ...)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        note = f"torch.fx could not trace the model ({reason[:160]}); convs were found by forward hooks instead"
        return observed, "hooks", note
    for name, site in sites.items():
        if name in observed:
            site.input_shape, site.output_shape = observed[name].input_shape, observed[name].output_shape
    return sites, traced_with, note


# --------------------------------------------------------------------------- decisions
def _skip_reason(
    name: str,
    conv: nn.Conv2d,
    site: _ConvSite | None,
    is_stem: bool,
    convert_first: bool,
    min_params: int,
    skip_patterns: Sequence[str],
) -> str | None:
    if type(conv) is not nn.Conv2d:
        return f"skipped: Conv2d subclass {type(conv).__name__}"
    if conv.groups == conv.in_channels and conv.groups > 1:
        return "skipped: depthwise"
    if conv.groups > 1:
        return f"skipped: grouped (groups={conv.groups})"
    if conv.padding_mode != "zeros":
        return f"skipped: padding_mode={conv.padding_mode!r}"
    if site is None or site.calls == 0:
        return "skipped: not called in forward"
    if site.calls > 1:
        return f"skipped: called at {site.calls} sites"
    if is_stem and not convert_first:
        return "skipped: stem (--convert-first)"
    for pattern in skip_patterns:
        if re.search(pattern, name):
            return f"skipped: matched --skip {pattern!r}"
    if conv.weight.numel() < min_params:
        return f"skipped: too small ({conv.weight.numel()} < --min-params {min_params})"
    return None


def _storage_of(conv: nn.Conv2d, options: dict) -> tuple[int, int]:
    """(dense bits, stored bits) of ``conv`` converted with ``options``, without allocating weights."""
    meta = VersatileConv2d.shaped_like(conv, device="meta", **options)
    return meta.dense_bits(), meta.stored_bits()


def _dense_bits(conv: nn.Conv2d) -> int:
    count = conv.weight.numel() + (conv.bias.numel() if conv.bias is not None else 0)
    return count * conv.weight.element_size() * 8


def _mask_density(layer: VersatileConv2d) -> float | None:
    mask = layer.output_mask()
    return None if mask is None else float(mask.detach().float().mean())


def _swap(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, replacement)


# --------------------------------------------------------------------------- the pass
def compress(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    mode: str = "learned",
    secondary: int = 2,
    channel_window: int | None = None,
    channel_stride: int = 1,
    mask_sharing: str = "per-filter",
    scale: bool = True,
    target_ratio: float | None = None,
    convert_first: bool = False,
    min_params: int = 0,
    skip: Sequence[str] = (),
    init: str = "fit",
    dry_run: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[nn.Module, ConversionPlan]:
    """Convert the eligible Conv2d layers of ``model`` into VersatileConv2d, initialised without data.

    Returns a converted deep copy (the user's classes and attribute names, eval mode) and the plan.
    ``target_ratio`` picks the secondary count per layer (mode ``learned`` or the channel modes) or
    which layers to convert (``spatial``) so that the whole model's stored size shrinks by that
    factor, preferring the layers whose fit error is lowest per bit saved. ``dry_run`` decides
    without fitting or swapping anything (``vconvert inspect`` on a plain model). ``progress`` is
    called as (layers done, layers in all, layer name). The input model is not modified.
    """
    if init not in METHODS:
        raise BadInputError(f"--init must be one of {', '.join(METHODS)}; got {init!r}.")
    for pattern in skip:
        try:
            re.compile(pattern)
        except re.error as error:
            raise BadInputError(f"--skip {pattern!r} is not a valid regular expression ({error}).") from error
    base_options = ConvOptions(mode, secondary, channel_window, channel_stride, mask_sharing, scale)
    try:  # surface option errors (bad mode, bad sharing) once, before any work
        VersatileConv2d(max(2, channel_stride + 1), 4, 3, device="meta", **base_options.layer_kwargs())
    except ValueError as error:
        raise BadInputError(str(error)) from error

    source = copy.deepcopy(model).eval()
    sites, traced_with, note = analyse(source, example_input)
    convs = {name: m for name, m in source.named_modules() if isinstance(m, nn.Conv2d)}
    order = [name for name in sites if name in convs] + [name for name in convs if name not in sites]
    stem = order[0] if order else None

    unmatched = [p for p in skip if not any(re.search(p, name) for name in convs)]
    if unmatched:
        raise BadInputError(f"--skip {unmatched[0]!r} matches no Conv2d in the model; check the layer names.")

    decisions: dict[str, LayerDecision] = {}
    eligible: list[str] = []
    for name in order:
        conv, site = convs[name], sites.get(name)
        reason = _skip_reason(name, conv, site, name == stem, convert_first, min_params, skip)
        decision = LayerDecision(
            name=name,
            decision=reason or CONVERTED,
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            kernel_size=list(conv.kernel_size),
            groups=conv.groups,
            call_sites=site.calls if site else 0,
            input_shape=site.input_shape if site else None,
            output_shape=site.output_shape if site else None,
            users=site.users if site else [],
            dense_bits=_dense_bits(conv),
        )
        if site and site.output_shape:
            decision.macs = conv_macs(site.output_shape, conv.in_channels, conv.kernel_size, conv.groups)
        if reason is None:
            try:
                dense_bits, stored_bits = _storage_of(conv, base_options.layer_kwargs())
            except ValueError as error:
                decision.decision = f"skipped: options do not apply ({error})"
            else:
                if stored_bits >= dense_bits:
                    decision.decision = "skipped: does not save storage"
                else:
                    eligible.append(name)
        decisions[name] = decision

    model_dense_bits = model_stored_bits(source)
    chosen = {name: base_options.layer_kwargs() for name in eligible}
    choice_note = ""
    if target_ratio is not None:
        chosen, choice_note = _choose_for_target(
            source, {n: convs[n] for n in eligible}, base_options, target_ratio, model_dense_bits, init
        )
        for name in eligible:
            if name not in chosen:
                decisions[name].decision = "skipped: not needed for --target-ratio"

    if dry_run:
        for name, options in chosen.items():
            decisions[name].options = options
            decisions[name].stored_bits = _storage_of(convs[name], options)[1]
        chosen = {}
    converted = source
    for index, (name, options) in enumerate(chosen.items()):
        if progress:
            progress(index, len(chosen), name)
        conv = convs[name]
        layer = VersatileConv2d.shaped_like(conv, **options)
        error = initialise_from_weight(layer, conv.weight.detach(), _detached(conv.bias), method=init)
        _swap(converted, name, layer)
        decision = decisions[name]
        decision.options = options
        decision.stored_bits = layer.stored_bits()
        decision.fit_error = float(error)
        decision.mask_density = _mask_density(layer)
    if progress:
        progress(len(chosen), len(chosen), "")

    plan = ConversionPlan(
        layers=list(decisions.values()),
        traced_with=traced_with,
        trace_note=note,
        input_shape=list(example_input.shape),
        init=init,
        target_ratio=target_ratio,
        model_dense_bits=model_dense_bits,
        model_stored_bits=model_dense_bits - sum(d.dense_bits - d.stored_bits for d in decisions.values() if d.options),
        choice_note=choice_note,
    )
    return converted.eval(), plan


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach()


def _candidate_options(base: ConvOptions, conv: nn.Conv2d) -> list[dict]:
    """Options for one layer in order of increasing compression."""
    if base.mode == "spatial":
        return [base.layer_kwargs()]
    candidates = []
    for count in SECONDARY_CANDIDATES:
        options = ConvOptions(**{**asdict(base), "secondary": count, "channel_window": None}).layer_kwargs()
        try:
            _storage_of(conv, options)
        except ValueError:
            continue
        candidates.append(options)
    return candidates


def _smaller_candidates(base: ConvOptions, conv: nn.Conv2d) -> list[tuple[dict, VersatileConv2d]]:
    """(options, unfitted layer) of each candidate that stores fewer bits than ``conv``, in ladder order."""
    layers = [(options, VersatileConv2d.shaped_like(conv, **options)) for options in _candidate_options(base, conv)]
    return [(options, layer) for options, layer in layers if layer.stored_bits() < _dense_bits(conv)]


def ladder_floor(dense_bits: int, step_bits: list[int]) -> int:
    """Bits of a layer at the top of its ladder: the greedy climbs while each step saves bits."""
    current = dense_bits
    for bits in step_bits:
        if bits >= current:
            break
        current = bits
    return current


def _fit_ladder(conv: nn.Conv2d, pairs: list[tuple[dict, VersatileConv2d]], init: str) -> list[tuple[dict, int, float]]:
    """(options, stored bits, relative fit error) of each candidate layer, fitted to ``conv``."""
    weight, bias = conv.weight.detach(), _detached(conv.bias)
    return [
        (options, layer.stored_bits(), float(initialise_from_weight(layer, weight, bias, method=init)))
        for options, layer in pairs
    ]


def _choose_for_target(
    model: nn.Module,
    convs: dict[str, nn.Conv2d],
    base: ConvOptions,
    target_ratio: float,
    model_dense_bits: int,
    init: str,
) -> tuple[dict[str, dict], str]:
    """Greedy: repeatedly take the step (convert a layer, or raise its secondary count) with the
    lowest increase of relative fit error per bit saved, until the whole model is small enough."""
    if target_ratio <= 1.0:
        raise BadInputError(f"--target-ratio must be greater than 1, got {target_ratio}.")
    budget = model_dense_bits / target_ratio
    shaped = {name: _smaller_candidates(base, conv) for name, conv in convs.items()}
    # how small the greedy can make the model follows from the shapes alone: refuse before fitting
    smallest = sum(
        ladder_floor(_dense_bits(convs[name]), [layer.stored_bits() for _, layer in pairs])
        for name, pairs in shaped.items()
    ) + (model_dense_bits - sum(_dense_bits(conv) for conv in convs.values()))
    if smallest > budget:
        raise BadInputError(
            f"--target-ratio {target_ratio} is out of reach: converting every eligible conv as far as "
            f"secondary={SECONDARY_CANDIDATES[-1]} gives {model_dense_bits / smallest:.2f}x; ask for less or "
            "convert more layers."
        )
    ladders = {name: _fit_ladder(convs[name], pairs, init) for name, pairs in shaped.items()}
    level = dict.fromkeys(convs, -1)
    total = model_dense_bits

    def step_cost(name: str) -> float | None:
        steps, current = ladders[name], level[name]
        if current + 1 >= len(steps):
            return None
        before_bits = steps[current][1] if current >= 0 else _dense_bits(convs[name])
        before_error = steps[current][2] if current >= 0 else 0.0
        saved = before_bits - steps[current + 1][1]
        return (steps[current + 1][2] - before_error) / saved if saved > 0 else None

    while total > budget:  # reachable (checked above): some step that saves bits is always left
        costs = {name: cost for name in convs if (cost := step_cost(name)) is not None}
        name = min(costs, key=costs.__getitem__)
        steps, current = ladders[name], level[name]
        before_bits = steps[current][1] if current >= 0 else _dense_bits(convs[name])
        total -= before_bits - steps[current + 1][1]
        level[name] = current + 1
    chosen = {name: ladders[name][lvl][0] for name, lvl in level.items() if lvl >= 0}
    counts = sorted({options["secondary"] for options in chosen.values()}) if base.mode != "spatial" else []
    note = (
        f"--target-ratio {target_ratio}: converted {len(chosen)} of {len(convs)} eligible convs"
        + (f" with secondary counts {counts}" if counts else "")
        + ", taking first the steps with the least fit error per bit saved;"
        + f" whole model {model_dense_bits / total:.2f}x"
    )
    return chosen, note


def apply_plan(model: nn.Module, plan: ConversionPlan) -> nn.Module:
    """Swap in (untrained) VersatileConv2d layers where ``plan`` converted a conv, by qualified name.

    Used to rebuild a converted model from its base before loading the converted state_dict.
    """
    for decision in plan.converted:
        try:
            conv = model.get_submodule(decision.name)
        except AttributeError as error:
            raise BadInputError(
                f"The checkpoint's plan names layer {decision.name!r}, which the base model lacks."
            ) from error
        if not isinstance(conv, nn.Conv2d):
            raise BadInputError(f"The checkpoint's plan names {decision.name!r}, which is not a Conv2d in the base.")
        try:
            layer = VersatileConv2d.shaped_like(conv, **(decision.options or {}))
        except (ValueError, TypeError) as error:
            raise BadInputError(
                f"The checkpoint's plan gives layer {decision.name!r} options it cannot take ({error}): the file is "
                "damaged."
            ) from error
        _swap(model, decision.name, layer)
    return model


def refresh_mask_density(plan: ConversionPlan, model: nn.Module) -> ConversionPlan:
    """A copy of ``plan`` with each converted layer's mask density read from ``model`` (it changes
    when masks are learned)."""
    refreshed = ConversionPlan.from_dict(copy.deepcopy(plan.to_dict()))
    for decision in refreshed.converted:
        layer = model.get_submodule(decision.name)
        if isinstance(layer, VersatileConv2d):
            decision.mask_density = _mask_density(layer)
    return refreshed
