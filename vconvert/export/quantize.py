"""INT8 export: QDQ ONNX whose versatile convs hold exactly int8 secondary filters.

onnxruntime's own quantizer (:func:`onnxruntime.quantization.quantize_static`, QDQ format, MinMax
calibration on the caller's images) sets every activation range (uint8, per tensor) and quantizes every
layer vconvert did not convert (int8, symmetric, per output channel). Each converted conv is then given
weights that keep the versatile structure in integers. With its folded weight

    W_o = a_o · M_o ∘ P_{p(o)}      (a_o = α_o · bn_o: the per-output scale times the folded BN factor)

each primary filter is quantized once, t_p = max|P_p| / 127 and Pq_p = clip(round(P_p / t_p), ±127), and

    Wq_o = sign(a_o) · M_o ∘ Pq_{p(o)}        with the per-output weight scale  s_o = |a_o| · t_{p(o)}

so every secondary filter is exactly an int8 filter: a mask and a sign applied to its int8 primary. The
int32 bias is requantized for s_o the way onnxruntime's QDQ quantizer does it (round(b / (s_in · s_o))).

The compact form stores, per converted conv, the int8 primaries, the bit-packed masks (deduplicated rows,
as :mod:`vconvert.export.compact`), the primary index (the sign folded in: index p + P selects −Pq_p) and
one float scale per output, and rebuilds the int8 weight in integers before its DequantizeLinear
(Concat/Neg and Gather on int8, BitShift/BitwiseAnd on uint8, Cast, Mul in int32, Cast to int8) from
initializers only: onnxruntime folds it when the session starts and then runs the same QLinearConv as
on the dense int8 file.

Pure numpy algebra (:func:`quantize_primaries`, :func:`encode_int8_layer`, :func:`decode_int8_layer`),
the graph pieces (:func:`int8_layer_subgraph`, :func:`set_int8_weights`, :func:`compact_int8_graph`), the
checks (:func:`qlinear_convs`, :func:`top1_agreement`) and the whole step (:func:`quantize_export`).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper
from torch import Tensor

from vconvert.errors import BadInputError, CheckFailedError, MissingCalibrationError
from vconvert.export.compact import (
    CompactLayer,
    SubgraphBuilder,
    _find_weight,
    decode_layer,
    encode_layer,
    smallest_index_dtype,
    splice_rebuilds,
)
from vconvert.export.names import drop_defaults, shorten_names
from vconvert.export.verify import run_session
from vconvert.io.metadata import CheckpointMetadata
from vconvert.nn.quantize import integers, minmax_step, storage_bits
from vconvert.nn.versatile import VersatileConv2d

__all__ = [
    "QUANTIZE_CHOICES",
    "Int8Export",
    "Int8Layer",
    "PackedPool",
    "calibration_images",
    "calibration_source",
    "check_fake_quantised",
    "check_quantize",
    "compact_int8_graph",
    "decode_int8_layer",
    "encode_int8_layer",
    "initializer_bits",
    "int8_layer_subgraph",
    "pack_nibbles",
    "qlinear_convs",
    "quantize_export",
    "quantize_primaries",
    "set_int8_weights",
    "top1_agreement",
    "unpack_nibbles",
]

QUANTIZE_CHOICES = ("none", "int8")
MIN_AGREEMENT = 0.9


# --------------------------------------------------------------------------- pure algebra
def quantize_primaries(primary: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Each primary filter as ``bits``-bit integers (held in int8) with one step: (Pq (P, ...) int8, t (P,)
    float64), t_p = max|P_p| / Q (Q = 127 at 8 bits, 7 at 4), computed in float32 by the quantizer that
    fine-tuning uses (:mod:`vconvert.nn.quantize`). A primary filter of zeros gets t_p = 1."""
    weight = torch.from_numpy(np.ascontiguousarray(primary, dtype=np.float32))
    step = minmax_step(weight, bits)
    return integers(weight, step, bits).to(torch.int8).numpy(), step.double().numpy()


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Integers in −8..7 as uint8 bytes, two per byte (value + 8; the first of each pair in the high nibble)."""
    flat = (values.reshape(-1).astype(np.int16) + 8).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.full(1, 8, dtype=np.uint8)])
    return (flat[0::2] << 4) | flat[1::2]


def unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: the first ``count`` integers as int8."""
    pairs = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)[:count]
    return (pairs.astype(np.int16) - 8).astype(np.int8)


