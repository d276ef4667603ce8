"""INT8 export: the integer algebra of versatile convs, the QDQ files in onnxruntime, and `export --quantize`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import assert_one_sentence_error, compress_resnet8, invoke, perturb_batchnorm
from onnx import TensorProto, helper
from torch import nn

from sample_models.resnet_cifar import resnet8
from vconvert import VersatileConv2d, compress
from vconvert.demo import sample_model_files
from vconvert.errors import CheckFailedError
from vconvert.evaluate import evaluate_file
from vconvert.export.compact import encode_layer
from vconvert.export.fold import prepare_for_export
from vconvert.export.int8_weights import zero_outputs
from vconvert.export.pipeline import export
from vconvert.export.qdq_graph import beyond_int32, bias_fitting_scale, check_int32_biases
from vconvert.export.quantize import (
    ZeroedOutputsWarning,
    decode_int8_layer,
    encode_int8_layer,
    int8_layer_subgraph,
    pack_integers,
    quantize_primaries,
    unpack_integers,
)
from vconvert.fit.initialise import from_conv
from vconvert.nn.versatile import materialise_weight

MODES = {
    "learned-s2": {"mode": "learned", "secondary": 2},
    "learned-s4": {"mode": "learned", "secondary": 4},
    "spatial": {"mode": "spatial"},
    "channel-s2": {"mode": "channel", "secondary": 2},
    "spatial+channel": {"mode": "spatial+channel", "secondary": 2},
    "shared-no-scale": {"mode": "learned", "secondary": 3, "mask_sharing": "shared", "scale": False},
}


# --------------------------------------------------------------------------- pure algebra
def test_quantize_primaries_uses_one_symmetric_scale_per_primary() -> None:
    primary = np.array([[[[0.5, -1.27]]], [[[0.0, 0.0]]], [[[2.54, 0.01]]]], dtype=np.float32)
    quantized, scale = quantize_primaries(primary)
    assert quantized.dtype == np.int8 and np.allclose(scale, [0.01, 1.0, 0.02])
    assert quantized.reshape(3, 2).tolist() == [[50, -127], [0, 0], [127, 0]]


def _layer(options: dict) -> tuple[VersatileConv2d, torch.Tensor]:
    """A 12→24 5x5 versatile layer with random masks and scales of both signs, and a BN factor with a zero."""
    torch.manual_seed(0)
    layer = from_conv(nn.Conv2d(12, 24, 5, padding=2), init="naive", **options).eval()
    with torch.no_grad():
        if layer.mask_proxy is not None:
            layer.mask_proxy.uniform_()
        if layer.scale is not None:
            layer.scale.mul_(torch.where(torch.rand(24) < 0.3, -1.0, 1.0))
    bn_scale = torch.rand(24) + 0.5
    bn_scale[5] = 0.0  # a zero factor: that secondary filter must become zero
    return layer, bn_scale


@pytest.mark.parametrize("options", MODES.values(), ids=MODES.keys())
def test_int8_encoding_decodes_to_sign_mask_times_int8_primary(options: dict) -> None:
    layer, bn_scale = _layer(options)
    encoded = encode_int8_layer(encode_layer(layer, bn_scale))

    # the reference, written from the definition: Wq_o = sign(a_o) · M_o ∘ Pq_p(o), s_o = |a_o| · t_p(o)
    with torch.no_grad():
        primary = layer.primary.double()
        t = primary.abs().flatten(1).amax(1) / 127
        pq = (primary / t.view(-1, 1, 1, 1)).round().clamp(-127, 127)
        alpha = (layer.scale.double() if layer.scale is not None else torch.ones(24, dtype=torch.float64)) * bn_scale
        mask = layer.output_mask()
        expected = materialise_weight(pq, layer.primary_index, mask, alpha.sign(), layer.channel_offset, 12)
    assert np.array_equal(decode_int8_layer(encoded), expected.to(torch.int8).numpy())
    scale = (alpha.abs() * t[layer.primary_index]).float().numpy()
    keep = alpha.numpy() != 0
    assert np.allclose(encoded.weight_scale[keep], scale[keep], rtol=1e-6) and (encoded.weight_scale > 0).all()
    assert not decode_int8_layer(encoded)[5].any()
    # what the compact file stores is smaller than the dense int8 weight
    assert encoded.nbytes() < 0.8 * expected.numel()


@pytest.mark.parametrize("options", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("has_zero", [False, True], ids=["appends-zero-primary", "reuses-zero-primary"])
def test_zeroed_outputs_decode_to_zero_and_leave_every_other_output(options: dict, has_zero: bool) -> None:
    layer, bn_scale = _layer(options)
    if not has_zero:
        bn_scale[5] = 0.7
    encoded = encode_int8_layer(encode_layer(layer, bn_scale))
    outputs = np.isin(np.arange(24), [2, 17])
    fitted = zero_outputs(encoded, outputs, np.full(24, 3.0, dtype=np.float32))
    before, after = decode_int8_layer(encoded), decode_int8_layer(fitted)
    assert not after[outputs].any() and np.array_equal(after[~outputs], before[~outputs])
    assert np.array_equal(fitted.weight_scale, np.where(outputs, 3.0, encoded.weight_scale).astype(np.float32))
    assert len(fitted.structure.primary) == len(encoded.structure.primary) + (not has_zero)


def test_a_bias_beyond_int32_is_found_and_a_fitting_scale_holds_it() -> None:
    bias, input_scale = np.array([0.5, -0.5, 0.0, 1e-3]), np.array(0.05, dtype=np.float32)
    weight_scale = np.array([1e-3, 1e-12, 1e-12, 1e-5], dtype=np.float32)
    assert beyond_int32(bias, input_scale, weight_scale).tolist() == [False, True, False, False]
    fitting = bias_fitting_scale(bias, input_scale)
    assert not beyond_int32(bias, input_scale, fitting).any()
    assert np.all(np.abs(bias / (input_scale * fitting.astype(np.float64)))[:2] > 2**29)


def test_a_clipped_int32_bias_fails_the_check() -> None:
    values = np.array([5, np.iinfo(np.int32).min], dtype=np.int32)
    node = helper.make_node("DequantizeLinear", ["b", "s"], ["y"])
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    graph.initializer.extend([onnx.numpy_helper.from_array(values, "b"),
                              onnx.numpy_helper.from_array(np.array(0.1, dtype=np.float32), "s")])  # fmt: skip
    with pytest.raises(CheckFailedError, match="clipped"):
        check_int32_biases(helper.make_model(graph))
    graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(values // 2, "b"))
    check_int32_biases(helper.make_model(graph))


@pytest.mark.parametrize("options", [MODES["learned-s2"], MODES["spatial+channel"]], ids=["learned", "spatial+channel"])
def test_int8_subgraph_computes_the_reference_decoder_in_onnxruntime(options: dict) -> None:
    layer, bn_scale = _layer(options)
    encoded = encode_int8_layer(encode_layer(layer, bn_scale))
    model = _rebuild_model(encoded)
    ops = {node.op_type for node in model.graph.node}
    assert {"BitShift", "BitwiseAnd", "Gather", "Neg"} <= ops and encoded.negated and "DequantizeLinear" not in ops
    assert _rebuilt_in_onnxruntime(model, encoded)
    # outputs zeroed for their int32 bias, with a zero primary appended behind the negated index range
    bn_scale[5] = 0.7
    encoded = encode_int8_layer(encode_layer(layer, bn_scale))
    fitted = zero_outputs(encoded, np.isin(np.arange(24), [0, 9]), np.ones(24, dtype=np.float32))
    assert fitted.negated and len(fitted.structure.primary) == len(encoded.structure.primary) + 1
    assert _rebuilt_in_onnxruntime(_rebuild_model(fitted), fitted)


def _rebuild_model(encoded) -> onnx.ModelProto:
    """A model whose one output is the int8 weight the compact subgraph rebuilds from ``encoded``."""
    nodes, inits = int8_layer_subgraph(encoded, "weight", "vq0")
    shape = list(decode_int8_layer(encoded).shape)
    graph = helper.make_graph(nodes, "rebuild", [], [helper.make_tensor_value_info("weight", TensorProto.INT8, shape)])
    graph.initializer.extend(inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def _rebuilt_in_onnxruntime(model: onnx.ModelProto, encoded) -> bool:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {})
    return got.dtype == np.int8 and np.array_equal(got, decode_int8_layer(encoded))


# --------------------------------------------------------------------------- int8 files in onnxruntime
def _converted_resnet8(options: dict) -> tuple[nn.Module, int]:
    """resnet8 with perturbed BatchNorm (so folded biases are not zero), converted with ``options``."""
    torch.manual_seed(0)
    base = perturb_batchnorm(resnet8().eval())
    model, plan = compress(base, torch.randn(1, 3, 32, 32), init="naive", **options)
    return model.eval(), len(plan.converted)


def _calibration(batches: int = 3, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 32, 32, generator=generator) for _ in range(batches)]


def _optimized_ops(path: Path, folder: Path) -> list[str]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]


@pytest.mark.parametrize("mode", ["learned-s2", "learned-s4", "spatial", "channel-s2"])
def test_compact_int8_runs_every_converted_conv_as_qlinearconv(mode: str, tmp_path: Path) -> None:
    model, converted = _converted_resnet8(MODES[mode])
    output = tmp_path / "int8.onnx"
    report = export(
        model, output, input_shape=[1, 3, 32, 32], compact=True, quantize="int8", calibration=_calibration(),
        measure=False, min_agreement=0.0,
    )  # fmt: skip
    info = report.quantization
    assert info["compact_equals_dense"] and info["converted_convs"] == converted
    assert info["converted_as_qlinear"] == converted and info["float_conv"] == 0

    # independently, from the file on disk: every conv (the converted ones and the stem) runs as QLinearConv
    (tmp_path / "ort").mkdir()
    ops = _optimized_ops(output, tmp_path / "ort")
    convs = sum(isinstance(m, nn.Conv2d | VersatileConv2d) for m in model.modules())
    assert ops.count("QLinearConv") == convs == info["qlinear_conv"] and "Conv" not in ops
    stored = onnx.load(str(output))
    rebuild = {"ScatterElements"} if mode == "channel-s2" else {"BitShift", "BitwiseAnd"}  # channel: no masks
    assert rebuild | {"Gather", "QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in stored.graph.node}
    props = {p.key: p.value for p in stored.metadata_props}
    assert props["vconvert.format"] == "compact" and json.loads(props["vconvert.quantization"])["type"] == "int8"
    assert all(key.startswith("vconvert.") for key in props) and not stored.graph.metadata_props
    rows = {row["model"]: row for row in report.table}
    assert rows["exported"]["file_bytes"] < rows["int8 dense"]["file_bytes"] < rows["dense fold"]["file_bytes"] / 2.5
    assert rows["exported"]["bits_per_weight"] < 7 < rows["int8 dense"]["bits_per_weight"] < 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8.onnx", "ort"]


def _int8_files(model: torch.nn.Module, folder: Path, variants: list[dict], **common) -> list[Path]:
    """One int8 export of ``model`` per variant (export keyword arguments), same calibration, no checks."""
    calibration = _calibration()
    files = []
    for index, variant in enumerate(variants):
        files.append(folder / f"int8_{index}.onnx")
        export(
            model, files[-1], input_shape=[1, 3, 32, 32], quantize="int8", calibration=calibration, measure=False,
            min_agreement=0.0, **{**common, **variant},
        )  # fmt: skip
    return files


def _dense_tensors(path: Path) -> dict[str, np.ndarray]:
    """The initializers of a dense int8 file (long names), with the bias scales the graph computes."""
    graph = onnx.load(str(path)).graph
    dense = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    # the bias scales are computed in the graph (trim_qdq): a Mul of the input and weight scales, in float32
    for node in graph.node:
        if node.op_type == "Mul" and node.output[0].endswith("bias_quantized_scale.m"):
            dense[node.output[0].removesuffix(".m")] = (dense[node.input[0]] * dense[node.input[1]]).astype(np.float32)
    return dense


def _bias_within_half_a_step(dense: dict[str, np.ndarray], folded: nn.Module, name: str) -> bool:
    step = dense[f"{name}.bias_quantized_scale"].astype(np.float64)
    bias = folded.get_submodule(name).bias.detach().double().numpy()
    return bool(np.all(np.abs(dense[f"{name}.bias_quantized"] * step - bias) <= 0.5001 * step))


def test_dense_int8_file_holds_the_versatile_int8_weights_and_equals_compact(tmp_path: Path) -> None:
    model, _ = _converted_resnet8(MODES["learned-s2"])
    files = _int8_files(model, tmp_path, [{"compact": False}, {"compact": True}], short_names=False)
    files = {False: files[0], True: files[1]}
    dense = _dense_tensors(files[False])
    assert not any(name.endswith(("weight_zero_point", "bias_quantized_zero_point")) for name in dense), "zeros"
    folded, fold = prepare_for_export(model, torch.randn(2, 3, 32, 32))
    for name, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, VersatileConv2d)):
        encoded = encode_int8_layer(encode_layer(layer, fold.bn_scales[name]), 7)  # the default target: 7 bits
        assert np.array_equal(dense[f"{name}.weight_quantized"], decode_int8_layer(encoded)), name
        assert np.array_equal(dense[f"{name}.weight_scale"], encoded.weight_scale), name
        # the int32 bias is requantized for these scales: step = input scale · s_o, within half a step
        step = dense[f"{name}.bias_quantized_scale"]
        assert np.allclose(step / encoded.weight_scale, (step / encoded.weight_scale)[0], rtol=1e-6), name
        assert _bias_within_half_a_step(dense, folded, name), name
    sessions = [ort.InferenceSession(str(files[c]), providers=["CPUExecutionProvider"]) for c in (False, True)]
    for batch in (1, 7):
        x = torch.randn(batch, 3, 32, 32).numpy()
        first, second = (s.run(None, {"input": x})[0] for s in sessions)
        assert np.array_equal(first, second)


@pytest.mark.parametrize("compact", [False, True], ids=["dense-int8", "compact-int8"])
def test_an_output_whose_int32_bias_cannot_fit_is_written_as_zero_and_keeps_its_bias(
    compact: bool, tmp_path: Path
) -> None:
    from vconvert.nn.versatile import versatile_layers

    model, _ = _converted_resnet8(MODES["learned-s2"])
    layers = dict(versatile_layers(model))
    for layer in layers.values():
        layer.set_weight_bits(4, "lsq")
    name = next(iter(layers))
    with torch.no_grad():  # training shrank this output to ~1e-10 while its folded bias stayed
        layers[name].scale[3] = 1e-9
    output = tmp_path / "m.onnx"
    with pytest.warns(ZeroedOutputsWarning, match=f"1 output channel.s. of {name} "):
        report = export(model, output, input_shape=[1, 3, 32, 32], quantize="int8", compact=compact,
                        short_names=False, calibration=_calibration(), measure=False, min_agreement=0.0)  # fmt: skip
    zeroed = report.quantization["zeroed_for_int32_bias"]
    assert list(zeroed) == [name] and zeroed[name]["outputs"] == [3] and 0 < zeroed[name]["largest_weight"] < 1e-8
    assert report.metadata["vconvert.quantization"]["zeroed_for_int32_bias"] == {name: [3]}
    assert report.quantization["compact_equals_dense"] is (True if compact else None)
    if not compact:
        dense = _dense_tensors(output)
        folded, _ = prepare_for_export(model, torch.randn(2, 3, 32, 32))
        assert not dense[f"{name}.weight_quantized"][3].any() and dense[f"{name}.weight_quantized"][2].any()
        assert _bias_within_half_a_step(dense, folded, name)  # clipped to int32, it would be off by ~all of it


def test_agreement_below_90_percent_fails_and_writes_nothing(tmp_path: Path) -> None:
    model, _ = _converted_resnet8(MODES["learned-s2"])
    calibration = _calibration(batches=4)
    good = export(
        model, tmp_path / "good.onnx", input_shape=[1, 3, 32, 32], quantize="int8", calibration=calibration,
        measure=False, min_agreement=0.0,
    )  # fmt: skip
    assert good.quantization["top1_agreement"] >= 0.8
    # one outlier image in the calibration set stretches every activation range ~1000x: the int8 model
    # then sees the ordinary images as almost constant and its top-1 collapses
    calibration[0][0] *= 1000.0
    output = tmp_path / "broken.onnx"
    with pytest.raises(CheckFailedError, match=r"top-1 class on only .* of 64 calibration images") as caught:
        export(model, output, input_shape=[1, 3, 32, 32], quantize="int8", calibration=calibration, measure=False)
    assert "\n" not in str(caught.value) and "nothing was written" in str(caught.value)
    assert not output.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["good.onnx"]


def test_int8_export_leaves_the_root_logger_as_it_found_it(tmp_path: Path) -> None:
    """onnxruntime.quantization logs through the root logger, which installs a stderr handler on a root that has
    none: every later vconvert log line would then print twice (seen in `vconvert demo`)."""
    model, _ = _converted_resnet8(MODES["learned-s2"])
    saved = logging.root.handlers[:]  # pytest's own capture handlers; the root of a plain process has none
    logging.root.handlers.clear()
    try:
        export(model, tmp_path / "int8.onnx", input_shape=[1, 3, 32, 32], quantize="int8",
               calibration=_calibration(batches=1), measure=False, min_agreement=0.0)  # fmt: skip
        assert logging.root.handlers == []
    finally:
        logging.root.handlers[:] = saved


# --------------------------------------------------------------------------- the CLI on the shipped sample
@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped ResNet-20 (digits), compressed with the default fit; it records its preprocessing."""
    folder = tmp_path_factory.mktemp("digits")
    weights, record = sample_model_files()
    output = folder / "resnet20.vc.pt"
    spec = record["data"]
    result = invoke(
        "compress", weights, "--arch", record["arch"], "--arch-kwargs", json.dumps(record["arch_kwargs"]),
        "--input-shape", "1,1,32,32", "--mean", str(spec["mean"][0]), "--std", str(spec["std"][0]), "-o", output,
    )  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    return output


