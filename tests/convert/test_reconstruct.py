"""Output reconstruction (vconvert.convert.reconstruct): the pass on the shipped digits model and on resnet8."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vconvert.convert.calibrate import output_divergence, recalibrate_batchnorm, recalibrate_if_closer
from vconvert.convert.compress import compress
from vconvert.convert.reconstruct import ReconstructSettings, output_errors, reconstruct
from vconvert.nn.quantize import largest_level
from vconvert.nn.versatile import versatile_layers

LAYERS = ("layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2")  # the first blocks: quick


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


# --------------------------------------------------------------------------- the single pass against the old one
def _torchvision(name: str):
    from torchvision import models

    return lambda: getattr(models, name)(num_classes=10)


def _resnet8():
    from sample_models.resnet_cifar import resnet8

    return resnet8()


# (model, the layers to reconstruct: all, or those under these prefixes, whose fits are quick; the whole graph
# is walked either way)
SINGLE_PASS_MODELS = {
    "resnet8-cifar": (_resnet8, None),
    "torchvision-resnet18-downsample-branch": (
        _torchvision("resnet18"),
        ("layer1.0.conv1", "layer1.1.conv2", "layer2.0.downsample"),
    ),
    "torchvision-mobilenet_v3_small": (
        _torchvision("mobilenet_v3_small"),
        ("features.1.", "features.2.", "features.4."),
    ),
    "resnet8-cifar-subset": (_resnet8, ("layer1.0.conv2", "layer2.0.conv1", "layer3.0.conv2")),
}


def _reconstructed_both_ways(monkeypatch: pytest.MonkeyPatch, build, prefixes, bits: int | None = 4):
    """(single pass, old prefix path) reconstructions of one compressed model: models and reports."""
    import vconvert.convert.reconstruct as module

    torch.manual_seed(0)
    teacher = build().eval()
    images = torch.randn(12, 3, 32, 32)
    student, _ = compress(teacher, images[:1], init="naive")
    layers = None
    if prefixes is not None:
        converted = [name for name, _ in versatile_layers(student)]
        layers = [name for name in converted if name in prefixes or name.startswith(tuple(prefixes))]
    batches = list(images.split(5))  # uneven batches: the last one is short
    settings = ReconstructSettings(rounds=1, mask_sweeps=1, positions=32, weight_bits=bits)
    single, prefix = copy.deepcopy(student), copy.deepcopy(student)
    with monkeypatch.context() as patched:  # the single pass must not fall back here
        patched.setattr(module, "prefix_inputs", lambda *_: pytest.fail("fell back to the prefix path"))
        single_report = reconstruct(single, teacher, batches, settings, layers=layers)
    with monkeypatch.context() as patched:
        patched.setattr(module, "single_pass_inputs", lambda *_: None)
        prefix_report = reconstruct(prefix, teacher, batches, settings, layers=layers)
    return layers, (single, single_report), (prefix, prefix_report)


@pytest.mark.parametrize("model", SINGLE_PASS_MODELS, ids=str)
def test_single_pass_gives_the_same_weights_as_running_the_prefix_per_layer(
    monkeypatch: pytest.MonkeyPatch, model: str
) -> None:
    build, prefixes = SINGLE_PASS_MODELS[model]
    layers, (single, single_report), (prefix, prefix_report) = _reconstructed_both_ways(monkeypatch, build, prefixes)
    names = [layer.name for layer in single_report.layers]
    assert names == [layer.name for layer in prefix_report.layers]
    assert layers is None or names == list(layers)
    assert sum(layer.skipped is None for layer in single_report.layers) >= 3
    for ours, theirs in zip(single_report.layers, prefix_report.layers, strict=True):
        assert (ours.error_before, ours.error_after, ours.skipped) == (
            theirs.error_before,
            theirs.error_after,
            theirs.skipped,
        )
    ours, theirs = single.state_dict(), prefix.state_dict()
    assert list(ours) == list(theirs)
    different = [key for key in ours if not torch.equal(ours[key], theirs[key])]
    assert not different, different  # bit-identical: the same operations on the same tensors


class _Untraceable(nn.Module):
    """Control flow on a tensor's value: FX cannot trace it, so reconstruction runs the prefix per layer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)  # the first conv stays dense
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(torch.relu(self.stem(x)))
        if x.mean() > 100:  # data-dependent branch
            x = -x
        return self.fc(self.conv2(torch.relu(x)).mean((2, 3)))


