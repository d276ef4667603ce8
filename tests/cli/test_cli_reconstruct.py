"""`vconvert compress --reconstruct`: the record it writes, int8 export of its file, and every bad input it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import RESNET8_ARCH, assert_one_sentence_error, invoke, noise_image_folder

from vconvert.io.checkpoint import load_checkpoint
from vconvert.nn.versatile import versatile_layers


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(resnet8 state_dict with random weights, a folder of noise images)."""
    from sample_models.resnet_cifar import resnet8

    root = tmp_path_factory.mktemp("reconstruct")
    torch.manual_seed(0)
    weights = root / "resnet8.pt"
    torch.save(resnet8().state_dict(), weights)
    return weights, noise_image_folder(root / "images") / "train"


def compress(weights: Path, *options: object):
    return invoke("compress", weights, "--arch", RESNET8_ARCH, "--input-shape", "2,3,32,32", *options)


def test_reconstructed_file_records_it_round_trips_and_exports_int8(workspace, tmp_path: Path) -> None:
    weights, images = workspace
    output = tmp_path / "r.vc.pt"
    result = compress(weights, "--calib-data", images, "--reconstruct", "--weight-bits", "4", "--calib-images", "4",
                      "--refine-steps", "5", "-o", output)  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    said = " ".join(result.output.split())
    assert "Reconstructed 8 layers on 4 images" in said and "blocks (5 steps each)" in said
    checkpoint = load_checkpoint(output)
    record = checkpoint.metadata.reconstruction
    assert record["data"] == str(images.resolve()) and record["images"] == 4 and record["layers"] == 8
    assert record["settings"]["weight_bits"] == 4 and record["error_after"] <= record["error_before"]
    refined = record["refinement"]  # resnet8: three BasicBlocks
    assert refined["steps"] == 5 and refined["blocks"] == 3 and refined["error_after"] <= refined["error_before"]
    recalibrated = checkpoint.metadata.bn_recalibration  # kept only where it brought the outputs closer
    assert recalibrated is None or recalibrated["images"] == 4
    assert "BatchNorm statistics " in result.output
    assert checkpoint.metadata.weight_quantization == {"bits": 4, "quantizer": "lsq"}
    onnx_file = tmp_path / "r.onnx"
    result = invoke("export", output, "--quantize", "int8", "--compact", "--calib-images", "4", "-o", onnx_file)
    assert result.exit_code == 0, result.output + result.stderr
    assert onnx_file.exists()
    inspected = invoke("inspect", output)
    assert inspected.exit_code == 0, inspected.output + inspected.stderr
    inspected_text = " ".join(inspected.output.split())
    assert "reconstructed: 8 layers against the original network's outputs on 4" in inspected_text
    assert f"refined: {refined['kept']} of 3 blocks, 5 steps each" in inspected_text


def test_a_size_plan_for_reconstruction_measures_its_choices_reconstructed(workspace, tmp_path: Path) -> None:
    weights, images = workspace
    planned = {}
    for label, extra in (("data-free", ()), ("reconstructed", ("--reconstruct", "--refine-steps", "0"))):
        output = tmp_path / f"{label}.vc.pt"
        result = compress(weights, "--mode", "learned", "--target-size", "0.2", "--calib-data", images,
                          "--calib-images", "4", "--plan-images", "4", *extra, "-o", output)  # fmt: skip
        assert result.exit_code == 0, result.output + result.stderr
        planned[label] = load_checkpoint(output).plan.choice_note
    assert planned["reconstructed"].endswith("on the calibration images, each choice as reconstruction leaves it)")
    assert planned["data-free"].endswith("on the calibration images)")


