"""Surgery on the QDQ graph onnxruntime's quantizer writes: find each converted conv's int8 tensors, set the
versatile int8 weights and requantized biases, drop what the graph can compute, and read back how onnxruntime
runs its convs after its optimisations (QLinearConv or float Conv).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from vconvert.errors import CheckFailedError
from vconvert.export.compact import _find_weight
from vconvert.export.int8_weights import Int8Layer, decode_int8_layer, zero_outputs

__all__ = [
    "ConvTarget",
    "QdqConv",
    "check_int32_biases",
    "conv_targets",
    "fit_int32_biases",
    "initializer_bits",
    "optimized_model",
    "qlinear_convs",
    "quantized_bias",
    "set_int8_weights",
    "trim_qdq",
]


@dataclass
class QdqConv:
    """The tensors of one Conv in a QDQ graph (initializer names; bias ones empty when it has none)."""

    node: str
    weight: str  # int8 weight initializer
    weight_scale: str
    weight_zero_point: str
    input_scale: str
    bias: str = ""  # int32 bias initializer
    bias_scale: str = ""


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in graph.node for output in node.output}


def _qdq_conv(graph: onnx.GraphProto, conv_name: str, producers: Mapping[str, onnx.NodeProto]) -> QdqConv:
    node = next((n for n in graph.node if n.name == conv_name and n.op_type == "Conv"), None)

    def dequantized(index: int) -> onnx.NodeProto:
        source = producers.get(node.input[index]) if node is not None and len(node.input) > index else None
        if source is None or source.op_type != "DequantizeLinear":
            raise CheckFailedError(
                f"onnxruntime's quantizer left the converted conv {conv_name!r} without int8 inputs, so its "
                "versatile int8 weights cannot be set; export without quantization and report this."
            )
        return source

    weight, activation = dequantized(1), dequantized(0)
    conv = QdqConv(conv_name, weight.input[0], weight.input[1], weight.input[2], activation.input[1])
    if node is not None and len(node.input) > 2 and node.input[2]:
        bias = dequantized(2)
        conv.bias, conv.bias_scale = bias.input[0], bias.input[1]
    return conv


def _set_initializer(initializers: Mapping[str, TensorProto], name: str, array: np.ndarray) -> None:
    tensor = initializers[name]
    old = numpy_helper.to_array(tensor)
    if old.shape != array.shape or old.dtype != array.dtype:
        raise CheckFailedError(
            f"onnxruntime's quantizer stored {name!r} as {old.dtype}{list(old.shape)}, not the expected "
            f"{array.dtype}{list(array.shape)}; export without quantization and report this."
        )
    tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))


def quantized_bias(
    bias: np.ndarray, input_scale: np.ndarray, weight_scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(int32 bias, its float32 scale) as onnxruntime's QDQ quantizer computes them: scale s_in · s_w in
    float32, round(b / scale) in float64, clipped to int32."""
    values, scale = _bias_quotients(bias, input_scale, weight_scale)
    info = np.iinfo(np.int32)
    return np.clip(values, info.min, info.max).astype(np.int32), scale


