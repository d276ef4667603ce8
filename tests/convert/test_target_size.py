"""``--target-size``: the per-layer plan (dense or versatile, 2 to 8 bits) for an int8 file of the asked size,
from the sizes through the search to the widths that fine-tuning and export keep."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import RESNET8_ARCH, assert_one_sentence_error, invoke, noise_image_folder, perturb_batchnorm
from torch import nn

from sample_models.resnet_cifar import resnet8
from vconvert.convert.compress import compress
from vconvert.convert.target_size import (
    FP32_GRAPH_BITS_PER_CONV,
    FP32_GRAPH_BITS_PER_FILE,
    Candidate,
    Choice,
    choice_bits,
    divergence,
    fp32_file_bits,
    greedy,
    knapsack,
    plain_int8_bits,
)
from vconvert.nn.versatile import VersatileConv2d, layer_widths

LEARNED = {"mode": "learned", "secondary": 2, "channel_stride": 1, "mask_sharing": "per-filter", "scale": True}


def _candidates(seed: int, layers: int = 4) -> dict[str, list[Candidate]]:
    rng = random.Random(seed)
    found = {}
    for layer in range(layers):
        sizes = sorted(rng.sample(range(10, 200), 5))
        errors = sorted((rng.random() for _ in sizes), reverse=True)  # fewer bits, more divergence
        found[f"l{layer}"] = [
            Candidate(Choice(1 + index % 2, 2 + index), size, error)
            for index, (size, error) in enumerate(zip(sizes, errors, strict=True))
        ]
    return found


def _brute_force(candidates: dict[str, list[Candidate]], budget: int) -> float:
    best = float("inf")
    for combination in itertools.product(*candidates.values()):
        if sum(c.bits for c in combination) <= budget:
            best = min(best, sum(c.divergence for c in combination))
    return best


@pytest.mark.parametrize("seed", range(6), ids=lambda seed: f"seed{seed}")
def test_the_knapsack_finds_the_least_divergence_that_fits(seed: int) -> None:
    candidates = _candidates(seed)
    budget = sum(min(c.bits for c in options) for options in candidates.values()) + 150
    chosen = knapsack(candidates, budget)
    assert chosen is not None and list(chosen) == list(candidates)
    assert sum(c.bits for c in chosen.values()) <= budget
    # bits are rounded up to budget / 1000 units, so the optimum is exact here (budgets under 1000 bits)
    assert sum(c.divergence for c in chosen.values()) == pytest.approx(_brute_force(candidates, budget))
    by_greedy = greedy(candidates, budget)
    assert by_greedy is not None and sum(c.bits for c in by_greedy.values()) <= budget
    assert sum(c.divergence for c in by_greedy.values()) >= sum(c.divergence for c in chosen.values()) - 1e-12


def test_a_budget_below_the_smallest_choices_has_no_plan() -> None:
    candidates = _candidates(0)
    smallest = sum(min(c.bits for c in options) for options in candidates.values())
    assert knapsack(candidates, smallest - 1) is None and greedy(candidates, smallest - 1) is None


def test_divergence_is_zero_for_the_same_outputs_and_grows_with_the_change() -> None:
    torch.manual_seed(0)
    logits = torch.randn(16, 10)
    assert divergence(logits, logits) == pytest.approx(0.0, abs=1e-12)
    small, large = divergence(logits, logits + 0.1 * torch.randn(16, 10)), divergence(logits, torch.randn(16, 10))
    assert 0 < small < large


@pytest.mark.parametrize(
    ("secondary", "bits"), [(1, 3), (2, 2), (2, 4), (4, 3), (4, 8)], ids=lambda v: str(v)
)  # fmt: skip
def test_a_choice_stores_its_primaries_at_their_width_and_one_bit_per_mask_element(secondary: int, bits: int) -> None:
    conv = nn.Conv2d(16, 32, 3, bias=False)
    choice = Choice(secondary, bits)
    layer = VersatileConv2d.shaped_like(conv, **choice.options(LEARNED))
    masks = layer.mask_proxy.numel() if layer.mask_proxy is not None else 0
    index = layer.out_channels * ((layer.num_primary - 1).bit_length() + (layer.group_size - 1).bit_length())
    expected = layer.primary.numel() * bits + masks + index + 32 * conv.out_channels
    assert choice_bits(conv, choice, LEARNED) == expected
    assert choice_bits(conv, Choice(1, 8), LEARNED) == plain_int8_bits(conv) == 32 * 16 * 9 * 8 + 32 * 32


@pytest.mark.parametrize("secondary", [2, 4], ids=lambda s: f"s{s}")
def test_a_shared_masks_choice_stores_one_mask_per_secondary(secondary: int) -> None:
    conv = nn.Conv2d(16, 32, 3, bias=False)
    shared, per_filter = Choice(secondary, 3, shared=True), Choice(secondary, 3)
    layer = VersatileConv2d.shaped_like(conv, **shared.options(LEARNED))
    assert layer.mask_sharing == "shared" and layer.mask_proxy.shape[0] == secondary
    saved = choice_bits(conv, per_filter, LEARNED) - choice_bits(conv, shared, LEARNED)
    assert saved == layer.mask_proxy[0].numel() * (32 - secondary)  # one mask per output -> one per secondary
    assert shared.label() == f"s={secondary} shared masks 3-bit"


def test_the_fp32_size_counts_every_conv_and_linear_weight_a_bias_per_output_and_the_graph() -> None:
    model = resnet8()
    expected, convs = 0, 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            expected, convs = expected + module.weight.numel() + module.out_channels, convs + 1
        elif isinstance(module, nn.Linear):
            expected += module.weight.numel() + module.bias.numel()
    assert fp32_file_bits(model) == 32 * expected + convs * FP32_GRAPH_BITS_PER_CONV + FP32_GRAPH_BITS_PER_FILE


@pytest.fixture(scope="module")
def planned() -> tuple[nn.Module, nn.Module, object]:
    torch.manual_seed(0)
    teacher = resnet8().eval()
    images = [torch.randn(8, 3, 32, 32)]
    model, plan = compress(teacher, images[0][:1], target_size=0.1, calibration=images)
    return teacher, model, plan


def test_a_plan_for_a_size_fits_it_and_gives_every_planned_conv_a_width(planned) -> None:
    teacher, model, plan = planned
    assert plan.target_size == 0.1 and "--target-size 0.1" in plan.choice_note
    ratio = float(plan.choice_note.split("planned int8 file ")[1].split("x")[0])
    assert ratio <= 0.1
    widths = layer_widths(model)
    for decision in plan.layers:
        if decision.converted:
            assert decision.weight_bits in (2, 3, 4, 8) and decision.divergence is not None
            layer = model.get_submodule(decision.name)
            assert widths[decision.name] == (None if decision.weight_bits == 8 else decision.weight_bits)
            assert layer.group_size in (1, 2, 4)
            if layer.group_size == 1:
                assert layer.mode == "channel" and decision.options["secondary"] == 1
    stem = plan.layers[0]
    assert stem.name == "conv1" and (not stem.converted or stem.options["secondary"] == 1), "the stem stays dense"
    for decision in plan.layers:
        if decision.converted and decision.options["mode"] == "learned":
            assert model.get_submodule(decision.name).mask_sharing == decision.options["mask_sharing"]
    assert isinstance(teacher.conv1, nn.Conv2d) and not isinstance(teacher.conv1, VersatileConv2d)


def test_a_planned_checkpoint_keeps_its_widths_through_save_and_load(planned, tmp_path: Path) -> None:
    from vconvert import save
    from vconvert.io.checkpoint import load_checkpoint
    from vconvert.io.metadata import CheckpointMetadata
    from vconvert.io.untrusted import BaseSpec

    teacher, model, plan = planned
    base = BaseSpec(arch=RESNET8_ARCH, arch_kwargs={}, pickled=None, source="test")
    path = tmp_path / "planned.vc.pt"
    save(path, model, plan, base, teacher, CheckpointMetadata(input_shape=[1, 3, 32, 32]))
    loaded = load_checkpoint(path)
    assert layer_widths(loaded.model) == layer_widths(model)
    assert [d.weight_bits for d in loaded.plan.layers] == [d.weight_bits for d in plan.layers]
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(images), model(images))


def test_a_planned_checkpoint_exports_each_layer_at_its_width(planned, tmp_path: Path) -> None:
    from vconvert.export.pipeline import export

    _, model, _ = planned
    calibration = [torch.randn(8, 3, 32, 32)]
    report = export(model, tmp_path / "planned.onnx", input_shape=[1, 3, 32, 32], quantize="int8", compact=True,
                    calibration=calibration, measure=False, min_agreement=0.0)  # fmt: skip
    info = report.quantization
    expected = {name: min(width or 8, 7) for name, width in layer_widths(model).items()}  # int8 target any: 7 bits
    assert info["layer_weight_bits"] == expected and info["compact_equals_dense"]


@pytest.mark.parametrize("size", [0.07, 0.12], ids=lambda size: f"target{size}")
def test_the_exported_int8_file_is_the_asked_size_of_the_fp32_file(size: float, tmp_path: Path) -> None:
    from vconvert.export.pipeline import export

    torch.manual_seed(0)
    teacher = perturb_batchnorm(resnet8().eval())
    images = [torch.randn(8, 3, 32, 32)]
    model, plan = compress(teacher, images[0][:1], target_size=size, calibration=images)
    export(teacher, tmp_path / "fp32.onnx", input_shape=[1, 3, 32, 32], measure=False)
    export(model, tmp_path / "int8.onnx", input_shape=[1, 3, 32, 32], quantize="int8", compact=True,
           calibration=images, measure=False, min_agreement=0.0)  # fmt: skip
    ratio = (tmp_path / "int8.onnx").stat().st_size / (tmp_path / "fp32.onnx").stat().st_size
    planned = float(plan.choice_note.split("planned int8 file ")[1].split("x")[0])
    assert ratio == pytest.approx(planned, rel=0.03) and ratio <= size * 1.02, (ratio, planned)


def test_a_damaged_width_in_a_plan_is_refused(planned, tmp_path: Path) -> None:
    from vconvert.convert.plan import ConversionPlan
    from vconvert.errors import BadInputError

    _, _, plan = planned
    data = plan.to_dict()
    data["layers"][1]["weight_bits"] = 9
    with pytest.raises(BadInputError, match="weight_bits must be an integer from 2 to 8"):
        ConversionPlan.from_dict(data)
    old = plan.to_dict()  # a file written before --target-size: neither field
    for layer in old["layers"]:
        del layer["weight_bits"], layer["divergence"]
    del old["target_size"]
    assert ConversionPlan.from_dict(old).target_size is None


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("planned_cli")
    torch.manual_seed(0)
    torch.save(resnet8().state_dict(), folder / "resnet8.pt")
    return folder / "resnet8.pt", noise_image_folder(folder / "images")


def _compress(weights: Path, *options: object):
    return invoke("compress", weights, "--arch", RESNET8_ARCH, "--input-shape", "1,3,32,32", "--mean", "0.5,0.5,0.5",
                  "--std", "0.25,0.25,0.25", *options)  # fmt: skip


def test_compress_target_size_plans_and_inspect_shows_the_widths(weights_file, tmp_path: Path) -> None:
    weights, images = weights_file
    output = tmp_path / "planned.vc.pt"
    result = _compress(weights, "--target-size", "0.12", "--calib-data", images / "train", "-o", output)
    assert result.exit_code == 0, result.output + result.stderr
    assert "--target-size 0.12:" in " ".join(result.stdout.split())
    shown = invoke("inspect", output, "--json")
    assert shown.exit_code == 0, shown.output
    layers = json.loads(shown.stdout)["plan"]["layers"]
    assert all(layer["weight_bits"] in (2, 3, 4, 8) for layer in layers if layer["decision"] == "converted")
    table = invoke("inspect", output)
    assert any(f"{kind} {bits}-bit" in table.stdout for kind in ("dense", "s=2", "s=4") for bits in (2, 3, 4, 8))


def test_a_small_target_size_stores_some_layers_with_shared_masks(weights_file, tmp_path: Path) -> None:
    weights, images = weights_file
    output = tmp_path / "small.vc.pt"
    result = _compress(weights, "--target-size", "0.07", "--calib-data", images / "train", "-o", output)
    assert result.exit_code == 0, result.output + result.stderr
    layers = json.loads(invoke("inspect", output, "--json").stdout)["plan"]["layers"]
    shared = [layer["name"] for layer in layers if (layer["options"] or {}).get("mask_sharing") == "shared"]
    assert shared, "at 0.07x no plan fits without shared masks"
    assert "shared masks" in invoke("inspect", output).stdout
    exported = invoke("export", output, "-o", tmp_path / "small.onnx", "--quantize", "int8", "--compact",
                      "--calib-data", images / "train", "--calib-images", "16", "--min-agreement", "0")  # fmt: skip
    assert exported.exit_code == 0, exported.output + exported.stderr


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (("--target-size", "0.1"), "--target-size measures each layer on images: pass --calib-data"),
        (("--target-size", "1.5", "--calib-data", "IMAGES"), "must lie between 0 and 1"),
        (("--target-size", "0.001", "--calib-data", "IMAGES"), "is out of reach"),
        (("--target-size", "0.9", "--calib-data", "IMAGES"), "no smaller than the plain int8 file"),
        (("--target-size", "0.1", "--target-ratio", "2", "--calib-data", "IMAGES"), "drop --target-ratio"),
        (("--target-size", "0.1", "--plan-images", "0", "--calib-data", "IMAGES"), "--plan-images must be at least 1"),
    ],
    ids=["no-images", "above-one", "out-of-reach", "not-smaller", "with-target-ratio", "no-plan-images"],
)
def test_bad_target_size_requests_get_one_sentence(weights_file, tmp_path: Path, options, fragment: str) -> None:
    weights, images = weights_file
    output = tmp_path / "planned.vc.pt"
    typed = [str(images / "train") if option == "IMAGES" else option for option in options]
    result = _compress(weights, *typed, "-o", output)
    assert_one_sentence_error(result, 2, fragment)
    assert not output.exists()


def test_fine_tuning_a_planned_checkpoint_keeps_each_layers_width(planned, tmp_path: Path) -> None:
    from vconvert import save
    from vconvert.io.checkpoint import load_checkpoint
    from vconvert.io.metadata import CheckpointMetadata
    from vconvert.io.untrusted import BaseSpec
    from vconvert.train.config import FinetuneConfig
    from vconvert.train.finetune import finetune

    teacher, model, plan = planned
    base = BaseSpec(arch=RESNET8_ARCH, arch_kwargs={}, pickled=None, source="test")
    source, output = tmp_path / "planned.vc.pt", tmp_path / "tuned.vc.pt"
    save(source, model, plan, base, teacher, CheckpointMetadata(input_shape=[1, 3, 32, 32]))
    data = _ten_class_folder(tmp_path / "images")
    finetune(source, output, FinetuneConfig(data=str(data), epochs=1, batch_size=10, workers=0))
    tuned = load_checkpoint(output)
    assert layer_widths(tuned.model) == layer_widths(model) and any(layer_widths(model).values())
    assert tuned.metadata.weight_quantization["layers"] == layer_widths(model)


def _ten_class_folder(root: Path) -> Path:
    """train/ and val/ with one random 32x32 RGB image in each of ten class folders (resnet8 scores ten)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in range(10):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "0.png")
    return root