def test_cli_int8_compact_export_then_evaluate(digits_checkpoint: Path, tmp_path: Path) -> None:
    output = tmp_path / "resnet20.int8.onnx"
    result = invoke(
        "export", digits_checkpoint, "-o", output, "--quantize", "int8", "--compact", "--calib-data", "digits",
        "--calib-images", "96", "--json", "--no-compare",
    )  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.stdout)
    info = report["quantization"]
    assert info["converted_as_qlinear"] == info["converted_convs"] == 20 and info["qlinear_conv"] == 21
    assert info["top1_agreement"] >= 0.9 and info["agreement_images"] == 96 and "digits" in info["calibration"]
    assert report["metadata"]["vconvert.quantization"]["type"] == "int8"
    assert [p.name for p in tmp_path.iterdir()] == [output.name]

    int8 = evaluate_file(output, "digits")
    fp32 = evaluate_file(digits_checkpoint, "digits")
    assert int8.kind == "onnx" and int8.images == 360 and abs(int8.top1 - fp32.top1) <= 2.0, (int8, fp32)
    shown = invoke("evaluate", output, "--data", "digits", "--limit", "40")
    assert shown.exit_code == 0 and "top-1" in shown.output, shown.output + shown.stderr


def test_cli_int8_table_reports_bits_size_and_latency(digits_checkpoint: Path, tmp_path: Path) -> None:
    output = tmp_path / "resnet20.int8.onnx"
    result = invoke("export", digits_checkpoint, "-o", output, "--quantize", "int8", "--calib-images", "32",
                    "--calib-data", "digits", "--no-compare")  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    text = " ".join(result.output.split())
    for fragment in ("bits per weight", "int8 (dense)", "smaller than the fp32 dense file", "latency", "QLinearConv"):
        assert fragment in text, text


