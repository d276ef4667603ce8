"""`--int8-target`: 7-bit weights that no CPU saturates by default, 8-bit for VNNI; the agreement check under the
saturating arithmetic; `--min-agreement` and the refusal sentence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import assert_one_sentence_error, compress_resnet8, invoke
from onnx import numpy_helper

from sample_models.resnet_cifar import resnet8
from vconvert import VersatileConv2d, compress
from vconvert.errors import BadInputError
from vconvert.export.compact import encode_layer
from vconvert.export.fold import prepare_for_export
from vconvert.export.int8_checks import exact_int8_kernels
from vconvert.export.pipeline import export
from vconvert.export.quantize import default_int8_target, encode_int8_layer, primary_width
from vconvert.export.saturation import SAFE_WEIGHT, saturation_report


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model, _ = compress(resnet8().eval(), torch.randn(1, 3, 32, 32), init="naive", mode="learned", secondary=2)
    return model.eval()


def _export(model: torch.nn.Module, path: Path, target: str | None = None, **options):
    calibration = [torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    arguments = {"input_shape": [1, 3, 32, 32], "quantize": "int8", "calibration": calibration, "measure": False,
                 "min_agreement": 0.0, "short_names": False, **options}  # fmt: skip
    if target is None:
        return export(model, path, **arguments)
    with default_int8_target(target):
        return export(model, path, **arguments)


def _weights(path: Path) -> dict[str, np.ndarray]:
    graph = onnx.load(str(path)).graph
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}


def test_the_default_target_writes_7_bit_weights_that_never_saturate(tmp_path: Path) -> None:
    model = _model()
    report = _export(model, tmp_path / "any.onnx")
    info = report.quantization
    assert info["int8_target"] == "any" and info["weight_bits"] == 7 and info["requested_weight_bits"] == 8
    assert info["agreement"]["saturating_pairs"] == 0 and info["agreement"]["max_abs_weight"] <= SAFE_WEIGHT
    weights = _weights(tmp_path / "any.onnx")
    assert weights and max(int(np.abs(w.astype(np.int32)).max()) for w in weights.values()) <= SAFE_WEIGHT
    # the versatile convs hold their 7-bit primaries: |q| ≤ 63, sign · mask · primary as before
    _, fold = prepare_for_export(model, torch.randn(2, 3, 32, 32))
    for name, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, VersatileConv2d)):
        encoded = encode_int8_layer(encode_layer(layer, fold.bn_scales[name]), 7)
        assert np.abs(encoded.structure.primary.astype(np.int32)).max() == 63
        assert np.abs(weights[f"{name}.weight_quantized"].astype(np.int32)).max() <= 63, name
    metadata = {p.key: p.value for p in onnx.load(str(tmp_path / "any.onnx")).metadata_props}
    recorded = json.loads(metadata["vconvert.quantization"])
    assert recorded["int8_target"] == "any" and "every CPU" in recorded["runs_exactly_on"]


def test_target_vnni_keeps_8_bit_weights_and_reports_the_saturating_reference(tmp_path: Path) -> None:
    report = _export(_model(), tmp_path / "vnni.onnx", "vnni")
    info = report.quantization
    assert info["int8_target"] == "vnni" and info["weight_bits"] == 8
    check = info["agreement"]
    assert check["max_abs_weight"] == 127 and check["saturating_pairs"] > 0
    assert check["saturating_pairs"] == saturation_report(onnx.load(str(tmp_path / "vnni.onnx")))["saturating_pairs"]
    assert 0.0 <= check["saturating"] <= 1.0 and 0.0 <= check["exact"] <= 1.0 and check["images"] == 32
    if exact_int8_kernels():  # this CPU adds int8 products exactly: its run is the exact arithmetic
        assert check["exact"] == check["runtime"] and check["checked"] == "onnxruntime on this CPU"


def test_4_bit_primaries_stay_4_bit_for_every_target() -> None:
    assert primary_width(4, "any") == primary_width(4, "vnni") == 4
    assert primary_width(8, "any") == 7 and primary_width(8, "vnni") == 8


def test_library_refuses_an_unknown_target_and_threshold() -> None:
    with pytest.raises(BadInputError, match="`int8_target` must be any"), default_int8_target("avx2"):
        pass
    from vconvert.export.quantize import check_min_agreement

    with pytest.raises(BadInputError, match="`min_agreement` must be a fraction"):
        check_min_agreement(90)


# --------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compress_resnet8(tmp_path_factory.mktemp("ckpt"))


@pytest.mark.parametrize("target", ["any", "vnni"])
def test_a_refused_agreement_exits_1_and_says_what_to_try(target: str, checkpoint: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The threshold is --min-agreement; the random resnet8 agrees everywhere, so onnxruntime's agreement is set."""
    import vconvert.export.int8_checks as checks

    measured = checks.top1_agreement
    monkeypatch.setattr(checks, "top1_agreement", lambda a, b, batches: (0.75, measured(a, b, batches)[1]))
    output = tmp_path / "out.onnx"
    common = ["export", checkpoint, "-o", output, "--quantize", "int8", "--calib-data", "digits", "--calib-images",
              "32", "--int8-target", target, "--no-compare"]  # fmt: skip
    result = invoke(*common, "--min-agreement", "0.8")
    fragments = ["only 75.0% of 32 calibration images", "at least 80% required", "nothing was written",
                 "--calib-images", "--weight-bits 4", "--min-agreement"]  # fmt: skip
    assert_one_sentence_error(result, 1, *fragments, *(["--int8-target any"] if target == "vnni" else []))
    assert not output.exists()
    result = invoke(*common, "--min-agreement", "0.7")
    assert result.exit_code == 0, result.output + result.stderr
    assert output.exists()


