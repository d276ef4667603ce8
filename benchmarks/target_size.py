"""``compress --target-size`` on the shared CIFAR-10 ResNet-20 (issue 30): the planner's int8 files at several
sizes against fixed configurations and dense int8, every row an ONNX file evaluated in onnxruntime.

    python benchmarks/target_size.py [--quick] [--epochs E] [--sizes 0.06,0.08,...] [--output STEM]

Each size is planned from one measurement of every conv's choices (dense or s=2/4, 2/3/4/8 bits) on
``--plan-images`` unlabeled training images; its cost is the first plan's time less a later one's (which
reuses the measurement and only fits). Both searches (knapsack, greedy) are scored on the same measurement
(their summed output divergence). Every converted file gets BatchNorm recalibrated on 1,024 training images
(no labels), then, with ``--epochs E``, the same fine-tuning budget (``vconvert finetune``), then the int8
compact export (default ``--int8-target any``) and ``vconvert evaluate`` on the test images. Without
``--epochs`` the rows are data-free (0 epochs): they rank the plans before any training, not the final
frontier. ``--quick``: sizes 0.10 and 0.15, 2,000 test images.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `benchmarks` importable
from benchmarks import common

ARCH = "sample_models.resnet_cifar:resnet20"
FULL_SIZES = (0.06, 0.08, 0.10, 0.12, 0.15, 0.20)
QUICK_SIZES = (0.10, 0.15)
FIXED = {  # data-free fixed rows: compress options as benchmarks/pareto.py builds them, export weight bits
    "s=2, 7-bit primaries (int8 default)": (["--secondary", "2", "--skip", "downsample"], None),
    "s=2, 4-bit primaries": (["--secondary", "2", "--skip", "downsample"], "4"),
    "s=4, 7-bit primaries (int8 default)": (["--secondary", "4", "--skip", "downsample"], None),
}


def _images(root: Path, count: int, seed: int = 0) -> list:
    from vconvert.data.datasets import calibration_batches

    return list(calibration_batches(root, (32, 32), common.CIFAR_MEAN, common.CIFAR_STD, limit=count, seed=seed))


def _save(path: Path, model, plan, teacher, recalibration: list) -> None:
    from vconvert import save
    from vconvert.convert.calibrate import recalibrate_batchnorm
    from vconvert.io.metadata import CheckpointMetadata
    from vconvert.io.untrusted import BaseSpec

    used = recalibrate_batchnorm(model, iter(recalibration), max_images=sum(len(b) for b in recalibration))
    preprocessing = {"mean": list(common.CIFAR_MEAN), "std": list(common.CIFAR_STD), "input_size": [32, 32]}
    metadata = CheckpointMetadata(input_shape=[1, 3, 32, 32], preprocessing=preprocessing,
                                  bn_recalibration={"data": "cifar10/train", "images": used})  # fmt: skip
    base = BaseSpec(arch=ARCH, arch_kwargs={}, pickled=None, source="benchmarks/target_size.py")
    save(path, model, plan, base, teacher, metadata)


def _objectives(candidates: dict, model, size: float) -> dict[str, Any]:
    """The summed divergence and planned size of both searches at ``size`` on one measurement."""
    import math

    from vconvert.convert.target_size import SEARCHES, fixed_int8_bits, fp32_file_bits

    fp32, fixed = fp32_file_bits(model), fixed_int8_bits(model, list(candidates))
    budget = math.floor(size * fp32) - fixed
    scores = {}
    for name, search in SEARCHES.items():
        chosen = search(candidates, budget)
        scores[name] = None if chosen is None else {
            "divergence": round(sum(c.divergence for c in chosen.values()), 6),
            "planned_ratio": round((fixed + sum(c.bits for c in chosen.values())) / fp32, 4),
        }  # fmt: skip
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", help="comma-separated target sizes (default: 0.06 to 0.20; quick: 0.10, 0.15)")
    parser.add_argument("--epochs", type=int, default=0, help="fine-tune every converted row this long first")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--plan-images", type=int, default=128)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--work", type=Path, default=common.ROOT / "cache" / "target_size")
    parser.add_argument("--models", type=Path, default=common.MODELS)
    parser.add_argument("--cifar", type=Path, default=common.CIFAR_CACHE)
    parser.add_argument("--shared-data", type=Path, default=common.SHARED_CIFAR)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    import torch

    from vconvert.convert.compress import compress
    from vconvert.export.pipeline import export

    torch.manual_seed(0)
    sizes = [float(s) for s in args.sizes.split(",")] if args.sizes else list(QUICK_SIZES if args.quick else FULL_SIZES)
    eval_limit = args.eval_limit or (2000 if args.quick else 10000)
    output = args.output or common.RESULTS / ("target_size_quick" if args.quick else "target_size")
    common.ensure_cifar(args.cifar, args.shared_data)
    args.work.mkdir(parents=True, exist_ok=True)
    run = common.Runner(args.work, echo=True)
    started = time.perf_counter()
    teacher = common.pretrained_resnet20(args.models)
    train = args.cifar / "train"
    plan_images, recalibration = _images(train, args.plan_images), _images(train, 1024, seed=1)
    record: dict[str, Any] = {
        "benchmark": "target_size",
        "mode": "quick" if args.quick else "full",
        "command": common.command_line(__file__, quote=True),
        "epochs": args.epochs,
        "train_limit": args.train_limit,
        "eval_images": eval_limit,
        "plan_images": args.plan_images,
        "machine": {
            **common.host(),
            **common.versions("python", "torch", "onnxruntime"),
            "load_average_start": common.load_average(),
        },
        "cpu_flags": common.cpu_flags(),
        "rows": [],
        "commands": run.commands,
    }

    def finish(name: str, checkpoint: Path | None, onnx_file: Path | None = None, weight_bits: str | None = None,
               **extra: Any) -> None:  # fmt: skip
        if checkpoint is not None and args.epochs:
            tuned = checkpoint.with_name(checkpoint.name.replace(".vc.pt", ".ft.vc.pt"))
            limit = ["--train-limit", str(args.train_limit)] if args.train_limit else []
            run("finetune", str(checkpoint), "-o", str(tuned), "--data", str(args.cifar), "--epochs", str(args.epochs),
                "--batch-size", "256", "--lr", "0.02", "--precision", "bf16", "--seed", "0", "--eval-limit", "2000",
                *limit)  # fmt: skip
            checkpoint = tuned
        if onnx_file is None:
            onnx_file = checkpoint.with_suffix(".onnx")
            bits = ["--weight-bits", weight_bits] if weight_bits else []
            run("export", str(checkpoint), "-o", str(onnx_file), "--quantize", "int8", "--compact", "--calib-data",
                str(train), "--calib-images", "512", "--min-agreement", "0", "--no-compare", *bits)  # fmt: skip
        normalisation = [] if checkpoint else ["--mean", common.CIFAR_MEAN_ARG, "--std", common.CIFAR_STD_ARG]
        result, _ = run("evaluate", str(onnx_file), "--data", str(args.cifar), "--limit", str(eval_limit),
                        *normalisation)  # fmt: skip
        row = {"artifact": name, "file_bytes": onnx_file.stat().st_size, "top1": result["top1"],
               "images": result["images"], **extra}  # fmt: skip
        record["rows"].append(row)
        print(row, flush=True)
        write(record, output)

    fp32 = args.work / "dense.fp32.onnx"
    export(teacher, fp32, input_shape=[1, 3, 32, 32], measure=False)
    finish("dense fp32", None, fp32)
    ptq = args.work / "dense.int8.onnx"
    export(teacher, ptq, input_shape=[1, 3, 32, 32], measure=False, quantize="int8", calibration=_images(train, 512))
    finish("dense INT8 PTQ (7-bit weights, --int8-target any)", None, ptq)

    candidates: dict = {}
    seconds = []
    for size in sizes:
        clock = time.perf_counter()
        model, plan = compress(teacher, plan_images[0][:1], target_size=size, calibration=plan_images,
                               candidates=candidates)  # fmt: skip
        seconds.append(time.perf_counter() - clock)
        path = args.work / f"plan{size:g}.vc.pt"
        _save(path, model, plan, teacher, recalibration)
        mix = plan.choice_note.split(": ", 1)[1].split(";")[0]
        finish(f"vconvert --target-size {size:g}", path, target_size=size, plan=mix,
               searches=_objectives(candidates, teacher, size))  # fmt: skip
    if len(seconds) > 1:
        record["search_s"] = round(seconds[0] - sum(seconds[1:]) / len(seconds[1:]), 1)
        record["plan_with_fits_s"] = [round(s, 1) for s in seconds]
    for name, (options, bits) in FIXED.items():
        path = args.work / f"fixed_{common.slug(name)}.vc.pt"
        model, plan = compress(teacher, plan_images[0][:1], **_options(options))
        _save(path, model, plan, teacher, recalibration)
        finish(f"vconvert {name}", path, weight_bits=bits)
    record["wall_s"] = round(time.perf_counter() - started, 1)
    record["machine"]["load_average_end"] = common.load_average()
    write(record, output)
    print(output.with_suffix(".md").read_text())


def _options(flags: list[str]) -> dict[str, Any]:
    """compress() keywords for the CLI flags of :data:`FIXED`."""
    values = dict(zip(flags[::2], flags[1::2], strict=True))
    return {"secondary": int(values["--secondary"]), "skip": [values["--skip"]]}


def write(record: dict[str, Any], stem: Path) -> None:
    """The JSON record and a Markdown table (file size against the fp32 file, top-1, Δ against it)."""
    common.write_json(stem.with_suffix(".json"), record)
    rows = record["rows"]
    fp32 = rows[0] if rows else None
    lines = [
        f"# compress --target-size on ResNet-20 / CIFAR-10 ({record['mode']} mode)",
        "",
        f"Command: `{record['command']}`  ",
        f"{record['epochs']} fine-tuning epochs per converted row"
        + (" (data-free: BatchNorm recalibrated on 1,024 unlabeled images only)" if not record["epochs"] else "")
        + f"; top-1 of each ONNX file in onnxruntime on {record['eval_images']} test images; planned on "
        f"{record['plan_images']} unlabeled training images.  ",
        f"CPU: {record['cpu_flags']}; load average {record['machine']['load_average_start']}.",
        "",
        "| artifact | plan | file bytes | file / fp32 | top-1 | Δ vs fp32 | knapsack / greedy divergence |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        searches = row.get("searches") or {}
        scores = " / ".join(f"{s['divergence']:.4f}" if s else "-" for s in searches.values()) if searches else ""
        cells = [row["artifact"], row.get("plan", ""), f"{row['file_bytes']:,}",
                 f"{row['file_bytes'] / fp32['file_bytes']:.4f}", f"{row['top1']:.2f}",
                 f"{row['top1'] - fp32['top1']:+.2f}", scores]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    if "search_s" in record:
        lines += ["", f"Search cost (measuring every choice once): {record['search_s']} s; plan + fits per size: "
                  f"{record['plan_with_fits_s']} s."]  # fmt: skip
    common.write_markdown(stem.with_suffix(".md"), lines)


if __name__ == "__main__":
    main()
