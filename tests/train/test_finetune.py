"""Fine-tuning: loss pieces, mask-update rules, a real run on digits, exact resume after SIGKILL,
NaN handling, bad data, and DistributedDataParallel on 2 CPU processes."""

from __future__ import annotations

import importlib
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import QUICK, converted_checkpoint, error_message, finetune_cut_and_resumed, noise_image_folder
from PIL import Image
from typer.testing import CliRunner

from vconvert import VersatileConv2d, load_checkpoint, save
from vconvert.cli.app import app
from vconvert.errors import BadInputError, CheckFailedError
from vconvert.evaluate import topk_correct
from vconvert.fit.initialise import from_conv, project_onto_groups
from vconvert.nn.versatile import group_members, materialise_weight
from vconvert.train.config import FinetuneConfig, projection_interval
from vconvert.train.distill import distillation_loss
from vconvert.train.finetune import _check_finite_weights, finetune, warmup_cosine
from vconvert.train.hardware import cpu_has_native_bf16, uses_bf16
from vconvert.train.masks import MaskLearner, MaskSettings, anneal_factor, binary_masks, count_flips, latent_share


def test_warmup_cosine_schedule() -> None:
    factors = [warmup_cosine(step, 4, 20) for step in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == pytest.approx(1.0) and factors[-1] < 0.02
    assert all(a >= b for a, b in itertools.pairwise(factors[3:]))


def test_distillation_loss_is_zero_only_for_equal_logits() -> None:
    logits = torch.randn(8, 10)
    assert distillation_loss(logits, logits, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(logits, torch.randn(8, 10), 4.0).item() > 0.01


def test_topk_correct() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    assert topk_correct(logits, torch.tensor([1, 2]), 1) == 1
    assert topk_correct(logits, torch.tensor([1, 2]), 2) == 1
    assert topk_correct(logits, torch.tensor([1, 2]), 3) == 2


def test_anneal_factor() -> None:
    assert anneal_factor(0.0, 0.6) == 1.0 and anneal_factor(0.3, 0.6) == pytest.approx(0.5)
    assert anneal_factor(0.6, 0.6) == 0.0 and anneal_factor(0.9, 0.6) == 0.0


def _layer_with_grad() -> tuple[torch.nn.Module, VersatileConv2d]:
    torch.manual_seed(0)
    layer = VersatileConv2d(8, 8, 3, padding=1)
    model = torch.nn.Sequential(layer)
    return model, layer


def test_flip_rule_respects_its_budget_and_first_order_gain() -> None:
    model, layer = _layer_with_grad()
    learner = MaskLearner(model, MaskSettings("flip", flip_rate=0.1, anneal=1.0, evidence_decay=0.0), 100, 1)
    before = binary_masks(model)
    on = (layer.mask_proxy > 0.5).clone()
    gradient = torch.randn_like(layer.mask_proxy)
    layer.mask_proxy.grad = gradient.clone()
    flipped = learner.after_step()
    after = binary_masks(model)
    assert flipped == int(0.1 * layer.mask_proxy.numel())  # the budget binds: half the bits have gain > 0
    assert count_flips(before, after) == flipped
    changed = before["0"] != after["0"]
    gain = torch.where(on, gradient, -gradient)  # flipping lowers the loss to first order where gain > 0
    assert bool((gain[changed] > 0).all())
    assert float(gain[changed].min()) >= float(gain[~changed].max()), "the strongest evidence flips first"
    assert layer.mask_proxy.grad is None


def test_flip_rule_flips_the_same_bits_in_a_channels_last_model() -> None:
    flips = {}
    for memory_format in (torch.contiguous_format, torch.channels_last):
        model, layer = _layer_with_grad()
        model.to(memory_format=memory_format)
        learner = MaskLearner(model, MaskSettings("flip", flip_rate=0.1, anneal=1.0, evidence_decay=0.0), 100, 1)
        before = binary_masks(model)
        layer.mask_proxy.grad = torch.randn(layer.mask_proxy.shape, generator=torch.Generator().manual_seed(0))
        assert learner.after_step() > 0
        flips[memory_format] = before["0"] != binary_masks(model)["0"]
    assert torch.equal(flips[torch.contiguous_format], flips[torch.channels_last])


def test_frozen_and_tpami_rules() -> None:
    model, layer = _layer_with_grad()
    MaskLearner(model, MaskSettings("frozen"), 10, 1)
    assert not layer.mask_proxy.requires_grad
    model, layer = _layer_with_grad()
    masks_before = binary_masks(model)
    learner = MaskLearner(model, MaskSettings("tpami"), 10, 1)
    assert count_flips(masks_before, binary_masks(model)) == 0, "switching to the TPAMI convention keeps the masks"
    with torch.no_grad():
        layer.mask_proxy.add_(0.3)
    learner.before_step()
    assert set(layer.mask_proxy.unique().tolist()) <= {0.0, 1.0}
    assert layer.mask_threshold == 0.0


def test_project_rule_trains_a_dense_latent_and_follows_it_with_masks_primaries_and_scales() -> None:
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, bias=False))
    model = torch.nn.Sequential(from_conv(teacher[0]))
    layer = model[0]
    learner = MaskLearner(model, MaskSettings("project"), 10, 1, teacher)
    assert torch.equal(layer.latent_weight, teacher[0].weight), "the latent weight starts as the original"
    assert not any(p.requires_grad for p in (layer.primary, layer.scale, layer.mask_proxy))
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["0.latent_weight"]

    images = torch.randn(4, 8, 6, 6)
    dense = layer.dense_weight().detach().requires_grad_(True)
    torch.nn.functional.conv2d(images, dense, padding=1).square().sum().backward()
    model(images).square().sum().backward()
    torch.testing.assert_close(layer.latent_weight.grad, dense.grad, msg="straight through: the versatile weight's")

    before, scale_before = binary_masks(model), layer.scale.detach().clone()
    with torch.no_grad():
        layer.latent_weight.sub_(0.5 * layer.latent_weight.grad)
    flipped = learner.after_step()
    assert flipped == count_flips(before, binary_masks(model)) > 0
    members = group_members(layer.primary_index, layer.secondary_index, layer.num_primary)
    latent = layer.latent_weight.detach().flatten(1)
    masks, primary, scale = project_onto_groups(latent, members, scale_before[members], search=False)
    expected = (scale.unsqueeze(-1) * masks * primary.unsqueeze(1)).flatten(0, 1)[members.flatten().argsort()]
    torch.testing.assert_close(layer.dense_weight().detach().flatten(1), expected)
    assert set(learner.state_dict()["projected"]["0"]) == {"latent_weight", "primary", "scale", "mask_proxy"}

    learner.settings.anneal = 0.0  # past the anneal point masks stay; primaries and scales still follow
    before, primary_before = binary_masks(model), layer.primary.detach().clone()
    with torch.no_grad():
        layer.latent_weight.add_(torch.randn_like(layer.latent_weight))
    assert learner.after_step() == 0 and count_flips(before, binary_masks(model)) == 0
    assert not torch.equal(layer.primary, primary_before)


