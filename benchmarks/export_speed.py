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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import onnx
import onnxruntime
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.compress_speed import run_measured
from vconvert.api import save
from vconvert.convert import compress
from vconvert.io import BaseSpec

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = getattr(torchvision.models, args.arch)(weights=None).eval()
    shape = [1, 3, args.size, args.size]
    converted, plan = compress(teacher, torch.randn(*shape), init="naive")
    results: dict = {
        "benchmark": "export_speed",
        "command": f"python benchmarks/export_speed.py --arch {args.arch} --size {args.size}",
        "arch": args.arch,
        "input_shape": shape,
        "stored_size_ratio": plan.ratio,
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
        },
    }
    with tempfile.TemporaryDirectory() as folder:
        folder_path = Path(folder)
        checkpoint = folder_path / "model.vc.pt"
        spec = BaseSpec(arch=f"torchvision.models:{args.arch}", arch_kwargs={})
        save(checkpoint, converted, plan, spec, teacher, {"input_shape": shape})
        baseline, _, _ = run_measured([sys.executable, "-c", "import torch, onnxruntime, vconvert.cli"], folder_path)
        results["import_baseline_rss_gb"] = baseline
        for name, extra in (("dense", []), ("compact", ["--compact"])):
            output = folder_path / f"{name}.onnx"
            command = [sys.executable, "-m", "vconvert", "export", str(checkpoint), "-o", str(output), "--json", *extra]
            peak, wall, stdout = run_measured(command, folder_path)
            report = json.loads(stdout)
            results[name] = {
                "cli": " ".join(["vconvert", *command[3:]]),
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
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"export_speed_{args.arch}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["targets"], indent=2))


if __name__ == "__main__":
    main()
