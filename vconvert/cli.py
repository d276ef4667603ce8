"""The ``vconvert`` command line: a thin typer layer over the Python API."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import torch
import typer

from vconvert import __version__
from vconvert.cli_common import (
    ArchKwargsOpt,
    ArchOpt,
    ChannelStrideOpt,
    ChannelWindowOpt,
    ConvertFirstOpt,
    DebugOpt,
    FileArg,
    InputShapeOpt,
    JsonOpt,
    MaskSharingOpt,
    MinParamsOpt,
    ModeOpt,
    SecondaryOpt,
    SkipOpt,
    TargetRatioOpt,
    TrustOpt,
    console,
    epoch_progress,
    explained_errors,
    fitting_progress,
    parse_kwargs,
    parse_preprocessing,
    parse_shape,
    progress_bar,
)
from vconvert.data import describe_input, log
from vconvert.errors import BadInputError

app = typer.Typer(
    name="vconvert",
    help="Convert the convolutions of a pretrained PyTorch CNN into versatile convolutions "
    "(few primary filters expanded by binary masks), fine-tune them and export to ONNX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"vconvert {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """vconvert: compress, fine-tune and export CNNs with versatile convolutions."""


def _load_input_model(file: Path, arch: str | None, arch_kwargs: str | None, trust: bool):
    from vconvert.io import load_model

    return load_model(file, arch=arch, arch_kwargs=parse_kwargs(arch_kwargs), trust=trust)


def _summary(plan) -> str:
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


# --------------------------------------------------------------------------- commands
@app.command()
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
    calib_images: Annotated[int, typer.Option("--calib-images", help="Images used for BN recalibration.")] = 2000,
    mean: Annotated[
        str | None, typer.Option("--mean", help="Per-channel input mean, e.g. 0.485,0.456,0.406 (ImageNet's for RGB).")
    ] = None,
    std: Annotated[
        str | None, typer.Option("--std", help="Per-channel input std, e.g. 0.229,0.224,0.225 (ImageNet's for RGB).")
    ] = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Convert the eligible Conv2d layers of a model into versatile ones, initialised from its weights."""
    from vconvert.api import save
    from vconvert.convert import compress as compress_model
    from vconvert.io import check_writable

    shape = parse_shape(input_shape or DEFAULT_INPUT_SHAPE)
    output = output or file.with_name(file.name.split(".")[0] + ".vc.pt")
    if output.resolve() == file.resolve():
        raise BadInputError(f"The output {output} would overwrite the input model; choose another -o.")
    check_writable(output)
    preprocessing = parse_preprocessing(mean, std, shape, required=calib_data is not None)
    model, base = _load_input_model(file, arch, arch_kwargs, trust)
    example = torch.randn(*shape)
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
            progress=fitting_progress(progress, "fitting"),
        )
    metadata: dict = {"input_shape": shape, "preprocessing": preprocessing}
    size_from = "--input-shape" if input_shape else f"the default {DEFAULT_INPUT_SHAPE}; --input-shape sets it"
    origin = "--mean/--std" if mean is not None else "ImageNet's, the default for RGB"
    log.info(describe_input(None, size_from, origin, shape=shape, preprocessing=preprocessing))
    if calib_data is not None:
        from vconvert.calibrate import recalibrate_batchnorm
        from vconvert.data import calibration_batches

        batches = calibration_batches(
            calib_data, (shape[2], shape[3]), preprocessing["mean"], preprocessing["std"], limit=calib_images,
            size_from=size_from,
        )  # fmt: skip
        used = recalibrate_batchnorm(converted, batches, max_images=calib_images)
        metadata["bn_recalibration"] = {"data": str(calib_data), "images": used}
    save(output, converted, plan, base, model, metadata)
    if as_json:
        typer.echo(json.dumps({"output": str(output), "plan": plan.to_dict(), "summary": _summary(plan)}, indent=2))
        return
    from vconvert.report import layer_table

    console.print(layer_table(plan.table_rows(), title=f"vconvert compress {file.name}"))
    if plan.traced_with != "fx":
        console.print(f"[yellow]note:[/] {plan.trace_note}")
    if plan.choice_note:
        console.print(plan.choice_note)
    if calib_data is not None:
        console.print(f"BatchNorm statistics recalibrated on {metadata['bn_recalibration']['images']} images.")
    console.print(f"{_summary(plan)}\nwrote {output}")


