"""`vconvert demo`: the whole pipeline on the shipped sample model and the embedded digits data.

compress (data-free fit) → fine-tune briefly with the original as teacher → export a compact ONNX
(verified in onnxruntime) → evaluate the ONNX file itself, next to the original network exported
and evaluated the same way. Every artifact lands in one working folder; a second run overwrites it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch

SAMPLE_WEIGHTS = "resnet20_digits.pt"


@dataclass
class DemoRow:
    """One side of the final before/after table."""

    stored_kib: float
    onnx_mb: float
    macs: int
    top1: float
    latency_ms: float


@dataclass
class DemoResult:
    workdir: str
    original: DemoRow
    vconvert: DemoRow
    stages_s: dict
    files: dict

    def to_dict(self) -> dict:
        return asdict(self)


def sample_model_files() -> tuple[Path, dict]:
    """The shipped sample state_dict and its training record (arch, kwargs, data, accuracy, command)."""
    folder = Path(str(resources.files("sample_models") / "weights"))
    weights = folder / SAMPLE_WEIGHTS
    return weights, json.loads(weights.with_suffix(".json").read_text())


def run_demo(
    workdir: str | Path,
    epochs: int = 3,
    say: Callable[[str], None] = print,
    progress: Callable[[int, int, dict], None] | None = None,
) -> DemoResult:
    """Run the pipeline into ``workdir`` and measure both models on their exported ONNX files."""
    from vconvert.convert.compress import compress
    from vconvert.convert.report import count_macs, model_stored_bits
    from vconvert.evaluate import evaluate_file
    from vconvert.export.checkpoint import export_checkpoint
    from vconvert.export.pipeline import export
    from vconvert.export.verify import compare
    from vconvert.io.checkpoint import load_checkpoint, save
    from vconvert.io.metadata import CheckpointMetadata
    from vconvert.io.untrusted import load_model
    from vconvert.nn.versatile import fold_model
    from vconvert.train.config import FinetuneConfig
    from vconvert.train.finetune import finetune

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    weights, record = sample_model_files()
    spec = record["data"]
    shape = [1, spec["channels"], *spec["input_size"]]
    files = {name: workdir / name for name in ("resnet20.vc.pt", "resnet20.ft.vc.pt", "resnet20.onnx", "original.onnx")}
    stages: dict[str, float] = {}

    started = time.perf_counter()
    original, base = load_model(weights, arch=record["arch"], arch_kwargs=record["arch_kwargs"])
    converted, plan = compress(original, torch.randn(*shape))
    preprocessing = {"mean": spec["mean"], "std": spec["std"], "input_size": spec["input_size"]}
    metadata = CheckpointMetadata(input_shape=shape, preprocessing=preprocessing)
    save(files["resnet20.vc.pt"], converted, plan, base, original, metadata)
    stages["compress"] = time.perf_counter() - started
    say(
        f"1/4 compress: {len(plan.converted)} of {len(plan.layers)} convs made versatile (learned masks, s=2), "
        f"stored size {plan.ratio:.2f}x smaller → {files['resnet20.vc.pt']}"
    )

    started = time.perf_counter()
    history = finetune(
        files["resnet20.vc.pt"],
        files["resnet20.ft.vc.pt"],
        FinetuneConfig(data="digits", epochs=epochs, workers=0),
        progress=progress,
    )
    stages["finetune"] = time.perf_counter() - started
    say(
        f"2/4 finetune: {epochs} epoch{'' if epochs == 1 else 's'} on digits with the original as teacher, "
        f"val top-1 {history[-1].val_top1:.2f}% → {files['resnet20.ft.vc.pt']}"
    )

    started = time.perf_counter()
    export_checkpoint(files["resnet20.ft.vc.pt"], files["resnet20.onnx"], compact=True, compare_original=False)
    export(original, files["original.onnx"], input_shape=shape, measure=False)
    stages["export"] = time.perf_counter() - started
    say(f"3/4 export: compact ONNX verified in onnxruntime → {files['resnet20.onnx']}")

    started = time.perf_counter()
    accuracy = {name: evaluate_file(files[name], "digits").top1 for name in ("original.onnx", "resnet20.onnx")}
    _, latency = compare(
        {name: files[name].read_bytes() for name in ("original.onnx", "resnet20.onnx")},
        torch.randn(*shape),
        seconds=2.0,
    )
    stages["evaluate"] = time.perf_counter() - started
    say(f"4/4 evaluate: the ONNX files in onnxruntime on the 360 held-out digits ({stages['evaluate']:.0f} s)")

    finetuned = load_checkpoint(files["resnet20.ft.vc.pt"]).model
    example = torch.randn(*shape)
    rows = {
        "original": DemoRow(
            model_stored_bits(original) / 8192,
            files["original.onnx"].stat().st_size / 1e6,
            count_macs(original, example),
            accuracy["original.onnx"],
            latency["original.onnx"],
        ),
        "vconvert": DemoRow(
            model_stored_bits(finetuned) / 8192,
            files["resnet20.onnx"].stat().st_size / 1e6,
            count_macs(fold_model(finetuned), example),
            accuracy["resnet20.onnx"],
            latency["resnet20.onnx"],
        ),
    }
    return DemoResult(str(workdir), rows["original"], rows["vconvert"], stages, {k: str(v) for k, v in files.items()})
