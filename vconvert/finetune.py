"""Fine-tuning a converted model with its original network as teacher.

Loss = (1-w)·CE + w·T²·KL(student/T ‖ teacher/T) + λ·L_ortho (masks that learn: the penalty is a
function of the masks alone, so it has no gradient when they are frozen).
SGD with Nesterov momentum, cosine schedule with linear warm-up, BatchNorm recalibration before the
first epoch, mask updates by one of the strategies of ``vconvert.mask_learning``. Each epoch writes
the last checkpoint (with everything needed to resume exactly) and the best one, atomically.
Under ``torchrun`` the student runs in DistributedDataParallel (NCCL on GPUs, gloo on CPU); rank 0
alone logs and writes.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from vconvert.api import Checkpoint, check_metadata, load_checkpoint, save
from vconvert.calibrate import recalibrate_batchnorm
from vconvert.data import (
    DIGITS,
    DataSpec,
    SeededSamples,
    check_class_count,
    choose_data,
    describe_input,
    log,
    normalisation_origin,
    open_split,
)
from vconvert.device_data import AUTO_HOST_BYTES, MAX_SIDE, DeviceImageSet
from vconvert.errors import BadInputError, CheckFailedError
from vconvert.feature_distill import FeatureDistillation
from vconvert.io import atomic_write_bytes, check_writable
from vconvert.layers import orthogonality_loss
from vconvert.mask_learning import (
    MaskLearner,
    MaskSettings,
    binary_masks,
    canonicalise_masks_,
    count_flips,
    drop_latent_weights_,
)
from vconvert.validate import check_fields, check_float, check_int, check_like, check_mapping
from vconvert.weight_average import WeightAverage


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run (plain data; stored in the checkpoint)."""

    data: str | None = None  # "digits", an image folder, or None: the data the checkpoint records
    epochs: int = 5
    batch_size: int = 128  # global batch, split across DDP ranks
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5
    masks: str = "project"
    mask_lr: float = 0.05
    flip_rate: float = 0.01
    mask_anneal: float = 0.6
    project_ramp: float = 0.0
    project_every: int = 128  # project: training images (global) between projections, at least one step
    ortho_weight: float = 0.05
    distill: bool = True
    temperature: float = 4.0
    distill_weight: float = 0.7
    label_smoothing: float = 0.0
    recalibrate_images: int = 2000
    bn_mode: str = "train"  # train | frozen (BatchNorm statistics fixed after recalibration)
    augment: bool = True
    train_limit: int | None = None  # use only this many training images (quick runs)
    eval_limit: int | None = None
    seed: int = 0
    workers: int = 2
    loader: str = "auto"  # auto | workers | device (whole split on the device, augmented there)
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 (autocast)
    feature_weight: float = 0.0  # weight of the layer-wise term (converted convs vs the teacher's); 0: off
    ema: float = 0.0  # decay of an EMA of the weights, evaluated and written instead of them (0: off)
    mean: list[float] | None = None
    std: list[float] | None = None


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    train_top1: float
    val_top1: float
    val_top5: float
    mask_flips: int
    images_per_s: float
    lr: float
    seconds: float
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- small pure pieces
def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), batch mean (Hinton et al. 2015)."""
    log_student = F.log_softmax(student / temperature, dim=1)
    log_teacher = F.log_softmax(teacher / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temperature**2


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[1])
    return int((logits.topk(k, dim=1).indices == labels.unsqueeze(1)).any(dim=1).sum())


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights and primary filters; none on BN, biases, scales, masks."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or name.endswith("mask_proxy"):
            continue
        is_weight = parameter.ndim > 1
        (decay if is_weight else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------- distributed
@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Distributed:
    """DDP when started by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return Distributed(device=torch.device("cuda" if cuda else "cpu"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Distributed(dist.get_rank(), dist.get_world_size(), device)


def _all_reduce_sum(values: list[float], env: Distributed) -> list[float]:
    if env.world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


# --------------------------------------------------------------------------- data
def _limited(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    if limit is None or limit >= len(dataset):  # type: ignore[arg-type]
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit]  # type: ignore[arg-type]
    return Subset(dataset, order.tolist())


def _resolve_preprocessing(config: FinetuneConfig, checkpoint: Checkpoint) -> tuple[list | None, list | None, bool]:
    """--mean/--std, else what compress recorded, else the data set's own default (mean, std, recorded)."""
    if config.mean is not None:
        return config.mean, config.std, False
    recorded = (checkpoint.metadata or {}).get("preprocessing") or {}
    if config.data != DIGITS and recorded.get("mean") is not None:
        return recorded["mean"], recorded["std"], True
    return None, None, False


def projection_interval(images: int, batch_size: int) -> int:
    """Steps between two projections of the ``project`` rule: about ``images`` training images apart, at
    least one step (so a batch of 128 or more projects after every step)."""
    return max(1, round(images / batch_size))


def open_data(
    config: FinetuneConfig,
    checkpoint: Checkpoint,
    file: Path | str = "the checkpoint",
    data_from: str = "",
    announce: bool = True,
) -> tuple[Dataset, Dataset, DataSpec, int]:
    """The (seeded, limited) training and evaluation splits of ``config.data`` as the checkpoint's model
    takes them, their DataSpec and the number of unreadable files skipped; logs (when ``announce``) the
    input line: size, normalisation and where they came from."""
    input_shape = (checkpoint.metadata or {}).get("input_shape") or checkpoint.plan.input_shape
    mean, std, recorded = _resolve_preprocessing(config, checkpoint)
    size_from = f"the input shape {Path(file).name} records"
    options = {"input_size": input_shape[2:], "channels": input_shape[1], "mean": mean, "std": std,
               "size_from": size_from}  # fmt: skip
    train, spec, skipped_train = open_split(config.data, True, augment=config.augment, **options)
    options["mean"], options["std"] = spec.mean, spec.std
    evaluation, eval_spec, skipped_eval = open_split(config.data, False, augment=False, check_size=False, **options)
    if eval_spec.classes != spec.classes:
        raise BadInputError(
            f"The evaluation split's classes ({len(eval_spec.classes)}) differ from the training split's "
            f"({len(spec.classes)}); give both the same class folders."
        )
    normalisation_from = normalisation_origin(config.mean is not None, recorded, file, spec.source)
    if announce:
        log.info(describe_input(spec, size_from, normalisation_from, data_from))
    return (
        SeededSamples(_limited(train, config.train_limit, config.seed), config.seed),
        _limited(evaluation, config.eval_limit, config.seed),
        spec,
        skipped_train + skipped_eval,
    )


def _loader(dataset: Dataset, batch: int, workers: int, sampler=None) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        drop_last=sampler is not None,
        persistent_workers=False,
    )


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset: Dataset, device: torch.device, batch: int = 256, workers: int = 2):
    """(top-1 %, top-5 %, images) of ``model`` on ``dataset``."""
    return evaluate_batches(model, _loader(dataset, batch, workers), device)


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches, device: torch.device) -> tuple[float, float, int]:
    """(top-1 %, top-5 %, images) of ``model`` on (images, labels) ``batches``."""
    model.eval()
    correct1 = correct5 = total = 0
    for images, labels in batches:
        logits = model(images.to(device))
        labels = labels.to(device)
        correct1 += topk_correct(logits, labels, 1)
        correct5 += topk_correct(logits, labels, 5)
        total += len(labels)
    return 100.0 * correct1 / max(1, total), 100.0 * correct5 / max(1, total), total