@app.command()
@explained_errors
def inspect(
    file: Annotated[Path, typer.Argument(help="A .vc.pt checkpoint, or a plain model (what would convert).")],
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust: TrustOpt = False,
    input_shape: InputShapeOpt = "1,3,224,224",
    mode: ModeOpt = "learned",
    secondary: SecondaryOpt = 2,
    convert_first: ConvertFirstOpt = False,
    min_params: MinParamsOpt = 0,
    skip: SkipOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Per-layer table of a .vc.pt (sizes, ratio, fit error, mask density) or of a plain model's convs."""
    from vconvert.api import is_checkpoint, load_checkpoint
    from vconvert.convert import compress as compress_model
    from vconvert.convert import refresh_mask_density

    notes: list[str] = []
    if is_checkpoint(file):
        checkpoint = load_checkpoint(file, trust=trust)
        plan = refresh_mask_density(checkpoint.plan, checkpoint.model)
        title = f"{file.name} (versatile checkpoint)"
        notes = checkpoint_notes(checkpoint.metadata)
    else:
        model, _ = _load_input_model(file, arch, arch_kwargs, trust)
        _, plan = compress_model(
            model,
            torch.randn(*parse_shape(input_shape)),
            mode=mode,
            secondary=secondary,
            convert_first=convert_first,
            min_params=min_params,
            skip=skip or [],
            dry_run=True,
        )
        title = f"{file.name}: what --mode {mode} would convert"
    if as_json:
        typer.echo(json.dumps({"file": str(file), "plan": plan.to_dict(), "summary": _summary(plan)}, indent=2))
        return
    from vconvert.report import layer_table

    console.print(layer_table(plan.table_rows(), title=title))
    if plan.traced_with != "fx":
        console.print(f"[yellow]note:[/] {plan.trace_note}")
    console.print(_summary(plan))
    for note in notes:
        console.print(note, highlight=False)


def _numbers(value: object) -> str | None:
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        return ",".join(f"{v:g}" for v in value)
    return None


def checkpoint_notes(metadata: object) -> list[str]:
    """What a .vc.pt says about its input and its training, as lines under the inspect table (fields are
    read from a file, so anything malformed is left out rather than trusted)."""
    metadata = metadata if isinstance(metadata, dict) else {}
    lines = []
    shape, pre = _numbers(metadata.get("input_shape")), metadata.get("preprocessing")
    pre = pre if isinstance(pre, dict) else {}
    if shape:
        mean, std = _numbers(pre.get("mean")), _numbers(pre.get("std"))
        normalised = f", normalised with mean {mean} and std {std}" if mean and std else ""
        lines.append(f"input: N,C,H,W = {shape}{normalised}.")
    tuned = metadata.get("finetune")
    if isinstance(tuned, dict) and isinstance(tuned.get("val_top1"), (int, float)):
        config = tuned.get("config") if isinstance(tuned.get("config"), dict) else {}
        data = metadata.get("data", {}).get("source") if isinstance(metadata.get("data"), dict) else None
        lines.append(
            f"fine-tuned: {tuned.get('epochs_done')} of {config.get('epochs')} epochs"
            + (f" on {data}" if isinstance(data, str) else "")
            + f", masks {config.get('masks')}, validation top-1 {tuned['val_top1']:.2f}%; fit err is the "
            "compress-time fit, masks is the density now."
        )
    else:
        from vconvert.api import NOT_FINETUNED

        lines.append(NOT_FINETUNED)
    return lines


from vconvert.cli_finetune import evaluate, finetune  # noqa: E402  (commands of their own module)

app.command()(finetune)
app.command()(evaluate)

from vconvert.cli_export import export  # noqa: E402

app.command()(export)


@app.command()
@explained_errors
def demo(
    workdir: Annotated[Path, typer.Option("--workdir", help="Folder for every artifact of the demo.")] = Path(
        "demo-output"
    ),
    epochs: Annotated[int, typer.Option("--epochs", help="Fine-tuning epochs.")] = 3,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """The whole pipeline on the shipped sample model (ResNet-20 on scikit-learn's digits)."""
    from rich.table import Table

    from vconvert.demo import run_demo

    progress, on_step = epoch_progress(epochs, enabled=not as_json)
    with progress:
        result = run_demo(workdir, epochs=epochs, say=(lambda _: None) if as_json else console.print, progress=on_step)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    table = Table(title="vconvert demo: ResNet-20 on digits, measured on the exported ONNX files")
    for column in ("", "original", "vconvert", "ratio"):
        table.add_column(column, justify="right" if column else "left")
    before, after = result.original, result.vconvert
    table.add_row("stored weights (KiB)", f"{before.stored_kib:,.1f}", f"{after.stored_kib:,.1f}",
                  f"{before.stored_kib / after.stored_kib:.2f}x smaller")  # fmt: skip
    table.add_row("ONNX file (MB)", f"{before.onnx_mb:.2f}", f"{after.onnx_mb:.2f}",
                  f"{before.onnx_mb / after.onnx_mb:.2f}x smaller")  # fmt: skip
    table.add_row("MACs per image", f"{before.macs / 1e6:.1f} M", f"{after.macs / 1e6:.1f} M",
                  f"{after.macs / before.macs:.2f}x")  # fmt: skip
    table.add_row("top-1, 360 test digits (%)", f"{before.top1:.2f}", f"{after.top1:.2f}",
                  f"{after.top1 - before.top1:+.2f} points")  # fmt: skip
    table.add_row("onnxruntime latency, batch 1 (ms)", f"{before.latency_ms:.2f}", f"{after.latency_ms:.2f}",
                  f"{after.latency_ms / before.latency_ms:.2f}x")  # fmt: skip
    console.print(table)
    stages = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in result.stages_s.items())
    console.print(f"artifacts in {result.workdir}/ ({stages})")


def run() -> None:
    """Console-script entry point."""
    app(prog_name="vconvert")


if __name__ == "__main__":
    sys.exit(run())