# --------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet8 converted from the CLI: it records ImageNet preprocessing and no image data."""
    return compress_resnet8(tmp_path_factory.mktemp("ckpt"))


@pytest.mark.parametrize(
    "case",
    ["unknown-value", "with-ring", "no-calibration-data", "missing-folder", "empty-folder", "unreadable-folder",
     "weight-bits-1", "weight-bits-16", "weight-bits-without-int8"],
)  # fmt: skip
def test_bad_quantize_requests_exit_2_and_write_nothing(case: str, checkpoint: Path, tmp_path: Path) -> None:
    data = tmp_path / "images"
    data.mkdir()
    if case == "unreadable-folder":
        (data / "cat").mkdir()
        (data / "cat" / "0.png").write_text("not an image")
    output = tmp_path / "out.onnx"
    args, fragments = {
        "unknown-value": (["--quantize", "int4"], ["--quantize must be one of none, int8", "'int4'"]),
        "with-ring": (["--quantize", "int8", "--ring"], ["--ring cannot be combined with --quantize"]),
        "no-calibration-data": (["--quantize", "int8"], ["needs calibration images", "--calib-data"]),
        "missing-folder": (["--quantize", "int8", "--calib-data", tmp_path / "nope"], ["does not exist"]),
        "empty-folder": (["--quantize", "int8", "--calib-data", data], ["holds no image files"]),
        "unreadable-folder": (["--quantize", "int8", "--calib-data", data], ["None of the 1 image files"]),
        "weight-bits-1": (["--quantize", "int8", "--weight-bits", "1", "--calib-data", "digits"], ["2 to 8; got 1"]),
        "weight-bits-16": (["--quantize", "int8", "--weight-bits", "16", "--calib-data", "digits"], ["got 16"]),
        "weight-bits-without-int8": (["--weight-bits", "4"], ["--weight-bits", "add --quantize int8"]),
    }[case]
    output.write_bytes(b"an earlier export")
    result = invoke("export", checkpoint, "-o", output, *args)
    assert_one_sentence_error(result, 2, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "out.onnx"]
    assert output.read_bytes() == b"an earlier export"