def test_min_agreement_zero_lets_the_same_export_through(checkpoint: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.onnx"
    result = invoke("export", checkpoint, "-o", output, "--quantize", "int8", "--calib-data", "digits",
                    "--calib-images", "32", "--min-agreement", "0", "--no-compare")  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    text = " ".join(result.output.split())
    assert "written for any CPU (--int8-target any): 7-bit weights" in text and "no u8 x s8 pair" in text
    assert output.exists()


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--quantize", "int8", "--int8-target", "avx2"], ["--int8-target must be any", "'avx2'"]),
        (["--quantize", "int8", "--min-agreement", "1.5"], ["--min-agreement must be a fraction", "1.5"]),
        (["--quantize", "int8", "--min-agreement", "-0.1"], ["--min-agreement must be a fraction"]),
        (["--int8-target", "vnni"], ["apply to int8 files", "add --quantize int8"]),
        (["--min-agreement", "0.5"], ["apply to int8 files"]),
    ],
)
def test_bad_target_and_threshold_exit_2_in_one_sentence(args: list, fragments: list, checkpoint: Path,
                                                         tmp_path: Path) -> None:  # fmt: skip
    output = tmp_path / "out.onnx"
    result = invoke("export", checkpoint, "-o", output, "--calib-data", "digits", *args)
    if "--quantize" not in args:  # --calib-data alone is refused first; drop it for these
        result = invoke("export", checkpoint, "-o", output, *args)
    assert_one_sentence_error(result, 2, *fragments)
    assert not output.exists()


def test_layers_fine_tuned_at_8_bits_warn_when_written_at_7_and_keep_their_integers_for_vnni(tmp_path: Path) -> None:
    from vconvert.export.pipeline import RequantizationWarning

    model = _model()
    for layer in model.modules():
        if isinstance(layer, VersatileConv2d):
            layer.set_weight_bits(8, "minmax")
    with pytest.warns(RequantizationWarning, match=r"fine-tuned at 8 bits and are written at 7 for `int8_target` any"):
        narrowed = _export(model, tmp_path / "any.onnx")
    assert narrowed.quantization["weight_bits"] == 7 and not narrowed.quantization["weights_equal_fake_quantised"]
    kept = _export(model, tmp_path / "vnni.onnx", "vnni")
    assert kept.quantization["weight_bits"] == 8 and kept.quantization["weights_equal_fake_quantised"]