def test_an_untraceable_model_is_reconstructed_through_the_prefix_path() -> None:
    import vconvert.convert.reconstruct as module

    torch.manual_seed(0)
    teacher = _Untraceable().eval()
    images = torch.randn(8, 3, 16, 16)
    student, _ = compress(teacher, images[:1], init="naive")
    batches = list(images.split(4))
    assert module.single_pass_inputs(student, teacher, batches, ["conv1", "conv2"]) is None
    report = reconstruct(student, teacher, batches, ReconstructSettings(rounds=2, positions=64))
    assert [layer.name for layer in report.layers] == ["conv1", "conv2"]
    assert all(layer.skipped is None and layer.error_after < layer.error_before for layer in report.layers)


def _batchnorm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items() if "running" in key}


def test_recalibration_is_put_back_when_it_moves_the_outputs_away(digits_model) -> None:
    teacher, _, calibration, _ = digits_model
    model = copy.deepcopy(teacher)  # the original statistics: nothing estimated on 128 images can match them better
    outcome = recalibrate_if_closer(model, teacher, calibration, 128)
    assert outcome.images == 128 and outcome.divergence_before == 0.0 < outcome.divergence_after and not outcome.kept
    after = _batchnorm_state(model)
    assert all(torch.equal(after[key], value) for key, value in _batchnorm_state(teacher).items())


def test_recalibration_is_kept_when_it_brings_the_outputs_closer(digits_model) -> None:
    teacher, _, calibration, _ = digits_model
    model = copy.deepcopy(teacher)
    with torch.no_grad():  # statistics that no longer fit: every BatchNorm's running mean shifted
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean += 0.5
    outcome = recalibrate_if_closer(model, teacher, calibration, 128)
    assert outcome.kept and outcome.divergence_after < outcome.divergence_before
    assert output_divergence(model, teacher, calibration) == pytest.approx(outcome.divergence_after)


WIDTH_LAYERS = {
    "dense": {"mode": "channel", "secondary": 1},
    "learned-s2": {"mode": "learned", "secondary": 2},
    "learned-s4-bias": {"mode": "learned", "secondary": 4},
}


@pytest.mark.parametrize("kind", list(WIDTH_LAYERS))
def test_fitting_once_then_rounding_to_each_width_is_what_fit_layer_gives_at_that_width(kind: str) -> None:
    from vconvert.convert.reconstruct import fit_layer, fit_widths, moments_of_inputs, write_fit
    from vconvert.fit.initialise import initialise_from_weight
    from vconvert.nn.versatile import VersatileConv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=kind.endswith("bias"))
    inputs = [torch.relu(torch.randn(16, 8, 6, 6) + 0.3) for _ in range(2)]
    start = VersatileConv2d.shaped_like(conv, **WIDTH_LAYERS[kind])
    initialise_from_weight(start, conv.weight.detach(), None if conv.bias is None else conv.bias.detach())
    moments = moments_of_inputs(zip(inputs, inputs, strict=True), start, conv)
    untouched = copy.deepcopy(start.state_dict())
    fits = fit_widths(start, conv, moments, [None, 4, 2], ReconstructSettings(rounds=2, mask_sweeps=1))
    assert all(torch.equal(value, untouched[key]) for key, value in start.state_dict().items())
    for bits, fit in fits.items():
        alone, shared = copy.deepcopy(start), copy.deepcopy(start)
        with torch.no_grad():
            fit_layer(alone, conv, moments, ReconstructSettings(rounds=2, mask_sweeps=1, weight_bits=bits))
        write_fit(shared, fit, bits)
        assert shared.weight_bits == alone.weight_bits == bits
        assert torch.equal(shared.dense_weight(), alone.dense_weight()), bits
        if conv.bias is not None:
            assert torch.equal(shared.bias, alone.bias)