def test_library_messages_name_no_cli_flag(checkpoint: Path, tmp_path: Path) -> None:
    from vconvert.errors import BadInputError, MissingCalibrationError
    from vconvert.export.checkpoint import export_checkpoint

    with pytest.raises(MissingCalibrationError) as missing:
        export_checkpoint(checkpoint, tmp_path / "m.onnx", quantize="int8")
    with pytest.raises(BadInputError) as unknown:
        export_checkpoint(checkpoint, tmp_path / "m.onnx", quantize="int4")
    with pytest.raises(BadInputError, match="`weight_bits`") as bits:
        export_checkpoint(checkpoint, tmp_path / "m.onnx", weight_bits=4)
    for error in (missing.value, unknown.value, bits.value):
        assert "--" not in str(error), error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("side", "batch"), [(32, 32), (64, 24), (112, 8), (160, 3), (224, 2), (512, 1)])
def test_calibration_batches_shrink_for_large_images(side: int, batch: int) -> None:
    from vconvert.export.quantize import calibration_batch_size

    assert calibration_batch_size([1, 3, side, side]) == batch


def test_digits_calibration_images_follow_the_recorded_preprocessing() -> None:
    from vconvert.export.quantize import calibration_images

    batches, note = calibration_images(
        "digits", [1, 1, 32, 32], {"mean": [0.5], "std": [0.25]}, limit=40, batch_size=16
    )
    assert [len(b) for b in batches] == [16, 16, 8] and note == "40 digits training images"
    images = torch.cat(batches)
    assert images.shape == (40, 1, 32, 32) and images.min() >= -2.0 - 1e-6 and images.max() <= 2.0 + 1e-6


