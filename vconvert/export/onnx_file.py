"""One in-memory ONNX model from a folded PyTorch model: torch.onnx's dynamo exporter (opset 18, a dynamic
batch axis, named input and outputs), export traces stripped, vconvert metadata set, serialised as one file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from vconvert.errors import BadInputError, VConvertWarning, first_line

OPSET = 18
TWO_GB = 2**31 - 2**20  # protobuf's limit, with some room for the graph itself
INPUT_NAME = "input"


class TracedExportWarning(VConvertWarning):
    """torch.export could not capture the model, so it was exported with the TorchScript tracer."""


# --------------------------------------------------------------------------- ONNX


def output_tensors(result: Any) -> list[Tensor]:
    """A model's output as a flat list of tensors (a tensor, or a tuple/list/dict of them)."""
    if isinstance(result, Tensor):
        return [result]
    if isinstance(result, Mapping):
        result = list(result.values())
    if isinstance(result, (tuple, list)):
        return [t for item in result for t in output_tensors(item)]
    raise BadInputError(f"The model returns a {type(result).__name__}; ONNX export needs tensors.")


def to_onnx(
    module: nn.Module, example: Tensor, *, optimize: bool = True, dynamic_batch: bool = True
) -> onnx.ModelProto:
    """``module`` (eval mode) as an ONNX model in memory: dynamo exporter, opset 18, input "input",
    output "output" (or "output_0", "output_1", ... for several), batch axis named "batch"."""
    with torch.no_grad():
        outputs = output_tensors(module(example))
    output_names = ["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    try:
        with _exporter_quiet():
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
        model = _traced_fallback(module, example, output_names, dynamic_batch, error)
    else:
        if program is None:
            raise BadInputError("torch.onnx returned no program for the folded model.")
        model = program.model_proto
    strip_export_traces(model)
    return model


@contextlib.contextmanager
def _exporter_quiet() -> Iterator[None]:
    """Keep the exporters' own output (graph dumps, reports, log lines, warnings) off the terminal: vconvert
    says in one sentence what happened (the full report with `debug=True`, as a traceback)."""
    sink = io.StringIO()
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def _traced_fallback(
    module: nn.Module, example: Tensor, output_names: list[str], dynamic_batch: bool, cause: BaseException
) -> onnx.ModelProto:
    """Export with torch.onnx's TorchScript tracer when torch.export cannot capture the model (e.g. its forward
    branches on a tensor's value): the tracer records the path the example input takes, so a one-line warning
    says so; the parity check that follows runs on that path. Refused with the first error if the tracer fails too."""
    reason = _export_failure(cause)
    buffer = io.BytesIO()
    axes = {name: {0: "batch"} for name in [INPUT_NAME, *output_names]} if dynamic_batch else None
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("always")
            logging.disable(logging.CRITICAL)
            torch.onnx.export(
                module,
                (example,),
                buffer,
                dynamo=False,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=output_names,
                dynamic_axes=axes,
            )
    except Exception:
        raise BadInputError(
            f"torch.onnx could not export the folded model ({reason}); rerun with `debug=True` for the exporter's "
            "report."
        ) from cause
    finally:
        logging.disable(logging.NOTSET)
    branched = any(issubclass(w.category, torch.jit.TracerWarning) for w in caught)
    what = (
        "records only the branch the example input took (the forward depends on tensor values, e.g. `if x.mean() > 0`)"
        if branched
        else "records the operations the example input ran"
    )
    warnings.warn(  # stacklevel 1: one place, so the original's export for the before/after table does not repeat it
        f"torch.export could not capture the model ({_root_cause(cause).__class__.__name__}): exported with the "
        f"TorchScript tracer instead, which {what}; parity with PyTorch is checked as usual.",
        TracedExportWarning,
        stacklevel=1,
    )
    return onnx.load_from_string(buffer.getvalue())


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _export_failure(error: BaseException) -> str:
    """The root cause of an exporter failure in a few words (the innermost error's first line)."""
    root = _root_cause(error)
    return f"{type(root).__name__}: {first_line(root, 120)}"


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
    it is needed to run the model. Model-level ``metadata_props`` keep vconvert's own keys only; graph-level
    ones (torch.export's graph signature: a line per parameter, ~3 KB for a ResNet-20) go.
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
        del graph.metadata_props[:]
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


def serialise(model: onnx.ModelProto) -> bytes:
    if model.ByteSize() > TWO_GB:
        raise BadInputError(
            "The ONNX model is over 2 GB, which one protobuf file cannot hold; vconvert writes single files only."
        )
    return model.SerializeToString()
