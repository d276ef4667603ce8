"""vconvert.export.names: short ids for every value but the graph's inputs and outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from vconvert.export.names import short_name, shorten_names


def test_short_name_is_base_36_and_unique() -> None:
    assert [short_name(i) for i in (0, 9, 10, 35, 36, 1295, 1296)] == ["0", "9", "a", "z", "10", "zz", "100"]
    assert len({short_name(i) for i in range(5000)}) == 5000


def test_shorten_names_keeps_inputs_outputs_and_the_computation() -> None:
    weight = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "a.rather.long.weight_name")
    nodes = [
        helper.make_node("MatMul", ["input", "a.rather.long.weight_name"], ["/block/MatMul_output_0"], name="mm"),
        helper.make_node("Relu", ["/block/MatMul_output_0"], ["0"], name="relu"),  # an id-like name
        helper.make_node("Add", ["0", "/block/MatMul_output_0"], ["output"], name="add"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [1, 3])], [weight],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = np.array([[1.0, -2.0]], dtype=np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    renaming = shorten_names(model)
    onnx.checker.check_model(model)
    assert set(renaming) == {"a.rather.long.weight_name", "/block/MatMul_output_0", "0"}
    assert len(set(renaming.values())) == 3 and all(len(v) <= 2 for v in renaming.values())
    assert model.graph.input[0].name == "input" and model.graph.node[-1].output[0] == "output"
    assert all(not node.name for node in model.graph.node)
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    assert np.array_equal(before[0], after[0])


def test_drop_defaults_removes_default_conv_attributes_and_keeps_the_computation() -> None:
    from vconvert.export.names import drop_defaults

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "w")
    conv = helper.make_node("Conv", ["input", "w"], ["mid"], group=1, auto_pad="NOTSET", strides=[1, 1],
                            dilations=[1, 1], pads=[1, 1, 1, 1], kernel_shape=[3, 3], doc_string="")  # fmt: skip
    strided = helper.make_node("Conv", ["mid", "w2"], ["output"], strides=[2, 1], dilations=[1, 1], group=1)
    weight2 = numpy_helper.from_array(rng.standard_normal((3, 4, 1, 1)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [conv, strided], "g", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 2, 6, 6])],
        [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [1, 3, 3, 6])], [weight, weight2],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = rng.standard_normal((1, 2, 6, 6)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    size = len(model.SerializeToString())
    assert drop_defaults(model) == 6
    onnx.checker.check_model(model)
    assert sorted(a.name for a in model.graph.node[0].attribute) == ["kernel_shape", "pads"]
    assert [a.name for a in model.graph.node[1].attribute] == ["strides"]  # (2, 1) is not the default
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    assert np.array_equal(before[0], after[0]) and len(model.SerializeToString()) < size
