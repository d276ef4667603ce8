"""The compact int8 subgraph: per converted conv the primaries (int8 at 8 bits, else packed at their true width),
the masks (1 bit each) and the signed primary index, rebuilt into the dense int8 weight in integers before its
DequantizeLinear.

Gather, BitShift, BitwiseOr and BitwiseAnd on uint8 unpack the packed values; Concat/Neg, Gather, Mul and the
channel placement in int32, then Cast to int8, rebuild each weight, from initializers only: onnxruntime folds
it when the session starts and then runs the same QLinearConv as on the dense int8 file. The packed values of all
layers share one initializer per width (:class:`PackedPool`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from vconvert.errors import CheckFailedError
from vconvert.export.compact import SubgraphBuilder, splice_rebuilds, unpack_bits
from vconvert.export.int8_weights import Int8Layer, decode_int8_layer, pack_codes
from vconvert.export.qdq_graph import QdqConv

__all__ = ["PackedPool", "PackedPools", "compact_int8_graph", "int8_layer_subgraph", "unpacking_constants"]

GROUP = 8  # values per group: 8 values of b bits fill exactly b bytes


def unpacking_constants(bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """How the 8 values of a group of ``bits`` bytes (:func:`vconvert.export.int8_weights.pack_codes`) are read
    in uint8: value j = ((byte[lo_j] >> s_j) | (byte[hi_j] << t_j)) & (2^bits − 1), with lo_j its first byte
    and s_j its first bit there, hi_j the next byte (clamped to the group) and t_j = min(8 − s_j, 7). A value that
    ends in its first byte has s_j + bits ≤ 8, so the high byte's bits land at t_j ≥ bits and are masked off;
    when ``bits`` divides 8 no value crosses a byte and (hi, t) are None. Returns (lo int32, s uint8, hi int32,
    t uint8), each (8,)."""
    first_bit = np.arange(GROUP) * bits
    low, right = first_bit // 8, first_bit % 8
    if 8 % bits == 0:
        return low.astype(np.int32), right.astype(np.uint8), None, None
    high, left = np.minimum(low + 1, bits - 1), np.minimum(8 - right, 7)
    return low.astype(np.int32), right.astype(np.uint8), high.astype(np.int32), left.astype(np.uint8)


class PackedPool:
    """The unsigned ``bits``-bit codes of every layer of a model, packed back to back into one uint8
    initializer (:func:`pack_codes`) and unpacked once in the graph into a flat int32 tensor (minus
    ``offset``) that one Split cuts into the layers' values: fewer nodes and tensors than one unpacking per
    layer, and no padding between layers. The stream is padded to a whole group of ``bits`` bytes (at most
    ``bits`` − 1 bytes per pool)."""

    def __init__(self, name: str, bits: int, offset: int = 0) -> None:
        self.name, self.bits, self.offset = name, bits, offset
        self.chunks: list[np.ndarray] = []  # each layer's codes
        self.outputs: list[str] = []

    def add(self, codes: np.ndarray) -> str:
        """Append one layer's codes; returns the tensor that will hold them minus ``offset`` (int32, flat)."""
        self.chunks.append(codes.reshape(-1).astype(np.int32))
        self.outputs.append(f"{self.name}.{len(self.chunks) - 1}")
        return self.outputs[-1]

    def packed(self) -> np.ndarray:
        """The stored bytes, (groups, bits) uint8."""
        stream = pack_codes(np.concatenate(self.chunks), self.bits)
        padding = (-stream.size) % self.bits
        return np.concatenate([stream, np.zeros(padding, dtype=np.uint8)]).reshape(-1, self.bits)

    def nodes(self) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
        """The unpacking (nothing when no layer added values): Gather each value's first byte of its group,
        BitShift it right (and, when a value can cross a byte, Gather the next byte, BitShift it left, BitwiseOr),
        BitwiseAnd 2^bits − 1, all on uint8 (:func:`unpacking_constants`); Cast to int32, Reshape flat, (Sub
        ``offset``), Split into the layers' values."""
        if not self.chunks:
            return [], []
        build = SubgraphBuilder(self.name)
        packed = build.init("bytes", self.packed())
        low, right, high, left = unpacking_constants(self.bits)
        values = build.node("Gather", [packed, build.init("low", low)], "low_bytes", axis=1)
        values = build.node("BitShift", [values, build.init("right", right)], "low_bits", direction="RIGHT")
        if high is not None and left is not None:
            upper = build.node("Gather", [packed, build.init("high", high)], "high_bytes", axis=1)
            upper = build.node("BitShift", [upper, build.init("left", left)], "high_bits", direction="LEFT")
            values = build.node("BitwiseOr", [values, upper], "joined")
        mask = build.init("mask", np.array(2**self.bits - 1, dtype=np.uint8))
        values = build.node("BitwiseAnd", [values, mask], "codes")
        values = build.node("Cast", [values], "i32", to=TensorProto.INT32)
        values = build.node("Reshape", [values, build.init("flat_shape", np.array([-1], dtype=np.int64))], "flat")
        if self.offset:
            values = build.node("Sub", [values, build.init("offset", np.array(self.offset, dtype=np.int32))], "values")
        sizes = [chunk.size for chunk in self.chunks]
        outputs = list(self.outputs)
        total = build.inits[0].dims[0] * GROUP  # values the whole groups hold
        if total > sum(sizes):
            sizes.append(total - sum(sizes))
            outputs.append(f"{self.name}.padding")
        split = build.init("sizes", np.array(sizes, dtype=np.int64))
        build.nodes.append(onnx.helper.make_node("Split", [values, split], outputs, axis=0))
        return build.nodes, build.inits