@pytest.mark.parametrize("compact", [False, True], ids=["dense-int8", "compact-int8"])
def test_short_names_change_bytes_not_outputs(compact: bool, tmp_path: Path) -> None:
    """The shipped int8 file names its values with short ids: smaller, and exactly the same computation."""
    model, _ = _converted_resnet8(MODES["learned-s2"])
    files = _int8_files(model, tmp_path, [{"short_names": False}, {"short_names": True}], compact=compact)
    files = {False: files[0], True: files[1]}
    graph = onnx.load(str(files[True])).graph
    names = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    assert max(len(name) for name in names - {"input", "output"}) <= 3
    assert all(not node.name for node in graph.node)
    assert files[True].stat().st_size < 0.92 * files[False].stat().st_size
    sessions = [ort.InferenceSession(str(files[s]), providers=["CPUExecutionProvider"]) for s in (False, True)]
    x = torch.randn(5, 3, 32, 32).numpy()
    first, second = (session.run(None, {"input": x})[0] for session in sessions)
    assert np.array_equal(first, second)


# --------------------------------------------------------------------------- 4-bit primaries
def test_nibbles_round_trip_every_value_and_an_odd_count() -> None:
    values = np.array([-8, 7, 0, -1, 3, -7, 5], dtype=np.int8)
    packed = pack_integers(values, 4)
    # value + 8, the first of each pair in the low nibble (the 4-bit case of the true-width packing)
    assert packed.dtype == np.uint8 and packed.tolist() == [0xF0, 0x78, 0x1B, 0x0D]
    assert np.array_equal(unpack_integers(packed, 4, 7), values)
    every = np.arange(-8, 8, dtype=np.int8).repeat(3)
    assert np.array_equal(unpack_integers(pack_integers(every, 4), 4, every.size), every)