def test_reconstructed_candidates_measure_each_choice_as_reconstruction_leaves_it(digits_model) -> None:
    """Planning for ``--reconstruct``: the same choices and bits, a plain int8 conv measured alike, and the low-bit
    choices measured after GPTQ-style rounding against the outputs, which costs far less than min-max rounding."""
    from vconvert.convert.target_size import measure_candidates

    teacher, _, calibration, _ = digits_model
    convs = {name: teacher.get_submodule(name) for name in ("layer1.1.conv1", "layer2.0.conv2", "layer2.2.conv1")}
    allowed = dict.fromkeys(convs, (1, 2))
    plain = measure_candidates(teacher, convs, allowed, LEARNED, calibration)
    rebuilt = measure_candidates(teacher, convs, allowed, LEARNED, calibration, reconstructed=True)
    low_bits = {"plain": 0.0, "rebuilt": 0.0}
    for name in convs:
        assert [(c.choice, c.bits) for c in plain[name]] == [(c.choice, c.bits) for c in rebuilt[name]]
        for ours, theirs in zip(rebuilt[name], plain[name], strict=True):
            if ours.choice.plain:
                assert ours.divergence == theirs.divergence
            elif ours.choice.bits <= 3:
                low_bits["rebuilt"] += ours.divergence
                low_bits["plain"] += theirs.divergence
    assert low_bits["rebuilt"] < 0.1 * low_bits["plain"], low_bits
    for name, conv in convs.items():  # measuring left the network as it was
        assert teacher.get_submodule(name) is conv


def test_reconstructed_candidates_compute_each_convs_input_moments_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from vconvert.convert import target_size

    computed = []
    measure = target_size._input_moments
    monkeypatch.setattr(
        target_size, "_input_moments", lambda model, name, *rest: computed.append(name) or measure(model, name, *rest)
    )
    torch.manual_seed(0)
    model = resnet8().eval()
    convs = {name: model.get_submodule(name) for name in ("layer1.0.conv1", "layer2.0.conv2")}
    images = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    found = target_size.measure_candidates(model, convs, dict.fromkeys(convs, (1, 2, 4)), LEARNED, images,
                                           reconstructed=True)  # fmt: skip
    assert sorted(computed) == sorted(convs)  # once per conv, for its three structures and their widths
    assert all(len(found[name]) > 8 for name in convs)