class PackedPools:
    """One :class:`PackedPool` per kind and width: signed primaries of b bits (codes k + 2^(b−1)) and the mask
    bits (1 bit each), all named ``prefix.*``."""

    def __init__(self, prefix: str = "vc") -> None:
        self.prefix = prefix
        self.pools: dict[str, PackedPool] = {}

    def _pool(self, key: str, bits: int, offset: int) -> PackedPool:
        if key not in self.pools:
            self.pools[key] = PackedPool(f"{self.prefix}.{key}", bits, offset)
        return self.pools[key]

    def integers(self, values: np.ndarray, bits: int) -> str:
        """Signed ``bits``-bit integers, stored packed; returns the flat int32 tensor that holds them."""
        offset = 2 ** (bits - 1)
        return self._pool(f"p{bits}", bits, offset).add(values.astype(np.int32) + offset)

    def mask_bits(self, bits: np.ndarray) -> str:
        """0/1 mask elements, stored 1 bit each; returns the flat int32 tensor that holds them."""
        return self._pool("bit", 1, 0).add(bits)

    def nodes(self) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
        """Every pool's unpacking."""
        nodes: list[onnx.NodeProto] = []
        inits: list[TensorProto] = []
        for pool in self.pools.values():
            pool_nodes, pool_inits = pool.nodes()
            nodes, inits = nodes + pool_nodes, inits + pool_inits
        return nodes, inits


def _shaped(build: SubgraphBuilder, values: str, shape: Sequence[int], suffix: str) -> str:
    """``values`` (flat) reshaped to ``shape`` (layers of one shape share the shape constant)."""
    shape_name = build.constant("shape_" + "x".join(map(str, shape)), np.array(shape, dtype=np.int64))
    return build.node("Reshape", [values, shape_name], suffix)


def int8_layer_subgraph(
    layer: Int8Layer,
    output: str,
    prefix: str,
    shared: dict[str, TensorProto] | None = None,
    pools: PackedPools | None = None,
) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Nodes and initializers computing ``decode_int8_layer(layer)`` (int8) into the tensor ``output``:
    Gather from [Pq; Neg(Pq)], Mul by the masks, channel placement in int32, Cast to int8. Layer-independent
    constants go into ``shared`` when given (see :class:`SubgraphBuilder`). Packed primaries (below 8 bits)
    and the masks are slices of values that ``pools`` unpacks once for the whole model (the caller adds
    ``pools.nodes()``); without ``pools`` the layer packs and unpacks its own."""
    build = SubgraphBuilder(prefix, shared)
    own_pools = pools is None
    pools = PackedPools(prefix) if pools is None else pools
    structure = layer.structure
    if layer.packed:
        primary = _shaped(build, pools.integers(structure.primary, layer.bits), structure.primary.shape, "primary")
    else:
        primary = build.init("primary", structure.primary)
    if layer.negated:
        primary = build.node("Concat", [primary, build.node("Neg", [primary], "negated")], "signed", axis=0)
    weight = build.node("Gather", [primary, build.as_int64(structure.primary_index, "primary_index")], "w0")
    if not layer.packed:
        weight = build.node("Cast", [weight], "w0_i32", to=TensorProto.INT32)
    if structure.mask_bits is not None and structure.mask_shape is not None:
        bits = unpack_bits(structure.mask_bits, int(np.prod(structure.mask_shape)))
        rows = _shaped(build, pools.mask_bits(bits), structure.mask_shape, "rows")
        if structure.mask_row is not None:
            rows = build.node("Gather", [rows, build.as_int64(structure.mask_row, "mask_row")], "mask")
        weight = build.node("Mul", [weight, rows], "w_masked")
    weight = build.place_channels(weight, structure, TensorProto.INT32)
    # the last Cast writes ``output`` itself: onnxruntime names the folded weight after it, as in the dense file
    build.nodes.append(onnx.helper.make_node("Cast", [weight], [output], to=TensorProto.INT8))
    if own_pools:
        pool_nodes, pool_inits = pools.nodes()
        return pool_nodes + build.nodes, pool_inits + build.inits
    return build.nodes, build.inits


def compact_int8_graph(
    model: onnx.ModelProto, layers: Mapping[str, Int8Layer], convs: Mapping[str, QdqConv]
) -> dict[str, int]:
    """Rewrite the dense int8 ``model`` in place: each converted conv's int8 weight initializer becomes its
    in-integer rebuild (checked against :func:`decode_int8_layer` first). Returns per-layer stored bytes."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[TensorProto] = []
    shared: dict[str, TensorProto] = {}
    pools = PackedPools()
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
    nodes, inits = pools.nodes()
    new_nodes, new_inits = nodes + new_nodes, inits + new_inits
    splice_rebuilds(model.graph, {conv.weight for conv in convs.values()}, new_nodes, [*shared.values(), *new_inits])
    return stored
