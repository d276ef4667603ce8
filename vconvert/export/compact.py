"""The ``--compact`` ONNX: store what a versatile layer stores, rebuild the dense weight in-graph.

A folded versatile conv holds as many weights as the original one, so a dense ONNX file is no
smaller. The compact file instead stores, per converted conv, the primary filters, the bit-packed
binary masks (deduplicated rows: the two nested spatial masks of a 3x3 kernel are two rows, not N),
the per-output scales, the small integer index tensors (primary index, mask row, channel offset) and,
when BatchNorm was folded, the BN factor. A handful of standard ONNX ops rebuilds the dense weight

    W = scatter_offset( Gather(primary, p) · unpack(mask bits)[row] · α ) · β

from initializers only, so onnxruntime constant-folds it once when the session starts and then runs
the very same Conv as the dense file. The arithmetic order is the one of
:func:`vconvert.nn.versatile.materialise_weight` followed by ``fuse_conv_bn_eval``, so the rebuilt weight is
bit-identical to the dense export's.

The encoding (:func:`encode_layer`) and its reference decoder (:func:`decode_layer`) are pure numpy
functions; :func:`compact_graph` rewrites a dense ONNX model (in place), replacing each folded conv's weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from vconvert.errors import CheckFailedError
from vconvert.nn.versatile import VersatileConv2d

__all__ = [
    "CompactLayer",
    "SubgraphBuilder",
    "compact_graph",
    "decode_layer",
    "encode_layer",
    "pack_bits",
    "splice_rebuilds",
    "unpack_bits",
]


# --------------------------------------------------------------------------- pure encoding
def pack_bits(mask: np.ndarray) -> np.ndarray:
    """A 0/1 array as uint8 bytes, most significant bit first (``np.packbits`` order)."""
    return np.packbits(mask.astype(bool).reshape(-1), bitorder="big")


def unpack_bits(packed: np.ndarray, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` bits as a uint8 array of 0/1."""
    return np.unpackbits(packed, bitorder="big")[:count]


def smallest_index_dtype(values: np.ndarray) -> np.dtype:
    """The narrowest unsigned integer type (uint8, uint16, else int32) that holds ``values``."""
    top = int(values.max()) if values.size else 0
    if top < 2**8:
        return np.dtype(np.uint8)
    if top < 2**16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


@dataclass
class CompactLayer:
    """What the compact file stores for one folded versatile conv (numpy arrays, exact copies)."""

    primary: np.ndarray  # (P, ĉ, kh, kw) float
    primary_index: np.ndarray  # (N,) small unsigned ints
    mask_bits: np.ndarray | None  # packed (R, ĉ|1, kh, kw) mask rows, uint8
    mask_shape: tuple[int, ...] | None  # (R, ĉ|1, kh, kw)
    mask_row: np.ndarray | None  # (N,) row of each output, None when R == N in output order
    scale: np.ndarray | None  # (N, 1, 1, 1) float
    channel_offset: np.ndarray | None  # (N, 1, 1, 1) small ints, None when ĉ == c
    in_channels: int
    bn_scale: np.ndarray | None  # (N, 1, 1, 1) float: BN weight · rsqrt(var + eps), when BN was folded

    @property
    def out_channels(self) -> int:
        return int(self.primary_index.shape[0])

    def nbytes(self) -> int:
        """Bytes of all stored arrays."""
        arrays = [self.primary, self.primary_index, self.mask_bits, self.mask_row, self.scale]
        arrays += [self.channel_offset, self.bn_scale]
        return sum(a.nbytes for a in arrays if a is not None)


