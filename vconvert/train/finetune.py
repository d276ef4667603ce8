"""Fine-tuning a converted model with its original network as teacher.

Loss = (1-w)·CE + w·T²·KL(student/T ‖ teacher/T) + λ·L_ortho (masks that learn: the penalty is a
function of the masks alone, so it has no gradient when they are frozen).
SGD with Nesterov momentum, cosine schedule with linear warm-up, BatchNorm recalibration before the first
epoch (of a data-free start only), mask updates by one of the strategies of ``vconvert.train.masks``. Each epoch writes
the last checkpoint (with everything needed to resume exactly) and the best one, atomically.
Under ``torchrun`` the student runs in DistributedDataParallel (NCCL on GPUs, gloo on CPU); rank 0
alone logs and writes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from vconvert.convert.calibrate import recalibrate_batchnorm
from vconvert.data.datasets import DataSpec, batch_loader, choose_data, limited, log, open_split
from vconvert.data.device import DeviceImageSet
from vconvert.errors import BadInputError, CheckFailedError
from vconvert.evaluate import evaluate_batches, evaluate_model
from vconvert.io.checkpoint import Checkpoint, load_checkpoint
from vconvert.io.files import check_writable
from vconvert.io.metadata import CheckpointMetadata
from vconvert.nn.versatile import orthogonality_loss, set_weight_bits_, versatile_layers, weight_quantization
from vconvert.train.config import EpochMetrics, FinetuneConfig, projection_interval
from vconvert.train.distill import FeatureDistillation, distillation_loss
from vconvert.train.distributed import Distributed, _all_reduce_sum, setup_distributed
from vconvert.train.ema import WeightAverage
from vconvert.train.hardware import uses_bf16, uses_channels_last, uses_device_loader
from vconvert.train.inputs import _check_classes, open_data
from vconvert.train.masks import (
    MaskLearner,
    MaskSettings,
    binary_masks,
    count_flips,
    drop_latent_weights_,
)
from vconvert.train.resume import (
    EpochFiles,
    _average_state,
    _check_resume_state,
    _output_paths,
    _rng_state,
    check_outputs_spare_input,
    restore_training_state,
    resumed_config,
)
from vconvert.validate import check_like, check_mapping


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights and primary filters; none on BN, biases, scales, masks."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or name.endswith("mask_proxy"):
            continue
        # one value per output channel kept in a conv's shape (a quantizer's scale, N x 1 x 1 x 1) is a scale
        is_weight = parameter.ndim > 1 and parameter[0].numel() > 1
        (decay if is_weight else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


SYNC_EVERY = 50


def stopped_message(what: str, epoch: int, last_path: Path, lr: float) -> str:
    """The sentence a run that stopped at (0-based) ``epoch`` ends with: ``what`` happened, which epochs are on
    disk (none before the first epoch ends: nothing on disk changed) and what to try."""
    if epoch == 0:
        written = "the run stopped before its first epoch ended, so no epoch was written; nothing on disk changed"
    else:
        epochs = "epoch 1 is" if epoch == 1 else f"epochs 1-{epoch} are"
        written = f"the run stopped; {epochs} in {last_path} (it holds epoch {epoch}, the last good one)"
    return f"{what}; {written}. Run it again with a lower `lr` (e.g. {lr / 10:g}, a tenth of {lr:g}) or check the data."


def _check_finite(loss, loss_sum, env: Distributed, epoch: int, step: int, last_path: Path, lr: float) -> float:
    """The loss (mean over ranks); raises CheckFailedError when it, or any loss since the last check,
    is NaN or infinite."""
    loss_value, since_last = _all_reduce_sum([float(loss.detach()), float(loss_sum)], env)
    loss_value /= env.world
    if not (math.isfinite(loss_value) and math.isfinite(since_last)):
        bad = loss_value if not math.isfinite(loss_value) else since_last
        what = f"The loss became {bad} at epoch {epoch + 1}, step {step + 1}"
        raise CheckFailedError(stopped_message(what, epoch, last_path, lr))
    return loss_value


def _gradient_norm(optimiser: torch.optim.Optimizer, clip: float) -> torch.Tensor:
    """The L2 norm of all gradients the optimiser steps with (on their device, no host sync), after scaling
    them down to ``clip`` where it is above (``clip`` 0: measured only)."""
    parameters = [p for group in optimiser.param_groups for p in group["params"] if p.grad is not None]
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(parameters, clip)
    return torch.nn.utils.get_total_norm([p.grad for p in parameters])


def _open_source(
    checkpoint_path: str | Path,
    last_path: Path,
    config: FinetuneConfig,
    trust: bool,
    resume: bool,
    typed: Collection[str] | None,
    world: int,
) -> tuple[Checkpoint, FinetuneConfig, dict | None, CheckpointMetadata, str]:
    """(the checkpoint trained from, the config with its data resolved (resumed: the recorded options where
    ``typed`` does not name them), the resume state or None, the metadata every file of the run carries forward,
    where the data came from)."""
    if not resume:
        source = load_checkpoint(checkpoint_path, trust=trust)
        data, data_from = choose_data(
            config.data, source.metadata.recorded_data(), checkpoint_path, source.metadata.missing_data()
        )
        return source, replace(config, data=data), None, source.metadata.carried(), data_from
    if not last_path.exists():
        raise BadInputError(f"`resume`: {last_path} does not exist yet; start the run without `resume`.")
    source = load_checkpoint(last_path, trust=trust)
    data, data_from = choose_data(
        config.data, source.metadata.recorded_data(), last_path, source.metadata.missing_data()
    )
    config = replace(config, data=data)
    typed = None if typed is None else {*typed, "data"}  # the data is resolved like a typed `data`
    state = source.metadata.finetune_state
    if state is None:
        raise BadInputError(f"`resume`: {last_path} holds no fine-tuning state to resume from.")
    config = resumed_config(check_mapping(state, "`resume` state").get("config"), config, typed, last_path)
    config.validate(world)
    state = _check_resume_state(state, config, source, last_path)
    return source, config, state, state["base_metadata"], data_from


def _optimisation(
    student: nn.Module, teacher: nn.Module, config: FinetuneConfig, steps_per_epoch: int, moved: bool
) -> tuple[MaskLearner, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The mask rule, SGD (Nesterov) over the weights and the rule's own parameters, and the warm-up
    cosine schedule. ``moved``: the layers are no longer their data-free fit of the teacher (reconstructed or
    fine-tuned), so the ``project`` rule starts its latent weights from them."""
    total_steps = steps_per_epoch * config.epochs
    every = projection_interval(config.project_every, config.batch_size)
    settings = MaskSettings(config.masks, config.mask_lr, config.flip_rate, config.mask_anneal,
                            ramp=config.project_ramp, every=every, latent_from_layer=moved)  # fmt: skip
    masks = MaskLearner(student, settings, total_steps, steps_per_epoch, teacher)
    optimiser = torch.optim.SGD(
        parameter_groups(student, config.weight_decay), lr=config.lr, momentum=config.momentum, nesterov=True
    )
    if masks.optimiser_parameters():
        optimiser.add_param_group(
            {"params": masks.optimiser_parameters(), "lr": config.mask_lr, "weight_decay": 0.0, "momentum": 0.0}
        )
    warmup = max(1, round(config.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: warmup_cosine(step, warmup, total_steps))
    return masks, optimiser, scheduler


def _quantize_primaries(student: nn.Module, config: FinetuneConfig, announce: bool) -> bool:
    """Fake-quantise the primary filters as ``config`` asks, unless they already are (a run resumed, or a file
    fine-tuned at these bits); returns whether the quantizers are new. Without ``weight_bits`` a quantized
    source stays quantized (it was trained for it)."""
    current = weight_quantization(student)
    if config.weight_bits is None:
        if current is not None and announce:
            widths = f"{current['bits']}-bit" if "layers" not in current else "at each layer's planned width"
            log.info(f"the primary filters stay {widths} ({current['quantizer']}) as the file records")
        return False
    wanted = {"bits": config.weight_bits, "quantizer": config.weight_quantizer}
    if current == wanted:
        return False
    set_weight_bits_(student, config.weight_bits, config.weight_quantizer)
    return True


def _recalibrate(student: nn.Module, config: FinetuneConfig, spec: DataSpec, device: torch.device) -> None:
    """BatchNorm statistics re-estimated on training images (unaugmented) before the first epoch."""
    images = open_split(config.data, True, augment=False, input_size=spec.input_size, channels=spec.channels,
                        mean=spec.mean, std=spec.std)[0]  # fmt: skip
    calibration = limited(images, config.recalibrate_images, config.seed)
    batches = (batch.to(device) for batch, _ in batch_loader(calibration, 128, config.workers))
    recalibrate_batchnorm(student, batches, max_images=config.recalibrate_images)


class _Batches:
    """Training and evaluation batches: from DataLoader workers, or (``--loader device``/``auto`` on small
    images) from whole splits kept on the device and augmented there."""

    def __init__(self, train_set, eval_set, spec: DataSpec, config: FinetuneConfig, env: Distributed,
                 sampler: DistributedSampler, per_rank: int, steps: int, channels_last: bool) -> None:  # fmt: skip
        self.train_set, self.eval_set, self.config, self.env = train_set, eval_set, config, env
        self.sampler, self.per_rank, self.steps = sampler, per_rank, steps
        self.on_device = uses_device_loader(config, spec, env.device, len(train_set) + len(eval_set))
        if self.on_device:
            options = {"input_size": spec.input_size, "channels": spec.channels, "mean": spec.mean, "std": spec.std,
                       "seed": config.seed, "device": env.device, "channels_last": channels_last}  # fmt: skip
            self.train_device = DeviceImageSet.from_dataset(train_set, augment=config.augment, **options)
            self.eval_device = DeviceImageSet.from_dataset(eval_set, augment=False, **options)

    def train(self, epoch: int):
        self.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)
        if self.on_device:
            self.train_device.set_epoch(epoch)
            return self.train_device.batches(list(self.sampler)[: self.steps * self.per_rank], self.per_rank)
        return batch_loader(self.train_set, self.per_rank, self.config.workers, self.sampler)

    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        """(top-1 %, top-5 %) of ``model`` on the validation split."""
        if self.on_device:
            batches = self.eval_device.batches(range(len(self.eval_device)), 256)
            top1, top5, _ = evaluate_batches(model, batches, self.env.device)
        else:
            top1, top5, _ = evaluate_model(model, self.eval_set, self.env.device, workers=self.config.workers)
        return top1, top5


