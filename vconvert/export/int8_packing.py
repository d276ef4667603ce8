"""The compact int8 subgraph: per converted conv the int8 (or 4-bit, two per byte) primaries, the bit-packed masks
and the signed primary index, rebuilt into the dense int8 weight in integers before its DequantizeLinear.

Concat/Neg and Gather on int8, BitShift/BitwiseAnd on uint8, Cast, Mul in int32, Cast to int8, from initializers
only: onnxruntime folds it when the session starts and then runs the same QLinearConv as on the dense int8 file.
The packed values of all layers share one initializer per kind (:class:`PackedPool`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from vconvert.errors import CheckFailedError
from vconvert.export.compact import SubgraphBuilder, splice_rebuilds
from vconvert.export.int8_weights import Int8Layer, decode_int8_layer, pack_nibbles
from vconvert.export.qdq_graph import QdqConv

__all__ = ["PackedPool", "compact_int8_graph", "int8_layer_subgraph"]


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
