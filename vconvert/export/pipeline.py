"""Export a model: fold, fuse BatchNorm, write ONNX, prove it in onnxruntime, then write it atomically.

:func:`export` runs the stages, each in a module of its own:

1. :mod:`vconvert.export.fold` — a deep copy in eval mode with every VersatileConv2d folded into a plain
   Conv2d (docs/ALGEBRA.md §8) and, with ``fold_bn``, every BatchNorm2d that directly follows a conv fused
   into it; with ``ring``, spatial convs run as one cropped conv per ring size (:mod:`vconvert.export.ring`).
2. :mod:`vconvert.export.onnx_file` — torch.onnx's dynamo exporter, opset 18, a dynamic batch axis, named
   input and output(s), one in-memory ``ModelProto`` with vconvert's metadata.
3. :mod:`vconvert.export.verify` — ``onnx.checker``, then an onnxruntime CPU session at batch 1 and 4
   against the PyTorch folded model: max abs difference ≤ tolerance × output scale and identical top-1.
4. ``compact`` (:mod:`vconvert.export.compact`: the versatile form stored, dense weights rebuilt in-graph,
   equal to the dense file) or ``quantize="int8"`` (:mod:`vconvert.export.quantize`).
5. an atomic write of the verified bytes (nothing under the final name unless every check passed), and the
   before/after table of sizes, MACs, latency and start-up measured side by side.

Memory: a resnet50-sized export holds several 100 MB copies of the weights (modules, protos, serialised
bytes, onnxruntime sessions), so :func:`export` drops each as soon as the next stage has what it needs; the
peak must stay near one model's worth above the import baseline.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vconvert.convert.report import count_macs, model_stored_bits
from vconvert.errors import BadInputError, CheckFailedError, VConvertWarning
from vconvert.export.fold import FoldResult, prepare_for_export
from vconvert.export.onnx_file import OPSET, serialise, set_metadata, to_onnx
from vconvert.export.verify import (
    Parity,
    check_parity,
    expected_outputs,
    max_abs_arrays,
    measure_latency,
    release_freed_memory,
    start_session,
)
from vconvert.io.files import atomic_write_bytes, check_writable
from vconvert.nn.versatile import VersatileConv2d, fold_model, layer_widths, versatile_layers, weight_quantization

RING_WITH_COMPACT = (
    "`ring=True` cannot be combined with `compact=True` (the compact file rebuilds dense weights, not ring "
    "convs); choose one."
)


# --------------------------------------------------------------------------- the whole export
@dataclass
class ExportReport:
    """What :func:`export` wrote and measured (plain data; ``to_dict`` for ``--json``)."""

    output: str
    compact: bool
    file_bytes: int
    opset: int
    graph: dict
    graph_note: str
    parity: dict
    compact_vs_dense_max_abs_diff: float | None
    inputs: str
    table: list[dict]
    timings_s: dict
    metadata: dict
    quantization: dict | None = None  # what the int8 step measured and checked (None when not quantized)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stored_floats(model: nn.Module) -> int:
    """Floating-point parameters stored (a versatile layer's masks are bits, not counted here)."""
    total = 0
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, VersatileConv2d) and name in ("mask_proxy", "primary_step"):
                continue
            total += param.numel()
    return total


def _dense_weights(module: nn.Module, names: Sequence[str]) -> dict[str, np.ndarray]:
    return {name: module.get_submodule(name).weight.detach().cpu().numpy() for name in names}


def format_name(compact: bool, ring: bool) -> str:
    """The ``vconvert.format`` metadata value: "compact", "ring" or "dense"."""
    return "compact" if compact else "ring" if ring else "dense"


def check_ring_request(layers: Mapping[str, VersatileConv2d], compact: bool) -> None:
    """Raise :class:`BadInputError` when ``--ring`` cannot be honoured for these versatile layers."""
    from vconvert.export.ring import spatial_layers

    if compact:
        raise BadInputError(RING_WITH_COMPACT)
    if not spatial_layers(layers):
        modes = sorted({layer.mode for layer in layers.values()}) or ["none"]
        raise BadInputError(
            f"`ring=True` needs versatile layers in spatial mode and this model has none (modes: {', '.join(modes)}); "
            "export without `ring=True`."
        )


