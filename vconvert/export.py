"""Export: fold, optionally fuse BatchNorm, write ONNX, and prove parity in onnxruntime.

The stages, each a function of its own:

1. :func:`prepare_for_export` — a deep copy in eval mode with every VersatileConv2d folded into a
   plain Conv2d (METHOD.md §1) and, with ``fold_bn``, every BatchNorm2d that directly follows a conv
   fused into it with torch's own ``fuse_conv_bn_eval``. Conv→BN pairs come from an FX trace; a
   model FX cannot trace falls back to forward hooks, and that fold is checked numerically (and
   dropped, with a note, if it changes the output).
2. :func:`to_onnx` — torch.onnx's dynamo exporter, opset 18, a dynamic batch axis, named input and
   output(s), returned as one in-memory ``ModelProto`` (no ``.onnx.data`` sidecar).
3. :func:`vconvert.onnx_compact.compact_graph` for ``--compact``, or
   :func:`vconvert.ring_export.ring_convs` for ``--ring`` (spatial convs as one conv per ring size).
4. :func:`verify_onnx` (:func:`start_session` + :func:`check_parity`) — ``onnx.checker``, then an
   onnxruntime CPU session at batch 1 and 4 against the PyTorch folded model: max abs difference ≤
   tolerance × output scale and identical top-1.
5. :func:`export` — all of it, then an atomic write of the verified bytes (nothing under the final
   name unless every check passed), and the before/after table (:func:`compare`).

Memory: a resnet50-sized export holds several 100 MB copies of the weights (modules, protos,
serialised bytes, onnxruntime sessions), so :func:`export` drops each as soon as the next stage has
what it needs; the peak must stay near one model's worth above the import baseline.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import io
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from vconvert.errors import BadInputError, CheckFailedError
from vconvert.io import atomic_write_bytes, check_writable
from vconvert.layers import VersatileConv2d, fold_model, versatile_layers
from vconvert.report import model_stored_bits

__all__ = [
    "OPSET",
    "ExportReport",
    "FoldResult",
    "Parity",
    "bn_factor",
    "check_parity",
    "check_ring_request",
    "compare",
    "count_macs",
    "expected_outputs",
    "export",
    "find_conv_bn_pairs",
    "format_name",
    "ort_session",
    "prepare_for_export",
    "start_session",
    "strip_export_traces",
    "to_onnx",
    "verify_onnx",
]

OPSET = 18
TWO_GB = 2**31 - 2**20  # protobuf's limit, with some room for the graph itself
INPUT_NAME = "input"
RING_WITH_COMPACT = (
    "--ring cannot be combined with --compact (the compact file rebuilds dense weights, not ring convs); choose one."
)


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
    try:
        return _pairs_from_fx(model), "fx"
    except Exception:  # FX raises many types on untraceable Python
        return _pairs_from_hooks(model, example), "hooks"


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


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


def _max_abs(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True)) if a else 0.0


def _outputs(result: Any) -> list[Tensor]:
    """A model's output as a flat list of tensors (a tensor, or a tuple/list/dict of them)."""
    if isinstance(result, Tensor):
        return [result]
    if isinstance(result, Mapping):
        result = list(result.values())
    if isinstance(result, (tuple, list)):
        return [t for item in result for t in _outputs(item)]
    raise BadInputError(f"The model returns a {type(result).__name__}; ONNX export needs tensors.")


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
        _set_module(fused, conv_name, fuse_conv_bn_eval(conv, bn))
        _set_module(fused, bn_name, nn.Identity())
    if found_with == "hooks" and pairs:
        with torch.no_grad():
            before, after = _outputs(folded(example)), _outputs(fused(example))
        scale = max(float(t.abs().max()) for t in before) or 1.0
        if _max_abs(before, after) > 1e-4 * scale:
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