def _bias_quotients(
    bias: np.ndarray, input_scale: np.ndarray, weight_scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(round(b / scale) in float64, unclipped; the float32 scale s_in · s_w), as onnxruntime computes them."""
    scale = (input_scale.astype(np.float32) * weight_scale.astype(np.float32)).astype(np.float32).reshape(-1)
    return np.round(bias.astype(np.float64).reshape(-1) / scale.astype(np.float64)), scale


INT32_MAX = float(np.iinfo(np.int32).max)


def beyond_int32(bias: np.ndarray, input_scale: np.ndarray, weight_scale: np.ndarray) -> np.ndarray:
    """Which outputs' biases do not fit int32 at the step s_in · s_o (:func:`quantized_bias` would clip them)."""
    return np.abs(_bias_quotients(bias, input_scale, weight_scale)[0]) > INT32_MAX


def bias_fitting_scale(bias: np.ndarray, input_scale: np.ndarray) -> np.ndarray:
    """A weight scale per output at which its int32 bias is at most 2^30 in magnitude (float32)."""
    step = 2 * np.abs(bias.astype(np.float64).reshape(-1)) / (INT32_MAX * float(np.asarray(input_scale).reshape(-1)[0]))
    return np.where(step > 0, step, 1.0).astype(np.float32)


@dataclass
class ConvTarget:
    conv: str  # Conv node name (kept by onnxruntime's quantizer)
    bias: np.ndarray | None  # the float bias the fp32 graph holds


def conv_targets(fp32: onnx.ModelProto, weights: Mapping[str, np.ndarray]) -> dict[str, ConvTarget]:
    """For each converted conv, its Conv node name and float bias in the fp32 graph."""
    initializers = {tensor.name: tensor for tensor in fp32.graph.initializer}
    targets = {}
    for name, expected in weights.items():
        weight = _find_weight(initializers, f"{name}.weight", expected)
        node = next((n for n in fp32.graph.node if n.op_type == "Conv" and n.input[1] == weight), None)
        if node is None or not node.name:
            raise CheckFailedError(f"No Conv node of the fp32 graph reads the weight of {name!r}; report this.")
        bias = None
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in initializers:
                raise CheckFailedError(f"The bias of {name!r} is not a constant in the fp32 graph; report this.")
            bias = numpy_helper.to_array(initializers[node.input[2]])
        targets[name] = ConvTarget(node.name, bias)
    return targets


def fit_int32_biases(
    model: onnx.ModelProto, targets: Mapping[str, ConvTarget], layers: Mapping[str, Int8Layer]
) -> tuple[dict[str, Int8Layer], dict[str, dict[str, Any]]]:
    """Each layer of ``layers`` whose int32 bias fits at its calibrated step s_in · s_o, and the others with
    those outputs written as zero at a weight scale their bias fits (what onnxruntime's quantizer does for the
    layers it quantizes itself: it raises the weight scale, and the weights round to zero).

    A bias beyond int32 at that step means |b_o| > 2^31 · s_in · s_o, so the output's weights, at most Q · s_o
    each, add at most fan-in · Q · 255 · s_in · s_o < fan-in · Q · 255 / 2^31 · |b_o| to it: a fraction of a
    percent of its bias (a channel that training shrank to ~1e-10 while its bias stayed). Clipping that bias
    instead moves the output by nearly all of it. Returns (the layers, {name: {"outputs": [...],
    "largest_weight": float}} for each layer that had such outputs)."""
    graph = model.graph
    producers = _producers(graph)
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    fitted, zeroed = dict(layers), {}
    for name, layer in layers.items():
        bias = targets[name].bias
        if bias is None:
            continue
        input_scale = numpy_helper.to_array(initializers[_qdq_conv(graph, targets[name].conv, producers).input_scale])
        outputs = beyond_int32(bias, input_scale, layer.weight_scale)
        if not outputs.any():
            continue
        dequantized = decode_int8_layer(layer).reshape(layer.out_channels, -1).astype(np.float64)
        largest = float((np.abs(dequantized[outputs]) * layer.weight_scale[outputs, None]).max(initial=0.0))
        scale = np.where(outputs, bias_fitting_scale(bias, input_scale), layer.weight_scale)
        fitted[name] = zero_outputs(layer, outputs, scale)
        zeroed[name] = {"outputs": np.flatnonzero(outputs).tolist(), "largest_weight": largest}
    return fitted, zeroed


def check_int32_biases(model: onnx.ModelProto) -> None:
    """No int32 bias of the QDQ ``model`` sits at the int32 limits (a clipped bias); else CheckFailedError."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    info = np.iinfo(np.int32)
    for node in model.graph.node:
        tensor = initializers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if tensor is None or tensor.data_type != TensorProto.INT32:
            continue
        values = numpy_helper.to_array(tensor)
        if values.size and (values.min() == info.min or values.max() == info.max):
            raise CheckFailedError(
                f"The int32 bias {node.input[0]!r} was clipped to the int32 range (its step is too small); "
                "nothing was written. Report this."
            )


def set_int8_weights(
    model: onnx.ModelProto, targets: Mapping[str, ConvTarget], layers: Mapping[str, Int8Layer]
) -> dict[str, QdqConv]:
    """Overwrite, in place, each converted conv's int8 weight, weight scale and int32 bias (and bias scale)
    in the QDQ ``model`` with the versatile int8 values. Returns each conv's tensor names."""
    graph = model.graph
    producers = _producers(graph)
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    convs = {}
    for name, layer in layers.items():
        conv = _qdq_conv(graph, targets[name].conv, producers)
        zero_point = numpy_helper.to_array(initializers[conv.weight_zero_point])
        if zero_point.any():
            raise CheckFailedError(f"The int8 weight of {name!r} is not symmetric (zero point ≠ 0); report this.")
        _set_initializer(initializers, conv.weight, decode_int8_layer(layer))
        _set_initializer(initializers, conv.weight_scale, layer.weight_scale)
        bias = targets[name].bias
        if conv.bias and bias is not None:
            input_scale = numpy_helper.to_array(initializers[conv.input_scale])
            values, scale = quantized_bias(bias, input_scale, layer.weight_scale)
            _set_initializer(initializers, conv.bias, values)
            _set_initializer(initializers, conv.bias_scale, scale)
        convs[name] = conv
    return convs


def trim_qdq(model: onnx.ModelProto) -> dict[str, int]:
    """Drop what a QDQ graph stores but can compute (in place; onnxruntime folds it at session start and fuses
    the same QLinearConv): the all-zero zero points of constant int8 weights and int32 biases (an absent zero
    point is 0), and each per-channel bias scale that equals, bit for bit, the float32 product of its input
    and weight scales, which becomes a Mul of those two. Returns how many of each it replaced."""
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = _producers(graph)
    zero_points = bias_scales = 0
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) == 3 and node.input[0] in initializers:
            zero_point = initializers.get(node.input[2])
            if zero_point is not None and zero_point.data_type in (TensorProto.INT8, TensorProto.INT32):
                if not numpy_helper.to_array(zero_point).any():
                    del node.input[2]
                    zero_points += 1
    multiplies = []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3:
            continue
        sources = [producers.get(name) for name in node.input[:3]]
        if not all(source is not None and source.op_type == "DequantizeLinear" for source in sources):
            continue
        activation, weight, bias = sources
        scales = [initializers.get(source.input[1]) for source in sources]
        if any(scale is None for scale in scales):
            continue
        input_scale, weight_scale, bias_scale = (numpy_helper.to_array(scale) for scale in scales)
        product = (input_scale.astype(np.float32) * weight_scale.astype(np.float32)).astype(np.float32)
        if product.shape != bias_scale.shape or not np.array_equal(product, bias_scale):
            continue
        output = f"{bias.input[1]}.m"
        multiplies.append((bias, onnx.helper.make_node("Mul", [activation.input[1], weight.input[1]], [output])))
        bias.input[1] = output
        bias_scales += 1
    for consumer, multiply in multiplies:
        graph.node.insert(list(graph.node).index(consumer), multiply)
    used = {name for node in graph.node for name in node.input}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return {"zero_points": zero_points, "bias_scales": bias_scales}


