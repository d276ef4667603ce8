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