def count_macs(model: nn.Module, example: Tensor) -> int:
    """Multiply-accumulates per forward of ``example`` in Conv2d and Linear layers (forward hooks)."""
    total = 0
    handles = []

    def hook(module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return total


# --------------------------------------------------------------------------- ONNX
def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def to_onnx(
    module: nn.Module, example: Tensor, *, optimize: bool = True, dynamic_batch: bool = True
) -> onnx.ModelProto:
    """``module`` (eval mode) as an ONNX model in memory: dynamo exporter, opset 18, input "input",
    output "output" (or "output_0", "output_1", ... for several), batch axis named "batch"."""
    with torch.no_grad():
        outputs = _outputs(module(example))
    output_names = ["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=output_names,
                dynamic_shapes=dynamic,
                optimize=optimize,
                verbose=False,
            )
    except Exception as error:
        raise BadInputError(
            f"torch.onnx could not export the folded model ({type(error).__name__}: {_first_line(error)}); "
            "rerun with --debug for the exporter's report."
        ) from error
    if program is None:
        raise BadInputError("torch.onnx returned no program for the folded model.")
    model = program.model_proto
    strip_export_traces(model)
    return model


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph held by its nodes' attributes (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _graphs(attribute.g)
            for subgraph in attribute.graphs:
                yield from _graphs(subgraph)


def strip_export_traces(model: onnx.ModelProto) -> None:
    """Remove, in place, what torch.onnx records about the exporting machine and its source code.

    The exporter annotates every node with debugging metadata (stack traces with absolute paths, FX
    node text, the class hierarchy, rewrite-rule names) and keeps intermediate ``value_info``; none of
    it is needed to run the model. Model-level ``metadata_props`` keep vconvert's own keys only.
    """
    model.doc_string = ""
    kept = [(prop.key, prop.value) for prop in model.metadata_props if prop.key.startswith("vconvert.")]
    del model.metadata_props[:]
    for key, value in kept:
        model.metadata_props.add(key=key, value=value)
    graphs = list(_graphs(model.graph))
    for function in model.functions:
        function.doc_string = ""
        del function.metadata_props[:]
    for container in [*graphs, *model.functions]:
        for node in container.node:
            node.doc_string = ""
            del node.metadata_props[:]
    for graph in graphs:
        graph.doc_string = ""
        del graph.value_info[:]
        for value in [*graph.input, *graph.output]:
            value.doc_string = ""
            del value.metadata_props[:]
        for tensor in graph.initializer:
            tensor.doc_string = ""
            del tensor.metadata_props[:]


def set_metadata(model: onnx.ModelProto, metadata: Mapping[str, Any]) -> None:
    """Store ``metadata`` as model-level metadata_props (JSON for anything that is not a string)."""
    existing = {prop.key: prop for prop in model.metadata_props}
    for key, value in metadata.items():
        prop = existing.get(key) or model.metadata_props.add()
        prop.key, prop.value = key, value if isinstance(value, str) else json.dumps(value)


def ort_session(model: bytes | str, threads: int | None = None):
    """An onnxruntime CPU InferenceSession (all graph optimisations on)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # idle worker threads must not spin: sessions measured side by side would steal each other's cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def _run(session, batch: Tensor) -> list[np.ndarray]:
    return session.run(None, {session.get_inputs()[0].name: batch.numpy()})


@dataclass
class Parity:
    """How an ONNX model compared with the PyTorch folded model (plain data)."""

    max_abs_diff: float
    output_scale: float
    tolerance: float
    top1_agree: bool
    top1_mismatches: int
    batches: list[int]

    @property
    def relative(self) -> float:
        return self.max_abs_diff / self.output_scale


def expected_outputs(reference: nn.Module, inputs: Sequence[Tensor]) -> list[list[Tensor]]:
    """``reference``'s outputs (float, flattened to a list) on every batch of ``inputs``."""
    with torch.no_grad():
        return [[t.detach().float() for t in _outputs(reference(batch))] for batch in inputs]


def start_session(model_bytes: bytes, what: str = "the ONNX model") -> tuple[Any, float]:
    """onnx.checker, then an onnxruntime CPU session: (session, start-up ms); CheckFailedError if either fails."""
    try:
        onnx.checker.check_model(model_bytes)  # bytes, not a parsed copy: one model less in memory
    except Exception as error:
        raise CheckFailedError(f"onnx.checker rejects {what} ({_first_line(error)}).") from error
    begin = time.perf_counter()
    try:
        session = ort_session(model_bytes)
    except Exception as error:
        raise CheckFailedError(f"onnxruntime cannot load {what} ({_first_line(error)}).") from error
    startup_ms = (time.perf_counter() - begin) * 1e3
    release_freed_memory()  # the session's start-up transients (a compact file constant-folds its weights)
    return session, startup_ms


def check_parity(
    session: Any,
    expected: Sequence[Sequence[Tensor]],
    inputs: Sequence[Tensor],
    tolerance: float = 1e-4,
    what: str = "the ONNX model",
    outputs: list | None = None,
) -> Parity:
    """Run ``session`` on every batch of ``inputs`` against the PyTorch ``expected`` outputs (see
    :func:`expected_outputs`): max |ort − torch| ≤ tolerance · max|torch| and the same top-1 (ignoring
    rows whose two best logits are closer than that bound: a tie has no order).

    Raises :class:`CheckFailedError` (exit 1) saying by how much on failure. The onnxruntime outputs
    are appended to ``outputs`` when it is given (one list of arrays per batch).
    """
    worst, scale, mismatches = 0.0, 0.0, 0
    results = []
    for batch, wanted in zip(inputs, expected, strict=True):
        arrays = _run(session, batch)
        if outputs is not None:
            outputs.append(arrays)
        got = [torch.from_numpy(a) for a in arrays]
        if [tuple(t.shape) for t in got] != [tuple(t.shape) for t in wanted]:
            raise CheckFailedError(
                f"{what} returns shapes {[tuple(t.shape) for t in got]} for a batch of {len(batch)}, PyTorch "
                f"{[tuple(t.shape) for t in wanted]}."
            )
        scale = max(scale, *(float(t.abs().max()) for t in wanted))
        worst = max(worst, _max_abs(got, wanted))
        results.append((got, wanted))
    scale = scale or 1.0
    bound = tolerance * scale
    for got, wanted in results:
        for g, e in zip(got, wanted, strict=True):
            if e.dim() == 2 and e.shape[1] > 1:
                top2 = e.topk(2, dim=1).values
                decided = (top2[:, 0] - top2[:, 1]) > 2 * bound
                mismatches += int(((g.argmax(1) != e.argmax(1)) & decided).sum())
    parity = Parity(worst, scale, tolerance, mismatches == 0, mismatches, [len(b) for b in inputs])
    if worst > bound or mismatches:
        raise CheckFailedError(
            f"{what} does not match the PyTorch folded model: max abs difference {worst:.3g} is "
            f"{worst / scale:.3g} of the output scale {scale:.3g} (allowed {tolerance:g})"
            + (f", and {mismatches} top-1 prediction(s) differ" if mismatches else "")
            + "; nothing was written."
        )
    return parity


def verify_onnx(
    model_bytes: bytes,
    reference: nn.Module,
    inputs: Sequence[Tensor],
    tolerance: float = 1e-4,
    what: str = "the ONNX model",
    outputs: list | None = None,
) -> Parity:
    """:func:`start_session` then :func:`check_parity` against ``reference`` run on ``inputs``."""
    session, _ = start_session(model_bytes, what)
    return check_parity(session, expected_outputs(reference, inputs), inputs, tolerance, what, outputs)


def measure_latency(sessions: Mapping[str, Any], batch: Tensor, seconds: float = 1.0, rounds: int = 200) -> dict:
    """Median onnxruntime latency (ms) of each session on ``batch``, measured in interleaved rounds."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():  # warm-up
        for _ in range(2):
            _run(session, batch)
    start = time.perf_counter()
    for _ in range(rounds):
        for name, session in sessions.items():
            begin = time.perf_counter()
            _run(session, batch)
            times[name].append((time.perf_counter() - begin) * 1e3)
        if time.perf_counter() - start > seconds and len(next(iter(times.values()))) >= 5:
            break
    return {name: statistics.median(values) for name, values in times.items()}


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
            if isinstance(module, VersatileConv2d) and name == "mask_proxy":
                continue
            total += param.numel()
    return total


def _dense_weights(module: nn.Module, names: Sequence[str]) -> dict[str, np.ndarray]:
    return {name: module.get_submodule(name).weight.detach().cpu().numpy() for name in names}


def _serialise(model: onnx.ModelProto) -> bytes:
    if model.ByteSize() > TWO_GB:
        raise BadInputError(
            "The ONNX model is over 2 GB, which one protobuf file cannot hold; vconvert writes single files only."
        )
    return model.SerializeToString()


def compare(
    exported: dict[str, bytes], batch: Tensor, seconds: float = 1.0
) -> tuple[dict[str, float], dict[str, float]]:
    """(session start-up ms, median latency ms) of each ONNX model, measured side by side.

    Sessions start in the dict's order, so put first the one whose start-up needs most memory (a
    compact file constant-folds its weights then). ``exported`` is emptied as they start, so that bytes
    nobody else holds are freed before the next one loads (a session keeps its own copy of the weights).
    """
    startup, sessions = {}, {}
    for name in list(exported):
        data = exported.pop(name)
        begin = time.perf_counter()
        sessions[name] = ort_session(data)
        startup[name] = (time.perf_counter() - begin) * 1e3
        del data
        release_freed_memory()  # a session's start-up transients, before the next one starts
    return startup, measure_latency(sessions, batch, seconds=seconds)


def format_name(compact: bool, ring: bool) -> str:
    """The ``vconvert.format`` metadata value: "compact", "ring" or "dense"."""
    return "compact" if compact else "ring" if ring else "dense"


def check_ring_request(layers: Mapping[str, VersatileConv2d], compact: bool) -> None:
    """Raise :class:`BadInputError` when ``--ring`` cannot be honoured for these versatile layers."""
    from vconvert.ring_export import spatial_layers

    if compact:
        raise BadInputError(RING_WITH_COMPACT)
    if not spatial_layers(layers):
        modes = sorted({layer.mode for layer in layers.values()}) or ["none"]
        raise BadInputError(
            f"--ring needs versatile layers in spatial mode and this model has none (modes: {', '.join(modes)}); "
            "export without --ring."
        )


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
) -> ExportReport:
    """Fold ``model``, export it to ONNX at ``output`` and verify it in onnxruntime before writing.

    ``input_shape`` is (N, C, H, W); the batch axis stays dynamic. ``inputs`` are the verification
    batches (default: random normal at batch 1 and 4). With ``compact`` the file stores the versatile
    form and rebuilds dense weights in-graph (:mod:`vconvert.onnx_compact`); with ``ring`` every
    spatial versatile conv runs as one cropped conv per ring size (:mod:`vconvert.ring_export`), the
    other convs fold densely. With ``teacher`` the original network is exported the same way and the
    before/after table compares both; ``measure`` False skips the table's latency and start-up
    columns (and the teacher). Nothing is written under ``output`` unless every check passed; failures
    raise :class:`CheckFailedError`, options that cannot be honoured :class:`BadInputError`.

    ``quantize="int8"`` writes a QDQ int8 file instead (:mod:`vconvert.quantize`): onnxruntime calibrates
    activations on the preprocessed ``calibration`` batches and quantizes the other layers, each converted
    conv holds its secondary filters as exact int8 filters (the compact form rebuilds them in integers);
    the compact and dense int8 files must agree exactly, every converted conv must run as QLinearConv, and
    the int8 file must pick the fp32 file's top-1 class on at least ``min_agreement`` of the calibration
    images. Its values get short names unless ``short_names`` is False (names are a tenth of a small
    int8 file).
    """
    from vconvert.onnx_compact import compact_graph
    from vconvert.quantize import check_quantize
    from vconvert.ring_export import ring_convs

    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def step(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    def say(text: str) -> None:
        if progress:
            progress(text)

    output = check_writable(output)
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
    check_quantize(quantize, ring)
    quantized = quantize == "int8"
    if quantized and not calibration:
        from vconvert.errors import MissingCalibrationError

        raise MissingCalibrationError("Int8 quantization needs calibration images, and none were given.")
    channels, height, width = (int(v) for v in input_shape[1:])
    # batch 2: torch.export specialises a size-1 axis to a constant, and the batch must stay dynamic
    example = torch.randn(2, channels, height, width, generator=torch.Generator().manual_seed(0))
    if inputs is None:
        generator = torch.Generator().manual_seed(1)
        inputs = [torch.randn(b, channels, height, width, generator=generator) for b in (1, 4)]

    say("folding")
    expected = expected_outputs(fold_model(model), inputs)  # kept instead of a folded model: a few KB
    folded, fold = prepare_for_export(model, example, fold_bn=fold_bn)
    if ring:
        rings = ring_convs(folded, layers)
        if not rings.ringed:
            raise BadInputError(
                f"--ring found no spatial conv it can crop ({next(iter(rings.left_dense.values()))}); "
                "export without --ring."
            )
        fold.ring, fold.ring_left_dense = rings.ringed, rings.left_dense
    macs = count_macs(folded, example[:1])
    folded_params = sum(p.numel() for p in folded.parameters())
    folded_kib = sum(p.numel() * p.element_size() for p in folded.parameters()) / 1024
    weights = _dense_weights(folded, fold.versatile) if compact or quantized else {}
    step("fold_s")
    say("exporting to ONNX")
    proto = to_onnx(folded, example, optimize=fold_bn)  # the exporter's optimiser would fuse BN itself
    del folded
    info = {
        "vconvert.format": format_name(compact, ring),
        "vconvert.quantization": quantize,
        "vconvert.bn_folded": str(len(fold.bn_folded)),
        "vconvert.input_shape": [None, channels, height, width],
        **dict(metadata or {}),
    }
    set_metadata(proto, info)
    final_bytes = _serialise(proto)
    if not compact:
        del proto
    release_freed_memory()
    step("export_s")

    # The verification sessions are the ones timed later: each file loads into onnxruntime once.
    say("verifying in onnxruntime")
    sizes: dict[str, int] = {}
    timed: dict[str, tuple[Any, float]] = {}  # name -> (session, start-up ms) for the latency columns
    what = "the ring ONNX export" if ring else "the dense ONNX export"
    session, startup_ms = start_session(final_bytes, what)
    first_outputs: list = []
    parity = check_parity(session, expected, inputs, tolerance, what, first_outputs)
    step("verify_s")
    compact_diff, layer_bytes, int8 = None, {}, None
    if quantized:
        from vconvert.quantize import quantize_export

        say("quantizing to int8 (onnxruntime calibration)")
        sizes["dense fold"] = len(final_bytes)
        if measure:
            timed["dense fold"] = (session, startup_ms)
        int8 = quantize_export(
            final_bytes, session, layers, weights, fold.bn_scales, calibration or [], compact=compact,
            inputs=inputs, metadata=info, min_agreement=min_agreement, short_names=short_names,
        )  # fmt: skip
        del session, final_bytes, weights
        final_bytes, session, startup_ms = int8.file_bytes, int8.session, int8.startup_ms
        if compact:
            sizes["int8 dense"] = int8.dense_size
            if measure:
                timed["int8 dense"] = (int8.dense_session, int8.dense_startup_ms)
        int8.file_bytes = int8.session = int8.dense_session = None
        release_freed_memory()
        step("quantize_s")
    elif compact:
        say("building the compact graph")
        sizes["dense fold"] = len(final_bytes)
        if measure:
            timed["dense fold"] = (session, startup_ms)
        del session, final_bytes
        layer_bytes = compact_graph(proto, layers, weights, fold.bn_scales)
        del weights
        final_bytes = _serialise(proto)
        del proto
        release_freed_memory()
        what = "the compact ONNX export"
        session, startup_ms = start_session(final_bytes, what)
        compact_outputs: list = []
        parity = check_parity(session, expected, inputs, tolerance, what, compact_outputs)
        compact_diff = _max_abs_arrays(first_outputs, compact_outputs)
        if compact_diff > 1e-6 * parity.output_scale:
            raise CheckFailedError(
                f"The compact ONNX export differs from the dense one by {compact_diff:.3g} (allowed "
                f"{1e-6 * parity.output_scale:.3g}); nothing was written."
            )
        step("compact_s")
    if measure:
        timed["exported"] = (session, startup_ms)
    del session

    say("writing")
    atomic_write_bytes(final_bytes, output)
    sizes["exported"] = file_bytes = len(final_bytes)
    del final_bytes
    release_freed_memory()
    step("write_s")
    if teacher is not None and measure:
        say("exporting the original network")
        teacher_bytes = _teacher_bytes(teacher, example, fold_bn)
        release_freed_memory()
        sizes = {"original": len(teacher_bytes), **sizes}
        timed["original"] = start_session(teacher_bytes, "the original network's ONNX export")
        del teacher_bytes
        step("teacher_export_s")
    say("measuring")
    sizes = {name: sizes[name] for name in ("original", "exported", "int8 dense", "dense fold") if name in sizes}
    nothing = dict.fromkeys(sizes, float("nan"))
    startup = {name: timed[name][1] for name in sizes} if measure else nothing
    sessions = {name: timed[name][0] for name in sizes} if measure else {}
    latency = measure_latency(sessions, inputs[0], seconds=latency_seconds) if measure else nothing
    sessions.clear()
    timed.clear()
    step("latency_s")
    table = []
    for name, size in sizes.items():
        source = teacher if name == "original" else model
        assert source is not None
        row = {
            "model": name,
            "stored_params": _stored_floats(source),
            "stored_kib": model_stored_bits(source) / 8192,
            "file_bytes": size,
            "macs": count_macs(teacher, example[:1]) if name == "original" and teacher is not None else macs,
            "ort_latency_ms": latency[name],
            "ort_startup_ms": startup[name],
        }
        if name in ("dense fold", "int8 dense") or (name == "exported" and quantized and not compact):
            row["stored_params"], row["stored_kib"] = folded_params, folded_kib
        if int8 is not None and name in ("exported", "int8 dense"):
            row["stored_kib"] = (int8.stored_bits if name == "exported" else int8.dense_stored_bits) / 8192
        row["bits_per_weight"] = row["stored_kib"] * 8192 / max(1, folded_params)
        table.append(row)

    return ExportReport(
        output=str(output),
        compact=compact,
        file_bytes=file_bytes,
        opset=OPSET,
        graph=fold.to_dict() | {"compact_layer_bytes": layer_bytes},
        graph_note=fold.describe(),
        parity=asdict(parity),
        compact_vs_dense_max_abs_diff=compact_diff,
        inputs=inputs_note,
        table=table,
        timings_s=timings,
        metadata={key: value for key, value in (int8.metadata if int8 is not None else info).items()},
        quantization=int8.report if int8 is not None else None,
    )


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc's malloc_trim; a no-op elsewhere).

    glibc keeps freed tensor and protobuf memory in its heap, so without this the resident size only
    ever grows and a 100 MB weight copy dropped early still counts at the later peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _max_abs_arrays(first: Sequence[Sequence[np.ndarray]], second: Sequence[Sequence[np.ndarray]]) -> float:
    """Max |a − b| over matching onnxruntime outputs of two models (one list of arrays per batch)."""
    return max(
        float(np.abs(a - b).max())
        for first_batch, second_batch in zip(first, second, strict=True)
        for a, b in zip(first_batch, second_batch, strict=True)
    )


def _teacher_bytes(teacher: nn.Module, example: Tensor, fold_bn: bool) -> bytes:
    """The original network exported the way :func:`export` exports the converted one (for the table)."""
    teacher_folded, _ = prepare_for_export(teacher.eval(), example, fold_bn=fold_bn)
    return _serialise(to_onnx(teacher_folded, example, optimize=fold_bn))


def load_verification_images(
    metadata: Mapping[str, Any], input_shape: Sequence[int]
) -> tuple[list[Tensor] | None, str]:
    """Batches of 1 and 4 real images when the checkpoint names an existing image folder, else None."""
    recal = metadata.get("bn_recalibration") or {}
    folder = recal.get("data") if isinstance(recal, Mapping) else None
    preprocessing = metadata.get("preprocessing") or {}
    if not folder or not os.path.isdir(folder) or not preprocessing or input_shape[1] != 3:
        return None, "random normal inputs (the checkpoint names no image folder)"
    try:
        from vconvert.data import calibration_batches

        images = next(
            iter(
                calibration_batches(
                    Path(folder),
                    tuple(input_shape[2:]),
                    preprocessing["mean"],
                    preprocessing["std"],
                    batch_size=4,
                    limit=4,
                )
            )
        )
    except Exception as error:
        return None, f"random normal inputs (reading {folder} failed: {_first_line(error)})"
    if len(images) < 4:
        return None, f"random normal inputs ({folder} holds fewer than 4 images)"
    return [images[:1], images], f"4 real images from {folder}"


def export_checkpoint(
    path: str | Path,
    output: str | Path,
    *,
    trust: bool = False,
    compact: bool = False,
    ring: bool = False,
    fold_bn: bool = True,
    input_shape: Sequence[int] | None = None,
    compare_original: bool = True,
    tolerance: float = 1e-4,
    progress: Callable[[str], None] | None = None,
    quantize: str = "none",
    calib_data: str | Path | None = None,
    calib_images: int = 512,
    min_agreement: float = 0.9,
) -> ExportReport:
    """:func:`export` for a ``.vc.pt`` file: its model, its teacher, its preprocessing and input shape.

    With ``quantize="int8"`` the calibration images come from ``calib_data`` ("digits" or an image
    folder), else from the data the checkpoint records (its fine-tuning data or BN recalibration folder);
    up to ``calib_images`` of them, preprocessed as the checkpoint records.
    """
    from vconvert.api import NOT_FINETUNED, load_checkpoint
    from vconvert.data import describe_input, log, normalisation_origin
    from vconvert.errors import MissingCalibrationError
    from vconvert.quantize import calibration_images, calibration_source, check_quantize

    check_quantize(quantize, ring)
    output = check_writable(output)
    if Path(output).resolve() == Path(path).resolve():
        raise BadInputError(f"The output {output} would overwrite the checkpoint; choose another -o.")
    checkpoint = load_checkpoint(path, trust=trust)
    if not checkpoint.finetuned:
        log.info(f"{Path(path).name} is {NOT_FINETUNED}")
    shape = list(input_shape or checkpoint.metadata.get("input_shape") or checkpoint.plan.input_shape)
    inputs, note = load_verification_images(checkpoint.metadata, shape)
    metadata: dict[str, Any] = {"vconvert.source": Path(path).name}
    if checkpoint.metadata.get("preprocessing"):
        metadata["vconvert.preprocessing"] = checkpoint.metadata["preprocessing"]
    calibration, calibration_note = None, ""
    if quantize != "none":
        source = calibration_source(calib_data, checkpoint.metadata)
        if source is None:
            raise MissingCalibrationError(
                "Int8 quantization needs calibration images: none were given and the checkpoint records no image "
                "source that still exists."
            )
        recorded = checkpoint.metadata.get("preprocessing")
        size_from = "--input-shape" if input_shape else f"the input shape {Path(path).name} records"
        data_from = "--calib-data" if calib_data is not None else f"recorded in {Path(path).name}"
        normalisation_from = normalisation_origin(False, bool(recorded), path, source)
        line = describe_input(None, size_from, normalisation_from, data_from, shape=shape, preprocessing=recorded,
                              data=source)  # fmt: skip
        log.info(f"calibration {line}")
        calibration, calibration_note = calibration_images(
            source, shape, recorded, limit=calib_images, size_from=size_from
        )
    report = export(
        checkpoint.model,
        output,
        input_shape=shape,
        compact=compact,
        ring=ring,
        fold_bn=fold_bn,
        teacher=checkpoint.teacher if compare_original else None,
        inputs=inputs,
        inputs_note=note,
        metadata=metadata,
        tolerance=tolerance,
        progress=progress,
        quantize=quantize,
        calibration=calibration,
        min_agreement=min_agreement,
    )
    if report.quantization is not None:
        report.quantization["calibration"] = calibration_note
    return report