def initializer_bits(model: onnx.ModelProto) -> int:
    """Bits of every initializer the model stores (its payload, without names and graph)."""
    total = 0
    for tensor in model.graph.initializer:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        total += int(np.prod(tensor.dims, dtype=np.int64)) * itemsize * 8
    return total


def optimized_model(model_bytes: bytes) -> onnx.ModelProto:
    """The graph onnxruntime runs after its session optimisations (all levels, CPU)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="vconvert-ort-") as folder:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        ort.InferenceSession(model_bytes, sess_options=options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def qlinear_convs(model_bytes: bytes, converted_weights: Mapping[str, str]) -> dict[str, Any]:
    """How onnxruntime runs the convs of an int8 file: QLinearConv count, and which converted convs
    (``converted_weights``: name → its int8 weight tensor) run as QLinearConv or are left as float Conv."""
    optimized = optimized_model(model_bytes)
    producers = _producers(optimized.graph)
    by_weight = {weight: name for name, weight in converted_weights.items()}
    qlinear, quantized, left_float = 0, [], []
    for node in optimized.graph.node:
        if node.op_type == "QLinearConv":
            qlinear += 1
            if node.input[3] in by_weight:
                quantized.append(by_weight[node.input[3]])
        elif node.op_type in ("Conv", "FusedConv") and len(node.input) > 1:
            weight = node.input[1]
            source = producers.get(weight)
            if source is not None and source.op_type == "DequantizeLinear":
                weight = source.input[0]
            if weight in by_weight:
                left_float.append(by_weight[weight])
    float_convs = sum(node.op_type in ("Conv", "FusedConv") for node in optimized.graph.node)
    missing = sorted(set(converted_weights) - set(quantized) - set(left_float))
    return {"qlinear_conv": qlinear, "float_conv": float_convs, "converted_as_qlinear": sorted(quantized),
            "converted_left_float": sorted(left_float), "converted_not_found": missing}  # fmt: skip
