"""``vconvert evaluate``: top-1/top-5 of a ``.vc.pt``, an ONNX file or a plain model on labelled images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from vconvert.cli.common import (
    ArchKwargsOpt,
    ArchOpt,
    DataOpt,
    DebugOpt,
    JsonOpt,
    MemoryBudgetOpt,
    TrustOpt,
    console,
    explained_errors,
    parse_kwargs,
    parse_normalisation,
    parse_shape,
)
from vconvert.errors import shown


@explained_errors
def evaluate(
    file: Annotated[Path, typer.Argument(help="A .vc.pt, an .onnx (run in onnxruntime) or a plain model file.")],
    data: DataOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust: TrustOpt = False,
    limit: Annotated[int | None, typer.Option("--limit", help="Evaluate on only N images.")] = None,
    input_shape: Annotated[
        str | None, typer.Option("--input-shape", help="N,C,H,W when the file records none.")
    ] = None,
    mean: Annotated[
        str | None,
        typer.Option(
            "--mean",
            help="Per-channel input mean (0-1 scale) the model was trained with; replaces a "
            "recorded one (a plain model records none: ImageNet's is used for RGB folders).",
        ),
    ] = None,
    std: Annotated[str | None, typer.Option("--std", help="Per-channel input std (0-1 scale), with --mean.")] = None,
    as_json: JsonOpt = False,
    memory_budget: MemoryBudgetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Top-1/top-5 of a model file on the evaluation split, measured on the artifact itself."""
    from vconvert.data.datasets import data_as_typed
    from vconvert.evaluate import evaluate_file

    result = evaluate_file(
        file, data, arch=arch, arch_kwargs=parse_kwargs(arch_kwargs), trust=trust, limit=limit,
        input_shape=parse_shape(input_shape) if input_shape else None,
        mean=parse_normalisation(mean, "--mean") if mean else None,
        std=parse_normalisation(std, "--std") if std else None,
    )  # fmt: skip
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        console.print(
            Text(
                f"{shown(file.name)} ({result.kind}) on {data_as_typed(result.data)}: top-1 {result.top1:.2f}%, "
                f"top-5 {result.top5:.2f}% ({result.images} images)"
            ),
            soft_wrap=True,
        )
