"""``vconvert inspect``: what a ``.vc.pt`` holds, or what compress would convert in a plain model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.text import Text

from vconvert.cli.common import (
    ArchKwargsOpt,
    ArchOpt,
    ConvertFirstOpt,
    DebugOpt,
    InputShapeOpt,
    JsonOpt,
    MemoryBudgetOpt,
    MinParamsOpt,
    ModeOpt,
    SecondaryOpt,
    SkipOpt,
    TrustOpt,
    console,
    explained_errors,
    labelled,
    parse_shape,
)
from vconvert.cli.compress import example_input, images_drawn, load_input_model, plan_summary
from vconvert.errors import shown

if TYPE_CHECKING:
    from vconvert.io.metadata import CheckpointMetadata


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
    memory_budget: MemoryBudgetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Per-layer table of a .vc.pt (sizes, ratio, fit error, mask density) or of a plain model's convs."""
    from vconvert.convert.compress import compress as compress_model
    from vconvert.convert.plan import refresh_mask_density
    from vconvert.io.checkpoint import is_checkpoint, load_checkpoint

    notes: list[str] = []
    if is_checkpoint(file):
        checkpoint = load_checkpoint(file, trust=trust)
        plan = refresh_mask_density(checkpoint.plan, checkpoint.model)
        title = f"{file.name} (versatile checkpoint)"
        notes = checkpoint_notes(checkpoint.metadata)
    else:
        model, _ = load_input_model(file, arch, arch_kwargs, trust)
        _, plan = compress_model(
            model,
            example_input(model, parse_shape(input_shape)),
            mode=mode,
            secondary=secondary,
            convert_first=convert_first,
            min_params=min_params,
            skip=skip or [],
            dry_run=True,
        )
        title = f"{file.name}: what --mode {mode} would convert"
    if as_json:
        typer.echo(json.dumps({"file": str(file), "plan": plan.to_dict(), "summary": plan_summary(plan)}, indent=2))
        return
    from vconvert.convert.report import layer_table

    console.print(layer_table(plan.table_rows(), title=title))
    if plan.traced_with != "fx":
        console.print(labelled("note:", "yellow", plan.trace_note), soft_wrap=True)
    console.print(plan_summary(plan))
    for note in notes:
        console.print(Text(note), soft_wrap=True)


def _numbers(value: object) -> str | None:
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        return ",".join(f"{v:g}" for v in value)
    return None


def checkpoint_notes(metadata: CheckpointMetadata) -> list[str]:
    """What a .vc.pt says about its input and its training, as lines under the inspect table (the fine-tuning
    record is plain data read from a file, so anything malformed in it is left out rather than trusted, and
    the values it shows are escaped and capped by :func:`shown`)."""
    lines = []
    shape, pre = _numbers(metadata.input_shape), metadata.preprocessing or {}
    if shape:
        mean, std = _numbers(pre.get("mean")), _numbers(pre.get("std"))
        normalised = f", normalised with mean {mean} and std {std}" if mean and std else ""
        lines.append(f"input: N,C,H,W = {shape}{normalised}.")
    tuned = metadata.finetune
    if isinstance(tuned, dict) and isinstance(tuned.get("val_top1"), (int, float)):
        config = tuned.get("config") if isinstance(tuned.get("config"), dict) else {}
        data = (metadata.data or {}).get("source")
        lines.append(
            f"fine-tuned: {shown(tuned.get('epochs_done'))} of {shown(config.get('epochs'))} epochs"
            + (f" on {shown(data)}" if isinstance(data, str) else "")
            + f", masks {shown(config.get('masks'))}, validation top-1 {tuned['val_top1']:.2f}%; fit err is the "
            "compress-time fit, masks is the density now."
        )
    else:
        from vconvert.io.checkpoint import NOT_FINETUNED

        lines.append(NOT_FINETUNED)
    if metadata.weight_quantization is not None:
        bits, quantizer = metadata.weight_quantization["bits"], metadata.weight_quantization["quantizer"]
        lines.append(
            f"primaries: fake-quantised to {bits} bits ({quantizer} step per primary filter); export --quantize int8 "
            f"stores them at {bits} bits (the sizes above are at float primaries)."
        )
    rebuilt = metadata.reconstruction  # checked field by field when the file was read
    if rebuilt is not None:
        lines.append(
            f"reconstructed: {rebuilt['layers']} layers against the original network's outputs on "
            f"{images_drawn(rebuilt, 'unlabeled images')} of {shown(rebuilt['data'])} (mean output error "
            f"{rebuilt['error_before']:.4f} → {rebuilt['error_after']:.4f})."
        )
        refined = rebuilt.get("refinement")
        if refined is not None:
            lines.append(
                f"refined: {refined['kept']} of {refined['blocks']} blocks, {refined['steps']} steps each (mean block "
                f"output error {refined['error_before']:.4f} → {refined['error_after']:.4f})."
            )
    return lines
