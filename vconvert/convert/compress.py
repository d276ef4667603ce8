"""The compress pass: find every Conv2d call site, decide per conv, swap in VersatileConv2d, fit.

Reads like ``torch.fx.experimental.optimization.fuse``: deep copy, trace, match exact types, replace.
The FX trace is used to *find* convs (call sites, order, users); the rewrite swaps modules by
qualified name, so the converted model keeps the user's classes and attribute names (no
GraphModule). Models FX cannot trace fall back to forward hooks for the same facts.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

from vconvert.convert.discover import _ConvSite, analyse
from vconvert.convert.plan import (
    CONVERTED,
    DENSE,
    ConversionPlan,
    ConvOptions,
    LayerDecision,
    dense_bits,
    detached,
    mask_density,
    storage_of,
)
from vconvert.convert.report import model_stored_bits
from vconvert.convert.select import _choose_for_target
from vconvert.convert.target_size import SizePlan, plan_for_size
from vconvert.errors import BadInputError
from vconvert.fit.initialise import METHODS, initialise_from_weight
from vconvert.nn.quantize import check_bits
from vconvert.nn.versatile import VersatileConv2d


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
    target_size: float | None = None,
    calibration: Sequence[torch.Tensor] = (),
    search: str = "knapsack",
    candidates: dict | None = None,
    weight_bits: int | None = None,
    reconstructed: bool = False,
) -> tuple[nn.Module, ConversionPlan]:
    """Convert the eligible Conv2d layers of ``model`` into VersatileConv2d, initialised without data.

    Returns a converted deep copy (the user's classes and attribute names, eval mode) and the plan.
    ``target_ratio`` picks the secondary count per layer (mode ``learned`` or the channel modes) or
    which layers to convert (``spatial``) so that the whole model's stored size shrinks by that
    factor, preferring the layers whose fit error is lowest per bit saved. ``dry_run`` decides
    without fitting or swapping anything (``vconvert inspect`` on a plain model). ``progress`` is
    called as (layers done, layers in all, layer name). The input model is not modified.

    ``target_size`` (a fraction of the fp32 file, e.g. 0.1) plans each conv instead: dense or versatile with 2
    or 4 secondaries, at 2, 3, 4 or 8 bits, measured on the unlabeled ``calibration`` batches
    (:mod:`vconvert.convert.target_size`; ``search`` knapsack or greedy; ``candidates`` a dict that keeps the
    measured choices: filled when empty, reused when filled, to plan several sizes from one measurement;
    ``reconstructed``: each choice measured as reconstruction on ``calibration`` leaves it, for a model that will
    be reconstructed next). Convs the rules above skip may still be stored dense at fewer bits; the layers get
    their widths (fine-tuning and export keep them).

    ``weight_bits`` fake-quantises the primaries of every converted layer at that width from the start (a learned
    step started min-max, what :func:`vconvert.convert.reconstruct.reconstruct` then rounds against the outputs)
    and sizes the plan at it. ``secondary`` 1 in mode ``learned`` keeps each conv dense (one filter per primary
    with a per-output scale, as ``target_size``'s dense choice), which saves storage only below 8 bits: it needs
    a ``weight_bits`` of 2 to 7.
    """
    dense = mode == "learned" and secondary == 1 and target_size is None  # a plan picks its own dense layers
    _check_weight_bits(weight_bits, dense, target_size)
    options = ConvOptions(mode, secondary, channel_window, channel_stride, mask_sharing, scale)
    base_options = _checked_options(DENSE if dense else options, init, skip)
    if target_size is not None and (target_ratio is not None or mode != "learned"):
        raise BadInputError("`target_size` plans the modes and widths itself: drop `target_ratio` and `mode`.")
    source = copy.deepcopy(model).eval()
    # analyse: every conv call site, in execution order
    sites, traced_with, note = analyse(source, example_input)
    convs = {name: m for name, m in source.named_modules() if isinstance(m, nn.Conv2d)}
    order = [name for name in sites if name in convs] + [name for name in convs if name not in sites]
    unmatched = [p for p in skip if not any(re.search(p, name) for name in convs)]
    if unmatched:
        raise BadInputError(f"`skip` {unmatched[0]!r} matches no Conv2d in the model; check the layer names.")
    # decide: a reason to skip each conv, or the options it converts with
    stem = order[0] if order else None
    decisions, reasons = {}, {}
    for name in order:
        conv, site = convs[name], sites.get(name)
        reasons[name] = _skip_reason(name, conv, site, name == stem, convert_first, min_params, skip)
        decisions[name] = _decide(name, conv, site, reasons[name], base_options, weight_bits)
    eligible = [name for name, decision in decisions.items() if decision.decision == CONVERTED]
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
    widths: dict[str, int | None] = dict.fromkeys(chosen, weight_bits) if weight_bits is not None else {}
    if target_size is not None:
        planner = functools.partial(plan_for_size, images=calibration, target_size=target_size, init=init,
                                    search=search, progress=progress, candidates=candidates,
                                    reconstructed=reconstructed)  # fmt: skip
        chosen, widths, choice_note = _plan_for_size(source, convs, decisions, reasons, base_options, planner)
    # apply: fit each chosen layer to its conv's weights and swap it in by qualified name
    if dry_run:
        for name, options in chosen.items():
            decisions[name].options = options
            decisions[name].stored_bits = storage_of(convs[name], options, widths.get(name))[1]
    else:
        _apply(source, convs, chosen, decisions, init, progress, widths)
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
        target_size=target_size,
    )
    return source.eval(), plan


PLANNABLE = re.compile(r"skipped: (stem|matched --skip|too small)")  # shapes a dense layer can take


def _plan_for_size(
    model: nn.Module,
    convs: dict[str, nn.Conv2d],
    decisions: dict[str, LayerDecision],
    reasons: dict[str, str | None],
    base: ConvOptions,
    planner: Callable[..., SizePlan],
) -> tuple[dict[str, dict], dict[str, int | None], str]:
    """``target_size``: each plannable conv's choice (``planner``: :func:`vconvert.convert.target_size.plan_for_size`
    with the request bound) as the options of the convs that become versatile, their widths, and the note; the
    decisions say what was chosen (a conv kept plain is left to the int8 export)."""
    allowed = {
        name: (1, 2, 4) if decisions[name].decision == CONVERTED else (1,)
        for name, reason in reasons.items()
        if reason is None or PLANNABLE.match(reason)
    }
    planned = planner(model, {name: convs[name] for name in allowed}, allowed, base.layer_kwargs())
    chosen: dict[str, dict] = {}
    widths: dict[str, int | None] = {}
    for name, candidate in planned.chosen.items():
        decision = decisions[name]
        decision.weight_bits, decision.divergence = candidate.choice.bits, candidate.divergence
        if candidate.choice.plain:
            decision.decision = reasons[name] or "kept dense: int8 at export (--target-size)"
            continue
        decision.decision = CONVERTED
        chosen[name] = candidate.choice.options(base.layer_kwargs())
        widths[name] = candidate.choice.weight_bits
    return chosen, widths, planned.note()


def _checked_options(options: ConvOptions, init: str, skip: Sequence[str]) -> ConvOptions:
    """``options`` once the layer accepts them (bad mode, bad sharing: said once, before any work), with
    ``init`` and the ``skip`` patterns checked too."""
    if init not in METHODS:
        raise BadInputError(f"`init` must be one of {', '.join(METHODS)}; got {init!r}.")
    for pattern in skip:
        try:
            re.compile(pattern)
        except re.error as error:
            raise BadInputError(f"`skip` {pattern!r} is not a valid regular expression ({error}).") from error
    try:
        VersatileConv2d(max(2, options.channel_stride + 1), 4, 3, device="meta", **options.layer_kwargs())
    except ValueError as error:
        raise BadInputError(str(error)) from error
    return options


def _check_weight_bits(bits: int | None, dense: bool, target_size: float | None) -> None:
    """``weight_bits`` once it agrees with a dense conversion (``secondary`` 1) and ``target_size``."""
    if bits is not None:
        if target_size is not None:
            raise BadInputError("`target_size` picks each layer's width itself: drop `weight_bits`.")
        try:
            check_bits(bits)
        except ValueError as error:
            raise BadInputError(f"`weight_bits` must be an integer from 2 to 8; got {bits!r}.") from error
    if dense and (bits is None or bits >= 8):
        raise BadInputError(
            "`secondary` 1 keeps every conv dense, which saves storage only below 8 bits: give a `weight_bits` "
            "from 2 to 7 (or use the int8 export alone)."
        )


def _decide(
    name: str, conv: nn.Conv2d, site: _ConvSite | None, reason: str | None, options: ConvOptions,
    weight_bits: int | None = None,
) -> LayerDecision:  # fmt: skip
    """What happens to one conv: skipped for ``reason``, or converted with ``options`` when they apply and
    save storage (its primaries at ``weight_bits``)."""
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
        dense_bits=dense_bits(conv),
    )
    if site and site.macs is not None:
        decision.macs = site.macs
    if reason is None:
        try:
            dense, stored = storage_of(conv, options.layer_kwargs(), weight_bits)
        except ValueError as error:
            decision.decision = f"skipped: options do not apply ({error})"
        else:
            if stored >= dense:
                decision.decision = "skipped: does not save storage"
    return decision


def _apply(
    model: nn.Module,
    convs: dict[str, nn.Conv2d],
    chosen: dict[str, dict],
    decisions: dict[str, LayerDecision],
    init: str,
    progress: Callable[[int, int, str], None] | None,
    widths: dict[str, int | None] | None = None,
) -> None:
    """Fit a versatile layer to each chosen conv's weights, swap it into ``model`` and record the result;
    ``widths`` fake-quantises a layer's primaries (the learned step of fine-tuning, started min-max)."""
    for index, (name, options) in enumerate(chosen.items()):
        if progress:
            progress(index, len(chosen), name)
        conv = convs[name]
        layer = VersatileConv2d.shaped_like(conv, **options)
        error = initialise_from_weight(layer, conv.weight.detach(), detached(conv.bias), method=init)
        if (widths or {}).get(name) is not None:
            layer.set_weight_bits(widths[name], "lsq")
        model.set_submodule(name, layer)
        decision = decisions[name]
        decision.options = options
        decision.stored_bits = layer.stored_bits()
        decision.fit_error = float(error)
        decision.mask_density = mask_density(layer)
    if progress:
        progress(len(chosen), len(chosen), "")
