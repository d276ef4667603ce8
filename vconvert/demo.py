"""`vconvert demo`: the whole pipeline on the shipped sample model and the embedded digits data.

compress (data-free fit) → fine-tune briefly with the original as teacher → export the product
artifact: a compact int8 ONNX file (7-bit primaries, bit-packed masks, QLinearConv kernels; verified
in onnxruntime and under the int8 arithmetic of x86 CPUs without VNNI) → evaluate the ONNX files themselves,
next to the original network exported as fp32 and through onnxruntime's post-training INT8 quantization (the
first thing a user would try), both int8 files written for any CPU (``--int8-target any``: 7-bit weights, which
no CPU's int8 kernels saturate). Every artifact lands in one working folder; a second run overwrites it.
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
    """One model of the final table, measured on its ONNX file."""

    onnx_bytes: int
    macs: int
    top1: float
    latency_ms: float


#: The demo's three files, in table order: the original as fp32, the original through onnxruntime's
#: post-training INT8 quantization, and vconvert's versatile + int8 compact file.
DEMO_FILES = {"original": "original.onnx", "int8_ptq": "original.int8.onnx", "vconvert": "resnet20.onnx"}


@dataclass
class DemoResult:
    workdir: str
    original: DemoRow
    int8_ptq: DemoRow
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
    """Run the pipeline into ``workdir`` and measure the three models on their exported ONNX files."""
    from vconvert.convert.compress import compress
    from vconvert.convert.report import count_macs
    from vconvert.evaluate import evaluate_file
    from vconvert.export.checkpoint import export_checkpoint
    from vconvert.export.pipeline import export
    from vconvert.export.quantize import calibration_images, calibration_source
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
    names = ("resnet20.vc.pt", "resnet20.ft.vc.pt", *DEMO_FILES.values())
    files = {name: workdir / name for name in names}
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
    report = export_checkpoint(
        files["resnet20.ft.vc.pt"], files["resnet20.onnx"], compact=True, quantize="int8", compare_original=False
    )
    finetuned = load_checkpoint(files["resnet20.ft.vc.pt"])
    original.eval()
    export(original, files["original.onnx"], input_shape=shape, measure=False)
    # the images export_checkpoint calibrated the vconvert file on: the recorded data and preprocessing
    source = calibration_source(None, finetuned.metadata)  # recorded by finetune; the export above needed it too
    calibration, _ = calibration_images(str(source), shape, finetuned.metadata.preprocessing)
    export(original, files["original.int8.onnx"], input_shape=shape, quantize="int8", calibration=calibration,
           measure=False)  # fmt: skip
    stages["export"] = time.perf_counter() - started
    quantization = report.quantization or {}
    written_for = "exact on every CPU" if quantization.get("int8_target") == "any" else "for VNNI CPUs"
    say(
        f"3/4 export: versatile + int8 compact ONNX ({quantization.get('weight_bits')}-bit primaries, bit-packed "
        f"masks, {quantization.get('qlinear_conv')} convs as QLinearConv, {written_for}), "
        f"verified in onnxruntime → "
        f"{files['resnet20.onnx']}; the original as fp32 → {files['original.onnx']} and through onnxruntime's "
        f"INT8 PTQ → {files['original.int8.onnx']}"
    )

    started = time.perf_counter()
    accuracy = {key: evaluate_file(files[name], "digits").top1 for key, name in DEMO_FILES.items()}
    _, latency = compare(
        {key: files[name].read_bytes() for key, name in DEMO_FILES.items()}, torch.randn(*shape), seconds=2.0
    )
    stages["evaluate"] = time.perf_counter() - started
    say(f"4/4 evaluate: the ONNX files in onnxruntime on the 360 held-out digits ({stages['evaluate']:.0f} s)")

    example = torch.randn(*shape)
    macs = {"original": count_macs(original, example), "vconvert": count_macs(fold_model(finetuned.model), example)}
    macs["int8_ptq"] = macs["original"]
    rows = {
        key: DemoRow(files[name].stat().st_size, macs[key], accuracy[key], latency[key])
        for key, name in DEMO_FILES.items()
    }
    return DemoResult(str(workdir), **rows, stages_s=stages, files={k: str(v) for k, v in files.items()})
