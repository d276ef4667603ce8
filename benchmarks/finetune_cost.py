"""Peak resident memory and speed of `vconvert finetune`: dense vs versatile, same set-up.

Both runs are the real CLI on the same checkpoint format: the dense one is a `.vc.pt` in which
compress converted nothing (`--skip .`), so student, teacher, distillation, optimiser, batch and
data are identical and only the convolutions differ. Each run is a child process whose own peak
RSS is read with os.wait4; the `import` baseline is measured in the same run.

    python benchmarks/finetune_cost.py [--arch torchvision.models:resnet18] [--data ~/.cache/vconvert/cifar10]
           [--masks frozen|project|...]

Writes benchmarks/results/finetune_cost.json. Target (issue 4): peak RSS versatile/dense ≤ 1.3.

    python benchmarks/finetune_cost.py --speed-grid [--quick] [--batches 8,32,128] [--rules project,frozen]

measures training images/s of the versatile model for each mask rule at each batch size, side by side
in one run (the same checkpoint, data and epoch of 32 steps, 16 with --quick), and writes
benchmarks/results/finetune_speed_grid[_quick].{json,md}. Target (issue 20): project costs ≤ 1.3x
frozen per image at batch 32.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `benchmarks` importable
from benchmarks import common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="torchvision.models:resnet18")
    parser.add_argument("--data", default=str(common.CIFAR_CACHE))
    parser.add_argument("--input-shape", default="1,3,32,32")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-limit", type=int, default=2048)
    parser.add_argument("--masks", default=None, help="vconvert finetune --masks (default: finetune's default)")
    parser.add_argument("--speed-grid", action="store_true", help="images/s per mask rule and batch size")
    parser.add_argument("--batches", default="8,32,128")
    parser.add_argument("--rules", default="project,project-every-step,frozen", help=f"from {', '.join(RULES)}")
    parser.add_argument("--quick", action="store_true", help="--speed-grid with 16 steps per run instead of 32")
    args = parser.parse_args()
    if args.speed_grid:
        speed_grid(args)
        return
    builder = common.import_object(args.arch)
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        weights = work / "model.pt"
        torch.manual_seed(0)
        torch.save(builder(num_classes=10).state_dict(), weights)
        baseline_gb = common.import_baseline_gb("torchvision, vconvert.cli", work)
        for name, extra in (("dense", ["--skip", "."]), ("versatile", [])):
            checkpoint = work / f"{name}.vc.pt"
            compress = common.vconvert_command("compress", str(weights), "--arch", args.arch, "--arch-kwargs",
                                               '{"num_classes": 10}', "--input-shape", args.input_shape, "-o",
                                               str(checkpoint), "--json", *extra)  # fmt: skip
            common.run_measured(compress, work)
            finetune = common.vconvert_command("finetune", str(checkpoint), "-o", str(work / f"{name}.ft.vc.pt"),
                                               "--data", args.data, "--epochs", "1", "--batch-size",
                                               str(args.batch_size), "--train-limit", str(args.train_limit),
                                               "--eval-limit", "256", "--recalibrate-images", "256",
                                               "--json")  # fmt: skip
            if args.masks:
                finetune += ["--masks", args.masks]
            peak, wall, stdout = common.run_measured(finetune, work)
            history = json.loads(stdout)["history"]
            rows[name] = {"peak_rss_gb": peak, "peak_above_import_gb": peak - baseline_gb, "wall_s": wall,
                          "train_images_per_s": history[0]["images_per_s"]}  # fmt: skip
    result = {
        "benchmark": "finetune_cost",
        "command": common.command_line(__file__),
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
        **common.host(),
        **common.versions("torch"),
    }
    common.write_json(common.RESULTS / "finetune_cost.json", result)
    print(json.dumps(result, indent=2))


RULES = {  # --rules names: a mask rule, or the project rule before --project-every existed
    "project": ["--masks", "project"],
    "project-every-step": ["--masks", "project", "--project-every", "1"],
    "frozen": ["--masks", "frozen"],
    "flip": ["--masks", "flip"],
}


def speed_grid(args: argparse.Namespace) -> None:
    """Training images/s of one versatile checkpoint for every (mask rule, batch size)."""
    builder = common.import_object(args.arch)
    batches = [int(batch) for batch in args.batches.split(",")]
    rules = args.rules.split(",")
    steps = 16 if args.quick else 32
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        torch.manual_seed(0)
        torch.save(builder(num_classes=10).state_dict(), work / "model.pt")
        checkpoint = work / "versatile.vc.pt"
        compress = common.vconvert_command("compress", str(work / "model.pt"), "--arch", args.arch, "--arch-kwargs",
                                           '{"num_classes": 10}', "--input-shape", args.input_shape, "-o",
                                           str(checkpoint), "--json")  # fmt: skip
        common.run_measured(compress, work)
        for batch in batches:
            for rule in rules:
                output = work / f"{rule}{batch}.ft.vc.pt"
                command = common.vconvert_command("finetune", str(checkpoint), "-o", str(output), "--data",
                                                  args.data, "--epochs", "1", "--batch-size", str(batch),
                                                  *RULES[rule], "--train-limit", str(steps * batch), "--eval-limit",
                                                  "64", "--recalibrate-images", "0", "--json")  # fmt: skip
                _, wall, stdout = common.run_measured(command, work)
                speed = json.loads(stdout)["history"][0]["images_per_s"]
                rows.append({"batch_size": batch, "masks": rule, "steps": steps, "train_images_per_s": speed,
                             "wall_s": wall})  # fmt: skip
                print(f"batch {batch:4d} {rule:8s} {speed:8.1f} images/s", flush=True)
    speed = {(row["batch_size"], row["masks"]): row["train_images_per_s"] for row in rows}
    compared = [rule for rule in rules if rule != "frozen"] if "frozen" in rules else []
    ratios = {rule: {str(batch): speed[batch, "frozen"] / speed[batch, rule] for batch in batches} for rule in compared}
    result = {
        "benchmark": "finetune_speed_grid",
        "mode": "quick" if args.quick else "full",
        "command": common.command_line(__file__),
        "arch": args.arch,
        "input_shape": args.input_shape,
        "rows": rows,
        "cost_per_image_over_frozen": ratios,
        "target": "project ≤ 1.3x frozen per image at batch 32",
        "device": "cpu",
        **common.host(),
        "threads": torch.get_num_threads(),
        **common.versions("torch"),
    }
    stem = common.RESULTS / ("finetune_speed_grid_quick" if args.quick else "finetune_speed_grid")
    common.write_json(stem.with_suffix(".json"), result)
    lines = [f"# Fine-tuning speed per mask rule and batch size ({result['mode']} mode)", "",
             f"`{result['command']}`: {args.arch} at {args.input_shape}, {steps} steps per run, "
             f"{os.cpu_count()} CPU cores, torch {torch.__version__}.", "",
             "| batch | " + " | ".join(f"{rule} images/s" for rule in rules)
             + "".join(f" | {rule} cost / frozen" for rule in compared) + " |",
             "|---:|" + "---:|" * (len(rules) + len(compared))]  # fmt: skip
    for batch in batches:
        cells = [f"{speed[batch, rule]:.1f}" for rule in rules] + [
            f"{ratios[rule][str(batch)]:.2f}x" for rule in compared
        ]
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    common.write_markdown(stem.with_suffix(".md"), lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
