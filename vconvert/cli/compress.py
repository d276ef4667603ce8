"""``vconvert compress``: a model file in, a ``.vc.pt`` out."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.text import Text

from vconvert.cli.common import (
    ArchKwargsOpt,
    ArchOpt,
    ChannelStrideOpt,
    ChannelWindowOpt,
    ConvertFirstOpt,
    DebugOpt,
    FileArg,
    JsonOpt,
    MaskSharingOpt,
    MemoryBudgetOpt,
    MinParamsOpt,
    ModeOpt,
    SecondaryOpt,
    SkipOpt,
    TargetRatioOpt,
    TrustOpt,
    console,
    explained_errors,
    fitting_progress,
    labelled,
    parse_kwargs,
    parse_preprocessing,
    parse_shape,
    progress_bar,
)
from vconvert.errors import BadInputError, shown

if TYPE_CHECKING:
    from vconvert.convert.calibrate import Recalibration


def load_input_model(file: Path, arch: str | None, arch_kwargs: str | None, trust: bool):
    from vconvert.io.untrusted import load_model

    return load_model(file, arch=arch, arch_kwargs=parse_kwargs(arch_kwargs), trust=trust)


def example_input(model, shape: list[int]):
    """A random input of ``shape`` (``--input-shape``) to trace ``model`` with, sized first on the meta device:
    a shape the model refuses, or a forward past the memory budget, is refused before anything is allocated."""
    import torch

    from vconvert.io.budget import check_forward

    typed = ",".join(map(str, shape))
    check_forward(
        model,
        shape,
        f"Tracing the model at --input-shape {typed}",
        lambda reason: (
            f"The model rejects an input of --input-shape {typed} ({reason}): give the shape it takes, "
            "N,C,H,W (e.g. 1,3,224,224)."
        ),
    )
    return torch.randn(*shape)


def plan_summary(plan) -> str:
    converted = plan.converted
    errors = [layer.fit_error for layer in converted if layer.fit_error is not None]
    mean_error = f", mean fit error {sum(errors) / len(errors):.3f}" if errors else ""
    conv_dense = sum(layer.dense_bits for layer in converted)
    conv_stored = sum(layer.stored_bits for layer in converted)
    conv_ratio = f", converted convs {conv_dense / conv_stored:.2f}x" if conv_stored else ""
    return (
        f"converted {len(converted)} of {len(plan.layers)} convs{conv_ratio}; whole model "
        f"{plan.model_dense_bits / 8192:,.1f} KiB → {plan.model_stored_bits / 8192:,.1f} KiB "
        f"({plan.ratio:.2f}x){mean_error}"
    )


DEFAULT_INPUT_SHAPE = "1,3,224,224"
# BatchNorm recalibration alone; with --reconstruct vconvert.convert.reconstruct.DEFAULT_IMAGES (torch-free here)
DEFAULT_CALIB_IMAGES = 2000


def check_calibration_options(
    calib_data: Path | None, images: int | None, reconstruct: bool, bits: int | None, refine_steps: int | None = None
) -> int:
    """The number of calibration images to read, once --calib-images, --reconstruct, --weight-bits and
    --refine-steps agree."""
    if reconstruct and calib_data is None:
        raise BadInputError("--reconstruct needs unlabeled images: pass --calib-data DIR (a folder of images).")
    if bits is not None and not reconstruct:
        raise BadInputError("--weight-bits rounds the primaries against the outputs: pass it with --reconstruct.")
    if refine_steps is not None and not reconstruct:
        raise BadInputError("--refine-steps refines the reconstructed blocks: pass it with --reconstruct.")
    if refine_steps is not None and refine_steps < 0:
        raise BadInputError(f"--refine-steps must be 0 (no block refinement) or more; got {refine_steps}.")
    if bits is not None and not 2 <= bits <= 8:
        raise BadInputError(f"--weight-bits must be an integer from 2 to 8; got {bits}.")
    if images is not None and images < 1:
        raise BadInputError(f"--calib-images must be at least 1, got {images}.")
    if images is None:
        return 1024 if reconstruct else DEFAULT_CALIB_IMAGES
    return images


def check_calibration_seed(calib_data: Path | None, seed: int | None) -> int:
    """The seed of the calibration subset (0 unless --calib-seed says otherwise)."""
    if seed is None:
        return 0
    if calib_data is None:
        raise BadInputError("--calib-seed chooses which --calib-data images are read: pass --calib-data DIR.")
    if seed < 0:
        raise BadInputError(f"--calib-seed must be 0 or more; got {seed}.")
    return seed


def reconstruct_layers(
    converted, original, batches: list, calib_data: Path, bits: int | None, refine_steps: int | None = None
) -> dict:
    """Reconstruct ``converted`` against ``original`` on ``batches`` layer by layer, then refine it block by block
    (``refine_steps`` steps a block, 0: not at all, None: by the network's size), each with a progress bar; return
    the metadata record."""
    from vconvert.convert.reconstruct import ReconstructSettings, reconstruct
    from vconvert.convert.refine import AUTO_LIMIT_MACS, RefineSettings, default_steps, refine_blocks
    from vconvert.convert.report import count_macs
    from vconvert.data.datasets import absolute_data, log
    from vconvert.nn.modes import eval_mode

    if not batches:
        raise BadInputError(f"--calib-data {shown(calib_data)} holds no images to reconstruct on.")
    with progress_bar() as progress:
        report = reconstruct(converted, original, batches, ReconstructSettings(weight_bits=bits),
                             fitting_progress(progress, "reconstructing"))  # fmt: skip
    record = report.record(absolute_data(str(calib_data)))
    if refine_steps is None:
        with eval_mode(original):  # counting runs a forward: no BatchNorm statistics may move
            macs = count_macs(original, batches[0][:1])
        refine_steps = default_steps(macs)
        if not refine_steps:
            log.info(
                f"Block refinement skipped: {macs / 1e9:.1f} G multiply-accumulates an image is above the "
                f"{AUTO_LIMIT_MACS / 1e9:.0f} G it runs for by default; --refine-steps 300 runs it (slow on CPUs)."
            )
    if refine_steps:
        with progress_bar() as progress:
            refinement = refine_blocks(converted, original, batches, RefineSettings(steps=refine_steps),
                                       fitting_progress(progress, "refining blocks"))  # fmt: skip
        record["refinement"] = refinement.record()
    return record


def images_drawn(record: dict, noun: str = "images") -> str:
    """How many images a reconstruction record was fitted on, and which subset when a --calib-seed other than 0
    drew them."""
    seed = record.get("seed", 0)
    return f"{record['images']} {noun}" + (f" (--calib-seed {seed})" if seed else "")


def refinement_line(record: dict) -> str:
    """What block refinement did (its metadata record)."""
    return (
        f"Refined {record['kept']} of {record['blocks']} blocks ({record['steps']} steps each): mean block output "
        f"error {record['error_before']:.4f} → {record['error_after']:.4f} ({record['seconds']:.0f} s)."
    )


def recalibration_line(outcome: Recalibration) -> str:
    """What became of BatchNorm recalibration after reconstruction."""
    if outcome.images == 0:
        return "The model has no BatchNorm statistics to recalibrate."
    change = (
        f"output divergence from the original network {outcome.divergence_before:.4g} → {outcome.divergence_after:.4g}"
    )
    if outcome.kept:
        return f"BatchNorm statistics recalibrated on {outcome.images} images ({change})."
    return (
        f"BatchNorm statistics kept as trained: re-estimated on {outcome.images} images they moved the outputs "
        f"away ({change})."
    )


# --------------------------------------------------------------------------- commands


@explained_errors
def compress(
    file: FileArg,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Where to write the .vc.pt (default: FILE's stem + .vc.pt).")
    ] = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust: TrustOpt = False,
    input_shape: Annotated[
        str | None,
        typer.Option(
            "--input-shape",
            help="N,C,H,W of the images the model takes, e.g. 1,3,32,32: traced with, recorded in the .vc.pt and "
            "used by finetune, evaluate and export. Default 1,3,224,224.",
        ),
    ] = None,
    mode: ModeOpt = "learned",
    secondary: SecondaryOpt = 2,
    channel_window: ChannelWindowOpt = None,
    channel_stride: ChannelStrideOpt = 1,
    mask_sharing: MaskSharingOpt = "per-filter",
    scale: Annotated[
        bool, typer.Option("--scale/--no-scale", help="Learn a scale per secondary filter.", metavar="")
    ] = True,
    target_ratio: TargetRatioOpt = None,
    target_size: Annotated[
        float | None,
        typer.Option(
            "--target-size",
            help="Plan every conv for an int8 file this fraction of the fp32 file, e.g. 0.1: dense or versatile "
            "(s=2, 4; masks per filter or shared), at 2, 3, 4 or 8 bits, whatever changes the outputs least on "
            "--calib-data (no labels); "
            "finetune and export keep each layer's width.",
        ),
    ] = None,
    plan_images: Annotated[
        int, typer.Option("--plan-images", help="Calibration images --target-size measures each choice on.")
    ] = 128,
    convert_first: ConvertFirstOpt = False,
    min_params: MinParamsOpt = 0,
    skip: SkipOpt = None,
    init: Annotated[
        str,
        typer.Option(
            "--init",
            help="fit (data-free least squares under a smooth-input prior; best accuracy before fine-tuning) | "
            "fit-plain (least squares on the weights alone; lowest weight error; for s=2 the better start when "
            "fine-tuning follows, see README) | naive.",
        ),
    ] = "fit",
    calib_data: Annotated[
        Path | None, typer.Option("--calib-data", help="Image folder to recalibrate BatchNorm statistics on.")
    ] = None,
    calib_images: Annotated[
        int | None,
        typer.Option(
            "--calib-images",
            help="Unlabeled images read from --calib-data, for reconstruction and BN recalibration alike "
            "(default 2000, or 1024 with --reconstruct).",
        ),
    ] = None,
    calib_seed: Annotated[
        int | None,
        typer.Option(
            "--calib-seed",
            help="Which random subset of --calib-data is read (default 0; the same seed, the same images): a few "
            "seeds show how much the result depends on the images. Recorded in the file when not 0.",
        ),
    ] = None,
    reconstruct: Annotated[
        bool,
        typer.Option(
            "--reconstruct",
            help="Refit each converted layer (masks, primaries, scales) so its outputs match the original network's "
            "on the --calib-data images, layer by layer (no labels, no training), then recalibrate BatchNorm where "
            "that brings the outputs closer to the original's.",
        ),
    ] = False,
    weight_bits: Annotated[
        int | None,
        typer.Option(
            "--weight-bits",
            help="With --reconstruct: round the primaries to B-bit integers (2-8) against the outputs, so that export "
            "--quantize int8 stores those integers (7: the width of the default --int8-target any files); with "
            "--secondary 1 the convs stay dense at B bits.",
        ),
    ] = None,
    refine_steps: Annotated[
        int | None,
        typer.Option(
            "--refine-steps",
            help="With --reconstruct: after the layer-by-layer fit, gradient steps per block (e.g. a residual block) "
            "on the block's output error against the original's, masks included (default 300 for networks up to 1 G "
            "multiply-accumulates an image, 0 above; 0: none). A block whose error does not fall keeps its "
            "layer-wise fit.",
        ),
    ] = None,
    mean: Annotated[
        str | None, typer.Option("--mean", help="Per-channel input mean, e.g. 0.485,0.456,0.406 (ImageNet's for RGB).")
    ] = None,
    std: Annotated[
        str | None, typer.Option("--std", help="Per-channel input std, e.g. 0.229,0.224,0.225 (ImageNet's for RGB).")
    ] = None,
    as_json: JsonOpt = False,
    memory_budget: MemoryBudgetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Convert the eligible Conv2d layers of a model into versatile ones, initialised from its weights."""
    from vconvert.convert.compress import compress as compress_model
    from vconvert.data.datasets import absolute_data, describe_input, log
    from vconvert.io.checkpoint import save
    from vconvert.io.files import check_writable, same_file
    from vconvert.io.metadata import CheckpointMetadata

    shape = parse_shape(input_shape or DEFAULT_INPUT_SHAPE)
    output = output or file.with_name(file.name.split(".")[0] + ".vc.pt")
    if same_file(output, file):
        raise BadInputError(f"The output {shown(output)} would overwrite the input model; choose another -o.")
    check_writable(output)
    if target_size is not None and calib_data is None:
        raise BadInputError("--target-size measures each layer on images: pass --calib-data (no labels needed).")
    if plan_images < 1:
        raise BadInputError(f"--plan-images must be at least 1; got {plan_images}.")
    calib_images = check_calibration_options(calib_data, calib_images, reconstruct, weight_bits, refine_steps)
    seed = check_calibration_seed(calib_data, calib_seed)
    preprocessing = parse_preprocessing(mean, std, shape, required=calib_data is not None)
    model, base = load_input_model(file, arch, arch_kwargs, trust)
    example = example_input(model, shape)
    size_from = "--input-shape" if input_shape else f"the default {DEFAULT_INPUT_SHAPE}; --input-shape sets it"
    plan_batches = []
    if target_size is not None:
        from vconvert.data.datasets import calibration_batches

        mean_std = preprocessing["mean"], preprocessing["std"]
        plan_batches = list(
            calibration_batches(
                calib_data, (shape[2], shape[3]), *mean_std, limit=plan_images, seed=seed, size_from=size_from
            )
        )
    with progress_bar() as progress:
        converted, plan = compress_model(
            model,
            example,
            mode=mode,
            secondary=secondary,
            channel_window=channel_window,
            channel_stride=channel_stride,
            mask_sharing=mask_sharing,
            scale=scale,
            target_ratio=target_ratio,
            convert_first=convert_first,
            min_params=min_params,
            skip=skip or [],
            init=init,
            progress=fitting_progress(progress, "planning" if target_size is not None else "fitting"),
            target_size=target_size,
            calibration=plan_batches,
            weight_bits=weight_bits,
            reconstructed=reconstruct,
        )
    metadata = CheckpointMetadata(input_shape=shape, preprocessing=preprocessing)
    origin = "--mean/--std" if mean is not None else "ImageNet's, the default for RGB"
    log.info(describe_input(None, size_from, origin, shape=shape, preprocessing=preprocessing))
    recalibration = None
    if calib_data is not None:
        from vconvert.convert.calibrate import recalibrate_batchnorm, recalibrate_if_closer
        from vconvert.data.datasets import calibration_batches

        batches = calibration_batches(
            calib_data, (shape[2], shape[3]), preprocessing["mean"], preprocessing["std"], limit=calib_images,
            seed=seed, size_from=size_from,
        )  # fmt: skip
        subset = {"seed": seed} if seed else {}  # files of the default subset stay as they were
        if reconstruct:
            batches = list(batches)
            metadata.reconstruction = (
                reconstruct_layers(converted, model, batches, calib_data, weight_bits, refine_steps) | subset
            )
            recalibration = recalibrate_if_closer(converted, model, batches, calib_images)
            used = recalibration.images if recalibration.kept else None
        else:
            used = recalibrate_batchnorm(converted, batches, max_images=calib_images)
        if used is not None:
            metadata.bn_recalibration = {"data": absolute_data(str(calib_data)), "images": used} | subset
    save(output, converted, plan, base, model, metadata)
    if as_json:
        record = {"output": str(output), "plan": plan.to_dict(), "summary": plan_summary(plan)}
        if metadata.reconstruction is not None:
            record["reconstruction"] = metadata.reconstruction
        if recalibration is not None:
            record["bn_recalibration"] = asdict(recalibration)
        typer.echo(json.dumps(record, indent=2))
        return
    from vconvert.convert.report import layer_table

    console.print(layer_table(plan.table_rows(), title=f"vconvert compress {file.name}"))
    if plan.traced_with != "fx":
        console.print(labelled("note:", "yellow", plan.trace_note), soft_wrap=True)
    if plan.choice_note:
        console.print(Text(shown(plan.choice_note, None)), soft_wrap=True)
    if metadata.reconstruction is not None:
        record = metadata.reconstruction
        console.print(
            f"Reconstructed {record['layers']} layers on {images_drawn(record)}: mean output error "
            f"{record['error_before']:.4f} → {record['error_after']:.4f} ({record['seconds']:.0f} s)."
        )
        if "refinement" in record:
            console.print(refinement_line(record["refinement"]))
    if recalibration is not None:
        console.print(recalibration_line(recalibration))
    elif calib_data is not None:
        console.print(f"BatchNorm statistics recalibrated on {metadata.bn_recalibration['images']} images.")
    console.print(plan_summary(plan))
    console.print(Text(f"wrote {shown(output, None)}"), soft_wrap=True)
