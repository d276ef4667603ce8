"""Wall time and peak resident memory of `vconvert compress` on torchvision resnet50 (random weights).

Runs the real CLI in a child process (so its peak RSS is its own), end to end: load the state_dict,
trace, decide, fit every layer, write the .vc.pt.

    python benchmarks/compress_speed.py [--arch torchvision.models:resnet50]

Writes benchmarks/results/compress_speed.json. Targets (issue 3): ≤ 15 s, ≤ 1.5 GB on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


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
        start = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        if completed.returncode != 0:
            sys.exit(f"compress failed: {completed.stderr.strip()}")
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
        report = json.loads(completed.stdout)
        result = {
            "benchmark": "compress_speed",
            "command": f"python benchmarks/compress_speed.py --arch {args.arch} --input-shape {args.input_shape}",
            "cli": " ".join(["vconvert", *command[3:]]),
            "arch": args.arch,
            "wall_s": wall,
            "peak_rss_gb": peak_kib * 1024 / 1e9,
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