def uses_device_loader(config: FinetuneConfig, spec: DataSpec, device: torch.device, images: int) -> bool:
    """``--loader auto`` decodes a small-image split (``images`` of them, train + eval) once onto the
    training device: always on CUDA, and on CPU while it takes ≤ 1 GiB of memory (on 2 cores it is
    1.6x faster than decoding each epoch in worker processes); ``device``/``workers`` force a choice."""
    if config.loader == "auto":
        if max(spec.input_size) > MAX_SIDE:
            return False
        return device.type == "cuda" or images * spec.channels * math.prod(spec.input_size) <= AUTO_HOST_BYTES
    return config.loader == "device"


PRECISIONS = ("auto", "fp32", "bf16")
CHANNELS_LAST_MIN_SIDE = 16


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN computes bfloat16 natively on this CPU (AVX512-BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether the forward passes run under bfloat16 autocast: ``auto`` on CUDA; ``bf16`` anywhere the
    device computes it natively (CUDA, or a CPU with AVX512-BF16/AMX: CIFAR-10 ResNet-20 s=2 fine-tunes at
    733 vs 426 images/s in fp32 on 2 Zen 4 cores); ``fp32`` never."""
    if precision not in PRECISIONS:
        raise BadInputError(f"--precision must be one of {', '.join(PRECISIONS)}; got {precision!r}.")
    if precision == "auto":
        return device.type == "cuda"
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        raise BadInputError(
            "--precision bf16 needs a CUDA device or a CPU with native bfloat16 (AVX512-BF16 or AMX); "
            "this CPU has neither: use --precision fp32."
        )
    return precision == "bf16"


def uses_channels_last(device: torch.device, spec: DataSpec) -> bool:
    """NHWC activations: on CUDA, and on CPU for images of 16 px and more (oneDNN's NHWC convolutions:
    CIFAR-10 ResNet-20 s=2 fine-tunes at 426 vs 397 images/s in fp32 on 2 cores)."""
    return device.type == "cuda" or min(spec.input_size) >= CHANNELS_LAST_MIN_SIDE


# --------------------------------------------------------------------------- the run
def _output_paths(output: Path) -> tuple[Path, Path, Path]:
    stem = output.name[: -len(".vc.pt")] if output.name.endswith(".vc.pt") else output.stem
    return output, output.with_name(f"{stem}.best.vc.pt"), output.with_name(f"{stem}.metrics.jsonl")


def _check_classes(model: nn.Module, dataset: Dataset, spec: DataSpec, device: torch.device) -> None:
    image, _ = dataset[0]
    try:
        with torch.no_grad():
            outputs = model.eval()(image.unsqueeze(0).to(device)).shape[-1]
    except RuntimeError as error:  # the recorded input shape does not suit the model
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BadInputError(
            f"The model rejects the data's images of shape {list(image.shape)} ({first_line[:160]}); the "
            "checkpoint's input shape does not match its model."
        ) from error
    check_class_count(outputs, len(spec.classes), "finetune")


SYNC_EVERY = 50


def _check_finite(loss, loss_sum, env: Distributed, epoch: int, step: int, last_path: Path) -> float:
    """The loss (mean over ranks); raises CheckFailedError when it, or any loss since the last check,
    is NaN or infinite."""
    loss_value, since_last = _all_reduce_sum([float(loss.detach()), float(loss_sum)], env)
    loss_value /= env.world
    if not (math.isfinite(loss_value) and math.isfinite(since_last)):
        bad = loss_value if not math.isfinite(loss_value) else since_last
        raise CheckFailedError(
            f"The loss became {bad} at epoch {epoch + 1}, step {step + 1}; the run stopped and "
            f"{last_path} keeps the last good epoch (if any): lower --lr or check the data."
        )
    return loss_value


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if torch.cuda.is_available() and isinstance(cuda, list) and len(cuda) == torch.cuda.device_count():
        if all(isinstance(item, torch.Tensor) and item.dtype == torch.uint8 for item in cuda):
            torch.cuda.set_rng_state_all(cuda)  # the same devices: the run continues exactly


def finetune(
    checkpoint_path: str | Path,
    output: str | Path,
    config: FinetuneConfig,
    *,
    trust: bool = False,
    resume: bool = False,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
    tensorboard: str | Path | None = None,
) -> list[EpochMetrics]:
    """Fine-tune the converted model of ``checkpoint_path`` and write ``output`` (last epoch, with
    resume state), ``<stem>.best.vc.pt`` (best validation top-1) and ``<stem>.metrics.jsonl``.

    ``progress(step, steps, info)`` is called during each epoch, ``on_epoch`` after it (rank 0 only).
    With ``resume`` the run continues from ``output``'s last completed epoch and ends with the same
    weights as an uninterrupted run.
    """
    env = setup_distributed()
    output = Path(output)
    last_path, best_path, metrics_path = _output_paths(output)
    for path in (last_path, best_path, metrics_path):
        check_writable(path)
    if config.bn_mode not in ("train", "frozen"):
        raise BadInputError(f"--bn-mode must be 'train' or 'frozen', got {config.bn_mode!r}.")
    if config.loader not in ("auto", "workers", "device"):
        raise BadInputError(f"--loader must be auto, workers or device; got {config.loader!r}.")
    use_bf16 = uses_bf16(config.precision, env.device)
    if config.feature_weight < 0:
        raise BadInputError(f"--feature-distill must be ≥ 0; got {config.feature_weight}.")
    if not 0.0 <= config.project_ramp <= 1.0:
        raise BadInputError(f"--project-ramp must be a fraction of the run in [0, 1]; got {config.project_ramp}.")
    if config.project_every < 1:
        raise BadInputError(f"--project-every must be at least 1 image; got {config.project_every}.")
    if not 0.0 <= config.ema < 1.0:
        raise BadInputError(f"--ema must be 0 (off) or a decay below 1 such as 0.999; got {config.ema}.")
    if config.epochs < 1 or config.batch_size < env.world or config.batch_size % env.world:
        raise BadInputError(
            f"--epochs must be ≥ 1 and --batch-size a multiple of the {env.world} process(es); "
            f"got {config.epochs} and {config.batch_size}."
        )

    resume_state = None
    if resume:
        if not last_path.exists():
            raise BadInputError(f"--resume: {last_path} does not exist yet; start the run without --resume.")
        source = load_checkpoint(last_path, trust=trust)
        data, data_from = choose_data(config.data, source.metadata, last_path)
        config = replace(config, data=data)
        resume_state = (source.metadata or {}).get("finetune_state")
        if resume_state is None:
            raise BadInputError(f"--resume: {last_path} holds no fine-tuning state to resume from.")
        resume_state = _check_resume_state(resume_state, config, source, last_path)
        base_metadata = resume_state["base_metadata"]
    else:
        source = load_checkpoint(checkpoint_path, trust=trust)
        data, data_from = choose_data(config.data, source.metadata, checkpoint_path)
        config = replace(config, data=data)
        base_metadata = dict(source.metadata or {})

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
            "lower --batch-size."
        )
    total_steps = steps_per_epoch * config.epochs
    masks = MaskLearner(
        student,
        MaskSettings(
            config.masks,
            config.mask_lr,
            config.flip_rate,
            config.mask_anneal,
            ramp=config.project_ramp,
            every=projection_interval(config.project_every, config.batch_size),
        ),
        total_steps,
        steps_per_epoch,
        teacher,
    )
    groups = parameter_groups(student, config.weight_decay)
    optimiser = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)
    if masks.optimiser_parameters():
        optimiser.add_param_group(
            {"params": masks.optimiser_parameters(), "lr": config.mask_lr, "weight_decay": 0.0, "momentum": 0.0}
        )
    warmup = max(1, round(config.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: warmup_cosine(step, warmup, total_steps))

    history: list[EpochMetrics] = []
    best_top1, start_epoch = -1.0, 0
    if resume_state is not None:
        where = f"--resume: {last_path}'s fine-tuning state"
        _check_optimiser_state(optimiser, resume_state["optimiser"], f"{where} optimiser")
        check_like(scheduler.state_dict(), resume_state["scheduler"], f"{where} scheduler")
        check_like(masks.state_dict(), resume_state["masks"], f"{where} masks")
        proxies = {name: layer.mask_proxy.detach() for name, layer in masks.layers}
        check_like(proxies, resume_state["mask_proxies"], f"{where} mask_proxies")
        check_like(torch.get_rng_state(), resume_state["rng"]["torch"], f"{where} rng")
        if "live_weights" in resume_state:
            check_like(student.state_dict(), resume_state["live_weights"], f"{where} live_weights")
        optimiser.load_state_dict(resume_state["optimiser"])
        scheduler.load_state_dict(resume_state["scheduler"])
        masks.load_state_dict(resume_state["masks"])
        with torch.no_grad():
            if "live_weights" in resume_state:  # with --ema the file holds the average, the state the weights
                student.load_state_dict(resume_state["live_weights"])
            for name, proxy in resume_state["mask_proxies"].items():
                student.get_submodule(name).mask_proxy.copy_(proxy)
        history = [EpochMetrics(**entry) for entry in resume_state["history"]]
        best_top1, start_epoch = resume_state["best_top1"], resume_state["epoch"]
        _restore_rng(resume_state["rng"])
    elif config.recalibrate_images > 0:
        calibration = _limited(
            open_split(
                config.data,
                True,
                augment=False,
                input_size=spec.input_size,
                channels=spec.channels,
                mean=spec.mean,
                std=spec.std,
            )[0],
            config.recalibrate_images,
            config.seed,
        )
        recalibrate_batchnorm(
            student,
            (images.to(env.device) for images, _ in _loader(calibration, 128, config.workers)),
            max_images=config.recalibrate_images,
        )

    on_device = uses_device_loader(config, spec, env.device, len(train_set) + len(eval_set))
    channels_last = uses_channels_last(env.device, spec)
    if on_device:
        options = {"input_size": spec.input_size, "channels": spec.channels, "mean": spec.mean, "std": spec.std,
                   "seed": config.seed, "device": env.device, "channels_last": channels_last}  # fmt: skip
        train_device = DeviceImageSet.from_dataset(train_set, augment=config.augment, **options)
        eval_device = DeviceImageSet.from_dataset(eval_set, augment=False, **options)
    if channels_last:
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)

    average = WeightAverage(student, config.ema) if config.ema else None
    if average is not None:
        drop_latent_weights_(average.model)  # the average is of the versatile weights the forward uses
        if resume_state is not None:
            check_like(average.state_dict(), resume_state["ema"], f"--resume: {last_path}'s fine-tuning state ema")
            average.load_state_dict(resume_state["ema"])
    evaluated = average.model if average is not None else student  # what is validated and written

    # hooks after the average's deepcopy, which would otherwise carry them
    features = FeatureDistillation(student, teacher) if config.feature_weight > 0 else None

    model: nn.Module = student
    if env.world > 1:
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[env.device.index] if env.device.type == "cuda" else None
        )
    writer = _tensorboard(tensorboard) if tensorboard and env.main else None

    loss_value = float("nan")  # the last loss read back from the device (shown by the progress bar)
    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)  # type: ignore[attr-defined]
        model.train()
        if config.bn_mode == "frozen":
            for module in student.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        before = binary_masks(student)
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)  # Σ loss·n since the last check
        correct = torch.zeros((), dtype=torch.long, device=env.device)
        sums = [0.0, 0.0, 0.0]  # loss·n, correct, n
        flips = 0
        if on_device:
            train_device.set_epoch(epoch)
            batches = train_device.batches(list(sampler)[: steps_per_epoch * per_rank], per_rank)
        else:
            batches = _loader(train_set, per_rank, config.workers, sampler)
        for step, (images, labels) in enumerate(batches):
            images, labels = images.to(env.device, non_blocking=True), labels.to(env.device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            masks.before_step()
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(images)
                loss = F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
                if config.distill or features is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(images)
                if config.distill:
                    kd = distillation_loss(logits.float(), teacher_logits.float(), config.temperature)
                    loss = (1 - config.distill_weight) * loss + config.distill_weight * kd
                if features is not None:
                    loss = loss + config.feature_weight * features.loss()
                if masks.learns and config.ortho_weight > 0:
                    loss = loss + config.ortho_weight * orthogonality_loss(student)
            loss_sum += loss.detach().double() * len(labels)
            correct += (logits.detach().argmax(dim=1) == labels).sum()
            sums[2] += len(labels)
            # a host sync per step would stall a GPU; a NaN persists, so checking every few steps suffices
            if env.device.type == "cpu" or (step + 1) % SYNC_EVERY == 0 or step + 1 == steps_per_epoch:
                loss_value = _check_finite(loss, loss_sum, env, epoch, step, last_path)
                sums[0] += float(loss_sum)
                sums[1] += int(correct)
                loss_sum.zero_()
                correct.zero_()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            flips += masks.after_step()
            if average is not None:
                average.update(student)
            if progress and env.main:
                progress(step + 1, steps_per_epoch, {"epoch": epoch + 1, "loss": loss_value})
        total_loss, total_correct, seen = _all_reduce_sum(sums, env)
        elapsed = time.perf_counter() - started
        mask_changes = count_flips(before, binary_masks(student))
        if on_device:
            top1, top5, _ = evaluate_batches(evaluated, eval_device.batches(range(len(eval_device)), 256), env.device)
        else:
            top1, top5, _ = evaluate_model(evaluated, eval_set, env.device, workers=config.workers)
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
            extra={"flip_rule_flips": flips, "skipped_images": skipped} if epoch == 0 else {"flip_rule_flips": flips},
        )
        history.append(metrics)
        if env.main:
            _write_epoch(
                evaluated,
                teacher,
                source,
                spec,
                config,
                metrics,
                history,
                best_top1,
                base_metadata,
                last_path,
                best_path,
                metrics_path,
                {
                    "optimiser": optimiser.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "masks": masks.state_dict(),
                    "mask_proxies": {name: layer.mask_proxy.detach().cpu() for name, layer in masks.layers},
                    "rng": _rng_state(),
                    "epoch": epoch + 1,
                    **_average_state(student, average),
                },
            )
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


RESUME_FIELDS = ("config", "optimiser", "scheduler", "masks", "mask_proxies", "rng", "epoch", "history", "best_top1",
                 "base_metadata")  # fmt: skip


def _check_resume_state(value: object, config: FinetuneConfig, source: Checkpoint, path: Path) -> dict:
    """The resume state of a checkpoint, its plain fields checked (the parts that mirror this run's
    optimiser, scheduler, masks and weights are checked against them when they exist)."""
    where = f"--resume: {path}'s fine-tuning state"
    averaged = ("live_weights", "ema") if config.ema else ()
    state = check_fields(value, where, RESUME_FIELDS + averaged)
    if state["config"] != asdict(config):
        raise BadInputError(f"--resume: the options differ from those of the run that wrote {path}.")
    epoch = check_int(state["epoch"], f"{where} epoch", 1, config.epochs)
    check_float(state["best_top1"], f"{where} best_top1")
    history = state["history"]
    if not isinstance(history, list) or len(history) != epoch:
        raise BadInputError(f"{where} history must list the {epoch} epochs done: the file is damaged.")
    names = tuple(item.name for item in fields(EpochMetrics))
    for index, entry in enumerate(history):
        entry = check_fields(entry, f"{where} history[{index}]", names)
        check_int(entry["epoch"], f"{where} history[{index}] epoch")
        check_int(entry["mask_flips"], f"{where} history[{index}] mask_flips")
        for name in names[1:-1]:
            check_float(entry[name], f"{where} history[{index}] {name}", finite=False)
        check_mapping(entry["extra"], f"{where} history[{index}] extra")
    check_fields(state["rng"], f"{where} rng", ("torch",), ("cuda",))
    channels = source.plan.input_shape[1]
    state["base_metadata"] = check_metadata(state["base_metadata"], f"{where} base_metadata", channels)
    return state


def _check_optimiser_state(optimiser: torch.optim.Optimizer, value: object, where: str) -> None:
    """The optimiser's saved state: its parameter groups like this run's, and each per-parameter tensor
    (momentum) of its parameter's shape and dtype."""
    saved = check_fields(value, where, ("state", "param_groups"))
    check_like(optimiser.state_dict()["param_groups"], saved["param_groups"], f"{where} param_groups")
    parameters = [parameter for group in optimiser.param_groups for parameter in group["params"]]
    entries = saved["state"]
    if not isinstance(entries, dict) or not all(isinstance(k, int) and 0 <= k < len(parameters) for k in entries):
        raise BadInputError(f"{where} state must map parameter numbers to their state: the file is damaged.")
    for index, entry in entries.items():
        for key, item in check_mapping(entry, f"{where} state[{index}]").items():
            if isinstance(item, torch.Tensor):  # momentum of the parameter's shape, or a scalar (a step count)
                template = parameters[index].detach() if item.ndim else torch.zeros((), dtype=item.dtype)
            else:
                template = None if item is None else 0.0
            check_like(template, item, f"{where} state[{index}][{key!r}]")


def _average_state(student: nn.Module, average: WeightAverage | None) -> dict:
    """With --ema, the resume state keeps the live weights and the average (the file's model is the average)."""
    if average is None:
        return {}
    live = {name: tensor.detach().cpu() for name, tensor in student.state_dict().items()}
    return {"live_weights": live, "ema": average.state_dict()}


def _write_epoch(
    student: nn.Module,
    teacher: nn.Module,
    source: Checkpoint,
    spec: DataSpec,
    config: FinetuneConfig,
    metrics: EpochMetrics,
    history: list[EpochMetrics],
    best_top1: float,
    base_metadata: dict,
    last_path: Path,
    best_path: Path,
    metrics_path: Path,
    training: dict,
) -> None:
    """Write the last checkpoint (with resume state), the best one when improved, and the metrics line."""
    snapshot, teacher = (
        copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format) for model in (student, teacher)
    )
    canonicalise_masks_(snapshot)  # threshold 0.5 / proxies 0.75, 0.25 whatever the training rule
    drop_latent_weights_(snapshot)  # the project rule's training state travels in the resume state
    finished = metrics.epoch == config.epochs
    metadata = {
        **base_metadata,
        "data": spec.to_dict(),
        "preprocessing": {"mean": spec.mean, "std": spec.std, "input_size": spec.input_size},
        "finetune": {
            "config": asdict(config),
            "epochs_done": metrics.epoch,
            "complete": finished,
            "val_top1": metrics.val_top1,
            "val_top5": metrics.val_top5,
        },
    }
    improved = metrics.val_top1 > best_top1
    state = {
        **training,
        "config": asdict(config),
        "history": [asdict(entry) for entry in history],
        "best_top1": max(best_top1, metrics.val_top1),
        "base_metadata": base_metadata,
    }
    if improved:
        save(best_path, snapshot, source.plan, source.base, teacher, metadata)
    save(last_path, snapshot, source.plan, source.base, teacher, {**metadata, "finetune_state": state})
    lines = "".join(json.dumps(asdict(entry)) + "\n" for entry in history)
    atomic_write_bytes(lines.encode(), metrics_path)


def _tensorboard(folder: str | Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise BadInputError("--tensorboard needs the tensorboard package: pip install tensorboard.") from None
    return SummaryWriter(str(folder))
