"""The non-VNNI x86 int8 reference: one QLinearConv against onnxruntime, the pair saturation, the QDQ model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from vconvert.export.saturation import (
    INT16_MAX,
    SAFE_WEIGHT,
    accumulate,
    conv_matrix,
    im2col_nhwc,
    qlinear_conv,
    saturating_model,
    saturating_pairs,
    saturation_report,
)

CASES = [  # channels, outputs, kernel, strides, pads, dilations (multiples of 4 take MLAS's ConvSym path)
    (16, 16, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (3, 8, 3, (2, 2), (1, 1, 1, 1), (1, 1)),
    (8, 24, 1, (2, 2), (0, 0, 0, 0), (1, 1)),
    (5, 16, 3, (1, 1), (2, 1, 0, 2), (2, 1)),
]


def _qlinear_conv_model(weight: np.ndarray, w_scale: np.ndarray, bias: np.ndarray, x_scale: float, x_zp: int,
                        y_scale: float, y_zp: int, strides, pads, dilations) -> bytes:  # fmt: skip
    inits = [
        numpy_helper.from_array(np.array(x_scale, np.float32), "xs"),
        numpy_helper.from_array(np.array(x_zp, np.uint8), "xz"),
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(w_scale.astype(np.float32), "ws"),
        numpy_helper.from_array(np.zeros(len(w_scale), np.int8), "wz"),
        numpy_helper.from_array(np.array(y_scale, np.float32), "ys"),
        numpy_helper.from_array(np.array(y_zp, np.uint8), "yz"),
        numpy_helper.from_array(bias, "b"),
    ]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"],
                            strides=list(strides), pads=list(pads), dilations=list(dilations))  # fmt: skip
    graph = helper.make_graph([node], "qconv", [helper.make_tensor_value_info("x", TensorProto.UINT8, None)],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


@pytest.mark.parametrize("case", CASES)
def test_reference_equals_onnxruntime_qlinearconv_where_nothing_saturates(case) -> None:
    channels, outputs, kernel, strides, pads, dilations = case
    rng = np.random.default_rng(len(CASES) * channels + outputs)
    x = rng.integers(0, 256, size=(2, channels, 9, 11), dtype=np.uint8)
    weight = rng.integers(-SAFE_WEIGHT, SAFE_WEIGHT + 1, size=(outputs, channels, kernel, kernel)).astype(np.int8)
    w_scale = rng.uniform(0.001, 0.01, outputs).astype(np.float32)
    bias = rng.integers(-5000, 5000, outputs).astype(np.int32)
    x_scale, x_zp, y_scale, y_zp = 0.02, 117, 0.9, 31
    session = ort.InferenceSession(
        _qlinear_conv_model(weight, w_scale, bias, x_scale, x_zp, y_scale, y_zp, strides, pads, dilations),
        providers=["CPUExecutionProvider"],
    )
    (expected,) = session.run(None, {"x": x})
    options = {"strides": strides, "pads": pads, "dilations": dilations}
    for saturate in (True, False):  # nothing can saturate with |q| <= 64: both modes are exact
        got = qlinear_conv(x, x_scale, x_zp, weight, w_scale, y_scale, y_zp, bias, saturate=saturate, **options)
        assert got.dtype == np.uint8 and got.shape == expected.shape
        assert np.array_equal(got, expected)
    assert 0 < expected.min() or expected.max() < 255 or len(np.unique(expected)) > 10  # not all clipped


def test_pairs_saturate_where_two_times_255_times_127_exceeds_int16() -> None:
    weight = np.array([[127, 127, -127, -127, 127, -127, 64, 64, 65, 64, 0, 127, 90]], dtype=np.int8)
    pairs = saturating_pairs(weight)
    # (127, 127), (−127, −127) and (65, 64) can leave int16; mixed signs, (64, 64), a zero and the padding cannot
    assert pairs.first.tolist() == [0, 2, 8] and pairs.output.tolist() == [0, 0, 0]
    columns = np.full((1, weight.shape[1]), 255, dtype=np.uint8)
    exact = accumulate(columns, weight, saturate=False)[0, 0]
    saturated = accumulate(columns, weight, saturate=True)[0, 0]
    assert exact == 255 * int(weight.astype(np.int64).sum())
    # each risky pair is clipped: 2·255·127 = 64770 → 32767, −64770 → −32768, 255·129 = 32895 → 32767
    assert saturated - exact == (INT16_MAX - 64770) + (-32768 + 64770) + (INT16_MAX - 32895)


def test_a_saturating_conv_differs_from_exact_int32_arithmetic() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(200, 256, size=(1, 8, 6, 6), dtype=np.uint8)  # bright activations, zero point 0
    weight = np.full((4, 8, 3, 3), 120, dtype=np.int8)
    weight[1] = -weight[1]
    scale = np.full(4, 1e-4, np.float32)
    args = (x, 0.01, 0, weight, scale, 1.0, 0)
    saturated = qlinear_conv(*args, saturate=True, pads=(1, 1, 1, 1))
    exact = qlinear_conv(*args, saturate=False, pads=(1, 1, 1, 1))
    assert not np.array_equal(saturated, exact)
    # by hand for the centre of output 0: 36 pairs of 2·x·120 each clipped at 32767
    columns, _ = im2col_nhwc(x, 0, (3, 3), pads=(1, 1, 1, 1))
    centre = columns[2 * 6 + 2]
    pair_sums = (centre[0::2].astype(np.int64) + centre[1::2]) * 120
    matrix = conv_matrix(weight)
    assert accumulate(centre[None], matrix, True)[0, 0] == np.minimum(pair_sums, INT16_MAX).sum()
    assert accumulate(centre[None], matrix, False)[0, 0] == pair_sums.sum()


def test_seven_bit_weights_never_saturate() -> None:
    rng = np.random.default_rng(1)
    weight = rng.integers(-SAFE_WEIGHT, SAFE_WEIGHT + 1, size=(64, 576)).astype(np.int8)
    weight[:, :8] = SAFE_WEIGHT  # the extreme: every pair at 64 + 64
    assert len(saturating_pairs(weight)) == 0
    columns = np.full((3, 576), 255, dtype=np.uint8)
    assert np.array_equal(accumulate(columns, weight, True), accumulate(columns, weight, False))


def _qdq_conv_model(weight: np.ndarray, w_scale: np.ndarray, x_scale: float, x_zp: int) -> onnx.ModelProto:
    """uint8 x → DequantizeLinear → Conv (3x3, pad 1) with a dequantised int8 weight → float output."""
    inits = [
        numpy_helper.from_array(np.array(x_scale, np.float32), "xs"),
        numpy_helper.from_array(np.array(x_zp, np.uint8), "xz"),
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(w_scale, "ws"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["xf"]),
        helper.make_node("DequantizeLinear", ["w", "ws"], ["wf"], axis=0),
        helper.make_node("Conv", ["xf", "wf"], ["y"], pads=[1, 1, 1, 1], name="conv"),
    ]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.UINT8, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_saturating_qdq_model_adds_exactly_the_reference_change() -> None:
    rng = np.random.default_rng(2)
    weight = rng.integers(-127, 128, size=(16, 8, 3, 3)).astype(np.int8)
    w_scale = rng.uniform(0.001, 0.002, 16).astype(np.float32)
    x = rng.integers(0, 256, size=(2, 8, 7, 7), dtype=np.uint8)
    x_scale, x_zp = 0.05, 10
    model = _qdq_conv_model(weight, w_scale, x_scale, x_zp)
    report = saturation_report(model)
    assert report["saturating_pairs"] > 0 and report["max_abs_weight"] == 127 and report["not_modelled"] == []
    changed = saturating_model(model)
    assert changed is not None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    runs = [ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
            .run(None, {"x": x})[0] for m in (model, changed)]  # fmt: skip
    columns, _ = im2col_nhwc(x, x_zp, (3, 3), pads=(1, 1, 1, 1))
    matrix = conv_matrix(weight)
    change = (accumulate(columns, matrix, True) - accumulate(columns, matrix, False)).astype(np.float64)
    change = change.reshape(2, 7, 7, 16).transpose(0, 3, 1, 2) * x_scale * w_scale.reshape(1, -1, 1, 1)
    assert np.abs(change).max() > 0
    assert np.allclose(runs[1] - runs[0], change, rtol=1e-5, atol=1e-4 * np.abs(runs[0]).max())


def test_a_model_with_seven_bit_weights_needs_no_saturating_copy() -> None:
    weight = np.random.default_rng(3).integers(-64, 65, size=(16, 8, 3, 3)).astype(np.int8)
    model = _qdq_conv_model(weight, np.full(16, 0.01, np.float32), 0.05, 10)
    assert saturating_model(model) is None and saturation_report(model)["saturating_pairs"] == 0
