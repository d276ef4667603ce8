"""The int8 arithmetic of onnxruntime on x86 CPUs without VNNI, exactly: u8 × s8 products added in pairs into
saturating int16 sums (``vpmaddubsw``), then int32; a numpy reference of one QLinearConv and a QDQ model that
adds the saturation to every quantized Conv and Gemm, so a file can be checked for every CPU on this one.

What onnxruntime's MLAS does (read from its sources, onnxruntime/core/mlas/lib): on AVX2 and on AVX-512 without
VNNI the u8 × s8 kernels (``MlasConvSymKernelAvx2``/``Avx512Core`` for convs whose input channels are a multiple
of 4, the QGEMM kernels ``MlasGemmU8S8KernelAvx2``/``Avx512Core`` otherwise and for Gemm) broadcast four
consecutive K bytes of the activations, ``vpmaddubsw`` them against four K bytes of one output's weights, which
adds the products of K elements (2i, 2i+1) into one int16 with saturation, and ``vpmaddwd`` by 1 then adds the
two int16 into int32 (exact). With VNNI (``vpdpbusd``), AMX or ARM dot products every product is added in int32.
K runs over (kh, kw, c) — QLinearConv reorders the weight OIHW → HWIO and its im2col is NHWC — per group, zero
padded to a multiple of 4 (``MlasGemmU8S8CopyPackBAvx2`` interleaves four K rows; ``MlasConvSymPackW`` packs four
input channels of one tap). The activations are the raw uint8 values, padding is the zero point, and the zero
point is subtracted afterwards through weight sums, so a pair saturates when x_a·w_a + x_b·w_b leaves
[−32768, 32767]: only when both weights have one sign and |w_a| + |w_b| > 128 (255·128 = 32640). Hence 7-bit
weights (|q| ≤ 64) never saturate. Requantization (both paths): float32(acc + bias − zp·Σw) times the float32
scale (x_scale · w_scale) / y_scale, clipped to the uint8 range, rounded half to even, plus the zero point.
Not modelled: depthwise convs (MLAS runs them in separate kernels) and MatMul nodes.

:func:`qlinear_conv` is the exact reference of one QLinearConv (tested against onnxruntime where nothing
saturates). :func:`saturating_model` returns a QDQ model that onnxruntime runs as written (optimisations off:
float convs on dequantised values) with, added to each quantized Conv/Gemm output, the exact change the pair
saturation makes to its int32 accumulator times its scale: what a CPU without VNNI computes, on any CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "INT16_MAX",
    "INT16_MIN",
    "SAFE_WEIGHT",
    "SaturatingPairs",
    "accumulate",
    "conv_matrix",
    "im2col_nhwc",
    "qlinear_conv",
    "requantize",
    "saturating_model",
    "saturating_pairs",
    "saturation_report",
]

INT16_MIN, INT16_MAX = -32768, 32767
SAFE_PAIR = 128  # |w_a| + |w_b| ≤ 128: 255 · 128 = 32640 fits in int16 whatever the activations
SAFE_WEIGHT = SAFE_PAIR // 2  # every |q| ≤ 64 (7-bit weights): no pair of the weight can saturate
ROWS_PER_CHUNK = 8192  # positions per chunk of the numpy reference (bounds its memory)


# --------------------------------------------------------------------------- which pairs can saturate
@dataclass(frozen=True)
class SaturatingPairs:
    """The pairs of K elements (2i, 2i+1) of a weight matrix (M, K) whose u8 × s8 sum can leave int16."""

    output: np.ndarray  # (P,) output channel of each pair
    first: np.ndarray  # (P,) K index of its first element (even); the second is first + 1
    weights: np.ndarray  # (P, 2) int32 the two weights

    def __len__(self) -> int:
        return len(self.output)


def conv_matrix(weight: np.ndarray) -> np.ndarray:
    """An OIHW conv weight as the (M, K) matrix MLAS multiplies: K in (kh, kw, c) order (per group)."""
    return weight.transpose(0, 2, 3, 1).reshape(weight.shape[0], -1)


def saturating_pairs(matrix: np.ndarray) -> SaturatingPairs:
    """The pairs (2i, 2i+1) of each row of an int8 (M, K) matrix whose two weights share a sign and sum in
    magnitude to more than 128: the only ones whose pair sum can leave int16 for some uint8 activations (an odd
    K pairs its last element with the zero padding, which never saturates)."""
    rows, count = matrix.shape
    padded = np.zeros((rows, count + count % 2), dtype=np.int32)
    padded[:, :count] = matrix
    first, second = padded[:, 0::2], padded[:, 1::2]
    risky = (first * second > 0) & (np.abs(first) + np.abs(second) > SAFE_PAIR)
    output, pair = np.nonzero(risky)
    return SaturatingPairs(output, 2 * pair, np.stack([first[output, pair], second[output, pair]], axis=1))


# --------------------------------------------------------------------------- the numpy reference of one conv
def im2col_nhwc(
    x: np.ndarray,
    zero_point: int,
    kernel: Sequence[int],
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 activations (N, C, H, W) as rows (N·OH·OW, KH·KW·C) in MLAS's K order, padded with the zero point;
    and (OH, OW)."""
    n, c, h, w = x.shape
    kh, kw = kernel
    top, left, bottom, right = pads
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=zero_point)
    oh = (h + top + bottom - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (w + left + right - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    columns = np.empty((n, oh, ow, kh, kw, c), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dilations[0], i * dilations[0] + strides[0] * (oh - 1) + 1, strides[0])
            cols = slice(j * dilations[1], j * dilations[1] + strides[1] * (ow - 1) + 1, strides[1])
            columns[:, :, :, i, j, :] = padded[:, :, rows, cols].transpose(0, 2, 3, 1)
    return columns.reshape(n * oh * ow, kh * kw * c), (oh, ow)


def accumulate(columns: np.ndarray, matrix: np.ndarray, saturate: bool) -> np.ndarray:
    """Σ_k x_k · w_k per row of ``columns`` (uint8, (P, K)) and output of ``matrix`` (int8, (M, K)) as int64 (P, M):
    exact int32 arithmetic, or with ``saturate`` the pairs (2i, 2i+1) clipped to int16 first, as ``vpmaddubsw``."""
    weights = matrix.astype(np.float64)
    total = np.empty((columns.shape[0], matrix.shape[0]), dtype=np.int64)
    pairs = saturating_pairs(matrix) if saturate else None
    for start in range(0, columns.shape[0], ROWS_PER_CHUNK):
        chunk = columns[start : start + ROWS_PER_CHUNK]
        exact = chunk.astype(np.float64) @ weights.T  # integers below 2^53: exact
        total[start : start + len(chunk)] = exact.astype(np.int64)
        if pairs:
            total[start : start + len(chunk)] += _pair_corrections(chunk, pairs, matrix.shape[0])
    return total


def _pair_corrections(columns: np.ndarray, pairs: SaturatingPairs, outputs: int) -> np.ndarray:
    """What the int16 saturation of ``pairs`` adds to each output's sum: clip(p) − p, summed per output."""
    padded = np.concatenate([columns, np.zeros((len(columns), 1), dtype=columns.dtype)], axis=1)
    sums = padded[:, pairs.first].astype(np.int32) * pairs.weights[:, 0]
    sums += padded[:, pairs.first + 1].astype(np.int32) * pairs.weights[:, 1]
    change = (np.clip(sums, INT16_MIN, INT16_MAX) - sums).astype(np.float64)
    owner = np.zeros((len(pairs), outputs))
    owner[np.arange(len(pairs)), pairs.output] = 1.0
    return (change @ owner).astype(np.int64)


def output_scale(x_scale: float, w_scale: np.ndarray, y_scale: float) -> np.ndarray:
    """QLinearConv's float32 requantization scale per output: (x_scale · w_scale) / y_scale in float32."""
    product = np.float32(x_scale) * np.asarray(w_scale, dtype=np.float32).reshape(-1)
    return (product / np.float32(y_scale)).astype(np.float32)


def requantize(total: np.ndarray, scale: np.ndarray, zero_point: int) -> np.ndarray:
    """int32 sums (bias and zero-point terms included) to uint8 as MLAS does: float32, times the float32
    scale, clipped to [−zp, 255 − zp], rounded half to even, plus the zero point."""
    value = total.astype(np.float32) * scale.astype(np.float32)
    value = np.clip(value, np.float32(-zero_point), np.float32(255 - zero_point))
    return (np.rint(value).astype(np.int32) + zero_point).astype(np.uint8)


def qlinear_conv(
    x: np.ndarray,
    x_scale: float,
    x_zero_point: int,
    weight: np.ndarray,
    w_scale: np.ndarray,
    y_scale: float,
    y_zero_point: int,
    bias: np.ndarray | None = None,
    *,
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
    group: int = 1,
    saturate: bool = True,
) -> np.ndarray:
    """QLinearConv (uint8 x, int8 weight OIHW with zero point 0, int32 bias, NCHW) as onnxruntime computes it on
    x86 without VNNI (``saturate``) or with exact int32 sums (VNNI, AMX, ARM dot products)."""
    n = x.shape[0]
    outputs, per_group = weight.shape[0], weight.shape[0] // group
    channels = weight.shape[1]
    scale = np.broadcast_to(output_scale(x_scale, w_scale, y_scale), (outputs,))
    results = []
    for g in range(group):
        part = weight[g * per_group : (g + 1) * per_group]
        columns, (oh, ow) = im2col_nhwc(x[:, g * channels : (g + 1) * channels], x_zero_point, part.shape[2:],
                                        strides, pads, dilations)  # fmt: skip
        matrix = conv_matrix(part)
        total = accumulate(columns, matrix, saturate) - x_zero_point * matrix.astype(np.int64).sum(axis=1)
        if bias is not None:
            total += bias[g * per_group : (g + 1) * per_group].astype(np.int64)
        results.append(requantize(total, scale[g * per_group : (g + 1) * per_group], y_zero_point))
    y = np.concatenate(results, axis=1)
    return y.reshape(n, oh, ow, outputs).transpose(0, 3, 1, 2)


# --------------------------------------------------------------------------- a whole QDQ model with saturation
def _initializers(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in graph.node for output in node.output}


@dataclass
class _QuantizedOp:
    """A Conv or Gemm of a QDQ graph whose activation is uint8 and whose weight is a constant int8 tensor."""

    node: onnx.NodeProto
    activation: str  # the uint8 tensor before its DequantizeLinear
    x_scale: float
    x_zero_point: int
    weight: np.ndarray  # int8, as stored (OIHW for Conv; Gemm's B)
    w_scale: np.ndarray  # per output (or one)
    matrix: np.ndarray  # (M, K) in MLAS's K order


def _attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _quantized_ops(model: onnx.ModelProto) -> tuple[list[_QuantizedOp], list[str]]:
    """The Conv/Gemm nodes fed by a dequantised uint8 activation and a dequantised constant int8 weight, and the
    names of those the reference does not model (depthwise convs, MatMul)."""
    graph = model.graph
    values, producers = _initializers(graph), _producers(graph)
    found, skipped = [], []

    def dequantized(name: str) -> tuple[str, np.ndarray, np.ndarray] | None:
        node = producers.get(name)
        if node is None or node.op_type != "DequantizeLinear":
            return None
        scale = values.get(node.input[1])
        point = values.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(1, np.int8)
        return (node.input[0], scale, point) if scale is not None and point is not None else None

    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        activation, weight = dequantized(node.input[0]), dequantized(node.input[1])
        if activation is None or weight is None or weight[0] not in values:
            continue
        stored = values[weight[0]]
        if stored.dtype != np.int8 or activation[2].dtype != np.uint8 or weight[2].any():
            continue
        padding = _attribute(node, "auto_pad", b"NOTSET")
        unusual = _attribute(node, "group", 1) > 1 or padding not in (b"NOTSET", "NOTSET")
        if node.op_type == "MatMul" or unusual or _attribute(node, "transA", 0):
            skipped.append(node.name or node.output[0])
            continue
        if node.op_type == "Conv":
            matrix = conv_matrix(stored)
        else:
            matrix = stored if _attribute(node, "transB", 0) else stored.T
        x_scale, x_zero_point = float(activation[1].reshape(-1)[0]), int(activation[2].reshape(-1)[0])
        found.append(_QuantizedOp(node, activation[0], x_scale, x_zero_point, stored, weight[1].reshape(-1), matrix))
    return found, skipped


def saturation_report(model: onnx.ModelProto) -> dict[str, object]:
    """How many weight pairs of the model's quantized Conv/Gemm nodes can saturate on x86 without VNNI, the
    largest |q| of their weights, and which nodes the reference does not model."""
    ops, skipped = _quantized_ops(model)
    pairs = {op.node.name or op.node.output[0]: len(saturating_pairs(op.matrix)) for op in ops}
    return {
        "quantized_ops": len(ops),
        "max_abs_weight": max((int(np.abs(op.matrix.astype(np.int32)).max(initial=0)) for op in ops), default=0),
        "saturating_pairs": sum(pairs.values()),
        "ops_with_saturating_pairs": sorted(name for name, count in pairs.items() if count),
        "not_modelled": skipped,
    }


def _correction_nodes(op: _QuantizedOp, index: int, pairs: SaturatingPairs) -> tuple[list, list, str]:
    """Nodes adding op's saturation change (clip(p) − p per pair, summed per output, times x_scale · w_scale) to
    its float output; returns nodes, initializers and the name of the correction tensor."""
    prefix = f"vc.sat{index}"
    count, outputs = len(pairs), op.matrix.shape[0]
    nodes, inits = [], []
    raw = f"{prefix}.x"
    nodes.append(helper.make_node("Cast", [op.activation], [raw], to=TensorProto.FLOAT))
    scale = (np.float64(op.x_scale) * np.broadcast_to(op.w_scale.astype(np.float64), (outputs,)))[pairs.output]
    gather = np.zeros((count, outputs), dtype=np.float32)
    gather[np.arange(count), pairs.output] = scale
    if op.node.op_type == "Conv":
        kh, kw = op.weight.shape[2:]
        channels = op.weight.shape[1]
        pair_filters = np.zeros((count, kh * kw * channels + 1), dtype=np.float32)
        pair_filters[np.arange(count), pairs.first] = pairs.weights[:, 0]
        pair_filters[np.arange(count), pairs.first + 1] = pairs.weights[:, 1]
        pair_filters = pair_filters[:, :-1].reshape(count, kh, kw, channels).transpose(0, 3, 1, 2)
        pads = list(_attribute(op.node, "pads", [0, 0, 0, 0]))
        if any(pads):
            inits.append(numpy_helper.from_array(np.array([0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]],
                                                          dtype=np.int64), f"{prefix}.pads"))  # fmt: skip
            inits.append(numpy_helper.from_array(np.array(op.x_zero_point, dtype=np.float32), f"{prefix}.zp"))
            nodes.append(helper.make_node("Pad", [raw, f"{prefix}.pads", f"{prefix}.zp"], [f"{prefix}.xp"]))
            raw = f"{prefix}.xp"
        inits.append(numpy_helper.from_array(np.ascontiguousarray(pair_filters), f"{prefix}.pw"))
        attributes = {"strides": list(_attribute(op.node, "strides", [1, 1])),
                      "dilations": list(_attribute(op.node, "dilations", [1, 1]))}  # fmt: skip
        nodes.append(helper.make_node("Conv", [raw, f"{prefix}.pw"], [f"{prefix}.p"], **attributes))
        inits.append(numpy_helper.from_array(gather.T.reshape(outputs, count, 1, 1).copy(), f"{prefix}.g"))
        combine = "Conv"
    else:
        pair_matrix = np.zeros((op.matrix.shape[1] + 1, count), dtype=np.float32)
        pair_matrix[pairs.first, np.arange(count)] = pairs.weights[:, 0]
        pair_matrix[pairs.first + 1, np.arange(count)] = pairs.weights[:, 1]
        inits.append(numpy_helper.from_array(pair_matrix[:-1].copy(), f"{prefix}.pw"))
        nodes.append(helper.make_node("MatMul", [raw, f"{prefix}.pw"], [f"{prefix}.p"]))
        alpha = np.float32(_attribute(op.node, "alpha", 1.0))
        inits.append(numpy_helper.from_array((gather * alpha).astype(np.float32), f"{prefix}.g"))
        combine = "MatMul"
    inits.append(numpy_helper.from_array(np.array(INT16_MIN, dtype=np.float32), f"{prefix}.lo"))
    inits.append(numpy_helper.from_array(np.array(INT16_MAX, dtype=np.float32), f"{prefix}.hi"))
    nodes.append(helper.make_node("Clip", [f"{prefix}.p", f"{prefix}.lo", f"{prefix}.hi"], [f"{prefix}.c"]))
    nodes.append(helper.make_node("Sub", [f"{prefix}.c", f"{prefix}.p"], [f"{prefix}.d"]))
    nodes.append(helper.make_node(combine, [f"{prefix}.d", f"{prefix}.g"], [f"{prefix}.out"]))
    return nodes, inits, f"{prefix}.out"


def saturating_model(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy of the QDQ ``model`` whose quantized Conv/Gemm outputs carry the change that the non-VNNI pair
    saturation makes, to run in onnxruntime with optimisations off; None when no pair of any weight can
    saturate (the model then computes the same integers on every CPU)."""
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    graph = changed.graph
    ops, _ = _quantized_ops(changed)
    added_nodes, added_inits = [], []
    for index, op in enumerate(ops):
        pairs = saturating_pairs(op.matrix)
        if not pairs:
            continue
        nodes, inits, correction = _correction_nodes(op, index, pairs)
        output = op.node.output[0]
        plain = f"vc.sat{index}.plain"
        op.node.output[0] = plain
        nodes.append(helper.make_node("Add", [plain, correction], [output]))
        added_nodes.append((op.node, nodes))
        added_inits += inits
    if not added_nodes:
        return None
    for node, nodes in added_nodes:
        position = list(graph.node).index(node) + 1
        for offset, new in enumerate(nodes):
            graph.node.insert(position + offset, new)
    graph.initializer.extend(added_inits)
    return changed