def primary_bits(model: nn.Module, weight_bits: int | None) -> dict[str, int]:
    """The width of each versatile layer's primaries in the int8 export: ``weight_bits`` for every layer, else
    each layer's own (the width it was fine-tuned at, or the one its plan gave it), else 8."""
    try:
        weight_quantization(model)
    except ValueError as error:  # layers quantized with different quantizers by hand
        raise BadInputError(f"The model cannot be exported: {error}") from None
    return {name: weight_bits or width or 8 for name, width in layer_widths(model).items()}


def needs_requantization(model: nn.Module, bits: Mapping[str, int]) -> bool:
    """Whether exporting at ``bits`` quantizes primaries the model was not fine-tuned at: any layer whose width
    is not its own, except 8 bits for float primaries (the plain int8 export)."""
    return any(_requantized_layer(width, bits[name]) for name, width in layer_widths(model).items())


def _requantized_layer(own: int | None, bits: int) -> bool:
    return own != bits and not (own is None and bits == 8)


class RequantizationWarning(VConvertWarning):
    """The primaries are exported at another width than the model was fine-tuned at."""


def requantized(model: nn.Module, bits: Mapping[str, int]) -> nn.Module:
    """A copy of ``model`` whose primaries are the ones its forward uses, quantized min-max at ``bits`` (per
    layer): the network an int8 export at ``bits`` holds for a model not fine-tuned at those widths."""
    copy_ = copy.deepcopy(model).eval()
    for name, layer in versatile_layers(copy_):
        with torch.no_grad():
            layer.primary.copy_(layer.quantized_primary())
        layer.set_weight_bits(bits[name], "minmax")
    return copy_


def widths_text(bits: Mapping[str, int | None] | int) -> str:
    """``4-bit`` for one width, ``2- to 8-bit`` when layers differ."""
    values = {bits} if isinstance(bits, int) else {width for width in bits.values() if width is not None}
    if not values:
        return "float"
    low, high = min(values), max(values)
    return f"{low}-bit" if low == high else f"{low}- to {high}-bit"


def warn_requantization(model: nn.Module, bits: Mapping[str, int], calibration: Sequence[Tensor], name: str) -> float:
    """Warn that ``model``'s primaries will be quantized at ``bits`` without fine-tuning, with the share of
    calibration images whose top-1 class that changes (in PyTorch); returns that share."""
    own = layer_widths(model)
    changed_layers = {layer: width for layer, width in bits.items() if _requantized_layer(own[layer], width)}
    trained = f"{widths_text(own)} primaries" if any(own.values()) else "float primaries"
    quantized = requantized(model, bits)
    changed = total = 0
    with torch.no_grad():
        for batch in calibration:
            before, after = model(batch), quantized(batch)
            if before.ndim < 2:
                return float("nan")
            changed += int((before.argmax(1) != after.argmax(1)).sum())
            total += before.argmax(1).numel()
    share = changed / max(1, total)
    target = widths_text(changed_layers)
    subject = "they are" if len(changed_layers) == len(own) else f"{len(changed_layers)} of its {len(own)} layers are"
    advice = (
        f"fine-tune it with `weight_bits` {min(changed_layers.values())} to keep its accuracy"
        if min(changed_layers.values()) < 8
        else "expect a small change"
    )
    warnings.warn(
        f"{name} has {trained}, so {subject} quantized min-max to {target.removesuffix('-bit')} bits at export: "
        f"that changes the top-1 class of {100 * share:.1f}% of the {total} calibration images; {advice}.",
        RequantizationWarning,
        stacklevel=3,
    )
    return share


class _Steps:
    """Times each stage of an export (``timings_s``) and reports progress."""

    def __init__(self, progress: Callable[[str], None] | None) -> None:
        self.progress, self.timings, self.clock = progress, {}, time.perf_counter()

    def say(self, text: str) -> None:
        if self.progress:
            self.progress(text)

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self.clock, 3)
        self.clock = now


