"""Prove an ONNX file in onnxruntime: ``onnx.checker``, a CPU session, parity with the PyTorch model
(max abs difference within tolerance of the output scale, identical top-1), and side-by-side latency.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from vconvert.errors import CheckFailedError, first_line
from vconvert.export.onnx_file import output_tensors


def ort_session(model: bytes | str, threads: int | None = None, optimised: bool = True):
    """An onnxruntime CPU InferenceSession, all graph optimisations on; ``optimised=False`` turns them off, so
    a QDQ graph runs as written (float convs on dequantised values: the reference its int8 kernels approximate)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimised:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # idle worker threads must not spin: sessions measured side by side would steal each other's cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


@functools.cache
def warm_runtime() -> None:
    """Start one tiny session, once per process: onnxruntime's one-time set-up (its environment, thread pools,
    kernel registry) would otherwise be counted in whichever session starts first, making that file's
    "session start" look several times slower than the others' (it is the runtime's, not the file's)."""
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "warm", [value], [output])
    ort_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString())


def run_session(session, batch: Tensor) -> list[np.ndarray]:
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
        return [[t.detach().float() for t in output_tensors(reference(batch))] for batch in inputs]


def start_session(model_bytes: bytes, what: str = "the ONNX model") -> tuple[Any, float]:
    """onnx.checker, then an onnxruntime CPU session: (session, start-up ms); CheckFailedError if either fails."""
    try:
        onnx.checker.check_model(model_bytes)  # bytes, not a parsed copy: one model less in memory
    except Exception as error:
        raise CheckFailedError(f"onnx.checker rejects {what} ({first_line(error, 200)}).") from error
    warm_runtime()
    begin = time.perf_counter()
    try:
        session = ort_session(model_bytes)
    except Exception as error:
        raise CheckFailedError(f"onnxruntime cannot load {what} ({first_line(error, 200)}).") from error
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
        arrays = run_session(session, batch)
        if outputs is not None:
            outputs.append(arrays)
        got = [torch.from_numpy(a) for a in arrays]
        if [tuple(t.shape) for t in got] != [tuple(t.shape) for t in wanted]:
            raise CheckFailedError(
                f"{what} returns shapes {[tuple(t.shape) for t in got]} for a batch of {len(batch)}, PyTorch "
                f"{[tuple(t.shape) for t in wanted]}."
            )
        scale = max(scale, *(float(t.abs().max()) for t in wanted))
        worst = max(worst, max_abs_difference(got, wanted))
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


def measure_latency(sessions: Mapping[str, Any], batch: Tensor, seconds: float = 1.0, rounds: int = 200) -> dict:
    """Median onnxruntime latency (ms) of each session on ``batch``, measured in interleaved rounds."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():  # warm-up
        for _ in range(2):
            run_session(session, batch)
    start = time.perf_counter()
    for _ in range(rounds):
        for name, session in sessions.items():
            begin = time.perf_counter()
            run_session(session, batch)
            times[name].append((time.perf_counter() - begin) * 1e3)
        if time.perf_counter() - start > seconds and len(next(iter(times.values()))) >= 5:
            break
    return {name: statistics.median(values) for name, values in times.items()}


def compare(
    exported: dict[str, bytes], batch: Tensor, seconds: float = 1.0
) -> tuple[dict[str, float], dict[str, float]]:
    """(session start-up ms, median latency ms) of each ONNX model, measured side by side.

    Sessions start in the dict's order, so put first the one whose start-up needs most memory (a
    compact file constant-folds its weights then). ``exported`` is emptied as they start, so that bytes
    nobody else holds are freed before the next one loads (a session keeps its own copy of the weights).
    """
    startup, sessions = {}, {}
    warm_runtime()
    for name in list(exported):
        data = exported.pop(name)
        begin = time.perf_counter()
        sessions[name] = ort_session(data)
        startup[name] = (time.perf_counter() - begin) * 1e3
        del data
        release_freed_memory()  # a session's start-up transients, before the next one starts
    return startup, measure_latency(sessions, batch, seconds=seconds)


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc's malloc_trim; a no-op elsewhere).

    glibc keeps freed tensor and protobuf memory in its heap, so without this the resident size only
    ever grows and a 100 MB weight copy dropped early still counts at the later peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def max_abs_difference(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True)) if a else 0.0


def max_abs_arrays(first: Sequence[Sequence[np.ndarray]], second: Sequence[Sequence[np.ndarray]]) -> float:
    """Max |a − b| over matching onnxruntime outputs of two models (one list of arrays per batch)."""
    return max(
        float(np.abs(a - b).max())
        for first_batch, second_batch in zip(first, second, strict=True)
        for a, b in zip(first_batch, second_batch, strict=True)
    )
