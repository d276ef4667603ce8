"""Which mask-update rule should fine-tuning use? Frozen fitted masks vs the TPAMI update vs the
thresholded STE proxy vs the flip rule, each learning rule with and without the orthogonality loss.

Runs the real CLI: compress the pretrained CIFAR-10 ResNet-20 (learned s=2 on every 3x3 conv but the
stem, BN recalibration), then `vconvert finetune` once per rule with the same data, seed and budget,
then `vconvert evaluate` on the fine-tuned file. The default is a reduced run (a subset, few epochs):
say so when quoting it. ``--train-limit 0 --epochs 15`` is the full budget: about 30 minutes per rule
on 2 CPU cores with ``--loader device --batch-size 256``; on a GPU ``--jobs 8`` runs the rules side by side.

    python benchmarks/mask_learning.py [--epochs 2] [--train-limit 8000] [--eval-limit 10000] [--jobs 1]
           [--batch-size 128] [--lr 0.01] [--loader auto|workers|device] [--models ../shared/models]
           [--cifar ~/.cache/vconvert/cifar10]
           [--output benchmarks/results/mask_learning]

Writes benchmarks/results/mask_learning.json and .md (or the --output stem).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `benchmarks` importable
from benchmarks import common

RULES = [
    ("frozen", ["--masks", "frozen"]),  # no "+ ortho" row: the penalty depends on the masks alone
    ("tpami", ["--masks", "tpami", "--mask-lr", "0.05", "--ortho-weight", "0"]),
    ("tpami + ortho", ["--masks", "tpami", "--mask-lr", "0.05", "--ortho-weight", "0.05"]),
    ("ste (threshold 0.5)", ["--masks", "ste", "--mask-lr", "0.05", "--ortho-weight", "0"]),
    ("ste + ortho", ["--masks", "ste", "--mask-lr", "0.05", "--ortho-weight", "0.05"]),
    ("flip", ["--masks", "flip", "--ortho-weight", "0"]),
    ("flip + ortho", ["--masks", "flip", "--ortho-weight", "0.05"]),
    ("project", ["--masks", "project"]),  # no "+ ortho" row: masks follow the latent weight, not a gradient
]


def compressed_start(args: argparse.Namespace, work: Path, *options: str) -> tuple[Path, float, dict]:
    """Compress the pretrained ResNet-20 (every 3x3 conv but the stem, BN recalibration on ``args.cifar``,
    extra compress ``options``) into ``work``; its path, the seconds it took, and its evaluation."""
    compressed = work / "resnet20.vc.pt"
    _, seconds = common.vconvert_json("compress", str(args.models / common.RESNET20_FILE), "--arch",
                                      "sample_models.resnet_cifar:resnet20", "--input-shape", "1,3,32,32",
                                      "--skip", "downsample", "--mean", common.CIFAR_MEAN_ARG, "--std",
                                      common.CIFAR_STD_ARG, "--calib-data", str(args.cifar), *options, "-o",
                                      str(compressed))  # fmt: skip
    evaluation, _ = common.vconvert_json(
        "evaluate", str(compressed), "--data", str(args.cifar), "--limit", str(args.eval_limit)
    )
    return compressed, seconds, evaluation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=common.MODELS)
    parser.add_argument("--cifar", type=Path, default=common.CIFAR_CACHE)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-limit", type=int, default=8000, help="training images (0: all)")
    parser.add_argument("--eval-limit", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loader", default="auto", help="vconvert finetune --loader")
    parser.add_argument("--jobs", type=int, default=1, help="rules fine-tuned at the same time")
    parser.add_argument("--rules", default=",".join(name for name, _ in RULES), help="comma-separated subset")
    parser.add_argument("--output", type=Path, default=common.RESULTS / "mask_learning", help="results path stem")
    args = parser.parse_args()
    if not (args.cifar / "train").is_dir():
        sys.exit(
            f"{args.cifar} has no train/ folder: unpack ../shared/data/cifar10 there (benchmarks/init_quality.py does)"
        )

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        compressed, compress_s, start_eval = compressed_start(args, work)
        chosen = [rule for rule in RULES if rule[0] in args.rules.split(",")]
        rows: list[dict] = []
        order, lock = [name for name, _ in chosen], threading.Lock()

        def run_rule(rule: tuple[str, list[str]]) -> dict:
            name, options = rule
            output = work / f"{common.slug(name)}.vc.pt"
            budget = ["--data", str(args.cifar), "--epochs", str(args.epochs), "--eval-limit", "2000",
                      "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed),
                      "--recalibrate-images", "0", "--loader", args.loader]  # fmt: skip
            if args.train_limit:
                budget += ["--train-limit", str(args.train_limit)]
            history, seconds = common.vconvert_json("finetune", str(compressed), "-o", str(output), *budget, *options)
            result, _ = common.vconvert_json(
                "evaluate", str(output), "--data", str(args.cifar), "--limit", str(args.eval_limit)
            )
            row = {
                "rule": name,
                "options": " ".join(options),
                "top1": result["top1"],
                "mask_flips_per_epoch": [entry["mask_flips"] for entry in history["history"]],
                "finetune_val_top1": [round(entry["val_top1"], 2) for entry in history["history"]],
                "finetune_s": round(seconds, 1),
            }
            with lock:
                rows.append(row)
                print(json.dumps(row), flush=True)
                write_results(args, start_eval, compress_s, sorted(rows, key=lambda r: order.index(r["rule"])))
            return row

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(run_rule, chosen))


def write_results(args: argparse.Namespace, start_eval: dict, compress_s: float, rows: list[dict]) -> None:
    """(Re)write the JSON and Markdown results with the rows measured so far."""
    result = {
        "benchmark": "mask_learning",
        "command": common.command_line(__file__),
        "network": "pretrained CIFAR-10 ResNet-20 (../shared/models, 88.57%), learned s=2, every 3x3 conv but the stem",
        "start_top1_after_compress_and_bn_recalibration": start_eval["top1"],
        "epochs": args.epochs,
        "train_images": args.train_limit or 50000,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "jobs": args.jobs,
        "loader": args.loader,
        "eval_images": start_eval["images"],
        "seed": args.seed,
        "compress_s": round(compress_s, 1),
        **common.device_fields(),
        "rows": rows,
        "complete": len(rows) == len(args.rules.split(",")),
    }
    common.write_json(args.output.with_suffix(".json"), result)
    full = args.epochs >= 15 and not args.train_limit
    lines = [
        f"# Mask-update rules in fine-tuning ({'full budget' if full else 'reduced run'}, {result['device']})",
        "",
        f"Command: `{result['command']}`  ",
        f"{result['network']}; {args.epochs} epochs on {result['train_images']} training images, "
        f"batch {args.batch_size}, lr {args.lr}, seed {args.seed}, "
        f"evaluated on {result['eval_images']} test images; start (compress + BN recal): "
        f"{result['start_top1_after_compress_and_bn_recalibration']:.2f}%. "
        f"{result['device']}, torch {result['torch']}.",
        "",
        "| rule | options | top-1 | mask bits flipped per epoch | fine-tune s |",
        "|---|---|---|---|---|",
        *[
            f"| {r['rule']} | `{r['options']}` | {r['top1']:.2f} | {r['mask_flips_per_epoch']} | {r['finetune_s']} |"
            for r in rows
        ],
        "",
        f"Rules ran {args.jobs} at a time, so the fine-tune seconds include sharing the device.",
        "",
        "One seed: differences under ~0.5 point are within run-to-run noise (METHOD.md §6).",
    ]
    common.write_markdown(args.output.with_suffix(".md"), lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