@dataclass
class Int8Layer:
    """What the compact int8 file stores for one converted conv.

    ``structure`` is the float encoding's structure (masks, channel offsets) with the int8 primaries Pq and
    neither scale nor BN factor. The sign of a_o lives in the primary index: with ``negated``, index p + P
    addresses −Pq_p (the rebuild gathers from [Pq; −Pq]), so a sign costs no storage of its own. An output
    whose a_o is 0 points at an all-zero primary appended to Pq."""

    structure: CompactLayer
    primary_scale: np.ndarray  # (P,) float64 t_p (folded into weight_scale; not stored in the file)
    weight_scale: np.ndarray  # (N,) float32 s_o = |a_o| · t_{p(o)}
    negated: bool  # some index addresses −Pq
    bits: int = 8  # Pq lies in −Q..Q; up to 4 bits the file stores it two per byte

    @property
    def out_channels(self) -> int:
        return self.structure.out_channels

    def signed_primaries(self) -> np.ndarray:
        """The table the primary index addresses: Pq, or [Pq; −Pq] when ``negated``."""
        primary = self.structure.primary
        return np.concatenate([primary, -primary]) if self.negated else primary

    @property
    def packed(self) -> bool:
        """Whether the file stores the primaries as 4-bit nibbles."""
        return storage_bits(self.bits) == 4

    def nbytes(self) -> int:
        """Bytes of all arrays the file stores for this layer."""
        primary = self.structure.primary
        stored_primary = (primary.size + 1) // 2 if self.packed else primary.nbytes
        return self.structure.nbytes() - primary.nbytes + stored_primary + self.weight_scale.nbytes


def _per_output(array: np.ndarray | None, count: int) -> np.ndarray:
    return np.ones(count) if array is None else array.reshape(-1).astype(np.float64)


def encode_int8_layer(
    encoded: CompactLayer, bits: int = 8, primary_integers: tuple[np.ndarray, np.ndarray] | None = None
) -> Int8Layer:
    """The int8 form of a float compact encoding (:func:`vconvert.export.compact.encode_layer`), its primaries
    as ``bits``-bit integers: ``primary_integers`` (Pq, t) when given (the integers a layer fine-tuned at
    ``bits`` was trained with), else min-max quantized from the encoded primaries."""
    count = encoded.out_channels
    factor = _per_output(encoded.scale, count) * _per_output(encoded.bn_scale, count)  # a_o
    if primary_integers is None:
        quantized, primary_scale = quantize_primaries(encoded.primary, bits)
    else:
        quantized, primary_scale = primary_integers[0].astype(np.int8), primary_integers[1].astype(np.float64)
    index = encoded.primary_index.astype(np.int64)
    weight_scale = np.where(factor != 0, np.abs(factor), 1.0) * primary_scale[index]
    if (factor == 0).any():  # that secondary filter is zero: point it at a zero primary
        index = np.where(factor == 0, len(quantized), index)
        quantized = np.concatenate([quantized, np.zeros_like(quantized[:1])])
    negated = bool((factor < 0).any())
    index = np.where(factor < 0, index + len(quantized), index)
    structure = replace(
        encoded, primary=quantized, primary_index=index.astype(smallest_index_dtype(index)), scale=None, bn_scale=None
    )
    return Int8Layer(structure, primary_scale, weight_scale.astype(np.float32), negated, bits)


def decode_int8_layer(layer: Int8Layer) -> np.ndarray:
    """Reference decoder: the dense int8 weight Wq (N, c, kh, kw), computed in int32 like the graph."""
    structure = replace(layer.structure, primary=layer.signed_primaries().astype(np.int32))
    return decode_layer(structure).astype(np.int8)


