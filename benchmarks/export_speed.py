"""`vconvert export` of torchvision resnet50 (random weights, converted) end to end: wall time, peak RSS,
and the compact file against its targets.

    python benchmarks/export_speed.py [--arch resnet50] [--size 224]

1. Builds the model, converts it (mode learned, init naive: fit quality does not matter here) and
   writes a .vc.pt with the Python API (not timed).
2. Runs `vconvert export` (dense, with the side-by-side table, i.e. also exporting the original) and
   `vconvert export --compact` in child processes: wall time and their own peak RSS (os.wait4), with
   the `import torch, vconvert.cli` baseline measured in the same run.
Writes benchmarks/results/export_speed_<arch>.json. Targets (issue 5): export + verification ≤ 60 s on
2 cores, peak RSS ≤ 2.5 GB (dense and compact); compact file ≤ 1.05 × dense / stored-size ratio;
compact vs dense outputs ≤ 1e-6; steady-state latency compact / dense ≤ 1.03.

    python benchmarks/export_speed.py --quantize int8 --calib-data DIR [--calib-images 512]

instead times `vconvert export --quantize int8 --compact` (calibration, the int8 checks, the report)
and writes export_speed_<arch>_int8.json. Targets (issue 17): ≤ 120 s on 2 cores, peak RSS ≤ 3 GB.
The weights are random, so the int8 file's top-1 agreement with fp32 may fall below the export's 90%
check (exit 1 after all the work, nothing written): the time is recorded either way.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `benchmarks` importable
from benchmarks import common
from vconvert.convert.compress import compress
from vconvert.io.checkpoint import save
from vconvert.io.metadata import CheckpointMetadata
from vconvert.io.untrusted import BaseSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--quantize", choices=("none", "int8"), default="none")
    parser.add_argument("--calib-data", default=str(common.CIFAR_CACHE))
    parser.add_argument("--calib-images", type=int, default=512)
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = getattr(torchvision.models, args.arch)(weights=None).eval()
    shape = [1, 3, args.size, args.size]
    converted, plan = compress(teacher, torch.randn(*shape), init="naive")
    results: dict = {
        "benchmark": "export_speed",
        "command": common.command_line(__file__, ["--arch", args.arch, "--size", str(args.size)]),
        "arch": args.arch,
        "input_shape": shape,
        "stored_size_ratio": plan.ratio,
        **common.host(),
        "versions": common.versions("torch", "onnx", "onnxruntime", "python"),
    }
    with tempfile.TemporaryDirectory() as folder:
        folder_path = Path(folder)
        checkpoint = folder_path / "model.vc.pt"
        spec = BaseSpec(arch=f"torchvision.models:{args.arch}", arch_kwargs={})
        save(checkpoint, converted, plan, spec, teacher, CheckpointMetadata(input_shape=shape))
        baseline = common.import_baseline_gb("torch, onnxruntime, vconvert.cli", folder_path)
        results["import_baseline_rss_gb"] = baseline
        if args.quantize == "int8":
            results["command"] += f" --quantize int8 --calib-data {args.calib_data} --calib-images {args.calib_images}"
            results["int8_compact"] = _int8_export(checkpoint, folder_path, args, baseline)
            common.write_json(common.RESULTS / f"export_speed_{args.arch}_int8.json", results)
            print(json.dumps(results["int8_compact"], indent=2))
            return
        for name, extra in (("dense", []), ("compact", ["--compact"])):
            output = folder_path / f"{name}.onnx"
            command = common.vconvert_command("export", str(checkpoint), "-o", str(output), "--json", *extra)
            peak, wall, stdout = common.run_measured(command, folder_path)
            report = json.loads(stdout)
            results[name] = {
                "cli": common.shown(command),
                "wall_s": wall,
                "peak_rss_gb": peak,
                "peak_above_import_gb": peak - baseline,
                "file_bytes": report["file_bytes"],
                "timings_s": report["timings_s"],
                "parity": report["parity"],
                "compact_vs_dense_max_abs_diff": report["compact_vs_dense_max_abs_diff"],
                "table": report["table"],
            }
        compact_table = {row["model"]: row for row in results["compact"]["table"]}
        dense_bytes = compact_table["dense fold"]["file_bytes"]
        results["targets"] = {
            "export_and_verify_wall_s": {"measured": results["dense"]["wall_s"], "target": 60.0},
            "peak_rss_gb": {
                "measured": max(results["dense"]["peak_rss_gb"], results["compact"]["peak_rss_gb"]),
                "dense": results["dense"]["peak_rss_gb"],
                "compact": results["compact"]["peak_rss_gb"],
                "target": 2.5,
            },
            "compact_file_over_dense_per_ratio": {
                "measured": results["compact"]["file_bytes"] / (dense_bytes / plan.ratio),
                "target": 1.05,
            },
            "compact_vs_dense_max_abs_diff": {
                "measured": results["compact"]["compact_vs_dense_max_abs_diff"],
                "target": 1e-6,
            },
            "latency_compact_over_dense": {
                "measured": compact_table["exported"]["ort_latency_ms"] / compact_table["dense fold"]["ort_latency_ms"],
                "target": 1.03,
            },
            "session_startup_ms": {
                "compact": compact_table["exported"]["ort_startup_ms"],
                "dense": compact_table["dense fold"]["ort_startup_ms"],
            },
        }
    common.write_json(common.RESULTS / f"export_speed_{args.arch}.json", results)
    print(json.dumps(results["targets"], indent=2))


def _int8_export(checkpoint: Path, folder: Path, args: argparse.Namespace, baseline: float) -> dict:
    """Wall time and peak RSS of the int8 compact export in a child process, checks included."""
    output = folder / "int8.onnx"
    command = common.vconvert_command("export", str(checkpoint), "-o", str(output), "--json", "--quantize", "int8",
                               "--compact", "--calib-data", args.calib_data, "--calib-images",
                               str(args.calib_images))  # fmt: skip
    code, peak, wall, stdout, stderr = common.run_child(command, folder)
    result = {
        "cli": common.shown(command),
        "exit_code": code,
        "wall_s": wall,
        "peak_rss_gb": peak,
        "peak_above_import_gb": peak - baseline,
        "targets": {"wall_s": 120.0, "peak_rss_gb": 3.0},
    }
    if result["exit_code"] == 0:
        report = json.loads(stdout)
        result.update(
            file_bytes=report["file_bytes"], timings_s=report["timings_s"], quantization=report.get("quantization")
        )
    else:
        result["error"] = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    return result


if __name__ == "__main__":
    main()
