"""Wall time and peak resident memory of `vconvert compress` on torchvision resnet50 (random weights).

Runs the real CLI in a child process (so its peak RSS is its own), end to end: load the state_dict,
trace, decide, fit every layer, write the .vc.pt.

    python benchmarks/compress_speed.py [--arch torchvision.models:resnet50]

Writes benchmarks/results/compress_speed.json. Targets (issue 3): ≤ 15 s, ≤ 1.5 GB on 2 cores, where
torch itself was taken as ~0.3 GB; `import torch` of the CUDA build installed here alone holds ~0.9 GB,
so the import baseline is measured in the same run and the peak above it is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def run_child(command: list[str], folder: Path) -> tuple[int, float, float, str, str]:
    """Run ``command`` (output to files, not pipes: a report can be large); return (exit code, its own peak
    RSS in GB, wall seconds, stdout, stderr)."""
    out_path, err_path = folder / "stdout.txt", folder / "stderr.txt"
    with out_path.open("w") as out, err_path.open("w") as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    return code, usage.ru_maxrss * 1024 / 1e9, wall, out_path.read_text(), err_path.read_text()


def run_measured(command: list[str], folder: Path) -> tuple[float, float, str]:
    """Run ``command``; return (its own peak RSS in GB, wall seconds, stdout). Exits on failure."""
    code, peak, wall, stdout, stderr = run_child(command, folder)
    if code != 0:
        sys.exit(f"{' '.join(command[:4])} failed: {stderr.strip()}")
    return peak, wall, stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="torchvision.models:resnet50")
    parser.add_argument("--input-shape", default="1,3,224,224")
    args = parser.parse_args()

    module_name, function = args.arch.split(":")
    builder = getattr(__import__(module_name, fromlist=[function]), function)
    with tempfile.TemporaryDirectory() as folder:
        weights, output = Path(folder) / "model.pt", Path(folder) / "model.vc.pt"
        torch.manual_seed(0)
        torch.save(builder().state_dict(), weights)
        command = [
            sys.executable,
            "-m",
            "vconvert",
            "compress",
            str(weights),
            "--arch",
            args.arch,
            "--input-shape",
            args.input_shape,
            "-o",
            str(output),
            "--json",
        ]
        baseline_gb, _, _ = run_measured([sys.executable, "-c", "import torchvision, vconvert.cli"], Path(folder))
        peak_gb, wall, stdout = run_measured(command, Path(folder))
        report = json.loads(stdout)
        result = {
            "benchmark": "compress_speed",
            "command": f"python benchmarks/compress_speed.py --arch {args.arch} --input-shape {args.input_shape}",
            "cli": " ".join(["vconvert", *command[3:]]),
            "arch": args.arch,
            "wall_s": wall,
            "peak_rss_gb": peak_gb,
            "import_baseline_rss_gb": baseline_gb,
            "peak_above_import_gb": peak_gb - baseline_gb,
            "target_wall_s": 15.0,
            "target_peak_rss_gb": 1.5,
            "input_file_mb": weights.stat().st_size / 1e6,
            "checkpoint_mb": output.stat().st_size / 1e6,
            "converted_layers": sum(1 for layer in report["plan"]["layers"] if layer["decision"] == "converted"),
            "summary": report["summary"],
            "cpus": os.cpu_count(),
            "machine": platform.platform(),
            "torch": torch.__version__,
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compress_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
