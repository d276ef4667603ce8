"""``vconvert export``: fold a ``.vc.pt``, write ONNX (optionally QDQ int8), verify it in onnxruntime,
print before/after."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from vconvert.cli.common import (
    DebugOpt,
    JsonOpt,
    MemoryBudgetOpt,
    TrustOpt,
    check_weight_bits,
    console,
    explained_errors,
    parse_shape,
    progress_bar,
)


def _table(report) -> Table:
    table = Table(title=f"vconvert export → {report.output}")
    table.add_column("", justify="left")
    for row in report.table:
        table.add_column(row["model"], justify="right")
    lines = [
        ("stored parameters", lambda r: f"{r['stored_params']:,}"),
        ("stored size (KiB)", lambda r: f"{r['stored_kib']:,.1f}"),
        ("bits per weight", lambda r: f"{r['bits_per_weight']:.2f}"),
        ("ONNX file (MB)", lambda r: f"{r['file_bytes'] / 1e6:,.2f}"),
        ("MACs per image", lambda r: f"{r['macs'] / 1e6:,.1f} M"),
        ("onnxruntime latency, batch 1 (ms)", lambda r: f"{r['ort_latency_ms']:.2f}"),
        ("onnxruntime session start (ms)", lambda r: f"{r['ort_startup_ms']:.0f}"),
    ]
    for label, cell in lines:
        table.add_row(label, *(cell(row) for row in report.table))
    return table


def _int8_summary(report) -> str:
    """One paragraph on the int8 file against the fp32 dense file measured in the same run."""
    info = report.quantization
    rows = {row["model"]: row for row in report.table}
    exported, fp32 = rows["exported"], rows["dense fold"]
    text = (
        f"int8 ({'compact' if info['compact'] else 'dense'}): {_widths(info)} primaries, "
        f"{exported['bits_per_weight']:.2f} bits per weight, "
        f"file {fp32['file_bytes'] / exported['file_bytes']:.2f}x smaller than the fp32 dense file"
    )
    if exported["ort_latency_ms"] == exported["ort_latency_ms"]:  # not NaN: latency was measured
        text += f", onnxruntime latency {exported['ort_latency_ms'] / fp32['ort_latency_ms']:.2f}x of it"
    text += (
        f"; {info['qlinear_conv']} convs run as QLinearConv ({info['converted_as_qlinear']} of "
        f"{info['converted_convs']} converted, {info['float_conv']} float convs left); top-1 agrees with the fp32 "
        f"file{' (the fake-quantised model)' if info['weights_equal_fake_quantised'] else ''} on "
        f"{100 * info['top1_agreement']:.1f}% of {info['agreement_images']} calibration images "
        f"({info.get('calibration') or 'given'})"
    )
    text += "; " + _target_note(info)
    if info["compact_equals_dense"]:
        text += "; compact and dense int8 outputs identical"
    if info["weights_equal_fake_quantised"]:
        text += "; its integers are the fine-tuned ones (dequantized weights equal the fake-quantised weights)"
    return text


def _widths(info: dict) -> str:
    """``4-bit``, or ``2- to 8-bit`` for a plan that gives each layer its own width."""
    from vconvert.export.pipeline import widths_text

    return widths_text(info.get("layer_weight_bits") or info["weight_bits"])


def _target_note(info: dict) -> str:
    """Which CPUs the int8 file is exact on, and its agreement under the arithmetic of x86 without VNNI."""
    check = info.get("agreement") or {}
    images = info["agreement_images"]
    if info.get("int8_target") == "any":
        return (
            f"written for any CPU (--int8-target any): {_widths(info)} weights, largest |q| "
            f"{check.get('max_abs_weight')}, so no u8 x s8 pair can saturate on x86 without VNNI and every CPU "
            f"computes these integers"
        )
    saturating = check.get("saturating", float("nan"))
    return (
        f"written for VNNI/AMX/ARM dot-product CPUs (--int8-target vnni): {check.get('saturating_pairs', 0):,} weight "
        f"pairs can saturate on x86 without VNNI, where the saturating reference agrees on {100 * saturating:.1f}% of "
        f"{images} images (exact int32 {100 * check.get('exact', float('nan')):.1f}%; --int8-target any avoids it)"
    )


@explained_errors
def export(
    file: Annotated[Path, typer.Argument(help="A .vc.pt checkpoint written by vconvert compress or finetune.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the .onnx file.")],
    compact: Annotated[
        bool,
        typer.Option(
            "--compact", help="Store primary filters + bit-packed masks; rebuild dense weights in-graph.", metavar=""
        ),
    ] = False,
    ring: Annotated[
        bool,
        typer.Option(
            "--ring",
            help="Run each spatial-mode versatile conv as one cropped conv per ring size (fewer MACs); "
            "other convs fold densely. Not with --compact.",
            metavar="",
        ),
    ] = False,
    fold_bn: Annotated[
        bool,
        typer.Option("--fold-bn/--no-fold-bn", help="Fuse each BatchNorm into the conv right before it.", metavar=""),
    ] = True,
    input_shape: Annotated[
        str | None,
        typer.Option(
            "--input-shape", help="N,C,H,W to export at (default: the checkpoint's); the batch stays dynamic."
        ),
    ] = None,
    compare_original: Annotated[
        bool,
        typer.Option(
            "--compare/--no-compare", help="Also export the original network to measure it side by side.", metavar=""
        ),
    ] = True,
    tolerance: Annotated[
        float, typer.Option("--tolerance", help="Allowed max abs difference, as a fraction of the output scale.")
    ] = 1e-4,
    quantize: Annotated[
        str,
        typer.Option(
            "--quantize",
            help="none | int8: QDQ int8 (uint8 activations, int8 weights per channel; converted convs as exact "
            "int8 secondary filters). Not with --ring.",
        ),
    ] = "none",
    calib_data: Annotated[
        str | None,
        typer.Option(
            "--calib-data",
            help="Images to calibrate int8 activation ranges on: a folder (read recursively, train/ if it has one) "
            "or digits (default: the data the checkpoint records).",
        ),
    ] = None,
    calib_images: Annotated[int, typer.Option("--calib-images", help="Calibration images used for int8.")] = 512,
    weight_bits: Annotated[
        int | None,
        typer.Option(
            "--weight-bits",
            help="With --quantize int8: the primary filters as 2- to 8-bit integers (below 8 stored at exactly that "
            "many bits, widened to int8 in the graph, still QLinearConv). Default: the width the checkpoint was "
            "fine-tuned at (finetune --weight-bits), else 8; another width warns with the top-1 change it causes.",
        ),
    ] = None,
    int8_target: Annotated[
        str,
        typer.Option(
            "--int8-target",
            help="With --quantize int8, the CPUs the file will run on: any (7-bit weights: exact on every CPU, "
            "including x86 without VNNI, whose int8 kernels saturate 8-bit weights) or vnni (8-bit weights for x86 "
            "with VNNI or AMX and ARM with dot products). 4-bit primaries stay 4-bit.",
        ),
    ] = "any",
    min_agreement: Annotated[
        float,
        typer.Option(
            "--min-agreement",
            help="With --quantize int8: the share of calibration images (0 to 1) on which the int8 file must pick "
            "the fp32 file's top-1 class, on this CPU and under the arithmetic of the CPUs --int8-target covers.",
        ),
    ] = 0.9,
    trust: TrustOpt = False,
    as_json: JsonOpt = False,
    memory_budget: MemoryBudgetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Fold a converted model into plain convs, write ONNX and verify it in onnxruntime before reporting."""
    from vconvert.errors import BadInputError
    from vconvert.export.checkpoint import export_checkpoint
    from vconvert.export.pipeline import RING_WITH_COMPACT
    from vconvert.export.quantize import QUANTIZE_CHOICES, check_int8_target, check_min_agreement
    from vconvert.io.files import check_writable

    if ring and compact:
        raise BadInputError(RING_WITH_COMPACT)
    if quantize not in QUANTIZE_CHOICES:
        raise BadInputError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}.")
    if ring and quantize != "none":
        raise BadInputError("--ring cannot be combined with --quantize (ring convs stay float); choose one.")
    if quantize == "none" and calib_data is not None:
        raise BadInputError("--calib-data is used only with --quantize int8; add it or drop --calib-data.")
    if calib_images < 1:
        raise BadInputError(f"--calib-images must be at least 1, got {calib_images}.")
    check_weight_bits(weight_bits)
    if weight_bits is not None and quantize != "int8":
        raise BadInputError("--weight-bits sets the width of int8 primaries: add --quantize int8 or drop it.")
    check_int8_target(int8_target)
    check_min_agreement(min_agreement)
    if quantize != "int8" and (int8_target != "any" or min_agreement != 0.9):
        raise BadInputError("--int8-target and --min-agreement apply to int8 files: add --quantize int8 or drop them.")
    check_writable(output)
    shape = parse_shape(input_shape) if input_shape else None
    with progress_bar() as progress:
        task = progress.add_task("export", total=None)
        report = export_checkpoint(
            file,
            output,
            trust=trust,
            compact=compact,
            ring=ring,
            fold_bn=fold_bn,
            input_shape=shape,
            compare_original=compare_original,
            tolerance=tolerance,
            progress=lambda text: progress.update(task, description=text),
            quantize=quantize,
            calib_data=calib_data,
            calib_images=calib_images,
            weight_bits=weight_bits,
            min_agreement=min_agreement,
            int8_target=int8_target,
        )
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    console.print(_table(report))
    if not compact and not ring:
        console.print(
            "This file stores every conv dense (folded); --compact stores the primary filters and bit-packed masks "
            "themselves, so the file shrinks to about the stored size above."
        )
    parity = report.parity
    console.print(report.graph_note + ".")
    console.print(
        ("the fp32 file " if report.quantization is not None else "")
        + f"verified in onnxruntime on {report.inputs} (batches {parity['batches']}): max abs difference "
        f"{parity['max_abs_diff']:.2g} ({parity['max_abs_diff'] / parity['output_scale']:.2g} of the output scale), "
        "top-1 identical"
        + (
            f"; compact vs dense max difference {report.compact_vs_dense_max_abs_diff:.2g}"
            if report.compact_vs_dense_max_abs_diff is not None
            else ""
        )
    )
    if report.quantization is not None:
        console.print(_int8_summary(report) + ".")
    console.print(f"wrote {report.output} ({report.file_bytes / 1e6:,.2f} MB, opset {report.opset})")
