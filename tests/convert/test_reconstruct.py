"""Output reconstruction (vconvert.convert.reconstruct): the pass on the shipped digits model and on resnet8."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from sample_models.resnet_cifar import resnet20
from vconvert.convert.calibrate import recalibrate_batchnorm
from vconvert.convert.compress import compress
from vconvert.convert.reconstruct import ReconstructSettings, output_errors, reconstruct
from vconvert.data.datasets import digits_tensors
from vconvert.nn.quantize import largest_level

WEIGHTS = Path(__file__).resolve().parents[2] / "sample_models" / "weights" / "resnet20_digits.pt"
MEAN, STD = 0.3049, 0.3234
LAYERS = ("layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2")  # the first blocks: quick


@pytest.fixture(scope="module")
def digits_model():
    torch.manual_seed(0)
    teacher = resnet20(num_classes=10, in_channels=1)
    teacher.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    images, _ = digits_tensors("train")
    held_out, _ = digits_tensors("test")
    images, held_out = (images - MEAN) / STD, (held_out - MEAN) / STD
    student, _ = compress(teacher.eval(), images[:1])
    return teacher.eval(), student, list(images[:128].split(64)), list(held_out[:128].split(64))


@pytest.mark.parametrize("bits", [None, 4], ids=["float", "4-bit"])
def test_reconstruction_lowers_the_output_error_on_held_out_images(digits_model, bits: int | None) -> None:
    teacher, student, calibration, held_out = digits_model
    data_free, rebuilt = copy.deepcopy(student), copy.deepcopy(student)
    if bits is not None:  # the data-free peer: its primaries rounded to the nearest integer at the same width
        for _, layer in data_free.named_modules():
            if hasattr(layer, "set_weight_bits"):
                layer.set_weight_bits(bits, "minmax")
    settings = ReconstructSettings(rounds=2, mask_sweeps=1, positions=64, weight_bits=bits)
    report = reconstruct(rebuilt, teacher, calibration, settings, layers=LAYERS)
    assert [layer.name for layer in report.layers] == list(LAYERS)
    assert all(layer.skipped is None for layer in report.layers)
    assert all(layer.error_after <= layer.error_before + 1e-9 or bits is not None for layer in report.layers)
    for model in (data_free, rebuilt):
        recalibrate_batchnorm(model, calibration, 128)
    before, after = output_errors(data_free, teacher, held_out), output_errors(rebuilt, teacher, held_out)
    assert sum(after[name] for name in LAYERS) < 0.8 * sum(before[name] for name in LAYERS), (before, after)
    if bits is not None:
        for name in LAYERS:
            layer = rebuilt.get_submodule(name)
            codes, _ = layer.primary_integers()
            assert layer.weight_bits == bits and codes.abs().max() <= largest_level(bits)
            assert torch.allclose(layer.quantized_primary(), layer.primary, atol=1e-6)


def test_settings_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        ReconstructSettings(rounds=0)
    with pytest.raises(ValueError):
        ReconstructSettings(weight_bits=9)


def test_channel_window_layers_are_skipped_with_a_reason_and_still_quantized() -> None:
    from sample_models.resnet_cifar import resnet8

    torch.manual_seed(0)
    teacher = resnet8().eval()
    images = torch.randn(4, 3, 32, 32)
    student, _ = compress(teacher, images[:1], mode="channel", secondary=2, init="naive")
    report = reconstruct(student, teacher, [images], ReconstructSettings(rounds=1, weight_bits=4))
    assert report.layers and all(layer.skipped and "channel windows" in layer.skipped for layer in report.layers)
    assert all(layer.weight_bits == 4 for layer in student.modules() if hasattr(layer, "weight_bits"))


@pytest.mark.parametrize("bits", [None, 4], ids=["float", "4-bit"])
def test_large_layers_take_the_iterative_path(monkeypatch: pytest.MonkeyPatch, bits: int | None) -> None:
    import vconvert.fit.output_fit as module
    from sample_models.resnet_cifar import resnet8

    monkeypatch.setattr(module, "EXACT_LIMIT", 100)  # every 3x3 conv of resnet8 but the first is "large" now
    torch.manual_seed(0)
    teacher = resnet8().eval()
    images = torch.randn(8, 3, 32, 32)
    student, _ = compress(teacher, images[:1], init="naive")
    report = reconstruct(student, teacher, [images], ReconstructSettings(rounds=1, weight_bits=bits))
    assert all(layer.skipped is None for layer in report.layers)
    if bits is None:
        assert all(layer.error_after <= layer.error_before + 1e-9 for layer in report.layers)
    else:
        assert all(layer.weight_bits == bits for layer in student.modules() if hasattr(layer, "weight_bits"))
    assert sum(layer.error_after for layer in report.layers) < sum(layer.error_before for layer in report.layers)
