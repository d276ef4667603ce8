"""Which fine-tuning recipe brings learned s=2 back within 0.3 points of the dense ResNet-20?

Compresses the pretrained CIFAR-10 ResNet-20 once (learned s=2 on every 3x3 conv but the stem, BN
recalibration), then runs ``vconvert finetune`` once per recipe and seed from that same file, exports
each result (``vconvert export --compact``) and measures the ONNX file in onnxruntime with ``vconvert
evaluate`` on the 10,000 test images. Every recipe shares data, budget, batch, lr and precision; only
its own options differ. The full budget (15 epochs, 50,000 images) is the default: about 20 minutes
per run on 2 Zen 4 cores with ``--precision bf16``, 35 in fp32.

    python benchmarks/finetune_recipes.py [--recipes "default,KD only"] [--seeds 0] [--jobs 1] [--epochs 15]
           [--train-limit 0] [--batch-size 256] [--lr 0.02] [--precision bf16] [--secondary 2]
           [--output benchmarks/results/finetune_recipes]

Writes the --output stem's .json and .md after every run, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `benchmarks` importable
from benchmarks import common
from benchmarks.mask_learning import compressed_start

BASELINE_TOP1 = 88.57  # ../shared/models/README.md: the pretrained ResNet-20 on the 10,000 JPEG test images
FROZEN = ["--masks", "frozen"]  # the default mask rule until session 6: the older recipes keep it
RECIPES = {
    "default": FROZEN,  # KD weight 0.7, T 4, no label smoothing, frozen fitted masks
    "KD only": [*FROZEN, "--distill-weight", "1.0"],
    "KD only T2": [*FROZEN, "--distill-weight", "1.0", "--temperature", "2"],  # the teacher was trained with LS 0.1
    "KD only T1": [*FROZEN, "--distill-weight", "1.0", "--temperature", "1"],
    "label smoothing 0.1": [*FROZEN, "--label-smoothing", "0.1"],
    "EMA 0.999": [*FROZEN, "--ema", "0.999"],
    "KD only + EMA 0.999": [*FROZEN, "--distill-weight", "1.0", "--ema", "0.999"],
    "features 1.0": [*FROZEN, "--feature-distill", "1.0"],
    "features 1.0 + EMA 0.999": [*FROZEN, "--feature-distill", "1.0", "--ema", "0.999"],
    "project masks": ["--masks", "project"],  # masks follow a dense latent weight: the default since session 6
    "project masks + anneal 0.3": ["--masks", "project", "--mask-anneal", "0.3"],
    "project masks + anneal 0.8": ["--masks", "project", "--mask-anneal", "0.8"],
    "project masks + ramp 0.3": ["--masks", "project", "--project-ramp", "0.3"],
    "project masks + ramp 0.3 + anneal 0.3": ["--masks", "project", "--project-ramp", "0.3", "--mask-anneal", "0.3"],
    # small batches (issue 20): the projection after every step against one every 128 images (the default)
    "project every step": ["--masks", "project", "--project-every", "1"],
    "project every 128 images": ["--masks", "project", "--project-every", "128"],
}
assert not any("," in name for name in RECIPES), "--recipes is comma-separated: a recipe name must not hold a comma"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=common.MODELS)
    parser.add_argument("--cifar", type=Path, default=common.CIFAR_CACHE)
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names from RECIPES")
    parser.add_argument("--seeds", default="0", help="comma-separated fine-tuning seeds")
    parser.add_argument("--secondary", type=int, default=2, help="secondary filters per primary (learned mode)")
    parser.add_argument("--init", default="fit", help="vconvert compress --init (the start every recipe shares)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--train-limit", type=int, default=0, help="training images (0: all)")
    parser.add_argument("--eval-limit", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--precision", default="auto", help="vconvert finetune --precision")
    parser.add_argument("--loader", default="auto", help="vconvert finetune --loader")
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time (a GPU takes several)")
    parser.add_argument("--output", type=Path, default=common.RESULTS / "finetune_recipes", help="results path stem")
    args = parser.parse_args()
    names = args.recipes.split(",")
    unknown = [name for name in names if name not in RECIPES]
    if unknown:
        sys.exit(f"unknown recipe(s) {unknown}; choose from {list(RECIPES)}")
    if not (args.cifar / "train").is_dir():
        sys.exit(f"{args.cifar} has no train/ folder: unpack ../shared/data/cifar10 there (benchmarks/cifar10.py does)")
    seeds = [int(seed) for seed in args.seeds.split(",")]

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        compressed, compress_s, start = compressed_start(
            args, work, "--mode", "learned", "--secondary", str(args.secondary), "--init", args.init
        )
        runs = [(name, seed) for name in names for seed in seeds]
        rows: list[dict] = []
        lock = threading.Lock()

        def run_and_record(run: tuple[str, int]) -> None:
            row = run_recipe(args, work, compressed, *run)
            with lock:
                rows.append(row)
                rows.sort(key=lambda r: runs.index((r["recipe"], r["seed"])))
                print(json.dumps(row), flush=True)
                write_results(args, start["top1"], compress_s, rows, complete=len(rows) == len(runs))

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(run_and_record, runs))


def run_recipe(args: argparse.Namespace, work: Path, compressed: Path, name: str, seed: int) -> dict:
    """Fine-tune, export and evaluate one recipe with one seed."""
    stem = work / f"{common.slug(name)}_seed{seed}"
    tuned, onnx = stem.with_suffix(".vc.pt"), stem.with_suffix(".onnx")
    options = ["--data", str(args.cifar), "--epochs", str(args.epochs), "--eval-limit", "2000",
               "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(seed),
               "--recalibrate-images", "0", "--loader", args.loader, "--precision", args.precision]  # fmt: skip
    if args.train_limit:
        options += ["--train-limit", str(args.train_limit)]
    history, finetune_s = common.vconvert_json("finetune", str(compressed), "-o", str(tuned), *options, *RECIPES[name])
    common.vconvert("export", str(tuned), "-o", str(onnx), "--compact", "--no-compare")
    result, _ = common.vconvert_json("evaluate", str(onnx), "--data", str(args.cifar), "--limit", str(args.eval_limit))
    return {
        "recipe": name,
        "options": " ".join(RECIPES[name]),
        "seed": seed,
        "top1_onnx": result["top1"],
        "delta_vs_dense": round(result["top1"] - BASELINE_TOP1, 2),
        "finetune_val_top1_2000": [round(entry["val_top1"], 2) for entry in history["history"]],
        "finetune_s": round(finetune_s, 1),
    }


def write_results(args: argparse.Namespace, start_top1: float, compress_s: float, rows: list[dict], complete: bool):
    """(Re)write the JSON and Markdown results with the runs measured so far."""
    result = {
        "benchmark": "finetune_recipes",
        "command": common.command_line(__file__),
        "network": f"pretrained CIFAR-10 ResNet-20 ({BASELINE_TOP1}%), learned s={args.secondary} (--init "
        f"{args.init}), every 3x3 conv but the stem",
        "start_top1_after_compress_and_bn_recalibration": start_top1,
        "epochs": args.epochs,
        "train_images": args.train_limit or 50000,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "precision": args.precision,
        "jobs": args.jobs,
        "eval_images": args.eval_limit,
        "compress_s": round(compress_s, 1),
        **common.device_fields(),
        "rows": rows,
        "complete": complete,
    }
    common.write_json(args.output.with_suffix(".json"), result)
    by_recipe: dict[str, list[float]] = {}
    for row in rows:
        by_recipe.setdefault(row["recipe"], []).append(row["top1_onnx"])
    lines = [
        f"# Fine-tuning recipes for learned s={args.secondary} ({'complete' if complete else 'partial'} run)",
        "",
        f"Command: `{result['command']}`  ",
        f"{result['network']}; {args.epochs} epochs on {result['train_images']} training images, batch "
        f"{args.batch_size}, lr {args.lr}, precision {args.precision}; start (compress + BN recal) {start_top1:.2f}%; "
        f"top-1 of the exported ONNX file in onnxruntime on {args.eval_limit} test images. {result['device']}, "
        f"torch {result['torch']}, {result['machine']}.",
        "",
        "| recipe | options | seed | top-1 (ONNX) | Δ vs dense 88.57 | FT val top-1 per epoch (2,000 images) | s |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {r['recipe']} | `{r['options'] or '(defaults)'}` | {r['seed']} | {r['top1_onnx']:.2f} | "
            f"{r['delta_vs_dense']:+.2f} | {r['finetune_val_top1_2000']} | {r['finetune_s']} |"
            for r in rows
        ],
        "",
        "Mean per recipe: "
        + "; ".join(f"{name} {statistics.mean(values):.2f} (n={len(values)})" for name, values in by_recipe.items()),
        "",
        "Differences under ~0.3 point between single runs are within seed-to-seed noise.",
    ]
    common.write_markdown(args.output.with_suffix(".md"), lines)


if __name__ == "__main__":
    main()
