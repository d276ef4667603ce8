"""int8 files for every CPU (issue 28): a checkpoint exported as fp32 and as int8 compact for ``--int8-target any``
(7-bit weights) and ``vnni`` (8-bit), each evaluated in onnxruntime on this CPU and, for x86 without VNNI, as the
saturating reference (:func:`vconvert.export.saturation.saturating_model` of its dense int8 file: the QDQ graph
with the int16 pair saturation added to every quantized Conv/Gemm).

    python benchmarks/int8_targets.py --checkpoint FILE.vc.pt [--work DIR] [--eval-limit N] [--output STEM]

Defaults: the data-free s=2 ResNet-20 of the shared CIFAR-10 model (``compress --mode learned --secondary 2
--skip downsample``, as benchmarks/pareto.py builds it; made in ``--work`` when missing), 10,000 test images,
512 calibration images from the training split. Latency on an x86 CPU without VNNI cannot be measured on a CPU
that has VNNI (the numpy/ONNX reference gives the arithmetic, not the speed): the record says so.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `benchmarks` importable
from benchmarks import common
from benchmarks.cifar10 import INPUT_SHAPE, MEAN, STD

ARCH = "sample_models.resnet_cifar:resnet20"
TARGETS = ("any", "vnni")
LATENCY_NOTE = (
    "Latency on x86 without VNNI is not measured: this CPU has AVX-512 VNNI, and the reference reproduces the "
    "arithmetic of those CPUs, not their speed."
)


def compressed_checkpoint(work: Path, args: argparse.Namespace, run: common.Runner) -> Path:
    """The data-free s=2 ResNet-20 (compress defaults, BN recalibrated on CIFAR-10 training images), made once."""
    output = work / "s2.vc.pt"
    if not output.exists():
        run("compress", str(args.models / common.RESNET20_FILE), "--arch", ARCH, "--input-shape",
            ",".join(map(str, INPUT_SHAPE)), "--skip", "downsample", "--mean", MEAN, "--std", STD,
            "--calib-data", str(args.cifar), "--mode", "learned", "--secondary", "2", "-o", str(output))  # fmt: skip
    return output


def saturating_reference_file(dense: Path, output: Path) -> bool:
    """Write the saturating reference of the dense int8 file ``dense`` to ``output``; False when no weight pair
    can saturate (the file then computes the same integers on every CPU, and is its own reference)."""
    from vconvert.export.saturation import saturating_model

    model = saturating_model(onnx.load(str(dense)))
    if model is None:
        return False
    output.write_bytes(model.SerializeToString())
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a .vc.pt (default: the data-free s=2 ResNet-20)")
    parser.add_argument("--work", type=Path, default=common.ROOT / "cache" / "int8_targets")
    parser.add_argument("--models", type=Path, default=common.MODELS)
    parser.add_argument("--cifar", type=Path, default=common.CIFAR_CACHE)
    parser.add_argument("--shared-data", type=Path, default=common.SHARED_CIFAR)
    parser.add_argument("--eval-limit", type=int, default=10000)
    parser.add_argument("--calib-images", type=int, default=512)
    parser.add_argument("--output", type=Path, default=common.RESULTS / "int8_targets_resnet20_s2")
    args = parser.parse_args()
    common.ensure_cifar(args.cifar, args.shared_data)
    args.work.mkdir(parents=True, exist_ok=True)
    run = common.Runner(args.work, echo=True)
    started = time.perf_counter()
    checkpoint = args.checkpoint or compressed_checkpoint(args.work, args, run)
    stem = checkpoint.name.removesuffix(".vc.pt")
    record: dict[str, Any] = {
        "benchmark": "int8_targets",
        "command": common.command_line(__file__, quote=True),
        "checkpoint": str(checkpoint).replace(str(common.ROOT), "."),
        "eval_images": args.eval_limit,
        "calibration_images": args.calib_images,
        "machine": {
            **common.host(),
            **common.versions("python", "torch", "onnxruntime", "onnx"),
            "load_average_start": common.load_average(),
        },
        "latency_without_vnni": LATENCY_NOTE,
        "commands": run.commands,
        "rows": [],
    }

    def evaluate(name: str, path: Path, **extra: Any) -> None:
        result, seconds = run("evaluate", str(path), "--data", str(args.cifar), "--limit", str(args.eval_limit))
        row = {"artifact": name, "file_bytes": path.stat().st_size, "top1": result["top1"],
               "images": result["images"], "evaluate_s": round(seconds, 1), **extra}  # fmt: skip
        record["rows"].append(row)
        print(row, flush=True)
        write(record, args.output)

    fp32 = args.work / f"{stem}.fp32.onnx"
    run("export", str(checkpoint), "-o", str(fp32), "--no-compare")
    evaluate("fp32 (dense fold)", fp32, arithmetic="float")
    calibration = ["--calib-data", str(args.cifar / "train"), "--calib-images", str(args.calib_images)]
    for target in TARGETS:
        compact, dense = args.work / f"{stem}.int8.{target}.onnx", args.work / f"{stem}.int8.{target}.dense.onnx"
        exported, _ = run("export", str(checkpoint), "-o", str(compact), "--quantize", "int8", "--compact",
                          "--int8-target", target, "--min-agreement", "0", *calibration, "--no-compare")  # fmt: skip
        run("export", str(checkpoint), "-o", str(dense), "--quantize", "int8", "--int8-target", target,
            "--min-agreement", "0", *calibration, "--no-compare")  # fmt: skip
        info = exported["quantization"]
        checks = {"weight_bits": info["weight_bits"], "agreement_on_calibration": info["agreement"]}
        evaluate(f"int8 compact, --int8-target {target}", compact, arithmetic="onnxruntime on this CPU", **checks)
        reference = args.work / f"{stem}.int8.{target}.saturating.onnx"
        if saturating_reference_file(dense, reference):
            evaluate(f"int8 compact, --int8-target {target}, x86 without VNNI (saturating reference)", reference,
                     arithmetic="saturating reference", weight_bits=info["weight_bits"])  # fmt: skip
        else:
            record["rows"].append({"artifact": f"int8 compact, --int8-target {target}, x86 without VNNI",
                                   "same_as": "onnxruntime on this CPU (no weight pair can saturate)"})  # fmt: skip
    record["wall_s"] = round(time.perf_counter() - started, 1)
    record["machine"]["load_average_end"] = common.load_average()
    write(record, args.output)
    print(args.output.with_suffix(".md").read_text())


def write(record: dict[str, Any], stem: Path) -> None:
    """The JSON record and a Markdown table (top-1 and Δ against the fp32 row)."""
    common.write_json(stem.with_suffix(".json"), record)
    rows = [row for row in record["rows"] if "top1" in row]
    base = rows[0]["top1"] if rows else float("nan")
    lines = [
        "# int8 files for every CPU: --int8-target any (7-bit weights) vs vnni (8-bit)",
        "",
        f"Command: `{record['command']}`  ",
        f"Checkpoint {record['checkpoint']}; top-1 of each ONNX file on {record['eval_images']} CIFAR-10 test images; "
        f"{record['calibration_images']} calibration images.",
        "",
        "| artifact | arithmetic | weight bits | file bytes | top-1 | Δ vs fp32 | agreement on calibration images "
        "(this CPU / exact / x86 without VNNI) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        check = row.get("agreement_on_calibration")
        agreement = (f"{100 * check['runtime']:.2f} / {100 * check['exact']:.2f} / {100 * check['saturating']:.2f} "
                     f"({check['saturating_pairs']:,} saturating pairs)" if check else "")  # fmt: skip
        cells = [row["artifact"], row.get("arithmetic", ""), row.get("weight_bits", 32), f"{row['file_bytes']:,}",
                 f"{row['top1']:.2f}", f"{row['top1'] - base:+.2f}", agreement]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", *(f"- {row['artifact']}: {row['same_as']}." for row in record["rows"] if "same_as" in row)]
    lines += ["", record["latency_without_vnni"]]
    common.write_markdown(stem.with_suffix(".md"), lines)


if __name__ == "__main__":
    main()
