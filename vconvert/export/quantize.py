"""INT8 export: QDQ ONNX whose versatile convs hold exactly int8 secondary filters, written for the CPUs it will
run on.

onnxruntime's own quantizer (:func:`vconvert.export.calibration.quantize_static_qdq`: QDQ format, MinMax
calibration on the caller's images) sets every activation range (uint8, per tensor) and quantizes every layer
vconvert did not convert (int8, symmetric, per output channel). Each converted conv is then given weights that
keep the versatile structure in integers (:mod:`vconvert.export.int8_weights`): every secondary filter is a mask
and a sign applied to its integer primary, with one weight scale per output; the int32 bias is requantized for
that scale the way onnxruntime's QDQ quantizer does it (:mod:`vconvert.export.qdq_graph`). The compact form
rebuilds the int8 weights in integers from the stored primaries and bit-packed masks
(:mod:`vconvert.export.int8_packing`) and runs the same QLinearConv as the dense int8 file.

The target (``int8_target``): ``any`` (default) writes 7-bit weights everywhere (versatile primaries |q| ≤ 63,
the other layers through ``reduce_range``, |q| ≤ 64), because onnxruntime on x86 CPUs without VNNI adds u8 × s8
products in saturating int16 pairs that 8-bit weights overflow (:mod:`vconvert.export.saturation`); ``vnni``
keeps 8-bit weights for CPUs known to add them exactly (x86 with VNNI or AMX, ARM with dot products). Narrower
primaries never saturate and keep their width; below 8 bits the compact file stores them at that width. The
file is checked under the arithmetic of the CPUs it is written for, not only this one's
(:mod:`vconvert.export.int8_checks`).

This module is the whole step (:func:`quantize_export`) and re-exports the names of its parts.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor

from vconvert.errors import BadInputError, CheckFailedError, MissingCalibrationError, VConvertWarning
from vconvert.export.calibration import (
    CALIBRATION_PIXELS,
    calibration_batch_size,
    calibration_images,
    calibration_source,
    quantize_static_qdq,
)
from vconvert.export.compact import encode_layer
from vconvert.export.int8_checks import check_agreement, top1_agreement
from vconvert.export.int8_packing import PackedPool, PackedPools, compact_int8_graph, int8_layer_subgraph
from vconvert.export.int8_weights import (
    INT8_TARGETS,
    Int8Layer,
    check_fake_quantised,
    decode_int8_layer,
    encode_int8_layer,
    pack_integers,
    primary_width,
    quantize_primaries,
    unpack_integers,
)
from vconvert.export.names import drop_defaults, shorten_names
from vconvert.export.qdq_graph import (
    check_int32_biases,
    conv_targets,
    fit_int32_biases,
    initializer_bits,
    optimized_model,
    qlinear_convs,
    quantized_bias,
    set_int8_weights,
    trim_qdq,
)
from vconvert.export.verify import run_session
from vconvert.nn.versatile import VersatileConv2d

__all__ = [
    "CALIBRATION_PIXELS",
    "INT8_TARGETS",
    "QUANTIZE_CHOICES",
    "Int8Export",
    "Int8Layer",
    "PackedPool",
    "PackedPools",
    "calibration_batch_size",
    "calibration_images",
    "calibration_source",
    "check_fake_quantised",
    "check_int8_target",
    "check_min_agreement",
    "check_quantize",
    "compact_int8_graph",
    "decode_int8_layer",
    "default_int8_target",
    "encode_int8_layer",
    "initializer_bits",
    "int8_layer_subgraph",
    "optimized_model",
    "pack_integers",
    "primary_width",
    "qlinear_convs",
    "quantize_export",
    "quantize_primaries",
    "quantized_bias",
    "set_int8_weights",
    "top1_agreement",
    "trim_qdq",
    "unpack_integers",
]

QUANTIZE_CHOICES = ("none", "int8")
MIN_AGREEMENT = 0.9
_DEFAULT_TARGET: contextvars.ContextVar[str] = contextvars.ContextVar("int8_target", default="any")


@contextlib.contextmanager
def default_int8_target(target: str) -> Iterator[None]:
    """Within the block, int8 exports that name no ``int8_target`` write for ``target`` (the CLI's
    ``--int8-target``; callers of :func:`quantize_export` can pass it directly)."""
    check_int8_target(target)
    token = _DEFAULT_TARGET.set(target)
    try:
        yield
    finally:
        _DEFAULT_TARGET.reset(token)


def check_int8_target(target: str) -> None:
    """Raise :class:`BadInputError` unless ``target`` is one of :data:`INT8_TARGETS`."""
    if target not in INT8_TARGETS:
        raise BadInputError(
            f"`int8_target` must be any (7-bit weights, exact on every CPU) or vnni (8-bit weights for x86 with VNNI "
            f"or AMX and ARM with dot products); got {target!r}."
        )


def check_min_agreement(value: float) -> None:
    """Raise :class:`BadInputError` unless ``value`` is a fraction in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise BadInputError(f"`min_agreement` must be a fraction from 0 to 1 (0.9 = 90%); got {value!r}.")


