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

__all__ = ["drop_defaults", "short_name", "shorten_names"]

# Conv attributes whose value is ONNX's default: stating them costs bytes and says nothing
_CONV_DEFAULTS = {"group": 1, "auto_pad": b"NOTSET"}
_CONV_ALL_ONES = ("strides", "dilations")

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
        node.ClearField("name")
        node.input[:] = [rename(name) for name in node.input]
        node.output[:] = [rename(name) for name in node.output]
    for value in graph.value_info:
        value.name = rename(value.name)
    return renaming


def drop_defaults(model: onnx.ModelProto) -> int:
    """Remove, in place, what the main graph's nodes state without need: empty doc strings and Conv
    attributes at their ONNX default (group 1, auto_pad NOTSET, strides and dilations of 1). Returns how many
    attributes went."""
    dropped = 0
    for node in model.graph.node:
        if not node.doc_string:
            node.ClearField("doc_string")
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        for attribute in list(node.attribute):
            value = onnx.helper.get_attribute_value(attribute)
            default = _CONV_DEFAULTS.get(attribute.name)
            if (default is not None and value == default) or (
                attribute.name in _CONV_ALL_ONES and all(item == 1 for item in value)
            ):
                node.attribute.remove(attribute)
                dropped += 1
    return dropped