# --------------------------------------------------------------------------- the compact int8 subgraph
class PackedPool:
    """The packed values of every layer of a model in one uint8 initializer, unpacked once in the graph into a
    flat int32 tensor that one Split cuts into the layers' values (fewer nodes and tensors than one unpacking
    per layer: the graph is a tenth of a small int8 file). ``bits`` is 1 (mask bits, most significant first)
    or 4 (nibbles, value + 8)."""

    def __init__(self, name: str, bits: int) -> None:
        self.name, self.bits = name, bits
        self.chunks: list[np.ndarray] = []
        self.sizes: list[int] = []  # values per Split output: each layer's, and the padding after it
        self.outputs: list[str] = []

    def add(self, packed: np.ndarray, count: int) -> str:
        """Append one layer's bytes holding ``count`` values; returns the tensor that will hold them (int32, flat)."""
        self.chunks.append(packed.reshape(-1))
        padding = packed.size * (8 // self.bits) - count
        output = f"{self.name}.{len(self.chunks) - 1}"
        self.sizes.append(count)
        self.outputs.append(output)
        if padding:
            self.sizes.append(padding)
            self.outputs.append(f"{output}p")
        return output

    def nodes(self) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
        """The unpacking (nothing when no layer added values): BitShift and BitwiseAnd on uint8, Cast to int32,
        Split into the layers' values."""
        if not self.chunks:
            return [], []
        build = SubgraphBuilder(self.name)
        packed = build.init("bytes", np.concatenate(self.chunks).reshape(-1, 1))
        per_byte = 8 // self.bits
        shifts = np.arange(per_byte - 1, -1, -1, dtype=np.uint8).reshape(1, -1) * self.bits
        values = build.node("BitShift", [packed, build.init("shifts", shifts)], "shifted", direction="RIGHT")
        mask = np.full((1, 1), 2**self.bits - 1, dtype=np.uint8)
        values = build.node("BitwiseAnd", [values, build.init("mask", mask)], "masked")
        values = build.node("Reshape", [values, build.init("flat", np.array([-1], dtype=np.int64))], "flat_u8")
        values = build.node("Cast", [values], "flat_i32", to=TensorProto.INT32)
        if self.bits == 4:
            values = build.node("Sub", [values, build.init("offset", np.array(8, dtype=np.int32))], "values")
        sizes = build.init("sizes", np.array(self.sizes, dtype=np.int64))
        build.nodes.append(onnx.helper.make_node("Split", [values, sizes], self.outputs, axis=0))
        return build.nodes, build.inits


def _pooled(build: SubgraphBuilder, pool: PackedPool, packed: np.ndarray, shape: Sequence[int], suffix: str) -> str:
    """One layer's values from ``pool``, reshaped to ``shape`` (int32; layers of one shape share the shape)."""
    values = pool.add(packed, int(np.prod(shape)))
    shape_name = build.constant("shape_" + "x".join(map(str, shape)), np.array(shape, dtype=np.int64))
    return build.node("Reshape", [values, shape_name], suffix)


def int8_layer_subgraph(
    layer: Int8Layer,
    output: str,
    prefix: str,
    shared: dict[str, TensorProto] | None = None,
    pools: tuple[PackedPool, PackedPool] | None = None,
) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Nodes and initializers computing ``decode_int8_layer(layer)`` (int8) into the tensor ``output``:
    Gather from [Pq; Neg(Pq)], Cast to int32, Mul by the unpacked masks, channel placement, Cast to int8.
    Layer-independent constants go into ``shared`` when given (see :class:`SubgraphBuilder`). With ``pools``
    (nibbles, mask bits: :class:`PackedPool`) the 4-bit primaries and the masks are slices of values unpacked
    once for the whole model; without, each layer unpacks its own."""
    build = SubgraphBuilder(prefix, shared)
    structure = layer.structure
    widened = layer.packed and pools is not None  # the primaries arrive as int32
    if widened:
        primary = _pooled(build, pools[0], pack_nibbles(structure.primary), structure.primary.shape, "primary")
    elif layer.packed:
        primary = _nibble_primaries(build, structure.primary)
    else:
        primary = build.init("primary", structure.primary)
    if layer.negated:
        primary = build.node("Concat", [primary, build.node("Neg", [primary], "negated")], "signed", axis=0)
    index = build.as_int64(structure.primary_index, "primary_index")
    weight = build.node("Gather", [primary, index], "w0")
    if not widened:
        weight = build.node("Cast", [weight], "w0_i32", to=TensorProto.INT32)
    if pools is not None and structure.mask_bits is not None and structure.mask_shape is not None:
        rows = _pooled(build, pools[1], structure.mask_bits, structure.mask_shape, "rows")
        if structure.mask_row is not None:
            rows = build.node("Gather", [rows, build.as_int64(structure.mask_row, "mask_row")], "mask")
    else:
        rows = build.mask_rows(structure, TensorProto.INT32)
    if rows is not None:
        weight = build.node("Mul", [weight, rows], "w_masked")
    weight = build.place_channels(weight, structure, TensorProto.INT32)
    # the last Cast writes ``output`` itself: onnxruntime names the folded weight after it, as in the dense file
    build.nodes.append(onnx.helper.make_node("Cast", [weight], [output], to=TensorProto.INT8))
    return build.nodes, build.inits


def _nibble_primaries(build: SubgraphBuilder, primary: np.ndarray) -> str:
    """The primaries stored two per byte (:func:`pack_nibbles`) and widened back to int8 in the graph:
    BitShift and BitwiseAnd on uint8, Cast to int32, minus 8, Cast to int8."""
    packed = build.init("primary4", pack_nibbles(primary).reshape(-1, 1))
    shifts = build.constant("nibble_shift", np.array([[4, 0]], dtype=np.uint8))
    nibbles = build.node("BitShift", [packed, shifts], "nibbles_shifted", direction="RIGHT")
    nibbles = build.node("BitwiseAnd", [nibbles, build.constant("nibble_mask", np.full((1, 1), 15, np.uint8))],
                         "nibbles")  # fmt: skip
    nibbles = build.node("Reshape", [nibbles, build.constant("flat", np.array([-1], dtype=np.int64))], "nibbles_flat")
    start = build.constant("zero", np.array([0], dtype=np.int64))
    end = build.init("primary_end", np.array([primary.size]))
    nibbles = build.node("Cast", [build.node("Slice", [nibbles, start, end], "nibbles_used")], "nibbles_i32",
                         to=TensorProto.INT32)  # fmt: skip
    values = build.node("Sub", [nibbles, build.constant("nibble_offset", np.array(8, dtype=np.int32))], "primary_i32")
    shape = build.init("primary_shape", np.array(primary.shape, dtype=np.int64))
    values = build.node("Reshape", [values, shape], "primary_shaped")
    return build.node("Cast", [values], "primary_i8", to=TensorProto.INT8)


# --------------------------------------------------------------------------- the QDQ graph
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
    scale = (input_scale.astype(np.float32) * weight_scale.astype(np.float32)).astype(np.float32).reshape(-1)
    values = np.round(bias.astype(np.float64) / scale.astype(np.float64))
    info = np.iinfo(np.int32)
    return np.clip(values, info.min, info.max).astype(np.int32), scale


@dataclass
class _Target:
    conv: str  # Conv node name (kept by onnxruntime's quantizer)
    bias: np.ndarray | None  # the float bias the fp32 graph holds


def _conv_targets(fp32: onnx.ModelProto, weights: Mapping[str, np.ndarray]) -> dict[str, _Target]:
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
        targets[name] = _Target(node.name, bias)
    return targets


def set_int8_weights(
    model: onnx.ModelProto, targets: Mapping[str, _Target], layers: Mapping[str, Int8Layer]
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


def compact_int8_graph(
    model: onnx.ModelProto, layers: Mapping[str, Int8Layer], convs: Mapping[str, QdqConv]
) -> dict[str, int]:
    """Rewrite the dense int8 ``model`` in place: each converted conv's int8 weight initializer becomes its
    in-integer rebuild (checked against :func:`decode_int8_layer` first). Returns per-layer stored bytes."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[TensorProto] = []
    shared: dict[str, TensorProto] = {}
    pools = (PackedPool("vc.nib", 4), PackedPool("vc.bit", 1))
    stored = {}
    for number, (name, layer) in enumerate(layers.items()):
        target = convs[name].weight
        if not np.array_equal(numpy_helper.to_array(initializers[target]), decode_int8_layer(layer)):
            raise CheckFailedError(f"The int8 compact encoding of {name!r} does not rebuild its weight; report this.")
        nodes, inits = int8_layer_subgraph(layer, target, f"vq{number}", shared, pools)
        new_nodes += nodes
        new_inits += inits
        stored[name] = layer.nbytes()
    del initializers
    for pool in pools:
        nodes, inits = pool.nodes()
        new_nodes, new_inits = nodes + new_nodes, inits + new_inits
    splice_rebuilds(model.graph, {conv.weight for conv in convs.values()}, new_nodes, [*shared.values(), *new_inits])
    return stored


def check_fake_quantised(name: str, layer: Int8Layer, folded: np.ndarray) -> None:
    """The dequantized int8 weight Wq · s equals the folded fake-quantised weight of the fp32 file (up to float
    rounding: the integers are the very ones the layer was fine-tuned with); else CheckFailedError."""
    dequantized = decode_int8_layer(layer).astype(np.float64) * layer.weight_scale.astype(np.float64).reshape(
        (-1,) + (1,) * (folded.ndim - 1)
    )
    error = float(np.abs(dequantized - folded.astype(np.float64)).max()) if folded.size else 0.0
    allowed = 1e-5 * float(np.abs(folded).max()) if folded.size else 0.0
    if error > allowed:
        raise CheckFailedError(
            f"The int8 weights of {name!r} differ from its fake-quantised weights by {error:.3g} (allowed "
            f"{allowed:.3g}); nothing was written."
        )


def initializer_bits(model: onnx.ModelProto) -> int:
    """Bits of every initializer the model stores (its payload, without names and graph)."""
    total = 0
    for tensor in model.graph.initializer:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        total += int(np.prod(tensor.dims, dtype=np.int64)) * itemsize * 8
    return total


# --------------------------------------------------------------------------- calibration data
def calibration_source(given: str | Path | None, metadata: CheckpointMetadata) -> str | None:
    """The calibration image source: ``given``, else the data a checkpoint records (its fine-tuning data or
    its BN recalibration folder) when that still exists; None when there is none."""
    return str(given) if given is not None else metadata.recorded_data()


def _normalisation(preprocessing: Mapping[str, Any] | None, channels: int, source: str) -> tuple[list, list]:
    from vconvert.data.datasets import IMAGENET_MEAN, IMAGENET_STD

    if preprocessing and preprocessing.get("mean") is not None and preprocessing.get("std") is not None:
        mean, std = list(preprocessing["mean"]), list(preprocessing["std"])
        if len(mean) != channels or len(std) != channels:
            raise BadInputError(
                f"The recorded preprocessing has {len(mean)} mean and {len(std)} std values for a {channels}-channel "
                "input; the calibration images cannot be normalised."
            )
        return mean, std
    if channels == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    raise BadInputError(
        f"No mean/std is recorded for the model's {channels}-channel input, so the images of {source} cannot be "
        "normalised for calibration; record the preprocessing in the checkpoint (compress or finetune with it)."
    )


def _digits(shape: Sequence[int], preprocessing: Mapping[str, Any] | None, limit: int, seed: int) -> Tensor:
    from vconvert.data.datasets import open_split

    recorded = dict(preprocessing or {})
    dataset, _, _ = open_split(
        "digits", True, input_size=list(shape[2:]), channels=int(shape[1]), mean=recorded.get("mean"),
        std=recorded.get("std"), augment=False,
    )  # fmt: skip
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit].tolist()
    return torch.stack([dataset[index][0] for index in order])