@dataclass
class Int8Export:
    """The int8 file :func:`quantize_export` built and checked, its session, and what it measured."""

    file_bytes: bytes
    session: Any
    startup_ms: float
    stored_bits: int
    dense_size: int = 0  # the dense int8 file (when the written one is compact)
    dense_session: Any = None
    dense_startup_ms: float = float("nan")
    dense_stored_bits: int = 0
    report: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)  # the vconvert.* metadata the file records


def check_quantize(quantize: str, ring: bool, weight_bits: int | None = None) -> None:
    """Raise :class:`BadInputError` when the quantization request cannot be honoured."""
    if quantize not in QUANTIZE_CHOICES:
        raise BadInputError(f"The quantization must be one of {', '.join(QUANTIZE_CHOICES)}; got {quantize!r}.")
    if quantize != "none" and ring:
        raise BadInputError("Ring convs cannot be quantized (they are float-only); export them unquantized.")
    if weight_bits is not None:
        if quantize != "int8":
            raise BadInputError("`weight_bits` sets the width of int8 primaries: pass it with `quantize` int8.")
        if isinstance(weight_bits, bool) or not isinstance(weight_bits, int) or not 2 <= weight_bits <= 8:
            raise BadInputError(f"`weight_bits` must be an integer from 2 to 8; got {weight_bits!r}.")


def _quantization_info(
    bits: Mapping[str, int], requested: Mapping[str, int], target: str, trained: bool, images: int
) -> dict[str, Any]:
    """The ``vconvert.quantization`` metadata of an int8 file."""
    from vconvert.export.pipeline import widths_text

    weights = "7-bit (reduce_range)" if target == "any" else "8-bit"
    info = {
        "type": "int8",
        "activations": "uint8 per tensor (onnxruntime MinMax calibration)",
        "weights": f"int8 symmetric per output channel ({weights} for unconverted layers); versatile convs as "
        f"sign · mask · {widths_text(bits)} primary",
        "weight_bits": _one_width(bits),
        "requested_weight_bits": _one_width(requested),
        "int8_target": target,
        "runs_exactly_on": "every CPU (no u8 x s8 pair reaches the int16 limit of x86 without VNNI)"
        if target == "any"
        else "x86 with VNNI or AMX, ARM with dot products (x86 without VNNI may saturate 8-bit weights)",
        "primary_storage": "; ".join(_primary_storage(width) for width in sorted(set(bits.values()))) or "int8",
        "primary_integers": "fine-tuned at these bits" if trained else "min-max at export",
        "calibration_images": images,
    }
    if len(set(bits.values())) > 1:
        info["layer_weight_bits"] = dict(bits)
    return info


def _one_width(bits: Mapping[str, int]) -> int | str:
    """The width every layer shares (8 for a model without versatile layers), else ``"per layer"``."""
    widths = set(bits.values())
    return widths.pop() if len(widths) == 1 else (8 if not widths else "per layer")


def _primary_storage(bits: int) -> str:
    """How the compact file stores ``bits``-bit primaries (the ``primary_storage`` metadata)."""
    if bits == 8:
        return "int8"
    return f"{bits}-bit, packed (value + {2 ** (bits - 1)}, little-endian)"  # b bits per value, 8 values in b bytes


def _warn_narrowed(
    layers: Mapping[str, VersatileConv2d], requested: Mapping[str, int], bits: Mapping[str, int]
) -> None:
    """Warn when layers fine-tuned at their requested bits are written at fewer for the target (8 → 7 for any)."""
    trained = sum(layer.weight_bits == requested[name] != bits[name] for name, layer in layers.items())
    if trained:
        from vconvert.export.pipeline import RequantizationWarning

        warnings.warn(
            RequantizationWarning(
                f"{trained} layer(s) were fine-tuned at 8 bits and are written at 7 for `int8_target` "
                f"any (8-bit weights saturate on x86 CPUs without VNNI); pass `int8_target` vnni to keep their "
                "integers for CPUs with VNNI, AMX or ARM dot products."
            ),
            stacklevel=3,
        )