def test_secondary_1_keeps_the_convs_dense_at_the_reconstructed_width(workspace, tmp_path: Path) -> None:
    weights, images = workspace
    output = tmp_path / "d.vc.pt"
    result = compress(weights, "--secondary", "1", "--calib-data", images, "--reconstruct", "--weight-bits", "3",
                      "--calib-images", "4", "--refine-steps", "0", "--json", "-o", output)  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    checkpoint = load_checkpoint(output)
    outcome = json.loads(result.stdout)["bn_recalibration"]
    assert outcome["images"] == 4 and outcome["kept"] == (outcome["divergence_after"] < outcome["divergence_before"])
    assert (checkpoint.metadata.bn_recalibration is not None) == outcome["kept"]
    layers = dict(versatile_layers(checkpoint.model))
    assert len(layers) == 8 and checkpoint.metadata.reconstruction["layers"] == 8
    assert "refinement" not in checkpoint.metadata.reconstruction  # --refine-steps 0: the layer-wise fit only
    for layer in layers.values():  # one filter per primary, scaled per output: the dense conv at 3 bits
        assert (layer.mode, layer.group_size, layer.num_primary) == ("channel", 1, layer.out_channels)
        assert layer.weight_bits == 3 and layer.primary_integers()[0].abs().max() <= 3
    converted = [layer for layer in checkpoint.plan.layers if layer.options]
    # sized at 3 of 32 bits a weight (plus a float scale per output and the output index), not as floats
    assert all(layer.stored_bits < layer.dense_bits / 4 for layer in converted)
    onnx_file = tmp_path / "d.onnx"
    result = invoke("export", output, "--quantize", "int8", "--compact", "--calib-images", "4", "-o", onnx_file)
    assert result.exit_code == 0, result.output + result.stderr


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (("--reconstruct",), "--reconstruct needs unlabeled images: pass --calib-data"),
        (("--weight-bits", "4"), "--weight-bits rounds the primaries against the outputs: pass it with --reconstruct"),
        (("--calib-data", "IMAGES", "--reconstruct", "--weight-bits", "9"), "--weight-bits must be an integer from 2"),
        (("--calib-data", "IMAGES", "--reconstruct", "--calib-images", "0"), "--calib-images must be at least 1"),
        (("--calib-data", "MISSING", "--reconstruct"), "missing"),
        (("--calib-data", "EMPTY", "--reconstruct"), "empty"),
        (("--secondary", "1"), "--secondary 1 keeps every conv dense, which saves storage only below 8 bits"),
        (("--secondary", "1", "--calib-data", "IMAGES", "--reconstruct", "--weight-bits", "8"), "below 8 bits"),
        (
            ("--calib-data", "IMAGES", "--target-size", "0.2", "--reconstruct", "--weight-bits", "4"),
            "--target-size picks each layer's width itself: drop --weight-bits",
        ),
        (("--refine-steps", "10"), "--refine-steps refines the reconstructed blocks: pass it with --reconstruct"),
        (("--calib-data", "IMAGES", "--reconstruct", "--refine-steps", "-1"), "--refine-steps must be 0"),
        (("--calib-seed", "3"), "--calib-seed chooses which --calib-data images are read: pass --calib-data DIR"),
        (("--calib-data", "IMAGES", "--reconstruct", "--calib-seed", "-1"), "--calib-seed must be 0 or more"),
    ],
    ids=[
        "no-calib-data",
        "bits-without-reconstruct",
        "bits-9",
        "images-0",
        "missing-folder",
        "empty-folder",
        "dense-without-bits",
        "dense-at-8-bits",
        "bits-with-target-size",
        "refine-without-reconstruct",
        "refine-negative",
        "seed-without-calib-data",
        "seed-negative",
    ],
)
def test_bad_reconstruction_options_exit_2(workspace, tmp_path: Path, options: tuple[str, ...], fragment: str) -> None:
    weights, images = workspace
    (tmp_path / "empty").mkdir()
    folders = {"IMAGES": images, "MISSING": tmp_path / "missing", "EMPTY": tmp_path / "empty"}
    typed = [folders.get(option, option) for option in options]
    output = tmp_path / "out.vc.pt"
    result = compress(weights, *typed, "-o", output)
    assert_one_sentence_error(result, 2, fragment)
    assert not output.exists()


def test_damaged_reconstruction_record_is_one_sentence(workspace, tmp_path: Path) -> None:
    weights, images = workspace
    output = tmp_path / "r.vc.pt"
    result = compress(weights, "--calib-data", images, "--reconstruct", "--calib-images", "2", "-o", output)
    assert result.exit_code == 0, result.output + result.stderr
    payload = torch.load(output, weights_only=True)
    for damage, fragment in [
        ({"images": 0}, "reconstruction images must be an integer ≥ 1"),
        ({"settings": {"rounds": 1}}, "reconstruction settings lacks"),
        ({"error_after": -1.0}, "reconstruction error_after must not be negative"),
        ({"surprise": 1}, "reconstruction has unknown field(s) surprise"),
        ({"seed": "1"}, "reconstruction seed must be an integer ≥ 0"),
    ]:
        damaged = dict(payload)
        damaged["metadata"] = {
            **payload["metadata"],
            "reconstruction": {**payload["metadata"]["reconstruction"], **damage},
        }
        path = tmp_path / "damaged.vc.pt"
        torch.save(damaged, path)
        assert_one_sentence_error(invoke("inspect", path), 2, fragment)