@dataclass
class _Run:
    """What one epoch of training uses."""

    config: FinetuneConfig
    env: Distributed
    student: nn.Module
    teacher: nn.Module
    model: nn.Module  # the student, or its DistributedDataParallel wrapper
    masks: MaskLearner
    optimiser: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: _Batches
    average: WeightAverage | None
    features: FeatureDistillation | None
    use_bf16: bool
    channels_last: bool
    last_path: Path
    gradient_norms: list[float] = field(default_factory=list)  # per epoch, the largest before clipping


def _loss(run: _Run, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(training loss, student logits): cross-entropy, distillation from the teacher's logits and features,
    and the orthogonality penalty while masks learn."""
    config = run.config
    with torch.autocast(run.env.device.type, dtype=torch.bfloat16, enabled=run.use_bf16):
        logits = run.model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
        if config.distill or run.features is not None:
            with torch.no_grad():
                teacher_logits = run.teacher(images)
        if config.distill:
            kd = distillation_loss(logits.float(), teacher_logits.float(), config.temperature)
            loss = (1 - config.distill_weight) * loss + config.distill_weight * kd
        if run.features is not None:
            loss = loss + config.feature_weight * run.features.loss()
        if run.masks.learns and config.ortho_weight > 0:
            loss = loss + config.ortho_weight * orthogonality_loss(run.student)
    return loss, logits


def _train_epoch(run: _Run, epoch: int, progress: Callable[[int, int, dict], None] | None) -> tuple[list[float], int]:
    """One epoch of steps: ([loss·n, correct, n] summed over ranks, flips the mask rule made)."""
    env, steps = run.env, run.batches.steps
    run.model.train()
    if run.config.bn_mode == "frozen":
        for module in run.student.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)  # Σ loss·n since the last check
    correct = torch.zeros((), dtype=torch.long, device=env.device)
    sums = [0.0, 0.0, 0.0]  # loss·n, correct, n
    flips = 0
    norm_max = torch.zeros((), device=env.device)  # the largest gradient norm of the epoch (before clipping)
    loss_value = float("nan")  # the last loss read back from the device (shown by the progress bar)
    for step, (images, labels) in enumerate(run.batches.train(epoch)):
        images, labels = images.to(env.device, non_blocking=True), labels.to(env.device, non_blocking=True)
        if run.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        run.masks.before_step()
        loss, logits = _loss(run, images, labels)
        loss_sum += loss.detach().double() * len(labels)
        correct += (logits.detach().argmax(dim=1) == labels).sum()
        sums[2] += len(labels)
        # a host sync per step would stall a GPU; a NaN persists, so checking every few steps suffices
        if env.device.type == "cpu" or (step + 1) % SYNC_EVERY == 0 or step + 1 == steps:
            loss_value = _check_finite(loss, loss_sum, env, epoch, step, run.last_path, run.config.lr)
            sums[0] += float(loss_sum)
            sums[1] += int(correct)
            loss_sum.zero_()
            correct.zero_()
        run.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        norm_max = torch.maximum(norm_max, _gradient_norm(run.optimiser, run.config.grad_clip).detach().float())
        run.optimiser.step()
        run.scheduler.step()
        flips += run.masks.after_step()
        if run.average is not None:
            run.average.update(run.student)
        if progress and env.main:
            progress(step + 1, steps, {"epoch": epoch + 1, "epochs": run.config.epochs, "loss": loss_value})
    run.gradient_norms.append(float(norm_max))
    return _all_reduce_sum(sums, env), flips


def _check_finite_weights(model: nn.Module, epoch: int, last_path: Path, lr: float) -> None:
    """Refuse to write weights that overflowed (a loss can stay finite while a scale reaches inf)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            what = f"The weights became non-finite at epoch {epoch + 1} ({name})"
            raise CheckFailedError(stopped_message(what, epoch, last_path, lr))


def finetune(
    checkpoint_path: str | Path,
    output: str | Path,
    config: FinetuneConfig,
    *,
    trust: bool = False,
    resume: bool = False,
    typed_options: Collection[str] | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
    on_start: Callable[[float, float], None] | None = None,
    tensorboard: str | Path | None = None,
) -> list[EpochMetrics]:
    """Fine-tune the converted model of ``checkpoint_path`` and write ``output`` (last epoch, with
    resume state), ``<stem>.best.vc.pt`` (best validation top-1) and ``<stem>.metrics.jsonl``.

    ``progress(step, steps, info)`` is called during each epoch, ``on_epoch`` after it (rank 0 only).
    The start is validated before the first step and is the best file until an epoch beats it, so
    ``<stem>.best.vc.pt`` is never below the model the run started from on the validation images (it is written
    with the first epoch's files: nothing is written before an epoch ends);
    ``on_start(top1, top5)`` (rank 0 only) receives that validation (the recorded one when resuming).
    With ``resume`` the run continues from ``output``'s last completed epoch and ends with the same
    weights as an uninterrupted run; it takes the options the run recorded, except those named in
    ``typed_options`` (None: all of ``config``), which must equal the recorded ones.
    """
    env = setup_distributed()
    last_path, best_path, metrics_path = _output_paths(Path(output))
    check_outputs_spare_input(checkpoint_path, (last_path, best_path, metrics_path), resume)
    for path in (last_path, best_path, metrics_path):
        check_writable(path)
    config.validate(env.world)
    uses_bf16(config.precision, env.device)  # refuse an impossible precision before any work (checked again below)
    source, config, resume_state, base_metadata, data_from = _open_source(
        checkpoint_path, last_path, config, trust, resume, typed_options, env.world
    )
    use_bf16 = uses_bf16(config.precision, env.device)

    torch.manual_seed(config.seed)
    file = last_path if resume else checkpoint_path
    train_set, eval_set, spec, skipped = open_data(config, source, file, data_from, announce=env.main)
    student, teacher = source.model.to(env.device), source.teacher.to(env.device).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    _check_classes(student, train_set, spec, env.device)

    per_rank = config.batch_size // env.world
    sampler = DistributedSampler(
        train_set, num_replicas=env.world, rank=env.rank, shuffle=True, seed=config.seed, drop_last=True
    )
    steps_per_epoch = len(sampler) // per_rank
    if steps_per_epoch == 0:
        raise BadInputError(
            f"The training split has {len(train_set)} images, fewer than one batch of {config.batch_size}; "
            "lower `batch_size`."
        )
    quantized_now = _quantize_primaries(student, config, env.main)
    moved = source.finetuned or source.metadata.reconstruction is not None
    masks, optimiser, scheduler = _optimisation(student, teacher, config, steps_per_epoch, moved)
    if quantized_now:  # the project rule has just replaced the primaries: learned steps start from those
        for _, layer in versatile_layers(student):
            layer.reset_primary_steps()
    history: list[EpochMetrics] = []
    best_top1, start_epoch = -1.0, 0
    if resume_state is not None:
        history, best_top1, start_epoch = restore_training_state(
            resume_state, last_path, student, masks, optimiser, scheduler
        )
    elif config.recalibrate_images > 0 and not moved:  # a reconstructed or fine-tuned file keeps its statistics
        _recalibrate(student, config, spec, env.device)

    channels_last = uses_channels_last(env.device, spec)
    batches = _Batches(train_set, eval_set, spec, config, env, sampler, per_rank, steps_per_epoch, channels_last)
    if channels_last:
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    average = WeightAverage(student, config.ema) if config.ema else None
    if average is not None:
        drop_latent_weights_(average.model)  # the average is of the versatile weights the forward uses
        if resume_state is not None:
            check_like(average.state_dict(), resume_state["ema"], f"`resume`: {last_path}'s fine-tuning state ema")
            average.load_state_dict(resume_state["ema"])
    evaluated = average.model if average is not None else student  # what is validated and written
    # hooks after the average's deepcopy, which would otherwise carry them
    features = FeatureDistillation(student, teacher) if config.feature_weight > 0 else None
    model: nn.Module = student
    if env.world > 1:
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[env.device.index] if env.device.type == "cuda" else None
        )
    run = _Run(config, env, student, teacher, model, masks, optimiser, scheduler, batches, average, features,
               use_bf16, channels_last, last_path)  # fmt: skip
    writer = _tensorboard(tensorboard) if tensorboard and env.main else None
    files = EpochFiles(last_path, best_path, metrics_path, source, spec, config, base_metadata)

    if resume_state is None:
        with torch.random.fork_rng(devices=[]):  # the training's random stream stays what it was without this
            start_top1, start_top5 = batches.evaluate(evaluated)
        best_top1 = start_top1
        if env.main:
            files.keep_start(evaluated, start_top1, start_top5)
    else:
        start_top1, start_top5 = resume_state.get("start_top1", math.nan), resume_state.get("start_top5", math.nan)
        files.start = (start_top1, start_top5)
    if env.main and on_start:
        on_start(start_top1, start_top5)

    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        before = binary_masks(student)
        (total_loss, total_correct, seen), flips = _train_epoch(run, epoch, progress)
        elapsed = time.perf_counter() - started
        mask_changes = count_flips(before, binary_masks(student))
        top1, top5 = batches.evaluate(evaluated)
        metrics = EpochMetrics(
            epoch=epoch + 1,
            train_loss=total_loss / seen,
            train_top1=100.0 * total_correct / seen,
            val_top1=top1,
            val_top5=top5,
            mask_flips=mask_changes,
            images_per_s=seen / elapsed,
            lr=scheduler.get_last_lr()[0],
            seconds=elapsed,
            extra={"flip_rule_flips": flips, "grad_norm_max": run.gradient_norms[-1]}
            | ({"skipped_images": skipped} if epoch == 0 else {}),
        )
        history.append(metrics)
        if env.main:
            _check_finite_weights(evaluated, epoch, last_path, config.lr)
            training_state = {
                "optimiser": optimiser.state_dict(),
                "scheduler": scheduler.state_dict(),
                "masks": masks.state_dict(),
                "mask_proxies": {name: layer.mask_proxy.detach().cpu() for name, layer in masks.layers},
                "rng": _rng_state(),
                "epoch": epoch + 1,
                **_average_state(student, average),
            }
            files.write(evaluated, teacher, metrics, history, best_top1, training_state)
            if writer is not None:
                for key, value in asdict(metrics).items():
                    if isinstance(value, (int, float)) and key != "epoch":
                        writer.add_scalar(key, value, epoch + 1)
            if on_epoch:
                on_epoch(metrics)
        best_top1 = max(best_top1, top1)
        if env.world > 1:
            dist.barrier()
    if writer is not None:
        writer.close()
    if features is not None:
        features.remove()
    return history


def _tensorboard(folder: str | Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise BadInputError("`tensorboard` needs the tensorboard package: pip install tensorboard.") from None
    return SummaryWriter(str(folder))
