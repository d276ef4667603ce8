"""Short value names for size-optimised ONNX files.

In a ~200 KB int8 file the names are a tenth of the bytes: every tensor name ("layer3.2.conv2.weight_
quantized", "/layer1/layer1.0/conv1/Conv_output_0_QuantizeLinear_Output") is written once where it is
made and again wherever it is read. :func:`shorten_names` renames every value but the graph's inputs
and outputs to a short base-36 id and clears node names (optional in ONNX), and returns the renaming
so that callers can still find a tensor they knew by its old name.
"""

from __future__ import annotations

import string

import onnx

__all__ = ["short_name", "shorten_names"]

_DIGITS = string.digits + string.ascii_lowercase


def short_name(index: int) -> str:
    """``index`` in base 36 (0 -> "0", 36 -> "10"): the shortest unique names for values."""
    text = ""
    while True:
        index, digit = divmod(index, 36)
        text = _DIGITS[digit] + text
        if index == 0:
            return text


def shorten_names(model: onnx.ModelProto) -> dict[str, str]:
    """Rename, in place, every value of the main graph except its inputs and outputs; clear node names.

    Returns {old name: new name}. The empty name (an omitted optional input) stays empty. Graphs with
    subgraphs (If/Loop/Scan) are left as they are, since their bodies may read outer names.
    """
    graph = model.graph
    if any(attribute.HasField("g") or attribute.graphs for node in graph.node for attribute in node.attribute):
        return {}
    kept = {value.name for value in [*graph.input, *graph.output]}
    renaming: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in kept:
            return name
        if name not in renaming:
            candidate = short_name(len(renaming))
            while candidate in kept:  # a graph input or output named like an id
                candidate = "_" + candidate
            renaming[name] = candidate
        return renaming[name]

    for tensor in graph.initializer:
        tensor.name = rename(tensor.name)
    for node in graph.node:
        node.name = ""
        node.input[:] = [rename(name) for name in node.input]
        node.output[:] = [rename(name) for name in node.output]
    for value in graph.value_info:
        value.name = rename(value.name)
    return renaming
