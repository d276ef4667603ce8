"""``vconvert finetune``: fine-tune a ``.vc.pt`` with its original network as teacher (one process or torchrun)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from vconvert.cli.common import (
    DataOpt,
    DebugOpt,
    JsonOpt,
    MemoryBudgetOpt,
    TrustOpt,
    check_weight_bits,
    console,
    epoch_progress,
    error_console,
    explained_errors,
    parse_normalisation,
)
from vconvert.errors import BadInputError, shown

# Command-line parameters whose FinetuneConfig field has another name.
FIELD_FOR_PARAMETER = {"feature_distill": "feature_weight"}


def typed_options(context: typer.Context) -> set[str]:
    """The FinetuneConfig fields the user set on the command line (or through the environment). Sources are
    compared by name: typer may bring its own copy of click's ParameterSource."""
    from dataclasses import fields

    from vconvert.train.config import FinetuneConfig

    names = {item.name for item in fields(FinetuneConfig)}
    typed = {
        FIELD_FOR_PARAMETER.get(name, name)
        for name in context.params
        if getattr(context.get_parameter_source(name), "name", None) in ("COMMANDLINE", "ENVIRONMENT")
    }
    return typed & names


@explained_errors
def finetune(
    context: typer.Context,
    file: Annotated[Path, typer.Argument(help="The .vc.pt written by compress.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The fine-tuned .vc.pt (last epoch).")],
    data: DataOpt = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs.")] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Global batch size (split over ranks).")] = 128,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate of the weights (SGD, Nesterov).")] = 0.01,
    weight_decay: Annotated[
        float,
        typer.Option(
            "--weight-decay",
            help="SGD weight decay on conv/linear weights and primary filters (none on BatchNorm, biases, "
            "scales, masks).",
        ),
    ] = 5e-4,
    warmup_epochs: Annotated[float, typer.Option("--warmup-epochs", help="Linear warm-up, then cosine.")] = 0.5,
    grad_clip: Annotated[
        float,
        typer.Option(
            "--grad-clip",
            help="Scale the gradients down to this L2 norm where above (0: off): models without BatchNorm need it, "
            "BatchNorm models stay below it.",
        ),
    ] = 10.0,
    masks: Annotated[
        str,
        typer.Option(
            "--masks",
            help="Mask learning: project (masks, primaries and scales follow a trained dense latent "
            "weight) | frozen (fitted masks kept) | flip | ste | tpami (see README).",
        ),
    ] = "project",
    mask_lr: Annotated[float, typer.Option("--mask-lr", help="Proxy learning rate (ste, tpami).")] = 0.05,
    flip_rate: Annotated[
        float, typer.Option("--flip-rate", help="flip: fraction of mask bits flipped per epoch at the start.")
    ] = 0.01,
    mask_anneal: Annotated[
        float,
        typer.Option("--mask-anneal", help="flip, project: fraction of training after which masks stay."),
    ] = 0.6,
    project_ramp: Annotated[
        float,
        typer.Option(
            "--project-ramp",
            help="project: fraction of training over which the forward moves from the dense latent weight "
            "to its versatile projection (cubic, as in gradual pruning; 0: projection from the start).",
        ),
    ] = 0.0,
    project_every: Annotated[
        int,
        typer.Option(
            "--project-every",
            help="project: training images between two projections (at least every step; every step from batch "
            "128 on). Each projection costs about a step of a small batch, so small batches project less often.",
        ),
    ] = 128,
    ortho_weight: Annotated[
        float, typer.Option("--ortho-weight", help="λ of the orthogonality loss (flip, ste, tpami).")
    ] = 0.05,
    distill: Annotated[
        bool, typer.Option("--distill/--no-distill", help="Distil from the original model.", metavar="")
    ] = True,
    temperature: Annotated[float, typer.Option("--temperature", help="Distillation temperature.")] = 4.0,
    distill_weight: Annotated[float, typer.Option("--distill-weight", help="Weight of the KD term.")] = 0.7,
    recalibrate_images: Annotated[
        int,
        typer.Option(
            "--recalibrate-images",
            help="BN recalibration images before epoch 1 (0: off; a reconstructed or fine-tuned file keeps its own).",
        ),
    ] = 2000,
    bn_mode: Annotated[
        str, typer.Option("--bn-mode", help="train | frozen (BN statistics fixed after recalibration).")
    ] = "train",
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Random crops and flips.", metavar="")] = True,
    train_limit: Annotated[int | None, typer.Option("--train-limit", help="Use only N training images.")] = None,
    eval_limit: Annotated[int | None, typer.Option("--eval-limit", help="Evaluate on only N images.")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    workers: Annotated[int, typer.Option("--workers", help="Data-loading worker processes.")] = 2,
    loader: Annotated[
        str,
        typer.Option(
            "--loader",
            help="workers (processes decode and augment) | device (the whole split on the training device, "
            "augmented there; images up to 64 px) | auto (device for small images on CUDA, and on CPU while the "
            "split fits in 1 GiB; else workers).",
        ),
    ] = "auto",
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help="auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 (also on a CPU with AVX512-BF16 or AMX: "
            "about 1.7x faster, slightly different numbers).",
        ),
    ] = "auto",
    feature_distill: Annotated[
        float,
        typer.Option(
            "--feature-distill",
            help="Weight of a layer-wise term: each converted conv's output matched to the original conv's "
            "(relative squared error, mean over layers). 0: off.",
        ),
    ] = 0.0,
    ema: Annotated[
        float,
        typer.Option(
            "--ema",
            help="Decay of an exponential moving average of the weights (e.g. 0.999), validated and written in "
            "their place; masks are never averaged. 0: off.",
        ),
    ] = 0.0,
    weight_bits: Annotated[
        int | None,
        typer.Option(
            "--weight-bits",
            help="Quantization-aware training: the primary filters are fake-quantised to 2-8 bits (symmetric, "
            "one step per primary filter, gradients straight through); export --quantize int8 then stores them at "
            "this width. Default: float primaries.",
        ),
    ] = None,
    weight_quantizer: Annotated[
        str | None,
        typer.Option(
            "--weight-quantizer",
            help="With --weight-bits: lsq (each primary filter's step is learned, LSQ; the default) | minmax "
            "(step = max|P|/Q, recomputed at every step).",
        ),
    ] = None,
    label_smoothing: Annotated[
        float, typer.Option("--label-smoothing", help="Label smoothing of the task cross-entropy.")
    ] = 0.0,
    mean: Annotated[str | None, typer.Option("--mean", help="Override the input mean.")] = None,
    std: Annotated[str | None, typer.Option("--std", help="Override the input std.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run that writes OUTPUT.", metavar="")] = False,
    tensorboard: Annotated[Path | None, typer.Option("--tensorboard", help="Write TensorBoard logs here.")] = None,
    trust: TrustOpt = False,
    as_json: JsonOpt = False,
    memory_budget: MemoryBudgetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Fine-tune a converted model with the original as teacher; writes OUTPUT, OUTPUT's .best.vc.pt
    and .metrics.jsonl. Under torchrun it runs DistributedDataParallel."""
    from vconvert.train.config import FinetuneConfig
    from vconvert.train.distributed import setup_distributed
    from vconvert.train.finetune import finetune as run_finetune
    from vconvert.train.masks import STRATEGIES

    if masks not in STRATEGIES:
        raise BadInputError(f"--masks must be one of {', '.join(STRATEGIES)}; got {masks!r}.")
    check_weight_bits(weight_bits)
    if weight_quantizer is not None and weight_bits is None:
        raise BadInputError("--weight-quantizer chooses the step of --weight-bits: add --weight-bits (2 to 8).")
    if (mean is None) != (std is None):
        raise BadInputError("Pass --mean and --std together.")
    config = FinetuneConfig(
        data=data, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        warmup_epochs=warmup_epochs, grad_clip=grad_clip, masks=masks, mask_lr=mask_lr, flip_rate=flip_rate,
        mask_anneal=mask_anneal,
        project_ramp=project_ramp, project_every=project_every, ortho_weight=ortho_weight, distill=distill,
        temperature=temperature,
        distill_weight=distill_weight, recalibrate_images=recalibrate_images, bn_mode=bn_mode, augment=augment,
        train_limit=train_limit, eval_limit=eval_limit, seed=seed, workers=workers, loader=loader, precision=precision,
        label_smoothing=label_smoothing, ema=ema, feature_weight=feature_distill, weight_bits=weight_bits,
        weight_quantizer=weight_quantizer or "lsq",
        mean=parse_normalisation(mean, "--mean") if mean else None,
        std=parse_normalisation(std, "--std") if std else None,
    )  # fmt: skip
    main = setup_distributed().main
    progress, on_step = epoch_progress(epochs, enabled=main)

    def on_epoch(metrics) -> None:
        if not as_json:
            console.print(
                f"epoch {metrics.epoch}/{total[0]}: loss {metrics.train_loss:.4f}, "
                f"train top-1 {metrics.train_top1:.2f}%, "
                f"val top-1 {metrics.val_top1:.2f}% (top-5 {metrics.val_top5:.2f}%), "
                f"{metrics.mask_flips} mask bits flipped, {metrics.images_per_s:.0f} img/s"
            )
            console.file.flush()  # a line per epoch also when stdout is a file or a pipe

    start: list[float] = []  # the start's validation top-1

    def on_start(top1: float, top5: float) -> None:
        start.append(top1)
        if not as_json and not math.isnan(top1):  # NaN: resuming a run written before starts were validated
            console.print(f"start: val top-1 {top1:.2f}% (top-5 {top5:.2f}%): the .best.vc.pt until an epoch beats it")
            console.file.flush()

    started = time.time()
    total = [epochs]  # a resumed run may take its recorded epoch count: the steps report it

    def on_training_step(step: int, steps: int, info: dict) -> None:
        total[0] = info.get("epochs", total[0])
        on_step(step, steps, info)

    try:
        with progress:
            history = run_finetune(
                file, output, config, trust=trust, resume=resume, typed_options=typed_options(context),
                on_epoch=on_epoch, progress=on_training_step, on_start=on_start,
                tensorboard=tensorboard,
            )  # fmt: skip
    except KeyboardInterrupt:
        if main:
            last_epoch = epoch_on_disk(output, started, resume)
            error_console.print(Text(interrupted_message(file, output, last_epoch, resume)), soft_wrap=True)
        raise typer.Exit(130) from None
    if not main:
        return
    best = max(history, key=lambda entry: entry.val_top1)
    start_top1 = start[0] if start and not math.isnan(start[0]) else None
    if as_json:
        typer.echo(json.dumps({"output": str(output), "start_val_top1": start_top1,
                               "history": [vars(entry) for entry in history]}, indent=2))  # fmt: skip
    elif start_top1 is None or best.val_top1 > start_top1:
        console.print(f"wrote {output} (last epoch, val top-1 {history[-1].val_top1:.2f}%); best epoch {best.epoch} "
                      f"({best.val_top1:.2f}%) in its .best.vc.pt")  # fmt: skip
    else:
        console.print(f"wrote {output} (last epoch, val top-1 {history[-1].val_top1:.2f}%); no epoch beat the start "
                      f"(val top-1 {start_top1:.2f}%, best epoch {best.epoch} {best.val_top1:.2f}%): its .best.vc.pt "
                      "holds the start")  # fmt: skip


def epoch_on_disk(output: Path, started: float, resumed: bool) -> int | None:
    """The last epoch the run's files hold (its metrics file has a line per epoch written), or None."""
    from vconvert.train.resume import _output_paths

    metrics = _output_paths(output)[2]
    try:
        if not resumed and metrics.stat().st_mtime < started:
            return None  # an earlier run's
        lines = metrics.read_text().splitlines()
        return int(json.loads(lines[-1])["epoch"]) if lines else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def interrupted_message(file: Path, output: Path, last_epoch: int | None, resumed: bool) -> str:
    """What Ctrl-C left on disk and how to go on (the epoch under way is lost: files are written per epoch)."""
    command = f"vconvert finetune {shown(file)} -o {shown(output)} --resume"
    if last_epoch is not None:
        held = f"{shown(output)} holds epoch {last_epoch} (the epoch under way is lost)"
        return f"interrupted: {held}; continue with: {command}"
    if resumed:
        return f"interrupted before an epoch ended: {shown(output)} is as it was; continue with: {command}"
    return "interrupted before the first epoch ended: no epoch was written (nothing on disk changed); run it again."