def _image_files(root: Path) -> list[Path]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return sorted(path for path in root.rglob("*") if path.suffix.lower() in IMG_EXTENSIONS and path.is_file())


def _folder(
    root: Path, shape: Sequence[int], preprocessing: Mapping[str, Any] | None, limit: int, seed: int, size_from: str
) -> Tensor:
    from PIL import Image

    from vconvert.data.datasets import check_image_size, image_transform

    if not root.is_dir():
        raise BadInputError(f"Calibration folder {root} does not exist; give a folder of images or 'digits'.")
    folder = root / "train" if (root / "train").is_dir() else root
    files = _image_files(folder)
    if not files:
        raise BadInputError(f"Calibration folder {folder} holds no image files (searched recursively).")
    channels, size = int(shape[1]), [int(s) for s in shape[2:]]
    check_image_size(folder, [str(file) for file in files], size, size_from)
    mean, std = _normalisation(preprocessing, channels, str(folder))
    transform = image_transform(size, channels, mean, std, augment=False)
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    images = []
    for index in order:
        try:
            with Image.open(files[index]) as image:
                images.append(transform(image.convert("RGB")))
        except Exception:  # PIL raises many types for a file that is not an image: skip it
            continue
        if len(images) == limit:
            break
    if not images:
        raise BadInputError(f"None of the {len(files)} image files in calibration folder {folder} could be read.")
    return torch.stack(images)