def _check_request(
    model: nn.Module,
    input_shape: Sequence[int],
    compact: bool,
    ring: bool,
    quantize: str,
    calibration: Sequence[Tensor] | None,
    weight_bits: int | None,
) -> dict[str, VersatileConv2d]:
    """The model's versatile layers, once the request is known to be one :func:`export` can honour."""
    from vconvert.export.quantize import check_quantize

    training = [name or "the model" for name, m in model.named_modules() if m.training]
    if training:
        raise BadInputError(
            f"The model is in train mode ({training[0]} and {len(training) - 1} more modules), so dropout and "
            "batch statistics would differ from inference: call model.eval() before exporting."
        )
    if len(input_shape) != 4:
        raise BadInputError(f"The input shape must be N,C,H,W; got {list(input_shape)}.")
    layers = dict(versatile_layers(model))
    if ring:
        check_ring_request(layers, compact)
    check_quantize(quantize, ring, weight_bits)
    if quantize == "int8" and not calibration:
        from vconvert.errors import MissingCalibrationError

        raise MissingCalibrationError(
            "Int8 quantization needs calibration images, and none were given: pass `calib_data` (a folder of "
            "images, or digits)."
        )
    return layers


VERIFY_BATCHES = (1, 4)  # the random verification batches; the tracing example has batch 2


def check_export_memory(model: nn.Module, input_shape: Sequence[int]) -> None:
    """Refuse (BadInputError) an export whose largest batch (:data:`VERIFY_BATCHES`) does not fit the memory
    budget: the images and the forward's peak, sized on the meta device (:func:`vconvert.io.budget.check_forward`),
    stand for what each onnxruntime session holds; a shape the model refuses is said, never run."""
    from vconvert.io.budget import check_forward

    shape = [max(VERIFY_BATCHES), *(int(v) for v in input_shape[1:])]
    check_forward(
        model,
        shape,
        f"Exporting at input shape {list(input_shape)} (verification batch {shape})",
        lambda reason: (
            f"The model rejects an input of shape {shape} ({reason}): give `input_shape` the shape it takes."
        ),
    )


def _example_and_inputs(input_shape: Sequence[int], inputs: Sequence[Tensor] | None) -> tuple[Tensor, Sequence[Tensor]]:
    """The tracing example (batch 2: torch.export specialises a size-1 axis to a constant, and the batch
    must stay dynamic) and the verification batches (random normal at batch 1 and 4 unless given)."""
    channels, height, width = (int(v) for v in input_shape[1:])
    example = torch.randn(2, channels, height, width, generator=torch.Generator().manual_seed(0))
    if inputs is None:
        generator = torch.Generator().manual_seed(1)
        inputs = [torch.randn(b, channels, height, width, generator=generator) for b in VERIFY_BATCHES]
    return example, inputs


@dataclass
class _DenseFold:
    """The folded model exported to ONNX, with what later stages need of the PyTorch side."""

    file_bytes: bytes | None
    proto: Any  # the ModelProto, kept only when the compact graph is built from it
    fold: FoldResult
    info: dict[str, Any]  # the file's vconvert metadata
    macs: int
    folded_params: int
    folded_kib: float
    weights: dict[str, np.ndarray]  # converted convs' dense weights (compact and int8 rebuild from them)


