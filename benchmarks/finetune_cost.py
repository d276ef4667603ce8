"""Peak resident memory and speed of `vconvert finetune`: dense vs versatile, same set-up.

Both runs are the real CLI on the same checkpoint format: the dense one is a `.vc.pt` in which
compress converted nothing (`--skip .`), so student, teacher, distillation, optimiser, batch and
data are identical and only the convolutions differ. Each run is a child process whose own peak
RSS is read with os.wait4; the `import` baseline is measured in the same run.

    python benchmarks/finetune_cost.py [--arch torchvision.models:resnet18] [--data ~/.cache/vconvert/cifar10]
           [--masks frozen|project|...]

Writes benchmarks/results/finetune_cost.json. Target (issue 4): peak RSS versatile/dense ≤ 1.3.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.compress_speed import run_measured

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="torchvision.models:resnet18")
    parser.add_argument("--data", default=str(Path.home() / ".cache/vconvert/cifar10"))
    parser.add_argument("--input-shape", default="1,3,32,32")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-limit", type=int, default=2048)
    parser.add_argument("--masks", default=None, help="vconvert finetune --masks (default: finetune's default)")
    args = parser.parse_args()
    vconvert = [sys.executable, "-m", "vconvert"]
    module_name, function = args.arch.split(":")
    builder = getattr(__import__(module_name, fromlist=[function]), function)
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        weights = work / "model.pt"
        torch.manual_seed(0)
        torch.save(builder(num_classes=10).state_dict(), weights)
        baseline_gb, _, _ = run_measured([sys.executable, "-c", "import torchvision, vconvert.cli"], work)
        for name, extra in (("dense", ["--skip", "."]), ("versatile", [])):
            checkpoint = work / f"{name}.vc.pt"
            run_measured([*vconvert, "compress", str(weights), "--arch", args.arch, "--arch-kwargs",
                          '{"num_classes": 10}', "--input-shape", args.input_shape, "-o", str(checkpoint),
                          "--json", *extra], work)  # fmt: skip
            finetune = [*vconvert, "finetune", str(checkpoint), "-o", str(work / f"{name}.ft.vc.pt"),
                        "--data", args.data, "--epochs", "1", "--batch-size", str(args.batch_size),
                        "--train-limit", str(args.train_limit), "--eval-limit", "256",
                        "--recalibrate-images", "256", "--json"]  # fmt: skip
            if args.masks:
                finetune += ["--masks", args.masks]
            peak, wall, stdout = run_measured(finetune, work)
            history = json.loads(stdout)["history"]
            rows[name] = {"peak_rss_gb": peak, "peak_above_import_gb": peak - baseline_gb, "wall_s": wall,
                          "train_images_per_s": history[0]["images_per_s"]}  # fmt: skip
    result = {
        "benchmark": "finetune_cost",
        "command": "python benchmarks/finetune_cost.py " + " ".join(sys.argv[1:]),
        "arch": args.arch,
        "data": args.data,
        "batch_size": args.batch_size,
        "masks": args.masks or "finetune's default",
        "import_baseline_rss_gb": baseline_gb,
        **rows,
        "peak_rss_ratio_versatile_over_dense": rows["versatile"]["peak_rss_gb"] / rows["dense"]["peak_rss_gb"],
        "peak_above_import_ratio": rows["versatile"]["peak_above_import_gb"] / rows["dense"]["peak_above_import_gb"],
        "train_speed_ratio_versatile_over_dense": rows["dense"]["train_images_per_s"]
        / rows["versatile"]["train_images_per_s"],
        "target_peak_ratio": 1.3,
        "device": "cpu",
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "torch": torch.__version__,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "finetune_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