def calibration_images(
    source: str | Path,
    input_shape: Sequence[int],
    preprocessing: Mapping[str, Any] | None = None,
    *,
    limit: int = 512,
    batch_size: int | None = None,
    seed: int = 0,
    size_from: str = "the model's input size",
) -> tuple[list[Tensor], str]:
    """Up to ``limit`` preprocessed calibration images in batches (of ``batch_size``, default
    :func:`calibration_batch_size`), and a note saying where they came from.

    ``source`` is ``"digits"`` or a folder of images, read recursively (its ``train/`` split when it has
    one; labels are not needed). Images are resized to ``input_shape`` (N, C, H, W) and normalised with
    the mean/std ``preprocessing`` records (ImageNet's for RGB when it records none), the same random
    subset for the same ``seed``; unreadable files are skipped.
    """
    if limit < 1:
        raise BadInputError(f"The number of calibration images must be at least 1, got {limit}.")
    if str(source) == "digits":
        images = _digits(input_shape, preprocessing, limit, seed)
        note = f"{len(images)} digits training images"
    else:
        root = Path(source).expanduser()
        images = _folder(root, input_shape, preprocessing, limit, seed, size_from)
        note = f"{len(images)} images from {root}"
    if list(images.shape[1:]) != [int(s) for s in input_shape[1:]]:
        raise BadInputError(
            f"The calibration images of {source} are {'x'.join(map(str, images.shape[1:]))} and the model takes "
            f"{'x'.join(map(str, input_shape[1:]))}; calibrate on images the model can take."
        )
    return list(images.split(batch_size or calibration_batch_size(input_shape))), note