def encode_layer(layer: VersatileConv2d, bn_scale: torch.Tensor | None = None) -> CompactLayer:
    """The compact encoding of ``layer`` (as folded in eval mode: fake-quantised primaries as the forward uses
    them), with an optional folded BN factor."""
    with torch.no_grad():
        primary = layer.quantized_primary().detach().cpu().numpy().copy()  # fake-quantised when it is
        index = layer.primary_index.cpu().numpy()
        mask = layer.output_mask()
        mask_bits = mask_shape = mask_row = None
        if mask is not None:
            mask = mask.detach().cpu()
            flat = (mask.reshape(mask.shape[0], -1) > 0.5).to(torch.uint8)
            rows, inverse = torch.unique(flat, dim=0, return_inverse=True)
            if rows.shape[0] < flat.shape[0]:
                stored, mask_row = rows, inverse.numpy().astype(smallest_index_dtype(inverse.numpy()))
            else:
                stored = flat
            mask_shape = (int(stored.shape[0]), *mask.shape[1:])
            mask_bits = pack_bits(stored.numpy())
        scale = None if layer.scale is None else layer.scale.detach().cpu().numpy().reshape(-1, 1, 1, 1).copy()
        offset = None
        if layer.channel_window < layer.in_channels:
            raw = layer.channel_offset.cpu().numpy()
            offset = raw.astype(smallest_index_dtype(raw)).reshape(-1, 1, 1, 1)
        beta = None if bn_scale is None else bn_scale.detach().cpu().numpy().reshape(-1, 1, 1, 1).copy()
    return CompactLayer(
        primary=primary,
        primary_index=index.astype(smallest_index_dtype(index)),
        mask_bits=mask_bits,
        mask_shape=mask_shape,
        mask_row=mask_row,
        scale=scale,
        channel_offset=offset,
        in_channels=layer.in_channels,
        bn_scale=beta,
    )


def decode_layer(encoded: CompactLayer) -> np.ndarray:
    """Reference decoder (numpy, same arithmetic order as the graph): the dense (N, c, kh, kw) weight."""
    weight = encoded.primary[encoded.primary_index.astype(np.int64)]
    if encoded.mask_bits is not None and encoded.mask_shape is not None:
        count = int(np.prod(encoded.mask_shape))
        rows = unpack_bits(encoded.mask_bits, count).reshape(encoded.mask_shape).astype(weight.dtype)
        if encoded.mask_row is not None:
            rows = rows[encoded.mask_row.astype(np.int64)]
        weight = weight * rows
    if encoded.scale is not None:
        weight = weight * encoded.scale
    if encoded.channel_offset is not None:
        out_channels, window, kh, kw = weight.shape
        dense = np.zeros((out_channels, encoded.in_channels, kh, kw), dtype=weight.dtype)
        channels = encoded.channel_offset.astype(np.int64) + np.arange(window).reshape(1, -1, 1, 1)
        np.put_along_axis(dense, np.broadcast_to(channels, weight.shape), weight, axis=1)
        weight = dense
    if encoded.bn_scale is not None:
        weight = weight * encoded.bn_scale
    return weight