class ZeroedOutputsWarning(VConvertWarning):
    """Outputs whose int32 bias does not fit at their weight step are written with zero weights."""


def _warn_zeroed(zeroed: Mapping[str, Mapping[str, Any]]) -> None:
    if not zeroed:
        return
    outputs = sum(len(entry["outputs"]) for entry in zeroed.values())
    largest = max(entry["largest_weight"] for entry in zeroed.values())
    warnings.warn(
        ZeroedOutputsWarning(
            f"{outputs} output channel(s) of {', '.join(zeroed)} have weights so small (at most {largest:.2g}) that "
            "their int32 bias does not fit at the weight step; their weights are written as zero and their biases "
            "kept, as onnxruntime does for the layers it quantizes itself."
        ),
        stacklevel=3,
    )


def quantize_export(
    fp32_bytes: bytes,
    fp32_session: Any,
    layers: Mapping[str, VersatileConv2d],
    weights: dict[str, np.ndarray],
    bn_scales: Mapping[str, torch.Tensor],
    calibration: Sequence[Tensor],
    *,
    compact: bool,
    inputs: Sequence[Tensor],
    metadata: Mapping[str, Any],
    min_agreement: float = MIN_AGREEMENT,
    short_names: bool = True,
    bits: int | Mapping[str, int] = 8,
    int8_target: str | None = None,
) -> Int8Export:
    """Quantize the verified fp32 dense file to QDQ int8, set the versatile int8 weights, build the compact
    form when asked, and check before returning (nothing is written here).

    ``weights`` are the folded (BN-fused) float weights the fp32 graph holds for each converted conv in
    ``layers`` (emptied once they have located those convs: a model's worth of memory less during
    calibration); ``calibration`` the preprocessed calibration batches. Checks, each a
    :class:`CheckFailedError`: the compact and dense int8 files give identical outputs in onnxruntime on
    ``inputs`` and the first calibration batch; after onnxruntime's optimisations every converted conv
    runs as QLinearConv; the int8 file picks the fp32 file's top-1 class on at least ``min_agreement``
    of the calibration images, in onnxruntime here and under the arithmetic of the CPUs ``int8_target``
    covers (:func:`vconvert.export.int8_checks.check_agreement`). ``short_names`` renames the file's values to
    short ids (:func:`vconvert.export.names.shorten_names`; a tenth of a small file's bytes).

    ``int8_target`` (default: ``any``, or what :func:`default_int8_target` set): ``any`` writes at most 7-bit
    weights, which no CPU saturates; ``vnni`` full 8-bit weights. The primaries are ``bits``-bit integers (one width,
    or {layer name: width}; held in int8; the compact file stores them at their width below 8; 8 becomes 7 for
    ``any``): a layer
    fine-tuned at that width keeps the very integers it was trained with, and its dequantized int8 weight must
    equal the fake-quantised weight of the fp32 file (:func:`check_fake_quantised`); other layers are quantized
    min-max from the primaries their forward uses. An output whose int32 bias would not fit at its weight step
    (weights that training shrank to ~1e-10 while the bias stayed) is written with zero weights and a step its
    bias fits (:func:`vconvert.export.qdq_graph.fit_int32_biases`; a ZeroedOutputsWarning, listed in the report
    and the file's metadata), and no int32 bias of the file may sit at the int32 limits.
    """
    from vconvert.export.onnx_file import serialise, set_metadata, strip_export_traces
    from vconvert.export.verify import start_session

    target = _DEFAULT_TARGET.get() if int8_target is None else int8_target
    check_int8_target(target)
    check_min_agreement(min_agreement)
    if not calibration:
        raise MissingCalibrationError(
            "Int8 quantization needs calibration images, and none were given: pass `calib_data` (a folder of "
            "images, or digits)."
        )
    requested = dict.fromkeys(layers, bits) if isinstance(bits, int) else {name: bits[name] for name in layers}
    widths = {name: primary_width(width, target) for name, width in requested.items()}
    _warn_narrowed(layers, requested, widths)
    trained_bits = bool(layers) and all(layer.weight_bits == widths[name] for name, layer in layers.items())
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    fp32 = onnx.load_from_string(fp32_bytes)
    targets = conv_targets(fp32, weights)
    input_name = fp32.graph.input[0].name
    del fp32
    int8_layers = {}
    for name, layer in layers.items():
        trained = layer.weight_bits == widths[name]  # fine-tuned at these bits: its own integers, checked
        own = tuple(t.cpu().numpy() for t in layer.primary_integers()) if trained else None
        int8_layers[name] = encode_int8_layer(encode_layer(layer, bn_scales.get(name)), widths[name], own)  # type: ignore[arg-type]
        if trained:
            check_fake_quantised(name, int8_layers[name], weights[name])
    weights.clear()
    model = quantize_static_qdq(fp32_bytes, calibration, input_name, reduce_range=target == "any")
    strip_export_traces(model)  # the quantizer's shape-inference value_info and its own metadata
    timings["calibrate_quantize_s"] = round(time.perf_counter() - clock, 3)
    int8_layers, zeroed = fit_int32_biases(model, targets, int8_layers)
    _warn_zeroed(zeroed)
    convs = set_int8_weights(model, targets, int8_layers)
    check_int32_biases(model)
    trim_qdq(model)
    if short_names:
        drop_defaults(model)
    images = sum(len(batch) for batch in calibration)
    quantization = _quantization_info(widths, requested, target, trained_bits, images)
    if zeroed:
        quantization["zeroed_for_int32_bias"] = {name: entry["outputs"] for name, entry in zeroed.items()}
    info = dict(metadata) | {"vconvert.quantization": quantization}
    set_metadata(model, info)
    renaming: dict[str, str] = {}
    if compact and short_names:  # the dense file is only compared with: rename a copy, compacting needs the names
        dense_model = onnx.ModelProto()
        dense_model.CopyFrom(model)
        shorten_names(dense_model)
        dense_bytes = serialise(dense_model)
        del dense_model
    else:
        renaming = shorten_names(model) if short_names and not compact else {}
        dense_bytes = serialise(model)
    dense_bits = initializer_bits(model)
    result = Int8Export(dense_bytes, None, float("nan"), dense_bits, metadata=info)
    dense_session, dense_startup = start_session(dense_bytes, "the int8 ONNX export")
    layer_bytes: dict[str, int] = {}
    compact_equal = None
    if compact:
        layer_bytes = compact_int8_graph(model, int8_layers, convs)
        renaming = shorten_names(model) if short_names else {}
        compact_bytes = serialise(model)
        result.stored_bits = initializer_bits(model)
        del model
        session, startup = start_session(compact_bytes, "the compact int8 ONNX export")
        for batch in [*inputs, calibration[0]]:
            for a, b in zip(run_session(dense_session, batch), run_session(session, batch), strict=True):
                if not np.array_equal(a, b):
                    raise CheckFailedError(
                        f"The compact int8 file differs from the dense int8 file by {float(np.abs(a - b).max()):.3g} "
                        "in onnxruntime (they must be identical); nothing was written."
                    )
        compact_equal = True
        result.file_bytes, result.session, result.startup_ms = compact_bytes, session, startup
        result.dense_size, result.dense_session, result.dense_startup_ms = (
            len(dense_bytes),
            dense_session,
            dense_startup,
        )
        result.dense_stored_bits = dense_bits
    else:
        del model
        result.session, result.startup_ms = dense_session, dense_startup
    timings["int8_files_s"] = round(time.perf_counter() - clock - sum(timings.values()), 3)

    runs = qlinear_convs(
        result.file_bytes, {name: renaming.get(conv.weight, conv.weight) for name, conv in convs.items()}
    )
    if runs["converted_left_float"] or runs["converted_not_found"]:
        names = runs["converted_left_float"] or runs["converted_not_found"]
        raise CheckFailedError(
            f"After onnxruntime's optimisations {len(names)} converted conv(s) (e.g. {names[0]!r}) do not run as "
            "QLinearConv; nothing was written."
        )
    agreement = check_agreement(fp32_session, result.session, dense_bytes, calibration,
                                min_agreement=min_agreement, target=target)  # fmt: skip
    del dense_bytes
    timings["checks_s"] = round(time.perf_counter() - clock - sum(timings.values()), 3)
    result.report = {
        "type": "int8",
        "compact": compact,
        "converted_convs": len(layers),
        "qlinear_conv": runs["qlinear_conv"],
        "float_conv": runs["float_conv"],
        "converted_as_qlinear": len(runs["converted_as_qlinear"]),
        "top1_agreement": agreement.runtime,
        "agreement_images": agreement.images,
        "min_agreement": min_agreement,
        "int8_target": target,
        "agreement": agreement.to_dict(),
        "compact_equals_dense": compact_equal,
        "weight_bits": _one_width(widths),
        "requested_weight_bits": _one_width(requested),
        "layer_weight_bits": widths,
        "weights_equal_fake_quantised": trained_bits or None,
        "zeroed_for_int32_bias": zeroed,
        "compact_layer_bytes": layer_bytes,
        "timings_s": timings,
    }
    return result
