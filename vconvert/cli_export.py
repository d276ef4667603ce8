"""``vconvert export``: fold a ``.vc.pt``, write ONNX, verify it in onnxruntime, print before/after."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from vconvert.cli_common import DebugOpt, JsonOpt, TrustOpt, console, explained_errors, parse_shape, progress_bar


def _table(report) -> Table:
    table = Table(title=f"vconvert export → {report.output}")
    table.add_column("", justify="left")
    for row in report.table:
        table.add_column(row["model"], justify="right")
    lines = [
        ("stored parameters", lambda r: f"{r['stored_params']:,}"),
        ("stored size (KiB)", lambda r: f"{r['stored_kib']:,.1f}"),
        ("ONNX file (MB)", lambda r: f"{r['file_bytes'] / 1e6:,.2f}"),
        ("MACs per image", lambda r: f"{r['macs'] / 1e6:,.1f} M"),
        ("onnxruntime latency, batch 1 (ms)", lambda r: f"{r['ort_latency_ms']:.2f}"),
        ("onnxruntime session start (ms)", lambda r: f"{r['ort_startup_ms']:.0f}"),
    ]
    for label, cell in lines:
        table.add_row(label, *(cell(row) for row in report.table))
    return table


@explained_errors
def export(
    file: Annotated[Path, typer.Argument(help="A .vc.pt checkpoint written by vconvert compress or finetune.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the .onnx file.")],
    compact: Annotated[
        bool,
        typer.Option("--compact", help="Store primary filters + bit-packed masks; rebuild dense weights in-graph."),
    ] = False,
    ring: Annotated[
        bool,
        typer.Option(
            "--ring",
            help="Run each spatial-mode versatile conv as one cropped conv per ring size (fewer MACs); "
            "other convs fold densely. Not with --compact.",
        ),
    ] = False,
    fold_bn: Annotated[
        bool, typer.Option("--fold-bn/--no-fold-bn", help="Fuse each BatchNorm into the conv right before it.")
    ] = True,
    input_shape: Annotated[
        str | None,
        typer.Option(
            "--input-shape", help="N,C,H,W to export at (default: the checkpoint's); the batch stays dynamic."
        ),
    ] = None,
    compare_original: Annotated[
        bool,
        typer.Option("--compare/--no-compare", help="Also export the original network to measure it side by side."),
    ] = True,
    tolerance: Annotated[
        float, typer.Option("--tolerance", help="Allowed max abs difference, as a fraction of the output scale.")
    ] = 1e-4,
    trust: TrustOpt = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Fold a converted model into plain convs, write ONNX and verify it in onnxruntime before reporting."""
    from vconvert.errors import BadInputError
    from vconvert.export import RING_WITH_COMPACT, export_checkpoint
    from vconvert.io import check_writable

    if ring and compact:
        raise BadInputError(RING_WITH_COMPACT)
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
        )
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    console.print(_table(report))
    parity = report.parity
    console.print(report.graph_note + ".")
    console.print(
        f"verified in onnxruntime on {report.inputs} (batches {parity['batches']}): max abs difference "
        f"{parity['max_abs_diff']:.2g} ({parity['max_abs_diff'] / parity['output_scale']:.2g} of the output scale), "
        "top-1 identical"
        + (
            f"; compact vs dense max difference {report.compact_vs_dense_max_abs_diff:.2g}"
            if report.compact_vs_dense_max_abs_diff is not None
            else ""
        )
    )
    console.print(f"wrote {report.output} ({report.file_bytes / 1e6:,.2f} MB, opset {report.opset})")
