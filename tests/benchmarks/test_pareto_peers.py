"""The peers of benchmarks/pareto.py are what they claim to be: real int4/int8 files that compute the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from benchmarks.pareto import ImageReader, int8_ptq, pareto_front, verdicts, weight_only_int4
from sample_models.resnet_cifar import resnet8
from vconvert.export.pipeline import export
from vconvert.export.verify import ort_session


@pytest.fixture(scope="module")
def fp32_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = resnet8().eval()
    path = tmp_path_factory.mktemp("pareto") / "dense.onnx"
    export(model, path, input_shape=[1, 3, 32, 32], measure=False)
    return path, model


def _outputs(path: Path, images: torch.Tensor) -> np.ndarray:
    return ort_session(str(path)).run(None, {"input": images.numpy()})[0]


def test_weight_only_int4_stores_every_conv_and_gemm_weight_in_4_bits(fp32_file, tmp_path: Path) -> None:
    source, model = fp32_file
    output = tmp_path / "w4.onnx"
    weight_only_int4(source, output)
    graph = onnx.load(str(output)).graph
    weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT4]
    convs_and_gemms = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(weights) == len(convs_and_gemms) == 10  # 9 convs (BN folded) + fc
    assert all(np.abs(numpy_helper.to_array(t)).max() <= 8 for t in weights)
    assert output.stat().st_size < 0.2 * source.stat().st_size
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(images).numpy()
    got = _outputs(output, images)
    relative = np.abs(got - expected).max() / np.abs(expected).max()
    assert 1e-4 < relative < 0.5, relative  # quantised (not identical), yet the same function


def test_int8_ptq_is_qdq_and_close(fp32_file, tmp_path: Path) -> None:
    source, model = fp32_file
    output = tmp_path / "int8.onnx"
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    int8_ptq(source, output, images)
    ops = {n.op_type for n in onnx.load(str(output)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    with torch.no_grad():
        expected = model(images[:8]).numpy()
    got = _outputs(output, images[:8])
    assert np.abs(got - expected).max() / np.abs(expected).max() < 0.2
    assert output.stat().st_size < 0.4 * source.stat().st_size


def test_image_reader_feeds_every_image_once() -> None:
    reader = ImageReader(torch.zeros(70, 3, 4, 4))
    sizes = []
    while (batch := reader.get_next()) is not None:
        sizes.append(batch["input"].shape[0])
    assert sizes == [32, 32, 6]


ROWS = [
    {"artifact": "dense", "method": "dense", "file_bytes": 1000, "file_ratio": 1.0, "top1": 88.6},
    {"artifact": "int8", "method": "int8-ptq", "file_bytes": 300, "file_ratio": 0.3, "top1": 88.5},
    {"artifact": "w4", "method": "w4", "file_bytes": 150, "file_ratio": 0.15, "top1": 87.0},
    {"artifact": "ours", "method": "versatile", "file_bytes": 180, "file_ratio": 0.18, "top1": 88.2},
    {"artifact": "ours small", "method": "versatile", "file_bytes": 100, "file_ratio": 0.1, "top1": 86.0},
]


def test_pareto_front_and_verdicts() -> None:
    assert [r["artifact"] for r in pareto_front(ROWS)] == ["ours small", "w4", "ours", "int8", "dense"]
    text = "\n".join(verdicts(ROWS))
    assert "ours (0.180x, 88.20%) wins against the best peer of the same or smaller size, w4" in text
    assert "ours small (0.100x, 86.00%): no peer is this small" in text
    assert "Peer int8 (0.300x, 88.50%) has no vconvert row" in text  # where a peer wins, it is said
    losing = [*ROWS[:3], {**ROWS[3], "top1": 86.5}]
    assert "ours (0.180x, 86.50%) LOSES" in "\n".join(verdicts(losing))
    assert "Peer w4" in "\n".join(verdicts(losing))