def test_project_rule_starts_a_moved_layer_exactly_where_it_is() -> None:
    """A reconstructed or fine-tuned layer is no longer the teacher's projection: started from the teacher its
    weight would jump back; started from itself it stays put."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, bias=False))
    moved_weights = {}
    for from_layer in (False, True):
        model = torch.nn.Sequential(from_conv(teacher[0]))
        layer = model[0]
        with torch.no_grad():  # what a reconstruction does: other primaries and scales, same structure
            layer.primary.mul_(1.5).add_(0.1 * torch.randn_like(layer.primary))
            layer.scale.mul_(0.8)
        before = layer.dense_weight().detach().clone()
        MaskLearner(model, MaskSettings("project", latent_from_layer=from_layer), 10, 1, teacher)
        moved_weights[from_layer] = (layer.dense_weight().detach() - before).norm() / before.norm()
        if from_layer:
            torch.testing.assert_close(layer.latent_weight.detach(), before)
    assert moved_weights[True] < 1e-6 < 0.1 < moved_weights[False]


def test_finetune_from_a_reconstructed_file_starts_from_its_reconstruction(tmp_path: Path) -> None:
    from vconvert.convert.reconstruct import reconstruct

    source = converted_checkpoint(tmp_path / "m.vc.pt")
    checkpoint = load_checkpoint(source)
    torch.manual_seed(1)
    report = reconstruct(checkpoint.model, checkpoint.teacher, [torch.randn(8, 1, 32, 32)])
    checkpoint.metadata.reconstruction = report.record("noise")
    reconstructed = tmp_path / "rec.vc.pt"
    save(reconstructed, checkpoint.model, checkpoint.plan, checkpoint.base, checkpoint.teacher, checkpoint.metadata)
    start = {name: layer.dense_weight().detach() for name, layer in load_checkpoint(reconstructed).model.named_modules()
             if isinstance(layer, VersatileConv2d)}  # fmt: skip
    statistics = {name: buffer.clone() for name, buffer in load_checkpoint(reconstructed).model.named_buffers()
                  if "running_" in name}  # fmt: skip
    # the default --recalibrate-images: a reconstructed file keeps the BatchNorm statistics compress chose
    options = {**QUICK, "epochs": 1, "lr": 0.0, "bn_mode": "frozen", "masks": "project"}
    finetune(reconstructed, tmp_path / "ft.vc.pt", FinetuneConfig(**options))
    trained = load_checkpoint(tmp_path / "ft.vc.pt").model
    for name, weight in start.items():  # no step was taken: every layer is where the reconstruction left it
        torch.testing.assert_close(trained.get_submodule(name).dense_weight().detach(), weight, msg=name)
    for name, buffer in statistics.items():
        torch.testing.assert_close(trained.get_buffer(name), buffer, msg=name)
    finetune(source, tmp_path / "df.vc.pt", FinetuneConfig(**options))  # a data-free start is recalibrated
    recalibrated = load_checkpoint(tmp_path / "df.vc.pt").model
    assert any(not torch.equal(recalibrated.get_buffer(name), buffer) for name, buffer in statistics.items()
               if name.endswith("running_var"))  # fmt: skip


@pytest.mark.parametrize(("images", "batch", "steps"), [(128, 8, 16), (128, 32, 4), (128, 128, 1), (128, 256, 1),
                                                     (100, 64, 2), (1, 8, 1)])  # fmt: skip
def test_projection_interval_is_about_a_fixed_number_of_images(images: int, batch: int, steps: int) -> None:
    assert projection_interval(images, batch) == steps


def test_project_every_k_steps_projects_then_and_at_every_epoch_end() -> None:
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, bias=False))
    model = torch.nn.Sequential(from_conv(teacher[0]))
    layer = model[0]
    learner = MaskLearner(model, MaskSettings("project", anneal=1.0, every=3), total_steps=10, steps_per_epoch=5,
                          teacher=teacher)  # fmt: skip
    projected_at = []
    for step in range(1, 11):
        with torch.no_grad():
            layer.latent_weight.add_(0.3 * torch.randn_like(layer.latent_weight))
        before = layer.dense_weight().detach().clone()
        learner.after_step()
        if not torch.equal(before, layer.dense_weight().detach()):
            projected_at.append(step)
            projection = layer.dense_weight().detach().flatten(1)
            assert float((projection - layer.latent_weight.detach().flatten(1)).norm()) < float(
                (before.flatten(1) - layer.latent_weight.detach().flatten(1)).norm()
            ), "a projection moves the layer to the latent weight"
    assert projected_at == [3, 5, 6, 9, 10], "every 3rd step and the last step of each epoch"


def test_project_ramp_starts_from_the_dense_weight_and_reaches_the_projection() -> None:
    assert [latent_share(progress, 0.5) for progress in (0.0, 0.25, 0.5, 0.9)] == [1.0, 0.125, 0.0, 0.0]
    assert latent_share(0.0, 0.0) == 0.0
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, bias=False))
    model = torch.nn.Sequential(from_conv(teacher[0]))
    learner = MaskLearner(model, MaskSettings("project", ramp=0.5), 4, 1, teacher)
    images = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(model(images), teacher(images), msg="the run starts from the original weights")
    shares = []
    for _ in range(3):
        learner.after_step()
        shares.append(model[0].latent_share)
    assert shares == [0.125, 0.0, 0.0]
    projected = model[0].dense_weight().detach()
    materialised = materialise_weight(model[0].primary, model[0].primary_index, model[0].output_mask(),
                                      model[0].scale, model[0].channel_offset, 8)  # fmt: skip
    torch.testing.assert_close(projected, materialised.detach())


def test_finetune_on_digits_writes_last_best_and_metrics(tmp_path: Path) -> None:
    source = converted_checkpoint(tmp_path / "m.vc.pt")
    output = tmp_path / "ft.vc.pt"
    start: list[float] = []
    config = FinetuneConfig(masks="flip", **{**QUICK, "lr": 0.05})  # enough for random weights to beat chance
    history = finetune(source, output, config, on_start=lambda top1, _: start.append(top1))
    assert [entry.epoch for entry in history] == [1, 2]
    lines = (tmp_path / "ft.metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    best = load_checkpoint(tmp_path / "ft.best.vc.pt")
    last = load_checkpoint(output)
    assert last.metadata.finetune["complete"] and last.metadata.data["source"] == "digits"
    best_epoch = max(entry.val_top1 for entry in history)
    assert best_epoch > start[0]  # random weights: training beats the start, and the best file holds that epoch
    assert best.metadata.finetune["val_top1"] == best_epoch and best.metadata.finetune["epochs_done"] >= 1
    assert history[-1].train_loss < history[0].train_loss * 1.5
    # the default gradient clip never acts on a BatchNorm net (runs stay as they were before it existed)
    assert all(0 < entry.extra["grad_norm_max"] < FinetuneConfig().grad_clip for entry in history)
    original = load_checkpoint(source).model.state_dict()
    changed = [
        k for k, v in last.model.state_dict().items() if v.is_floating_point() and not torch.equal(v, original[k])
    ]
    assert any(name.endswith("primary") for name in changed), "primary filters must train"


def _pretrained_digits_checkpoint(path: Path) -> Path:
    """The shipped trained ResNet-20 on digits compressed with the defaults: a start worth keeping."""
    from sample_models.resnet_cifar import resnet20
    from vconvert import compress
    from vconvert.io.metadata import CheckpointMetadata
    from vconvert.io.untrusted import BaseSpec

    weights = Path(__file__).resolve().parents[2] / "sample_models" / "weights"
    record = json.loads((weights / "resnet20_digits.json").read_text())
    teacher = resnet20(**record["arch_kwargs"]).eval()
    teacher.load_state_dict(torch.load(weights / "resnet20_digits.pt", weights_only=True))
    torch.manual_seed(0)
    model, plan = compress(teacher, torch.randn(1, 1, 32, 32))
    base = BaseSpec(record["arch"], record["arch_kwargs"], None, str(weights / "resnet20_digits.pt"))
    preprocessing = {key: record["data"][key] for key in ("mean", "std", "input_size")}
    save(path, model, plan, base, teacher, CheckpointMetadata(input_shape=[1, 1, 32, 32], preprocessing=preprocessing))
    return path


def test_a_run_that_only_loses_accuracy_leaves_the_start_as_its_best_file(tmp_path: Path) -> None:
    source = _pretrained_digits_checkpoint(tmp_path / "r20.vc.pt")
    output = tmp_path / "ft.vc.pt"
    options = ["--data", "digits", "--epochs", "1", "--batch-size", "64", "--train-limit", "256", "--eval-limit", "96"]
    result = CliRunner().invoke(app, ["finetune", str(source), "-o", str(output), *options, "--lr", "1.0"])
    assert result.exit_code == 0, result.output + result.stderr
    best, last = load_checkpoint(tmp_path / "ft.best.vc.pt"), load_checkpoint(output)
    start = best.metadata.finetune["val_top1"]
    assert f"start: val top-1 {start:.2f}%" in result.output and "holds the start" in result.output
    assert best.metadata.finetune["epochs_done"] == 0 and last.metadata.finetune["val_top1"] < start - 50
    assert last.metadata.finetune_state["start_top1"] == start  # a resumed run still compares against it
    scores = {}  # the best file is the working start, the last one the wrecked model
    for name in ("ft.best.vc.pt", "ft.vc.pt"):
        evaluated = CliRunner().invoke(app, ["evaluate", str(tmp_path / name), "--data", "digits", "--json"])
        assert evaluated.exit_code == 0, evaluated.output + evaluated.stderr
        scores[name] = json.loads(evaluated.stdout)["top1"]
    assert scores["ft.best.vc.pt"] > 90 > 50 > scores["ft.vc.pt"]


def _run_cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vconvert", "finetune", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


FINETUNE_ARGS = ["--data", "digits", "--epochs", "4", "--batch-size", "64", "--train-limit", "512",
                 "--eval-limit", "64", "--workers", "0", "--recalibrate-images", "128", "--masks", "flip"]  # fmt: skip


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path: Path) -> None:
    source = converted_checkpoint(tmp_path / "m.vc.pt")
    straight = tmp_path / "straight.vc.pt"
    completed = _run_cli(str(source), "-o", str(straight), *FINETUNE_ARGS)
    assert completed.wait(timeout=600) == 0, completed.stderr.read().decode()

    killed = tmp_path / "killed.vc.pt"
    process = _run_cli(str(source), "-o", str(killed), *FINETUNE_ARGS)
    metrics = tmp_path / "killed.metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    interrupted = load_checkpoint(killed)
    assert not interrupted.metadata.finetune["complete"], "the kill must land before the run ends"

    resumed = _run_cli(str(source), "-o", str(killed), *FINETUNE_ARGS, "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()
    expected, actual = load_checkpoint(straight).model.state_dict(), load_checkpoint(killed).model.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=1e-6, msg=name)
    straight_lines = [json.loads(line) for line in (tmp_path / "straight.metrics.jsonl").read_text().splitlines()]
    resumed_lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [e["val_top1"] for e in resumed_lines] == [e["val_top1"] for e in straight_lines]


def test_project_run_writes_plain_checkpoints_changes_masks_and_resumes_exactly(tmp_path: Path) -> None:
    source = converted_checkpoint(tmp_path / "m.vc.pt")
    config = FinetuneConfig(masks="project", project_ramp=0.75, **QUICK)
    straight = tmp_path / "straight.vc.pt"
    history = finetune(source, straight, config)
    assert sum(entry.mask_flips for entry in history) > 0
    start, written = load_checkpoint(source).model, load_checkpoint(straight)
    assert written.model.state_dict().keys() == start.state_dict().keys(), "no latent weight in the checkpoint"
    assert count_flips(binary_masks(start), binary_masks(written.model)) > 0
    cut = tmp_path / "cut.vc.pt"
    finetune_cut_and_resumed(source, cut, config)
    resumed = load_checkpoint(cut).model.state_dict()
    for name, tensor in written.model.state_dict().items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_project_with_ema_averages_the_versatile_weights_and_resumes_exactly(tmp_path: Path) -> None:
    source = converted_checkpoint(tmp_path / "m.vc.pt")
    config = FinetuneConfig(masks="project", project_ramp=0.75, ema=0.9, **QUICK)
    straight, cut = tmp_path / "straight.vc.pt", tmp_path / "cut.vc.pt"
    finetune(source, straight, config)
    written = load_checkpoint(straight)
    assert not any(name.endswith("latent_weight") for name in written.metadata.finetune_state["ema"]["weights"])
    finetune_cut_and_resumed(source, cut, config)
    for name, tensor in written.model.state_dict().items():
        torch.testing.assert_close(load_checkpoint(cut).model.state_dict()[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    source = converted_checkpoint(tmp_path / "m.vc.pt")
    output = tmp_path / "ft.vc.pt"
    finetune(source, output, FinetuneConfig(**{**QUICK, "epochs": 1}))
    good, good_best = output.read_bytes(), (tmp_path / "ft.best.vc.pt").read_bytes()
    broken = load_checkpoint(source)
    with torch.no_grad():
        broken.model.fc.weight.fill_(3e38)  # finite (a NaN weight is refused on loading), but the logits overflow
    save(tmp_path / "broken.vc.pt", broken.model, broken.plan, broken.base, broken.teacher, broken.metadata)
    with pytest.raises(CheckFailedError, match=r"loss became (nan|inf)") as stopped:
        finetune(tmp_path / "broken.vc.pt", output, FinetuneConfig(**{**QUICK, "recalibrate_images": 0}))
    assert output.read_bytes() == good and (tmp_path / "ft.best.vc.pt").read_bytes() == good_best  # start held
    assert "before its first epoch ended, so no epoch was written; nothing on disk changed" in str(stopped.value)
    assert "with a lower `lr` (e.g. 0.001, a tenth of 0.01)" in str(stopped.value)


def _no_batchnorm_net(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> Path:
    """A user's net without BatchNorm or ReLU (two convs, mean pool, a linear layer: a deep linear net, whose
    gradients grow with its weights), compressed and saved as a .vc.pt."""
    from vconvert import compress
    from vconvert.io.metadata import CheckpointMetadata
    from vconvert.io.untrusted import BaseSpec

    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / name / "nets.py").write_text(
        "from torch import nn\n"
        "class LinearNet(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)\n"
        "        self.fc = nn.Linear(16, 2)\n"
        "    def forward(self, x):\n"
        "        return self.fc(self.b(self.a(x)).mean((2, 3)))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    teacher = importlib.import_module(f"{name}.nets").LinearNet().eval()
    model, plan = compress(teacher, torch.randn(2, 3, 32, 32))
    base = BaseSpec(arch=f"{name}.nets:LinearNet", arch_kwargs={}, pickled=None, source="test")
    save(tmp_path / "nobn.vc.pt", model, plan, base, teacher, CheckpointMetadata(input_shape=[1, 3, 32, 32]))
    return tmp_path / "nobn.vc.pt"


def test_gradient_clipping_keeps_a_net_without_batchnorm_finite_where_it_diverged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _no_batchnorm_net(tmp_path, monkeypatch, "nobn_clip_user")
    data = noise_image_folder(tmp_path / "data")  # 6 training images: 3 steps of 2 per epoch
    options = {"data": str(data), "epochs": 4, "batch_size": 2, "lr": 10.0, "recalibrate_images": 0, "workers": 0}
    output = tmp_path / "off.vc.pt"
    with pytest.raises(CheckFailedError, match=r"(loss|weights) became (nan|inf|non-finite) at epoch [2-4]") as stopped:
        finetune(source, output, FinetuneConfig(**options, grad_clip=0.0), trust=True)
    message = str(stopped.value)
    written = json.loads((tmp_path / "off.metrics.jsonl").read_text().splitlines()[-1])["epoch"]
    assert f"epoch{'s 1-' if written > 1 else ' '}{written} {'are' if written > 1 else 'is'} in {output}" in message
    assert f"(it holds epoch {written}, the last good one)" in message and "e.g. 1, a tenth of 10" in message
    assert load_checkpoint(output, trust=True).metadata.finetune["epochs_done"] == written

    history = finetune(source, tmp_path / "clipped.vc.pt", FinetuneConfig(**options, grad_clip=1.0), trust=True)
    assert [entry.epoch for entry in history] == [1, 2, 3, 4]
    assert all(math.isfinite(entry.train_loss) for entry in history)
    assert max(entry.extra["grad_norm_max"] for entry in history) > 1.0  # the clip acted (norms before it)
    weights = load_checkpoint(tmp_path / "clipped.vc.pt", trust=True).model.state_dict().values()
    assert all(bool(torch.isfinite(w).all()) for w in weights if w.is_floating_point())


def test_non_finite_weights_say_which_epochs_are_on_disk(tmp_path: Path) -> None:
    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.weight[0, 0] = float("inf")
    last = tmp_path / "ft.vc.pt"
    with pytest.raises(CheckFailedError) as first:
        _check_finite_weights(net, 0, last, 0.01)
    assert str(first.value).startswith("The weights became non-finite at epoch 1 (weight); the run stopped before")
    assert "no epoch was written; nothing on disk changed" in str(first.value)
    with pytest.raises(CheckFailedError) as later:
        _check_finite_weights(net, 3, last, 0.01)
    assert f"epochs 1-3 are in {last} (it holds epoch 3, the last good one)" in str(later.value)
    assert "lower `lr` (e.g. 0.001, a tenth of 0.01)" in str(later.value)


def test_grad_clip_must_be_a_norm() -> None:
    with pytest.raises(BadInputError, match="`grad_clip` must be a gradient norm"):
        FinetuneConfig(grad_clip=-1.0).validate()
    with pytest.raises(BadInputError, match="`grad_clip`"):
        FinetuneConfig(grad_clip=float("nan")).validate()


def _image_folder(root: Path, classes: int, per_class: int, broken: int = 0, empty: str | None = None) -> Path:
    for split in ("train", "val"):
        for label in range(classes):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for index in range(per_class):
                color = (label * 25 % 255, index * 7 % 255, 128)
                Image.new("RGB", (32, 32), color).save(folder / f"{index}.png")
        for index in range(broken):
            (root / split / "class0" / f"broken{index}.png").write_bytes(b"not an image")
        if empty:
            (root / split / empty).mkdir()
    return root


def invoke(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def test_image_folder_with_unreadable_files_skips_them_with_a_count(tmp_path: Path) -> None:
    data = _image_folder(tmp_path / "data", classes=10, per_class=4, broken=3)
    source = converted_checkpoint(tmp_path / "m.vc.pt", in_channels=3)
    history = finetune(
        source, tmp_path / "ft.vc.pt",
        FinetuneConfig(data=str(data), epochs=1, batch_size=8, workers=0, recalibrate_images=16),
    )  # fmt: skip
    assert history[0].extra["skipped_images"] == 6  # 3 in train, 3 in val


BAD_OPTIONS = {
    "bad-mask-rule": ["--masks", "random"],
    "bad-loader": ["--loader", "gpu"],
    "bad-precision": ["--precision", "fp16"],
    "ema-of-one": ["--ema", "1"],
    "negative-feature-distill": ["--feature-distill", "-1"],
    "project-ramp-above-one": ["--masks", "project", "--project-ramp", "1.5"],
}


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("missing-folder", "does not exist"),
        ("no-train-split", "no train/"),
        ("empty-class-folder", "hold no images"),
        ("class-count-mismatch", "the model scores 10"),
        ("bad-mask-rule", "--masks must be one of"),
        ("bad-loader", "--loader must be auto, workers or device"),
        ("bad-precision", "--precision must be one of auto, fp32, bf16"),
        ("ema-of-one", "--ema must be 0 (off) or a decay below 1"),
        ("negative-feature-distill", "--feature-distill must be ≥ 0"),
        ("project-ramp-above-one", "--project-ramp must be a fraction of the run in [0, 1]"),
    ],
    ids=lambda value: value if " " not in value else "",
)
def test_finetune_bad_data_is_one_sentence_and_exit_2(case: str, fragment: str, tmp_path: Path) -> None:
    source = converted_checkpoint(tmp_path / "m.vc.pt", in_channels=3)
    output = tmp_path / "ft.vc.pt"
    data, extra = tmp_path / "data", []
    if case == "missing-folder":
        data = tmp_path / "nowhere"
    elif case == "no-train-split":
        data.mkdir()
    elif case == "empty-class-folder":
        _image_folder(data, classes=10, per_class=2, empty="zzz_empty")
    elif case == "class-count-mismatch":
        _image_folder(data, classes=3, per_class=2)
    elif case in BAD_OPTIONS:  # good data, one bad option
        _image_folder(data, classes=10, per_class=2)
        extra = BAD_OPTIONS[case]
    result = invoke("finetune", source, "-o", output, "--data", data, "--workers", "0", *extra)
    assert result.exit_code == 2, result.output
    message = error_message(result)
    assert message.startswith("error:") and "\n" not in message and fragment in message, message
    assert not output.exists()


def test_bf16_on_a_cpu_without_native_bfloat16_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("vconvert.train.hardware.cpu_has_native_bf16", lambda: False)
    source = converted_checkpoint(tmp_path / "m.vc.pt")
    output = tmp_path / "ft.vc.pt"
    result = invoke("finetune", source, "-o", output, "--workers", "0", "--precision", "bf16")
    assert result.exit_code == 2, result.output
    assert "needs a CUDA device or a CPU with native bfloat16" in result.stderr and not output.exists()


@pytest.mark.parametrize(
    ("precision", "device", "native", "expected"),
    [("auto", "cpu", True, False), ("auto", "cuda", False, True), ("fp32", "cuda", True, False),
     ("bf16", "cpu", True, True), ("bf16", "cuda", False, True)],
    ids=["auto-cpu", "auto-cuda", "fp32-cuda", "bf16-cpu", "bf16-cuda"],
)  # fmt: skip
def test_precision_choice(precision: str, device: str, native: bool, expected: bool, monkeypatch) -> None:
    monkeypatch.setattr("vconvert.train.hardware.cpu_has_native_bf16", lambda: native)
    assert uses_bf16(precision, torch.device(device)) is expected


def test_bf16_run_on_this_cpu_trains_and_writes_fp32_contiguous_weights(tmp_path: Path) -> None:
    source = converted_checkpoint(tmp_path / "m.vc.pt")
    output = tmp_path / "ft.vc.pt"
    config = FinetuneConfig(precision="bf16", **QUICK)
    if not cpu_has_native_bf16():  # CI machines may lack it: then the refusal is what must hold
        with pytest.raises(BadInputError, match="native bfloat16"):
            finetune(source, output, config)
        return
    history = finetune(source, output, config)
    assert all(math.isfinite(entry.train_loss) for entry in history)
    original = load_checkpoint(source).model.state_dict()
    for name, tensor in load_checkpoint(output).model.state_dict().items():
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float32 and tensor.is_contiguous(), name
    assert not torch.equal(load_checkpoint(output).model.state_dict()["layer1.0.conv1.primary"],
                           original["layer1.0.conv1.primary"])  # fmt: skip


def test_feature_distill_adds_its_term_to_the_training_loss(tmp_path: Path) -> None:
    source = converted_checkpoint(tmp_path / "m.vc.pt")
    plain = finetune(source, tmp_path / "plain.vc.pt", FinetuneConfig(**QUICK))
    hinted = finetune(source, tmp_path / "hinted.vc.pt", FinetuneConfig(feature_weight=1.0, **QUICK))
    assert all(math.isfinite(entry.train_loss) for entry in hinted)
    assert hinted[0].train_loss > plain[0].train_loss  # the same first step, plus a positive term


def test_ema_run_writes_the_average_and_resumes_to_the_same_weights(tmp_path: Path) -> None:
    source = converted_checkpoint(tmp_path / "m.vc.pt")
    config = FinetuneConfig(masks="flip", ema=0.9, **QUICK)
    straight, plain = tmp_path / "straight.vc.pt", tmp_path / "plain.vc.pt"
    finetune(source, straight, config)
    finetune(source, plain, FinetuneConfig(masks="flip", **QUICK))
    written = load_checkpoint(straight)
    state = written.metadata.finetune_state
    live, average = state["live_weights"], written.model.state_dict()
    assert not torch.equal(live["layer1.0.conv1.primary"], average["layer1.0.conv1.primary"])
    # the live weights are those of the same run without --ema (the average never feeds back)
    for name, tensor in load_checkpoint(plain).metadata.finetune_state["mask_proxies"].items():
        assert torch.equal(state["mask_proxies"][name], tensor), name
    torch.testing.assert_close(live["layer1.0.conv1.primary"],
                               load_checkpoint(plain).model.state_dict()["layer1.0.conv1.primary"])  # fmt: skip
    cut = tmp_path / "cut.vc.pt"
    finetune_cut_and_resumed(source, cut, config)
    for name, tensor in average.items():
        torch.testing.assert_close(load_checkpoint(cut).model.state_dict()[name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("masks", "port", "extra"),
    [("flip", "29517", []), ("project", "29518", []), ("project", "29519", ["--weight-bits", "4"])],
    ids=["flip", "project", "project-4-bit"],
)
def test_torchrun_two_cpu_processes_match_a_single_process(masks: str, port: str, extra: list, tmp_path: Path) -> None:
    source = converted_checkpoint(tmp_path / "m.vc.pt")
    args = ["--data", "digits", "--epochs", "1", "--batch-size", "64", "--train-limit", "256", "--eval-limit", "64",
            "--workers", "0", "--recalibrate-images", "128", "--bn-mode", "frozen", "--masks", masks,
            *extra]  # fmt: skip
    single = tmp_path / "single.vc.pt"
    assert _run_cli(str(source), "-o", str(single), *args).wait(timeout=600) == 0
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun ships with torch"
    double = tmp_path / "ddp.vc.pt"
    completed = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", port, "-m", "vconvert", "finetune", str(source),
         "-o", str(double), *args],
        capture_output=True, text=True, timeout=600, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    expected, actual = load_checkpoint(single).model.state_dict(), load_checkpoint(double).model.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_finetune_to_a_pipe_prints_progress_lines_as_it_goes(tmp_path: Path) -> None:
    """Not a terminal (a log file, CI): a line every tenth of an epoch on stderr and one per epoch on stdout,
    each written when it happens, not at exit."""
    source = converted_checkpoint(tmp_path / "m.vc.pt")
    output = tmp_path / "ft.vc.pt"
    log = tmp_path / "log.txt"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "vconvert", "finetune", source, "-o", output, "--data", "digits", "--epochs", "2",
             "--batch-size", "32", "--train-limit", "320", "--eval-limit", "64", "--workers", "0",
             "--recalibrate-images", "64", "--masks", "frozen"],
            stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
        seen_before_exit = ""
        while process.poll() is None:
            seen_before_exit = log.read_text()
            if "epoch 1/2:" in seen_before_exit:
                break
            time.sleep(0.2)
        assert process.wait(timeout=300) == 0, log.read_text()
    assert "epoch 1/2 step 1/10" in seen_before_exit and "epoch 1/2:" in seen_before_exit, seen_before_exit
    text = log.read_text()
    assert "epoch 2/2 step 10/10" in text and "epoch 2/2:" in text and "epoch 0/" not in text
