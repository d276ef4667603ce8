"""Accuracy against stored size on real images: every versatile setting, and torch-pruning at equal size.

Takes the pretrained CIFAR-10 ResNet-20 (../shared/models, 88.57% on the full JPEG test set) and, for
each setting — spatial (2018), spatial+channel (2018), learned s=2, learned s=4, ``--target-ratio``
2 and 3 — runs the real CLI: ``vconvert compress`` (every 3x3 conv but the stem: ``--skip
downsample``, BN recalibration on training images) → ``vconvert finetune`` (same epochs, data, seed
and distillation for every row) → ``vconvert export`` (``--compact``) → ``vconvert evaluate`` on
the ONNX file in onnxruntime.

The peer is structured channel pruning with torch-pruning (L2 magnitude, the same ratio in every
layer, the classifier's outputs kept), pruned until its whole-model stored size is no larger than
that of versatile ``--target-ratio`` 2 and 3. The pruned dense model is fine-tuned by vconvert's own
fine-tuning function (``vconvert.train.finetune.finetune``: same loop, optimiser, schedule, BN
recalibration, seed and distillation from the original network; only the loading and saving of
``.vc.pt`` files is swapped for plain modules), exported by ``vconvert.export.pipeline.export`` (what
``vconvert export`` calls) and evaluated by ``vconvert evaluate`` on its ONNX file.

Every row records MACs (of the exported graph) and onnxruntime latency, measured side by side for
all rows at the end (batch 1 and 32), since pruning removes MACs and versatile filters mostly do not.

    python benchmarks/cifar10.py --quick          # ResNet-20, 2,000 training images, 2 epochs (CPU)
    python benchmarks/cifar10.py --jobs 8         # 50,000 images, 15 epochs, 10,000 test images (GPU)
           [--epochs E] [--train-limit N] [--eval-limit N] [--settings a,b] [--models DIR] [--cifar DIR]
           [--batch-size B] [--lr LR] [--loader auto|workers|device] [--jobs N]

``--jobs N`` processes N settings at the same time (on a GPU the small ResNet-20 leaves the device
mostly idle, so settings side by side finish sooner; wall times per row then include the sharing).

Writes benchmarks/results/cifar10.json (after every row, ``complete`` false until the end),
cifar10.md and cifar10.png. Trained files live in a temporary folder and are never written to the
repository.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `benchmarks` importable
from benchmarks import common

ARCHS = ("resnet8", "resnet20", "resnet56")  # in sample_models.resnet_cifar
MEAN, STD = common.CIFAR_MEAN_ARG, common.CIFAR_STD_ARG  # as vconvert's --mean/--std take them
INPUT_SHAPE = [1, 3, 32, 32]
PUBLISHED_BASELINE = 88.57  # ../shared/models/README.md, full JPEG test set, fp32 CPU


@dataclass
class Setting:
    """One row of the table: a versatile compress setting, or pruning matched to one of them."""

    name: str
    method: str  # "versatile" | "pruning"
    options: list[str] = field(default_factory=list)  # compress options (versatile)
    match: str | None = None  # pruning: the versatile setting whose stored size it matches


# Order: the rows the targets need first, so that a run cut short still answers them.
SETTINGS = [
    Setting("learned s=2", "versatile", ["--mode", "learned", "--secondary", "2"]),
    Setting("target-ratio 2", "versatile", ["--target-ratio", "2"]),
    Setting("torch-pruning @ target-ratio 2", "pruning", match="target-ratio 2"),
    Setting("learned s=4", "versatile", ["--mode", "learned", "--secondary", "4"]),
    Setting("target-ratio 3", "versatile", ["--target-ratio", "3"]),
    Setting("torch-pruning @ target-ratio 3", "pruning", match="target-ratio 3"),
    Setting("spatial (2018)", "versatile", ["--mode", "spatial"]),
    Setting("spatial+channel (2018)", "versatile", ["--mode", "spatial+channel"]),
]

# Quoted from ../shared/METHOD.md §6 (not measured here).
QUOTED = [
    ("METHOD.md prototype, ResNet-20 CIFAR-10 JPEG, 8 ep FT + KD, H200", "dense baseline", "1.00x", "87.74"),
    ("", "spatial (nested) masks, fitted init", "1.98x conv", "84.90"),
    ("", "learned s=2, fitted init + scale α, STE", "1.86x conv", "87.16"),
    ("", "learned s=4, fitted init + scale α, STE", "3.43x conv", "86.82"),
    ("METHOD.md prototype, ResNet-8, 10k-image subset, 8 ep KD, 2 CPU cores", "dense baseline", "1.00x", "72.75"),
    ("", "versatile s=2 (fitted + scale, frozen masks)", "1.79x", "72.85"),
    ("", "torch-pruning (L2 magnitude)", "1.76x", "70.50"),
    ("", "versatile s=4", "3.09x", "71.95"),
    ("", "torch-pruning", "3.00x", "67.25"),
    ("Wang et al. 2018, ImageNet", "VGG-16 → spatial versatile", "fewer params", "71.5 → 72.2"),
    ("Wang et al. 2018, ImageNet", "ResNet-50 (25.6 M, 4.1 GFLOPs) → spatial+channel (11.0 M, 3.0 GFLOPs)",
     "2.33x params", "76.1 → 74.5"),
    ("Wang et al. 2018, COCO Faster R-CNN", "ResNet-50 97.2 MB → spatial 75.6 MB", "1.29x", "33.1 → 33.0 mAP"),
    ("Wang et al. 2018, COCO Faster R-CNN", "ResNet-50 → spatial+channel 41.7 MB", "2.33x", "33.1 → 31.3 mAP"),
]  # fmt: skip


# --------------------------------------------------------------------------- the CLI rows
def conv_ratios(plan: dict) -> tuple[float, float]:
    """(converted convs, all convs) dense/stored ratio of a compress plan."""
    converted = [layer for layer in plan["layers"] if layer.get("stored_bits")]
    dense_c = sum(layer["dense_bits"] for layer in converted)
    stored_c = sum(layer["stored_bits"] for layer in converted)
    dense_all = sum(layer["dense_bits"] for layer in plan["layers"])
    stored_all = sum(layer.get("stored_bits") or layer["dense_bits"] for layer in plan["layers"])
    return dense_c / max(1, stored_c), dense_all / max(1, stored_all)


# --------------------------------------------------------------------------- pruning
def base_file(args: argparse.Namespace) -> Path:
    """The dense network to compress: ``--base``, else the pretrained ResNet-20 in ``--models``."""
    return args.base or args.models / common.RESNET20_FILE


def arch_spec(args: argparse.Namespace) -> str:
    return f"sample_models.resnet_cifar:{args.arch}"


def load_base(args: argparse.Namespace) -> nn.Module:
    """The dense network in eval mode."""
    from sample_models import resnet_cifar

    model = getattr(resnet_cifar, args.arch)()
    model.load_state_dict(torch.load(base_file(args), weights_only=True))
    return model.eval()


def conv_bits(model: nn.Module) -> int:
    """Bits of all Conv2d weights (and biases) of a dense model."""
    return sum(p.numel() * p.element_size() * 8 for m in model.modules() if isinstance(m, nn.Conv2d)
               for p in m.parameters(recurse=False))  # fmt: skip


def prune(base: nn.Module, ratio: float) -> nn.Module:
    """A copy of ``base`` with ``ratio`` of the channels of every prunable layer removed by torch-pruning
    (L2 magnitude importance, per-layer ratio, classifier outputs kept)."""
    import torch_pruning as tp

    model = copy.deepcopy(base).eval()
    pruner = tp.pruner.MagnitudePruner(
        model,
        torch.randn(*INPUT_SHAPE),
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=[model.fc],
    )
    pruner.step()
    return model


def prune_to_size(base: nn.Module, target_ratio: float) -> tuple[nn.Module, float]:
    """The least-pruned model whose whole-model stored size is ≤ base / ``target_ratio`` (bisection
    on the channel ratio), and that channel ratio."""
    from vconvert.convert.report import model_stored_bits

    dense = model_stored_bits(base)
    low, high = 0.0, 0.95
    best: tuple[nn.Module, float] | None = None
    for _ in range(14):
        middle = (low + high) / 2
        model = prune(base, middle)
        if dense / model_stored_bits(model) >= target_ratio:
            best, high = (model, middle), middle
        else:
            low = middle
    if best is None:
        best = (prune(base, high), high)
    return best


@contextlib.contextmanager
def plain_module_finetune(model: nn.Module, teacher: nn.Module, saved: dict[str, nn.Module]) -> Iterator[None]:
    """Let ``vconvert.train.finetune.finetune`` train a plain (pruned) module: its ``.vc.pt`` loading returns
    ``model`` with ``teacher``, and its saving keeps the snapshots in ``saved`` (by path)."""
    from vconvert.io.checkpoint import Checkpoint
    from vconvert.io.metadata import CheckpointMetadata
    from vconvert.train import finetune as finetune_module
    from vconvert.train import resume as resume_module

    metadata = CheckpointMetadata(
        input_shape=list(INPUT_SHAPE),
        preprocessing={"mean": parse(MEAN), "std": parse(STD), "input_size": list(INPUT_SHAPE[2:])},
    )

    def load(_path: Any, trust: bool = False) -> Checkpoint:
        return Checkpoint(model, teacher, plan=None, base=None, metadata=metadata)  # type: ignore[arg-type]

    def save(path: Any, snapshot: nn.Module, *_args: Any, **_kwargs: Any) -> None:
        saved[str(path)] = snapshot

    with mock.patch.object(finetune_module, "load_checkpoint", load), mock.patch.object(resume_module, "save", save):
        yield


def parse(text: str) -> list[float]:
    return [float(value) for value in text.split(",")]


# --------------------------------------------------------------------------- the run
def machine() -> dict[str, Any]:
    """Where the numbers came from."""
    return {
        "platform": platform.platform(),
        "cpu": common.cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **common.versions("python", "torch", "onnxruntime", "torch_pruning"),
        "load_average_start": common.load_average(),
    }


def measure_latencies(
    files: dict[str, Path], seconds: float, batches: tuple[int, ...] = (1, 32)
) -> dict[str, dict[str, float]]:
    """Median onnxruntime latency (ms) of every ONNX file at each of ``batches``, measured interleaved."""
    from vconvert.export.verify import measure_latency, ort_session

    sessions = {name: ort_session(str(path)) for name, path in files.items()}
    result: dict[str, dict[str, float]] = {name: {} for name in files}
    for batch in batches:
        example = torch.randn(batch, *INPUT_SHAPE[1:], generator=torch.Generator().manual_seed(0))
        for name, value in measure_latency(sessions, example, seconds=seconds, rounds=500).items():
            result[name][f"b{batch}"] = round(value, 4)
    return result


@dataclass
class Context:
    """What every row of one run shares."""

    args: argparse.Namespace
    work: Path
    run: common.Runner
    data: str
    epochs: int
    train_limit: int | None
    calib: int
    finetune_opts: list[str]
    evaluate_opts: list[str]


def compress_setting(setting: Setting, ctx: Context) -> dict[str, Any]:
    """``vconvert compress`` for one versatile setting: its output and timing."""
    name = common.slug(setting.name)
    compressed = ctx.work / f"{name}.vc.pt"
    result, seconds = ctx.run(
        "compress", str(base_file(ctx.args)), "--arch", arch_spec(ctx.args),
        "--input-shape", ",".join(map(str, INPUT_SHAPE)), "--skip", "downsample",
        "--mean", MEAN, "--std", STD, "--calib-data", ctx.data, "--calib-images", str(ctx.calib),
        *setting.options, "-o", str(compressed),
    )  # fmt: skip
    plan = result["plan"]
    return {"result": result, "seconds": seconds, "path": compressed,
            "ratio": plan["model_dense_bits"] / plan["model_stored_bits"]}  # fmt: skip


def versatile_row(setting: Setting, compressed: dict[str, Any], ctx: Context) -> tuple[dict[str, Any], Path]:
    """finetune → compact export → evaluate of one compressed setting: (row, ONNX path)."""
    name = common.slug(setting.name)
    onnx, tuned = ctx.work / f"{name}.onnx", ctx.work / f"{name}.ft.vc.pt"
    times = {"compress_s": compressed["seconds"]}
    result, plan = compressed["result"], compressed["result"]["plan"]
    history, times["finetune_s"] = ctx.run("finetune", str(compressed["path"]), "-o", str(tuned), *ctx.finetune_opts)
    try:
        exported, times["export_s"] = ctx.run("export", str(tuned), "-o", str(onnx), "--compact", "--no-compare")
        onnx_format = "compact"
    except RuntimeError as error:  # compact not available for this mode: dense is fine
        print(f"  compact export failed, exporting dense: {str(error)[-300:]}", flush=True)
        exported, times["export_s"] = ctx.run("export", str(tuned), "-o", str(onnx), "--no-compare")
        onnx_format = "dense"
    converted_ratio, all_conv_ratio = conv_ratios(plan)
    row = {
        "setting": setting.name,
        "method": setting.method,
        "compress_options": " ".join(setting.options),
        "converted_convs": len([layer for layer in plan["layers"] if layer.get("stored_bits")]),
        "converted_conv_ratio": round(converted_ratio, 3),
        "all_conv_ratio": round(all_conv_ratio, 3),
        "summary": result["summary"],
        "finetune_val_top1": [round(e["val_top1"], 2) for e in history["history"]],
        "stored_ratio": round(compressed["ratio"], 3),
        "stored_kib": round(plan["model_stored_bits"] / 8192, 1),
        "onnx_format": onnx_format,
        "onnx_bytes": exported["file_bytes"],
        "macs": next(r["macs"] for r in exported["table"] if r["model"] == "exported"),
    }
    return finish_row(row, onnx, times, ctx), onnx


def pruning_row(setting: Setting, target: float, ctx: Context) -> tuple[dict[str, Any], Path]:
    """Prune to ``target``, fine-tune and export in a child process (the fine-tune patches module
    globals, which threads must not share), then evaluate: (row, ONNX path)."""
    name = common.slug(setting.name)
    onnx, row_file = ctx.work / f"{name}.onnx", ctx.work / f"{name}.row.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--prune-one", f"{target}", "--prune-onnx", str(onnx),
               "--prune-row", str(row_file), "--models", str(ctx.args.models), "--cifar", ctx.data,
               "--arch", ctx.args.arch, *(["--base", str(ctx.args.base)] if ctx.args.base else []),
               "--epochs", str(ctx.epochs), "--calib-images", str(ctx.calib), "--batch-size", str(ctx.args.batch_size),
               "--lr", str(ctx.args.lr), "--seed", str(ctx.args.seed), "--loader", ctx.args.loader]  # fmt: skip
    if ctx.train_limit:
        command += ["--train-limit", str(ctx.train_limit)]
    completed, _ = common.run_captured(command, cwd=common.ROOT)
    if completed.returncode != 0:
        raise RuntimeError(f"pruning {setting.name} failed: {completed.stderr.strip()[-1500:]}")
    row = json.loads(row_file.read_text())
    times = row.pop("times_s")
    row.update({"setting": setting.name, "method": setting.method})
    row["pruning"] += f", matched to {setting.match} ({target:.3f}x)"
    return finish_row(row, onnx, times, ctx), onnx


def prune_one(args: argparse.Namespace, epochs: int, calib: int) -> None:
    """The child process of ``pruning_row``: prune, fine-tune (vconvert's loop), export; write a row."""
    from vconvert.convert.report import model_stored_bits
    from vconvert.export.pipeline import export as export_model
    from vconvert.train.config import FinetuneConfig
    from vconvert.train.finetune import finetune as run_finetune

    base = load_base(args)
    times: dict[str, float] = {}
    clock = time.perf_counter()
    pruned, channel_ratio = prune_to_size(base, args.prune_one)
    times["prune_s"] = time.perf_counter() - clock
    config = FinetuneConfig(
        data=str(args.cifar), epochs=epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        recalibrate_images=calib, eval_limit=500, train_limit=args.train_limit, loader=args.loader,
        mean=parse(MEAN), std=parse(STD),
    )  # fmt: skip
    saved: dict[str, nn.Module] = {}
    with tempfile.TemporaryDirectory(prefix="vconvert-prune-") as folder:
        target = Path(folder) / "pruned.ft.vc.pt"
        clock = time.perf_counter()
        with plain_module_finetune(pruned, copy.deepcopy(base), saved):
            history = run_finetune(Path(folder) / "unused.vc.pt", target, config)
        times["finetune_s"] = time.perf_counter() - clock
        tuned = saved[str(target)].eval()
    clock = time.perf_counter()
    preprocessing = {"mean": parse(MEAN), "std": parse(STD), "input_size": INPUT_SHAPE[2:]}
    report = export_model(tuned, args.prune_onnx, input_shape=INPUT_SHAPE, measure=False,
                          metadata={"vconvert.preprocessing": preprocessing})  # fmt: skip
    times["export_s"] = time.perf_counter() - clock
    row = {
        "pruning": f"torch-pruning {channel_ratio:.4f} of the channels of every layer, L2 magnitude",
        "channel_ratio": round(channel_ratio, 4),
        "all_conv_ratio": round(conv_bits(base) / conv_bits(tuned), 3),
        "finetune_val_top1": [round(e.val_top1, 2) for e in history],
        "finetune_api": "vconvert.train.finetune.finetune (same config) on the pruned module",
        "stored_ratio": round(model_stored_bits(base) / model_stored_bits(tuned), 3),
        "stored_kib": round(model_stored_bits(tuned) / 8192, 1),
        "onnx_format": "dense (pruned)",
        "onnx_bytes": report.file_bytes,
        "macs": report.table[0]["macs"],
        "times_s": times,
    }
    args.prune_row.write_text(json.dumps(row))


def finish_row(row: dict[str, Any], onnx: Path, times: dict[str, float], ctx: Context) -> dict[str, Any]:
    """Evaluate ``onnx`` in onnxruntime and complete ``row`` with the fields every row has."""
    evaluation, times["evaluate_s"] = ctx.run("evaluate", str(onnx), *ctx.evaluate_opts)
    row.update({
        "top1": evaluation["top1"],
        "top5": evaluation["top5"],
        "eval_images": evaluation["images"],
        "epochs": ctx.epochs,
        "train_images": ctx.train_limit or 50000,
        "seed": ctx.args.seed,
        "device": common.device_name(),
        "times_s": {key: round(value, 1) for key, value in times.items()},
    })  # fmt: skip
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU preset: 2,000 training images, 2 epochs")
    parser.add_argument("--models", type=Path, default=common.MODELS)
    parser.add_argument(
        "--base",
        type=Path,
        help="dense state_dict to compress instead of the pretrained ResNet-20 "
        "(e.g. from benchmarks/train_baseline.py)",
    )
    parser.add_argument("--arch", choices=ARCHS, default="resnet20", help="architecture of --base")
    parser.add_argument("--cifar", type=Path, default=common.CIFAR_CACHE)
    parser.add_argument("--shared-data", type=Path, default=common.SHARED_CIFAR)
    parser.add_argument("--epochs", type=int, help="fine-tune epochs (quick 2, full 15)")
    parser.add_argument("--train-limit", type=int, help="training images (quick 2000, full all)")
    parser.add_argument("--eval-limit", type=int, help="test images for the final evaluation (quick 2000, full all)")
    parser.add_argument("--calib-images", type=int, help="BN recalibration images (quick 500, full 2000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loader", default="auto", help="vconvert finetune --loader")
    parser.add_argument("--jobs", type=int, default=1, help="settings processed at the same time")
    parser.add_argument("--latency-seconds", type=float, default=3.0)
    parser.add_argument("--settings", help="comma-separated subset of setting names (pruning needs its match)")
    parser.add_argument("--output", type=Path, default=common.RESULTS / "cifar10", help="results stem (.json/.md/.png)")
    parser.add_argument("--prune-one", type=float, help=argparse.SUPPRESS)  # child process of pruning_row
    parser.add_argument("--prune-onnx", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--prune-row", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    quick = args.quick
    epochs = args.epochs or (2 if quick else 15)
    train_limit = args.train_limit or (2000 if quick else None)
    eval_limit = args.eval_limit or (2000 if quick else None)
    calib = args.calib_images or (500 if quick else 2000)
    if args.prune_one:
        prune_one(args, epochs, calib)
        return
    common.ensure_cifar(args.cifar, args.shared_data)
    chosen = [s for s in SETTINGS if not args.settings or s.name in args.settings.split(",")]
    started_all = time.perf_counter()
    record: dict[str, Any] = {
        "benchmark": "cifar10",
        "complete": False,
        "command": common.command_line(__file__),
        "mode": "quick" if quick else "full",
        "network": f"{'own' if args.base else 'pretrained'} CIFAR-10 {args.arch} ({base_file(args)}), "
        f"arch {arch_spec(args)}",
        "published_baseline_top1_full_test_set": None if args.base else PUBLISHED_BASELINE,
        "epochs": epochs,
        "train_images": train_limit or 50000,
        "eval_images": eval_limit or 10000,
        "calib_images": calib,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "jobs": args.jobs,
        "device": common.device_name(),
        "machine": machine(),
        "rows": [],
    }
    stem: Path = args.output
    stem.parent.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()

    def write() -> None:
        from benchmarks.cifar10_report import write_report

        common.write_json(stem.with_suffix(".json"), record)
        write_report(record, stem.with_suffix(".md"), stem.with_suffix(".png"), QUOTED)

    with tempfile.TemporaryDirectory(prefix="vconvert-cifar10-") as folder:
        work = Path(folder)
        run = common.Runner(work)
        record["commands"] = run.commands
        data = str(args.cifar)
        finetune_opts = ["--data", data, "--epochs", str(epochs), "--batch-size", str(args.batch_size),
                         "--lr", str(args.lr), "--seed", str(args.seed), "--recalibrate-images", str(calib),
                         "--eval-limit", "500", "--mean", MEAN, "--std", STD, "--loader", args.loader]  # fmt: skip
        if train_limit:
            finetune_opts += ["--train-limit", str(train_limit)]
        ctx = Context(args, work, run, data, epochs, train_limit, calib, finetune_opts,
                      ["--data", data] + (["--limit", str(eval_limit)] if eval_limit else []))  # fmt: skip

        # the dense baseline, exported and evaluated the same way as every row
        from vconvert.convert.report import model_stored_bits
        from vconvert.export.pipeline import export as export_model

        base = load_base(args)
        preprocessing = {"mean": parse(MEAN), "std": parse(STD), "input_size": INPUT_SHAPE[2:]}
        onnx_files: dict[str, Path] = {"dense baseline": work / "baseline.onnx"}
        report = export_model(base, onnx_files["dense baseline"], input_shape=INPUT_SHAPE, measure=False,
                              metadata={"vconvert.preprocessing": preprocessing})  # fmt: skip
        baseline, _ = run("evaluate", str(onnx_files["dense baseline"]), *ctx.evaluate_opts)
        record["baseline"] = {
            "top1": baseline["top1"],
            "top5": baseline["top5"],
            "images": baseline["images"],
            "macs": report.table[0]["macs"],
            "stored_kib": model_stored_bits(base) / 8192,
            "onnx_bytes": report.file_bytes,
        }
        print(f"dense baseline: top-1 {baseline['top1']:.2f}% on {baseline['images']} test images", flush=True)
        write()

        versatile = [setting for setting in chosen if setting.method == "versatile"]
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = pool.map(lambda setting: compress_setting(setting, ctx), versatile)
            compressed = dict(zip([setting.name for setting in versatile], results, strict=True))

        def one_row(setting: Setting) -> None:
            if setting.method == "versatile":
                row, onnx = versatile_row(setting, compressed[setting.name], ctx)
            elif setting.match in compressed:
                row, onnx = pruning_row(setting, compressed[setting.match]["ratio"], ctx)
            else:
                print(f"skipping {setting.name}: its match {setting.match!r} did not run", flush=True)
                return
            row.update(
                {
                    "baseline_top1": baseline["top1"],
                    "macs_ratio": round(record["baseline"]["macs"] / row["macs"], 3) if row["macs"] else None,
                }
            )
            with lock:
                onnx_files[setting.name] = onnx
                record["rows"].append(row)
                record["rows"].sort(key=lambda r: [s.name for s in chosen].index(r["setting"]))
                print(f"{setting.name}: {row['stored_ratio']:.2f}x stored, top-1 {row['top1']:.2f}% "
                      f"(baseline {baseline['top1']:.2f}%), {row['macs'] / 1e6:.1f} M MACs, {row['times_s']}",
                      flush=True)  # fmt: skip
                write()

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(one_row, chosen))

        latencies = measure_latencies(onnx_files, args.latency_seconds)
        record["baseline"]["latency_ms"] = latencies["dense baseline"]["b1"]
        record["baseline"]["latency_ms_b32"] = latencies["dense baseline"]["b32"]
        for row in record["rows"]:
            row["latency_ms"] = latencies[row["setting"]]["b1"]
            row["latency_ms_b32"] = latencies[row["setting"]]["b32"]
    record["wall_s"] = round(time.perf_counter() - started_all, 1)
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    record["cpu_s"] = round(sum(u.ru_utime + u.ru_stime for u in usage), 1)  # this process and every CLI run
    record["machine"]["load_average_end"] = common.load_average()
    record["complete"] = True
    write()
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