# --------------------------------------------------------------------------- the ONNX subgraph
def _const(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


class SubgraphBuilder:
    """Nodes and initializers of one in-graph weight rebuild, their tensors named ``prefix.*`` (keep it
    short: names are stored once per tensor). Shared by the float and the int8 compact forms.

    Small constants that do not depend on the layer (bit shifts, ...) go into ``shared`` when it is given,
    named ``vc.*``, so that a model stores them once for all its rebuilds."""

    def __init__(self, prefix: str, shared: dict[str, TensorProto] | None = None) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.shared = shared

    def init(self, suffix: str, array: np.ndarray) -> str:
        """An initializer holding ``array``; returns its name."""
        self.inits.append(_const(f"{self.prefix}.{suffix}", array))
        return f"{self.prefix}.{suffix}"

    def constant(self, key: str, array: np.ndarray) -> str:
        """A constant independent of the layer: in ``shared`` (once per model) when there is one."""
        if self.shared is None:
            name = f"{self.prefix}.{key}"
            return name if any(tensor.name == name for tensor in self.inits) else self.init(key, array)
        name = f"vc.{key}"
        if name not in self.shared:
            self.shared[name] = _const(name, array)
        return name

    def node(self, op: str, inputs: list[str], suffix: str, **attrs) -> str:
        """A node with one output; returns the output's name."""
        name = f"{self.prefix}.{suffix}"
        self.nodes.append(helper.make_node(op, inputs, [name], **attrs))
        return name

    def as_int64(self, stored: np.ndarray, suffix: str) -> str:
        """A small stored index array, cast to int64 in the graph (what Gather and Scatter take)."""
        return self.node("Cast", [self.init(suffix, stored)], f"{suffix}_i64", to=TensorProto.INT64)

    def mask_rows(self, encoded: CompactLayer, dtype: int) -> str | None:
        """Each output's binary mask as ``dtype`` (a TensorProto type), or None when the layer has none.

        The stored bytes are unpacked with BitShift and BitwiseAnd on uint8 (most significant bit first)."""
        if encoded.mask_bits is None or encoded.mask_shape is None:
            return None
        count = int(np.prod(encoded.mask_shape))
        packed = self.init("mask_bits", encoded.mask_bits.reshape(-1, 1))
        shifts = self.constant("bit_shift", np.arange(7, -1, -1, dtype=np.uint8).reshape(1, 8))
        bits = self.node("BitShift", [packed, shifts], "bits_shifted", direction="RIGHT")
        bits = self.node("BitwiseAnd", [bits, self.constant("bit_one", np.ones((1, 1), dtype=np.uint8))], "bits")
        bits = self.node("Reshape", [bits, self.constant("flat", np.array([-1], dtype=np.int64))], "bits_flat")
        start, end = self.constant("zero", np.array([0], dtype=np.int64)), self.init("slice_end", np.array([count]))
        bits = self.node("Slice", [bits, start, end], "bits_used")
        shape = self.init("mask_shape", np.array(encoded.mask_shape, dtype=np.int64))
        rows = self.node("Cast", [self.node("Reshape", [bits, shape], "rows_u8")], "rows", to=dtype)
        if encoded.mask_row is not None:
            rows = self.node("Gather", [rows, self.as_int64(encoded.mask_row, "mask_row")], "mask")
        return rows

    def place_channels(self, weight: str, encoded: CompactLayer, dtype: int) -> str:
        """``weight`` (N, ĉ, kh, kw) placed at each output's channel offset in zeros of (N, c, kh, kw)."""
        if encoded.channel_offset is None:
            return weight
        out_channels, window, kh, kw = (encoded.out_channels, *encoded.primary.shape[1:])
        offsets = self.as_int64(encoded.channel_offset, "channel_offset")
        window_range = self.init("window", np.arange(window, dtype=np.int64).reshape(1, -1, 1, 1))
        channels = self.node("Add", [offsets, window_range], "channels")
        channels = self.node(
            "Expand", [channels, self.init("window_shape", np.array([out_channels, window, kh, kw]))], "index"
        )
        zeros = self.node(
            "ConstantOfShape",
            [self.init("dense_shape", np.array([out_channels, encoded.in_channels, kh, kw], dtype=np.int64))],
            "zeros",
            value=numpy_helper.from_array(np.zeros(1, dtype=helper.tensor_dtype_to_np_dtype(dtype))),
        )
        return self.node("ScatterElements", [zeros, channels, weight], "w_placed", axis=1)

    def finish(self, weight: str, output: str) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
        """The nodes (ending in an Identity into ``output``) and the initializers."""
        self.nodes.append(helper.make_node("Identity", [weight], [output]))
        return self.nodes, self.inits


def layer_subgraph(
    encoded: CompactLayer, output: str, prefix: str, shared: dict[str, TensorProto] | None = None
) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Nodes and initializers that compute ``decode_layer(encoded)`` into the tensor named ``output``.

    Their own tensors are named ``prefix.*`` (keep it short: names are stored once per tensor); layer-
    independent constants go into ``shared`` when given (the caller adds them to the graph once)."""
    build = SubgraphBuilder(prefix, shared)
    dtype = helper.np_dtype_to_tensor_dtype(encoded.primary.dtype)
    primary, index = build.init("primary", encoded.primary), build.as_int64(encoded.primary_index, "primary_index")
    weight = build.node("Gather", [primary, index], "w0")
    rows = build.mask_rows(encoded, dtype)
    if rows is not None:
        weight = build.node("Mul", [weight, rows], "w_masked")
    if encoded.scale is not None:
        weight = build.node("Mul", [weight, build.init("scale", encoded.scale)], "w_scaled")
    weight = build.place_channels(weight, encoded, dtype)
    if encoded.bn_scale is not None:
        weight = build.node("Mul", [weight, build.init("bn_scale", encoded.bn_scale)], "w_bn")
    return build.finish(weight, output)


# --------------------------------------------------------------------------- the rewrite
def _find_weight(initializers: Mapping[str, TensorProto], name: str, expected: np.ndarray) -> str:
    """The initializer that holds ``expected`` exactly: ``name`` first, else any of the same shape and value."""
    candidate = initializers.get(name)
    if candidate is not None and np.array_equal(numpy_helper.to_array(candidate), expected):
        return name
    for other_name, tensor in initializers.items():
        if tuple(tensor.dims) == expected.shape and np.array_equal(numpy_helper.to_array(tensor), expected):
            return other_name
    raise CheckFailedError(
        f"The dense ONNX graph holds no exact copy of the folded weight of {name.removesuffix('.weight')!r} "
        "(the exporter changed it), so the compact file cannot rebuild it: export without `compact=True`."
    )


def compact_graph(
    model: onnx.ModelProto,
    layers: Mapping[str, VersatileConv2d],
    dense_weights: Mapping[str, np.ndarray],
    bn_scales: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, int]:
    """Rewrite the dense ``model`` in place: each folded conv's weight initializer becomes its rebuild.

    ``layers`` maps conv names to the versatile layers they were folded from, ``dense_weights`` to the
    folded (and BN-fused) weights that the dense graph holds, ``bn_scales`` to the BN factor fused in.
    Each encoding is checked against ``dense_weights`` with :func:`decode_layer` (bit-exact) before the
    graph is touched. In place because a copy of a resnet50-sized proto costs 100 MB at the export's
    memory peak. Returns per-layer stored bytes.
    """
    bn_scales = bn_scales or {}
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[TensorProto] = []
    shared: dict[str, TensorProto] = {}
    replaced: set[str] = set()
    stored: dict[str, int] = {}
    for number, (name, layer) in enumerate(layers.items()):
        expected = dense_weights[name]
        encoded = encode_layer(layer, bn_scales.get(name))
        decoded = decode_layer(encoded)
        if decoded.shape != expected.shape or not np.array_equal(decoded, expected):
            difference = float(np.abs(decoded - expected).max()) if decoded.shape == expected.shape else float("inf")
            raise CheckFailedError(
                f"The compact encoding of {name!r} does not rebuild its folded weight exactly (max difference "
                f"{difference:.3g}); export without `compact=True` and report this."
            )
        target = _find_weight(initializers, f"{name}.weight", expected)
        nodes, inits = layer_subgraph(encoded, target, f"vc{number}", shared)
        new_nodes += nodes
        new_inits += inits
        replaced.add(target)
        stored[name] = encoded.nbytes()
    del initializers
    splice_rebuilds(graph, replaced, new_nodes, [*shared.values(), *new_inits])
    return stored


def splice_rebuilds(
    graph: onnx.GraphProto, replaced: set[str], nodes: list[onnx.NodeProto], inits: list[TensorProto]
) -> None:
    """Drop the ``replaced`` initializers from ``graph`` and add the rebuilds that compute them instead.

    The rebuild nodes go first: they read initializers only, so the topological order holds."""
    for index in reversed(range(len(graph.initializer))):
        if graph.initializer[index].name in replaced:
            del graph.initializer[index]
    graph.initializer.extend(inits)
    old_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old_nodes)
