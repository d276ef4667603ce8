"""``vconvert demo``: the whole pipeline on the shipped sample model and data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from vconvert.cli.common import (
    DebugOpt,
    JsonOpt,
    console,
    epoch_progress,
    explained_errors,
)


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
    for column in ("", "ONNX file", "top-1 (%)", "latency (ms)", "MACs"):
        table.add_column(column, justify="right" if column else "left")
    base = result.original
    for label, row in (("original (fp32)", base), ("INT8 PTQ (onnxruntime)", result.int8_ptq),
                       ("vconvert (s=2 + int8)", result.vconvert)):  # fmt: skip
        size, speed = row.onnx_bytes / base.onnx_bytes, row.latency_ms / base.latency_ms
        table.add_row(
            label,
            f"{row.onnx_bytes / 1e3:,.1f} KB" + ("" if row is base else f" {size:.2f}x"),
            f"{row.top1:.2f}",
            f"{row.latency_ms:.2f}" + ("" if row is base else f" {speed:.2f}x"),
            f"{row.macs / 1e6:.1f} M",
        )
    console.print(table)
    console.print(
        "top-1 on the 360 held-out digits; latency: onnxruntime, batch 1, median, the three files side by side; "
        "ratios against the original"
    )
    stages = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in result.stages_s.items())
    console.print(f"artifacts in {result.workdir}/ ({stages})")