def _fold_to_onnx(
    model: nn.Module,
    example: Tensor,
    layers: Mapping[str, VersatileConv2d],
    *,
    compact: bool,
    ring: bool,
    fold_bn: bool,
    quantize: str,
    metadata: Mapping[str, Any] | None,
    steps: _Steps,
) -> _DenseFold:
    """Fold (and with ``ring`` crop) the versatile layers, fuse BN, export to ONNX with metadata."""
    from vconvert.export.ring import ring_convs

    folded, fold = prepare_for_export(model, example, fold_bn=fold_bn)
    if ring:
        rings = ring_convs(folded, layers)
        if not rings.ringed:
            raise BadInputError(
                f"`ring=True` found no spatial conv it can crop ({next(iter(rings.left_dense.values()))}); "
                "export without `ring=True`."
            )
        fold.ring, fold.ring_left_dense = rings.ringed, rings.left_dense
    macs = count_macs(folded, example[:1])
    folded_params = sum(p.numel() for p in folded.parameters())
    folded_kib = sum(p.numel() * p.element_size() for p in folded.parameters()) / 1024
    weights = _dense_weights(folded, fold.versatile) if compact or quantize == "int8" else {}
    steps.done("fold_s")
    steps.say("exporting to ONNX")
    proto = to_onnx(folded, example, optimize=fold_bn)  # the exporter's optimiser would fuse BN itself
    del folded
    channels, height, width = example.shape[1:]
    info = {
        "vconvert.format": format_name(compact, ring),
        "vconvert.quantization": quantize,
        "vconvert.bn_folded": str(len(fold.bn_folded)),
        "vconvert.input_shape": [None, channels, height, width],
        **dict(metadata or {}),
    }
    set_metadata(proto, info)
    file_bytes = serialise(proto)
    if not compact:
        proto = None
    release_freed_memory()
    steps.done("export_s")
    return _DenseFold(file_bytes, proto, fold, info, macs, folded_params, folded_kib, weights)


@dataclass
class _Written:
    """The verified file that :func:`export` writes, and its onnxruntime session."""

    file_bytes: bytes | None
    session: Any
    startup_ms: float
    parity: Parity
    compact_diff: float | None = None
    layer_bytes: dict = field(default_factory=dict)
    int8: Any = None  # Int8Export when quantized


def _build_compact(
    dense: _DenseFold,
    layers: Mapping[str, VersatileConv2d],
    expected: list,
    inputs: Sequence[Tensor],
    tolerance: float,
    dense_outputs: list,
) -> _Written:
    """The compact graph (versatile form stored, dense weights rebuilt in-graph), checked against the
    dense file: the same outputs to 1e-6 of the output scale."""
    from vconvert.export.compact import compact_graph

    layer_bytes = compact_graph(dense.proto, layers, dense.weights, dense.fold.bn_scales)
    dense.weights = {}
    file_bytes = serialise(dense.proto)
    dense.proto = None
    release_freed_memory()
    what = "the compact ONNX export"
    session, startup_ms = start_session(file_bytes, what)
    compact_outputs: list = []
    parity = check_parity(session, expected, inputs, tolerance, what, compact_outputs)
    compact_diff = max_abs_arrays(dense_outputs, compact_outputs)
    if compact_diff > 1e-6 * parity.output_scale:
        raise CheckFailedError(
            f"The compact ONNX export differs from the dense one by {compact_diff:.3g} (allowed "
            f"{1e-6 * parity.output_scale:.3g}); nothing was written."
        )
    return _Written(file_bytes, session, startup_ms, parity, compact_diff, layer_bytes)


def _size_table(
    sizes: Mapping[str, int],
    latency: Mapping[str, float],
    startup: Mapping[str, float],
    model: nn.Module,
    teacher: nn.Module | None,
    example: Tensor,
    dense: _DenseFold,
    int8: Any,
    quantized: bool,
    compact: bool,
) -> list[dict]:
    """One row per file measured: stored parameters and KiB, file bytes, MACs, latency, start-up."""
    table = []
    for name, size in sizes.items():
        source = teacher if name == "original" else model
        assert source is not None
        row = {
            "model": name,
            "stored_params": _stored_floats(source),
            "stored_kib": model_stored_bits(source) / 8192,
            "file_bytes": size,
            "macs": count_macs(teacher, example[:1]) if name == "original" and teacher is not None else dense.macs,
            "ort_latency_ms": latency[name],
            "ort_startup_ms": startup[name],
        }
        if name in ("dense fold", "int8 dense") or (name == "exported" and quantized and not compact):
            row["stored_params"], row["stored_kib"] = dense.folded_params, dense.folded_kib
        if int8 is not None and name in ("exported", "int8 dense"):
            row["stored_kib"] = (int8.stored_bits if name == "exported" else int8.dense_stored_bits) / 8192
        row["bits_per_weight"] = row["stored_kib"] * 8192 / max(1, dense.folded_params)
        table.append(row)
    return table