def test_calib_seed_draws_another_subset_the_same_each_time_and_the_file_says_which(workspace, tmp_path: Path) -> None:
    from vconvert.data.datasets import calibration_batches

    weights, images = workspace
    drawn = {seed: torch.cat(list(calibration_batches(images, (32, 32), (0.5,) * 3, (0.25,) * 3, limit=2, seed=seed)))
             for seed in (0, 5)}  # fmt: skip
    assert not torch.equal(drawn[0], drawn[5])  # 2 of the 6 images: another pair
    options = ("--calib-data", images, "--reconstruct", "--weight-bits", "4", "--calib-images", "2", "--refine-steps",
               "0")  # fmt: skip
    files = {}
    for label, extra in (("default", ()), ("seed5", ("--calib-seed", "5")), ("seed5-again", ("--calib-seed", "5"))):
        files[label] = tmp_path / f"{label}.vc.pt"
        result = compress(weights, *options, *extra, "-o", files[label])
        assert result.exit_code == 0, result.output + result.stderr
        if extra:
            assert "Reconstructed 8 layers on 2 images (--calib-seed 5)" in " ".join(result.output.split())
    loaded = {label: load_checkpoint(path) for label, path in files.items()}
    assert "seed" not in loaded["default"].metadata.reconstruction  # the default subset: files as before
    assert loaded["seed5"].metadata.reconstruction["seed"] == 5
    assert loaded["seed5"].metadata.bn_recalibration in (None, {"data": str(images.resolve()), "images": 2, "seed": 5})
    states = {label: checkpoint.model.state_dict() for label, checkpoint in loaded.items()}
    assert all(torch.equal(value, states["seed5-again"][key]) for key, value in states["seed5"].items())
    assert not all(torch.equal(value, states["default"][key]) for key, value in states["seed5"].items())
    inspected = invoke("inspect", files["seed5"])
    assert inspected.exit_code == 0, inspected.output + inspected.stderr
    assert "on 2 unlabeled images (--calib-seed 5) of" in " ".join(inspected.output.split())


def test_calib_seed_is_recorded_with_batchnorm_recalibration_alone(workspace, tmp_path: Path) -> None:
    weights, images = workspace
    output = tmp_path / "bn.vc.pt"
    result = compress(weights, "--calib-data", images, "--calib-images", "2", "--calib-seed", "2", "-o", output)
    assert result.exit_code == 0, result.output + result.stderr
    assert load_checkpoint(output).metadata.bn_recalibration == {"data": str(images.resolve()), "images": 2, "seed": 2}


def test_default_image_counts() -> None:
    from vconvert.cli.compress import DEFAULT_CALIB_IMAGES, check_calibration_options
    from vconvert.convert.reconstruct import DEFAULT_IMAGES

    assert check_calibration_options(Path("images"), None, True, None) == DEFAULT_IMAGES == 1024
    assert check_calibration_options(Path("images"), None, False, None) == DEFAULT_CALIB_IMAGES == 2000
    assert check_calibration_options(Path("images"), 16, True, 4) == 16


@pytest.mark.parametrize(
    ("images", "kept", "fragment"),
    [(0, False, "no BatchNorm statistics"), (8, True, "recalibrated on 8 images"), (8, False, "kept as trained")],
    ids=["no-batchnorm", "kept", "put-back"],
)
def test_the_batchnorm_outcome_is_said_in_one_line(images: int, kept: bool, fragment: str) -> None:
    from vconvert.cli.compress import recalibration_line
    from vconvert.convert.calibrate import Recalibration

    line = recalibration_line(Recalibration(images, 0.02, 0.01 if kept else 0.03, kept))
    assert fragment in line and "\n" not in line


def test_block_refinement_runs_by_default_on_small_networks_only() -> None:
    from vconvert.convert.refine import AUTO_LIMIT_MACS, DEFAULT_STEPS, default_steps

    assert default_steps(41_000_000) == DEFAULT_STEPS == 300  # ResNet-20 on 32x32 images
    assert default_steps(4_100_000_000) == 0  # ResNet-50 at 224 px: only with --refine-steps
    import typer

    from vconvert.cli.app import app

    command = typer.main.get_command(app).commands["compress"]
    help_text = next(param.help for param in command.params if param.name == "refine_steps")
    assert f"default {DEFAULT_STEPS} for networks up to {AUTO_LIMIT_MACS // 10**9} G" in help_text