CALIBRATION_PIXELS = 2 * 224 * 224  # per batch: every onnxruntime session sizes its memory arena by its largest run


def calibration_batch_size(input_shape: Sequence[int]) -> int:
    """Images per calibration batch: 32 for small images, fewer for large ones (2 at 224x224), so that the
    calibration and check sessions do not each keep several GB of activations (resnet50 at 224: 2 per batch
    peaks at 2.69 GB RSS, 4 at 3.11 GB, 8 at 3.98 GB). Batching changes no result
    (MinMax ranges and top-1 agreement are taken over all images)."""
    return max(1, min(32, CALIBRATION_PIXELS // (int(input_shape[2]) * int(input_shape[3]))))


class _Batches:
    """An onnxruntime CalibrationDataReader over in-memory batches."""

    def __init__(self, batches: Sequence[Tensor], input_name: str) -> None:
        self._batches, self._name = batches, input_name
        self._next: Iterator[Tensor] = iter(batches)

    def get_next(self) -> dict | None:
        batch = next(self._next, None)
        return None if batch is None else {self._name: batch.numpy()}

    def __len__(self) -> int:
        return len(self._batches)

    def rewind(self) -> None:
        self._next = iter(self._batches)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence onnxruntime.quantization's root-logger advice ("consider pre-processing") and warnings.

    Its module-level ``logging.info``/``logging.warning`` calls also install a stderr handler on a root logger
    that has none (``logging.basicConfig``), which would print every later log line of the process twice: the
    root's handlers are put back as they were.
    """
    previous, handlers = logging.root.manager.disable, list(logging.root.handlers)
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
        logging.root.handlers[:] = handlers


def _quantize_static(fp32_bytes: bytes, batches: Sequence[Tensor], input_name: str) -> onnx.ModelProto:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    reader = _Batches(batches, input_name)
    assert isinstance(reader, CalibrationDataReader)  # structural: get_next is all it needs
    with tempfile.TemporaryDirectory(prefix="vconvert-int8-") as folder, _quiet():
        source, target = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        source.write_bytes(fp32_bytes)
        quantize_static(
            str(source),
            str(target),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            # no CalibMaxIntermediateOutputs: the calibrator keeps only per-batch min/max scalars anyway, and in
            # onnxruntime 1.32 that option drops every full chunk of batches instead of merging its range
        )
        return onnx.load(str(target))


# --------------------------------------------------------------------------- checks
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


def top1_agreement(reference: Any, candidate: Any, batches: Sequence[Tensor]) -> tuple[float, int]:
    """Fraction of images (of positions, for outputs with more axes) on which the two sessions' first
    outputs pick the same class along axis 1, and how many images were compared."""
    same = total = images = 0
    for batch in batches:
        expected, got = run_session(reference, batch)[0], run_session(candidate, batch)[0]
        if expected.ndim < 2:
            raise BadInputError("The model's output has no class axis, so top-1 agreement cannot be measured.")
        agree = expected.argmax(axis=1) == got.argmax(axis=1)
        same, total, images = same + int(agree.sum()), total + agree.size, images + len(batch)
    return same / max(1, total), images


# --------------------------------------------------------------------------- the whole step
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
            raise BadInputError(f"`weight_bits` must be 4 or 8 (the library takes 2 to 8); got {weight_bits!r}.")


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
    bits: int = 8,
) -> Int8Export:
    """Quantize the verified fp32 dense file to QDQ int8, set the versatile int8 weights, build the compact
    form when asked, and check before returning (nothing is written here).

    ``weights`` are the folded (BN-fused) float weights the fp32 graph holds for each converted conv in
    ``layers`` (emptied once they have located those convs: a model's worth of memory less during
    calibration); ``calibration`` the preprocessed calibration batches. Checks, each a
    :class:`CheckFailedError`: the compact and dense int8 files give identical outputs in onnxruntime on
    ``inputs`` and the first calibration batch; after onnxruntime's optimisations every converted conv
    runs as QLinearConv; the int8 file picks the fp32 file's top-1 class on at least ``min_agreement``
    of the calibration images. ``short_names`` renames the file's values to short ids
    (:func:`vconvert.export.names.shorten_names`; a tenth of a small file's bytes).

    The primaries are ``bits``-bit integers (held in int8; stored two per byte up to 4 bits): a layer
    fine-tuned at ``bits`` keeps the very integers it was trained with, and its dequantized int8 weight must
    equal the fake-quantised weight of the fp32 file (:func:`check_fake_quantised`); other layers are
    quantized min-max from the primaries their forward uses.
    """
    from vconvert.export.onnx_file import serialise, set_metadata, strip_export_traces
    from vconvert.export.verify import start_session

    if not calibration:
        raise MissingCalibrationError("Int8 quantization needs calibration images, and none were given.")
    trained_bits = bool(layers) and all(layer.weight_bits == bits for layer in layers.values())
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    fp32 = onnx.load_from_string(fp32_bytes)
    targets = _conv_targets(fp32, weights)
    input_name = fp32.graph.input[0].name
    del fp32
    int8_layers = {}
    for name, layer in layers.items():
        trained = layer.weight_bits == bits  # fine-tuned at these bits: its own integers, checked
        own = tuple(t.cpu().numpy() for t in layer.primary_integers()) if trained else None
        int8_layers[name] = encode_int8_layer(encode_layer(layer, bn_scales.get(name)), bits, own)  # type: ignore[arg-type]
        if trained:
            check_fake_quantised(name, int8_layers[name], weights[name])
    weights.clear()
    model = _quantize_static(fp32_bytes, calibration, input_name)
    strip_export_traces(model)  # the quantizer's shape-inference value_info and its own metadata
    timings["calibrate_quantize_s"] = round(time.perf_counter() - clock, 3)
    convs = set_int8_weights(model, targets, int8_layers)
    trim_qdq(model)
    if short_names:
        drop_defaults(model)
    info = dict(metadata) | {
        "vconvert.quantization": {
            "type": "int8",
            "activations": "uint8 per tensor (onnxruntime MinMax calibration)",
            "weights": f"int8 symmetric per output channel; versatile convs as sign · mask · {bits}-bit primary",
            "weight_bits": bits,
            "primary_storage": "4-bit, two per byte" if storage_bits(bits) == 4 else "int8",
            "primary_integers": "fine-tuned at these bits" if trained_bits else "min-max at export",
            "calibration_images": sum(len(batch) for batch in calibration),
        }
    }
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
        del dense_bytes
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
    agreement, images = top1_agreement(fp32_session, result.session, calibration)
    if agreement < min_agreement:
        raise CheckFailedError(
            f"The int8 model picks the fp32 model's top-1 class on only {100 * agreement:.1f}% of {images} "
            f"calibration images (at least {100 * min_agreement:g}% required); nothing was written."
        )
    timings["checks_s"] = round(time.perf_counter() - clock - sum(timings.values()), 3)
    result.report = {
        "type": "int8",
        "compact": compact,
        "converted_convs": len(layers),
        "qlinear_conv": runs["qlinear_conv"],
        "float_conv": runs["float_conv"],
        "converted_as_qlinear": len(runs["converted_as_qlinear"]),
        "top1_agreement": agreement,
        "agreement_images": images,
        "min_agreement": min_agreement,
        "compact_equals_dense": compact_equal,
        "weight_bits": bits,
        "weights_equal_fake_quantised": trained_bits or None,
        "compact_layer_bytes": layer_bytes,
        "timings_s": timings,
    }
    return result