def export(
    model: nn.Module,
    output: str | Path,
    *,
    input_shape: Sequence[int],
    compact: bool = False,
    ring: bool = False,
    fold_bn: bool = True,
    teacher: nn.Module | None = None,
    inputs: Sequence[Tensor] | None = None,
    inputs_note: str = "random normal inputs",
    metadata: Mapping[str, Any] | None = None,
    tolerance: float = 1e-4,
    latency_seconds: float = 1.0,
    measure: bool = True,
    progress: Callable[[str], None] | None = None,
    quantize: str = "none",
    calibration: Sequence[Tensor] | None = None,
    min_agreement: float = 0.9,
    short_names: bool = True,
    weight_bits: int | None = None,
    int8_target: str | None = None,
    source_name: str = "The model",
) -> ExportReport:
    """Fold ``model``, export it to ONNX at ``output`` and verify it in onnxruntime before writing.

    ``input_shape`` is (N, C, H, W); the batch axis stays dynamic. ``inputs`` are the verification
    batches (default: random normal at batch 1 and 4). With ``compact`` the file stores the versatile
    form and rebuilds dense weights in-graph (:mod:`vconvert.export.compact`); with ``ring`` every
    spatial versatile conv runs as one cropped conv per ring size (:mod:`vconvert.export.ring`), the
    other convs fold densely. With ``teacher`` the original network is exported the same way and the
    before/after table compares both; ``measure`` False skips the table's latency and start-up
    columns (and the teacher). Nothing is written under ``output`` unless every check passed; failures
    raise :class:`CheckFailedError`, options that cannot be honoured :class:`BadInputError`.

    ``quantize="int8"`` writes a QDQ int8 file instead (:mod:`vconvert.export.quantize`): onnxruntime
    calibrates activations on the preprocessed ``calibration`` batches and quantizes the other layers, each
    converted conv holds its secondary filters as exact int8 filters (the compact form rebuilds them in
    integers); the compact and dense int8 files must agree exactly, every converted conv must run as
    QLinearConv, and the int8 file must pick the fp32 file's top-1 class on at least ``min_agreement`` of
    the calibration images. Its values get short names unless ``short_names`` is False (names are a tenth
    of a small int8 file).

    ``weight_bits`` (int8 only) is the width of the versatile primaries: 2 to 8 (below 8 stored at exactly
    that many bits and widened to int8 in the graph); by default the width the model was fine-tuned at (``finetune
    --weight-bits``), else 8. A model fine-tuned at that width keeps its integers exactly; otherwise they are
    quantized min-max at export, with a warning that says how many calibration images change their top-1
    class (``source_name`` names the model in it). ``int8_target``: the CPUs the int8 file must run exactly
    on, ``any`` (7-bit weights, the default) or ``vnni`` (8-bit; :func:`vconvert.export.quantize.quantize_export`).
    """
    steps = _Steps(progress)
    output = check_writable(output)
    layers = _check_request(model, input_shape, compact, ring, quantize, calibration, weight_bits)
    check_export_memory(model, input_shape)
    quantized = quantize == "int8"
    bits = primary_bits(model, weight_bits) if quantized else None
    if bits is not None and needs_requantization(model, bits):
        warn_requantization(model, bits, calibration or [], source_name)
    example, inputs = _example_and_inputs(input_shape, inputs)

    steps.say("folding")
    expected = expected_outputs(fold_model(model), inputs)  # kept instead of a folded model: a few KB
    dense = _fold_to_onnx(model, example, layers, compact=compact, ring=ring, fold_bn=fold_bn, quantize=quantize,
                          metadata=metadata, steps=steps)  # fmt: skip

    # The verification sessions are the ones timed later: each file loads into onnxruntime once.
    steps.say("verifying in onnxruntime")
    sizes: dict[str, int] = {}
    timed: dict[str, tuple[Any, float]] = {}  # name -> (session, start-up ms) for the latency columns
    what = "the ring ONNX export" if ring else "the dense ONNX export"
    session, startup_ms = start_session(dense.file_bytes, what)
    dense_outputs: list = []
    written = _Written(dense.file_bytes, session, startup_ms,
                       check_parity(session, expected, inputs, tolerance, what, dense_outputs))  # fmt: skip
    del session
    steps.done("verify_s")
    if quantized or compact:
        sizes["dense fold"] = len(dense.file_bytes)
        if measure:
            timed["dense fold"] = (written.session, written.startup_ms)
    if quantized:
        from vconvert.export.quantize import quantize_export

        steps.say("quantizing to int8 (onnxruntime calibration)")
        int8 = quantize_export(
            dense.file_bytes, written.session, layers, dense.weights, dense.fold.bn_scales, calibration or [],
            compact=compact, inputs=inputs, metadata=dense.info, min_agreement=min_agreement,
            short_names=short_names, bits=bits or {}, int8_target=int8_target,
        )  # fmt: skip
        dense.file_bytes, dense.weights = None, {}
        written = _Written(int8.file_bytes, int8.session, int8.startup_ms, written.parity, int8=int8)
        if compact:
            sizes["int8 dense"] = int8.dense_size
            if measure:
                timed["int8 dense"] = (int8.dense_session, int8.dense_startup_ms)
        int8.file_bytes = int8.session = int8.dense_session = None
        release_freed_memory()
        steps.done("quantize_s")
    elif compact:
        steps.say("building the compact graph")
        dense.file_bytes, written = None, None
        written = _build_compact(dense, layers, expected, inputs, tolerance, dense_outputs)
        steps.done("compact_s")
    if measure:
        timed["exported"] = (written.session, written.startup_ms)
    written.session = None

    steps.say("writing")
    atomic_write_bytes(written.file_bytes, output)
    sizes["exported"] = file_bytes = len(written.file_bytes)
    written.file_bytes, dense.file_bytes = None, None
    release_freed_memory()
    steps.done("write_s")
    if teacher is not None and measure:
        steps.say("exporting the original network")
        teacher_bytes = _teacher_bytes(teacher, example, fold_bn)
        release_freed_memory()
        sizes = {"original": len(teacher_bytes), **sizes}
        timed["original"] = start_session(teacher_bytes, "the original network's ONNX export")
        del teacher_bytes
        steps.done("teacher_export_s")
    steps.say("measuring")
    sizes = {name: sizes[name] for name in ("original", "exported", "int8 dense", "dense fold") if name in sizes}
    nothing = dict.fromkeys(sizes, float("nan"))
    startup = {name: timed[name][1] for name in sizes} if measure else nothing
    sessions = {name: timed[name][0] for name in sizes} if measure else {}
    latency = measure_latency(sessions, inputs[0], seconds=latency_seconds) if measure else nothing
    sessions.clear()
    timed.clear()
    steps.done("latency_s")
    int8 = written.int8
    return ExportReport(
        output=str(output),
        compact=compact,
        file_bytes=file_bytes,
        opset=OPSET,
        graph=dense.fold.to_dict() | {"compact_layer_bytes": written.layer_bytes},
        graph_note=dense.fold.describe(),
        parity=asdict(written.parity),
        compact_vs_dense_max_abs_diff=written.compact_diff,
        inputs=inputs_note,
        table=_size_table(sizes, latency, startup, model, teacher, example, dense, int8, quantized, compact),
        timings_s=steps.timings,
        metadata=dict(int8.metadata if int8 is not None else dense.info),
        quantization=int8.report if int8 is not None else None,
    )


def _teacher_bytes(teacher: nn.Module, example: Tensor, fold_bn: bool) -> bytes:
    """The original network exported the way :func:`export` exports the converted one (for the table)."""
    teacher_folded, _ = prepare_for_export(teacher.eval(), example, fold_bn=fold_bn)
    return serialise(to_onnx(teacher_folded, example, optimize=fold_bn))
