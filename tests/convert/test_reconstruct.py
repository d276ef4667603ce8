"""Output reconstruction (vconvert.convert.reconstruct): the pure steps, and the pass on the shipped digits model."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch

from sample_models.resnet_cifar import resnet20
from vconvert.convert.calibrate import recalibrate_batchnorm
from vconvert.convert.compress import compress
from vconvert.convert.reconstruct import (
    ReconstructSettings,
    improve_masks,
    output_errors,
    reconstruct,
    relative_error,
    round_with_feedback,
    row_errors,
    solve_primaries,
    solve_primaries_cg,
    solve_scales,
)
from vconvert.data.datasets import digits_tensors
from vconvert.nn.quantize import largest_level

WEIGHTS = Path(__file__).resolve().parents[2] / "sample_models" / "weights" / "resnet20_digits.pt"
MEAN, STD = 0.3049, 0.3234
LAYERS = ("layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2")  # the first blocks: quick


def quadratic(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A positive-definite A (K x K) from random patches, and a random dense target (N x K)."""
    generator = torch.Generator().manual_seed(seed)
    patches = torch.randn(4 * size, size, generator=generator, dtype=torch.float64)
    return patches.T @ patches / patches.shape[0], torch.randn(8, size, generator=generator, dtype=torch.float64)


def test_each_step_never_raises_the_output_error() -> None:
    a, target = quadratic(18)
    g, c = target @ a, ((target @ a) * target).sum(1)
    d = torch.ones(8, dtype=torch.float64)
    index = torch.arange(8) // 2
    primary = target[::2].clone()
    masks, scale = torch.ones(8, 18, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
    errors = [relative_error(scale[:, None] * masks * primary[index], a, g, c, d)]
    for _ in range(3):
        masks = improve_masks(a, g, scale[:, None] * primary[index], masks, sweeps=2)
        errors.append(relative_error(scale[:, None] * masks * primary[index], a, g, c, d))
        primary = solve_primaries(a, g, masks, scale, d, index, primary, damping=1e-9)
        errors.append(relative_error(scale[:, None] * masks * primary[index], a, g, c, d))
        scale = solve_scales(a, g, masks * primary[index], scale)
        errors.append(relative_error(scale[:, None] * masks * primary[index], a, g, c, d))
    assert all(after <= before + 1e-12 for before, after in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.7 * errors[0]


def test_conjugate_gradients_reach_the_exact_primaries() -> None:
    a, target = quadratic(27, seed=3)
    g = target @ a
    index = torch.arange(8) // 2
    generator = torch.Generator().manual_seed(3)
    masks = (torch.rand(8, 27, generator=generator) > 0.3).double()
    scale, d = 0.5 + torch.rand(8, generator=generator, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
    previous = torch.randn(4, 27, generator=generator, dtype=torch.float64)
    exact = solve_primaries(a, g, masks, scale, d, index, previous, damping=1e-4)
    iterated = solve_primaries_cg(a, g, masks, scale, d, index, previous, damping=1e-4, iterations=60)
    assert torch.allclose(iterated, exact, atol=1e-6, rtol=1e-5)


def test_masks_are_a_local_optimum_of_single_flips() -> None:
    a, target = quadratic(10, seed=1)
    g, c = target @ a, ((target @ a) * target).sum(1)
    values = target * 1.3
    masks = improve_masks(a, g, values, torch.ones_like(values), sweeps=20)
    best = row_errors(masks * values, a, g, c)
    for e in range(10):
        flipped = masks.clone()
        flipped[:, e] = 1 - flipped[:, e]
        assert torch.all(row_errors(flipped * values, a, g, c) >= best - 1e-12)


def test_rounding_with_feedback_beats_plain_rounding_under_the_quadratic() -> None:
    a, target = quadratic(27, seed=2)
    systems = a.expand(8, -1, -1).contiguous()
    step = target.abs().amax(1) / largest_level(4)
    codes = round_with_feedback(target, systems, step, 4)
    assert codes.abs().max() <= largest_level(4) and torch.equal(codes, codes.round())
    plain = torch.clamp(torch.round(target / step[:, None]), -7, 7)

    def cost(integers: torch.Tensor) -> float:
        error = integers * step[:, None] - target
        return float(torch.einsum("pk,pkl,pl->", error, systems, error))

    assert cost(codes) < cost(plain)


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
    import vconvert.convert.reconstruct as module
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