def _four_bit(options: dict):
    layer, bn_scale = _layer(options)
    layer.set_weight_bits(4, "lsq")
    with torch.no_grad():
        layer.primary_step.mul_(0.7)  # a learned step that clips: the integers are the layer's, not min-max
    own = tuple(tensor.numpy() for tensor in layer.primary_integers())
    return layer, encode_int8_layer(encode_layer(layer, bn_scale), 4, own), bn_scale


@pytest.mark.parametrize("name", ["learned-s2", "spatial+channel", "shared-no-scale"])
def test_4_bit_subgraph_widens_nibbles_to_int8_in_onnxruntime(name: str) -> None:
    layer, encoded, bn_scale = _four_bit(MODES[name])
    primary = encoded.structure.primary
    assert encoded.packed and int(np.abs(primary).max()) == 7
    nodes, inits = int8_layer_subgraph(encoded, "weight", "vq0")
    stored = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in inits}
    assert "vq0.primary" not in stored and stored["vq0.p4.bytes"].size == 4 * -(-primary.size // 8)  # whole groups
    eight_bit = encode_int8_layer(encode_layer(layer, bn_scale))
    assert encoded.nbytes() == eight_bit.nbytes() - primary.size + (primary.size + 1) // 2
    shape = list(decode_int8_layer(encoded).shape)
    graph = helper.make_graph(nodes, "rebuild", [], [helper.make_tensor_value_info("weight", TensorProto.INT8, shape)])
    graph.initializer.extend(inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    (got,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})
    assert got.dtype == np.int8 and np.array_equal(got, decode_int8_layer(encoded))


def test_4_bit_integers_dequantize_to_the_fake_quantised_weight() -> None:
    from vconvert.export.quantize import check_fake_quantised

    layer, encoded, bn_scale = _four_bit(MODES["learned-s2"])
    folded = (layer.dense_weight().detach() * bn_scale.view(-1, 1, 1, 1)).numpy()
    check_fake_quantised("layer", encoded, folded)
    folded[3, 0, 0, 0] += 1e-2 * float(np.abs(folded).max())
    with pytest.raises(CheckFailedError, match="differ from its fake-quantised weights"):
        check_fake_quantised("layer", encoded, folded)


@pytest.fixture(scope="module")
def digits_4_bit(digits_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped ResNet-20 (digits) fine-tuned one short epoch with 4-bit primaries."""
    from conftest import QUICK

    from vconvert.train.config import FinetuneConfig
    from vconvert.train.finetune import finetune

    output = tmp_path_factory.mktemp("w4") / "resnet20.w4.vc.pt"
    finetune(digits_checkpoint, output, FinetuneConfig(weight_bits=4, **{**QUICK, "epochs": 1}))
    return output


def _digits_images(checkpoint: Path, count: int) -> list[torch.Tensor]:
    from vconvert.export.quantize import calibration_images
    from vconvert.io.checkpoint import load_checkpoint

    metadata = load_checkpoint(checkpoint).metadata
    return calibration_images("digits", metadata.input_shape, metadata.preprocessing, limit=count)[0]


def _top1(model: nn.Module, images: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.eval()(batch).argmax(1) for batch in images])


def test_a_4_bit_checkpoint_exports_its_own_4_bit_integers_by_default(digits_4_bit: Path, tmp_path: Path) -> None:
    from vconvert.io.checkpoint import load_checkpoint

    output = tmp_path / "w4.onnx"
    result = invoke("export", digits_4_bit, "-o", output, "--quantize", "int8", "--compact", "--calib-data", "digits",
                    "--calib-images", "128", "--json", "--no-compare")  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    assert "warning" not in result.stderr
    report = json.loads(result.stdout)
    info = report["quantization"]
    assert info["weight_bits"] == 4 and info["weights_equal_fake_quantised"] and info["compact_equals_dense"]
    assert info["converted_as_qlinear"] == info["converted_convs"] == 20 and info["float_conv"] == 0
    recorded = report["metadata"]["vconvert.quantization"]
    assert recorded["weight_bits"] == 4 and recorded["primary_storage"] == "4-bit, packed (value + 8, little-endian)"

    # the file against the fake-quantised PyTorch model, on the same calibration images, measured here
    images = _digits_images(digits_4_bit, 128)
    expected = _top1(load_checkpoint(digits_4_bit).model, images)
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    got = torch.cat([torch.from_numpy(session.run(None, {"input": batch.numpy()})[0]).argmax(1) for batch in images])
    agreement = float((got == expected).float().mean())
    assert agreement == pytest.approx(info["top1_agreement"])
    assert agreement == 1.0, "top-1 identical on every calibration image, uint8 activations included"

    eight = tmp_path / "w8.onnx"
    result = invoke("export", digits_4_bit, "-o", eight, "--quantize", "int8", "--compact", "--calib-data", "digits",
                    "--calib-images", "128", "--weight-bits", "8", "--no-compare")  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    assert "has 4-bit primaries, so they are quantized min-max to 8 bits" in " ".join(result.stderr.split())
    assert output.stat().st_size < 0.8 * eight.stat().st_size


def test_4_bits_on_a_float_checkpoint_warns_with_the_top1_change_it_causes(digits_checkpoint: Path,
                                                                            tmp_path: Path) -> None:  # fmt: skip
    from vconvert.io.checkpoint import load_checkpoint
    from vconvert.nn.versatile import set_weight_bits_

    output = tmp_path / "w4.onnx"
    result = invoke("export", digits_checkpoint, "-o", output, "--quantize", "int8", "--compact", "--calib-data",
                    "digits", "--calib-images", "128", "--weight-bits", "4", "--json", "--no-compare")  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    warning = " ".join(result.stderr.split())
    assert "warning: resnet20.vc.pt has float primaries, so they are quantized min-max to 4 bits" in warning
    assert "fine-tune it with --weight-bits 4" in warning
    # the share it states, computed here from the definition: 4-bit min-max primaries against float ones
    model = load_checkpoint(digits_checkpoint).model
    images = _digits_images(digits_checkpoint, 128)
    before = _top1(model, images)
    set_weight_bits_(model, 4, "minmax")
    changed = float((_top1(model, images) != before).float().mean())
    assert f"changes the top-1 class of {100 * changed:.1f}% of the 128 calibration images" in warning
    info = json.loads(result.stdout)["quantization"]
    assert info["weight_bits"] == 4 and info["weights_equal_fake_quantised"] is None


def test_layers_at_different_widths_keep_their_own_integers(tmp_path: Path) -> None:
    from vconvert.nn.versatile import versatile_layers

    model, _ = _converted_resnet8(MODES["learned-s2"])
    layers = list(versatile_layers(model))
    widths = {name: 3 + index % 3 for index, (name, _) in enumerate(layers)}  # 3, 4, 5, 3, ...
    for name, layer in layers:
        layer.set_weight_bits(widths[name], "lsq")
    report = export(model, tmp_path / "m.onnx", input_shape=[1, 3, 32, 32], quantize="int8", compact=True,
                    calibration=_calibration(), measure=False, min_agreement=0.0)  # fmt: skip
    info = report.quantization
    assert info["layer_weight_bits"] == widths and info["weight_bits"] == "per layer"
    assert info["weights_equal_fake_quantised"] and info["compact_equals_dense"]
    recorded = report.metadata["vconvert.quantization"]
    assert recorded["layer_weight_bits"] == widths
    assert recorded["primary_storage"].split("; ")[0] == "3-bit, packed (value + 4, little-endian)"


def test_layers_with_different_quantizers_are_refused_before_any_work(tmp_path: Path) -> None:
    from vconvert.errors import BadInputError
    from vconvert.nn.versatile import versatile_layers

    model, _ = _converted_resnet8(MODES["learned-s2"])
    layers = [layer for _, layer in versatile_layers(model)]
    layers[0].set_weight_bits(4, "lsq")
    layers[1].set_weight_bits(8, "minmax")
    with pytest.raises(BadInputError, match="different quantizers"):
        export(model, tmp_path / "m.onnx", input_shape=[1, 3, 32, 32], quantize="int8", calibration=_calibration(),
               measure=False)  # fmt: skip
    assert list(tmp_path.iterdir()) == []
