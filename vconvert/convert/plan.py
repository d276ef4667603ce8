"""What compress decided, as plain data: the six conversion options, one decision per conv, the whole plan
(stored in every ``.vc.pt`` and validated field by field when read back), and how to re-apply a plan.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from vconvert.errors import BadInputError
from vconvert.nn.versatile import VersatileConv2d
from vconvert.validate import (
    check_fields,
    check_float,
    check_input_shape,
    check_int,
    check_int_list,
    check_str,
)

CONVERTED = "converted"


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


DENSE = ConvOptions(mode="channel", secondary=1)  # a dense conv with a per-output scale: one filter per primary


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
    weight_bits: int | None = None  # the width --target-size planned (8: int8 at export), None: not planned
    divergence: float | None = None  # the output divergence the planned choice alone caused (--target-size)

    @property
    def converted(self) -> bool:
        return self.decision == CONVERTED

    @classmethod
    def from_dict(cls, data: object, where: str) -> LayerDecision:
        """Inverse of ``asdict`` with strict types and bounds; a damaged entry raises BadInputError."""
        values = check_fields(data, where, tuple(item.name for item in fields(cls))[:-2], _PLANNED_FIELDS)
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
            weight_bits=_optional(values.get("weight_bits"), lambda v: check_int(v, f"{where}'s weight_bits", 2, 8)),
            divergence=_optional(values.get("divergence"), lambda v: check_float(v, f"{where}'s divergence")),
        )
        if decision.converted and decision.options is None:
            raise BadInputError(f"{where} is converted but records no options: the file is damaged.")
        return decision


_PLANNED_FIELDS = ("weight_bits", "divergence")  # written since --target-size; older files lack them


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


def storage_of(conv: nn.Conv2d, options: dict, weight_bits: int | None = None) -> tuple[int, int]:
    """(dense bits, stored bits) of ``conv`` converted with ``options`` (its primaries at ``weight_bits``; None:
    float), without allocating weights."""
    meta = VersatileConv2d.shaped_like(conv, device="meta", **options)
    meta.weight_bits = weight_bits  # sizing only: no step is allocated on the meta device
    return meta.dense_bits(), meta.stored_bits()


def dense_bits(conv: nn.Conv2d) -> int:
    count = conv.weight.numel() + (conv.bias.numel() if conv.bias is not None else 0)
    return count * conv.weight.element_size() * 8


def mask_density(layer: VersatileConv2d) -> float | None:
    mask = layer.output_mask()
    return None if mask is None else float(mask.detach().float().mean())


def detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach()


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
    target_size: float | None = None  # --target-size: the int8 file's planned fraction of the fp32 file

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
        values = check_fields(data, where, tuple(item.name for item in fields(cls))[:-1], ("target_size",))
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
            target_size=_optional(
                values.get("target_size"), lambda v: check_float(v, f"{where}'s target_size", positive=True)
            ),
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
                    "secondary": _secondary_shown(options),
                    "shared": options.get("mask_sharing") == "shared",
                    "bits": layer.weight_bits,
                    "dense_bits": layer.dense_bits,
                    "stored_bits": layer.stored_bits or layer.dense_bits,
                    "fit_error": layer.fit_error,
                    "mask_density": layer.mask_density,
                }
            )
        return rows


def _secondary_shown(options: dict) -> int | None:
    """The secondary count a table shows: learned layers', and 1 for a dense one (channel mode, one secondary)."""
    if options.get("mode") == "learned" or (options.get("mode") == "channel" and options.get("secondary") == 1):
        return options.get("secondary")
    return None


def check_options_fit(conv: nn.Conv2d, options: dict, name: str) -> None:
    """Refuse options that ask for more than the conv's shape allows (docs/ALGEBRA.md §1): a learned layer's
    ``secondary`` slots beyond its output channels would hold no output (shared masks would still allocate
    a row for each), a channel window beyond its input channels holds no channel."""
    mode, secondary, window = options.get("mode"), options.get("secondary"), options.get("channel_window")
    if mode == "learned" and isinstance(secondary, int) and secondary > conv.out_channels:
        raise BadInputError(
            f"The checkpoint's plan gives layer {name!r} secondary {secondary}, more than its {conv.out_channels} "
            "output channels: the file is damaged."
        )
    if isinstance(window, int) and window > conv.in_channels:
        raise BadInputError(
            f"The checkpoint's plan gives layer {name!r} channel_window {window}, more than its {conv.in_channels} "
            "input channels: the file is damaged."
        )


def layer_bytes(layer: nn.Module) -> int:
    """Bytes of a layer's parameters and buffers (a layer on the meta device is sized without allocating)."""
    tensors = [*layer.parameters(), *layer.buffers()]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def _planned_layers(model: nn.Module, plan: ConversionPlan) -> dict[str, tuple[nn.Conv2d, dict]]:
    """Each converted conv of ``plan`` in ``model`` with its options, once they fit the conv and the layers
    they ask for, built first on the meta device, fit the memory budget together."""
    from vconvert.io.budget import check_allocation

    planned: dict[str, tuple[nn.Conv2d, dict]] = {}
    sizes: dict[str, int] = {}
    for decision in plan.converted:
        try:
            conv = model.get_submodule(decision.name)
        except AttributeError as error:
            raise BadInputError(
                f"The checkpoint's plan names layer {decision.name!r}, which the base model lacks."
            ) from error
        if not isinstance(conv, nn.Conv2d):
            raise BadInputError(f"The checkpoint's plan names {decision.name!r}, which is not a Conv2d in the base.")
        options = decision.options or {}
        check_options_fit(conv, options, decision.name)
        try:
            sizes[decision.name] = layer_bytes(VersatileConv2d.shaped_like(conv, device="meta", **options))
        except (ValueError, TypeError, RuntimeError) as error:
            raise BadInputError(
                f"The checkpoint's plan gives layer {decision.name!r} options it cannot take ({error}): the file is "
                "damaged."
            ) from None
        planned[decision.name] = (conv, options)
    if sizes:
        largest = max(sizes, key=sizes.__getitem__)
        check_allocation(
            sum(sizes.values()),
            f"The checkpoint's plan ({len(sizes)} versatile layers, the largest {largest!r})",
        )
    return planned


def apply_plan(model: nn.Module, plan: ConversionPlan) -> nn.Module:
    """Swap in (untrained) VersatileConv2d layers where ``plan`` converted a conv, by qualified name.

    Used to rebuild a converted model from its base before loading the converted state_dict. Every layer
    is checked against its conv and sized on the meta device (:func:`check_options_fit`, the memory budget)
    before any is built.
    """
    for name, (conv, options) in _planned_layers(model, plan).items():
        model.set_submodule(name, VersatileConv2d.shaped_like(conv, **options))
    return model


def refresh_mask_density(plan: ConversionPlan, model: nn.Module) -> ConversionPlan:
    """A copy of ``plan`` with each converted layer's mask density read from ``model`` (it changes
    when masks are learned)."""
    refreshed = ConversionPlan.from_dict(copy.deepcopy(plan.to_dict()))
    for decision in refreshed.converted:
        layer = model.get_submodule(decision.name)
        if isinstance(layer, VersatileConv2d):
            decision.mask_density = mask_density(layer)
    return refreshed
