"""Does the default fine-tuning work on a model without BatchNorm (issue 29 item 2)?

A new user's set-up, rebuilt from the shared CIFAR-10 data: 4 classes (airplane, automobile, ship, truck),
300 training and 100 validation images each, resized to 64x64 (PNG under ``WORK/data``); a torchvision
``squeezenet1_1`` (no BatchNorm) and, as the BatchNorm control, ``sample_models.resnet_cifar:resnet8``, each
trained briefly with plain torch (Adam, 5 epochs) so that it is pretrained; then ``vconvert compress`` as the
user ran it and ``vconvert.finetune`` with the defaults and with each remedy, recording the loss of every step,
the largest gradient norm of each epoch and the validation top-1 after each epoch.

    python benchmarks/no_bn_divergence.py [--quick] [--work /tmp/nobn] [--runs default,lr0.001,clip1]

Writes benchmarks/results/no_bn_divergence.json and .md (``--quick``: ..._quick.*). Nothing trained or
unpacked here is committed: the work folder (data, models, checkpoints) defaults to /tmp/nobn.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `benchmarks` importable
from benchmarks import common

CLASSES = ("airplane", "automobile", "ship", "truck")
ARCHS = {"squeezenet1_1": "torchvision.models:squeezenet1_1", "resnet8": "sample_models.resnet_cifar:resnet8"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # vconvert's default for folders
# name: FinetuneConfig changes from the defaults
RUNS: dict[str, dict[str, Any]] = {
    "default": {},  # gradients clipped at norm 10 since this measurement
    "noclip": {"grad_clip": 0.0},  # the default before it
    "lr0.001": {"lr": 0.001},
    "warmup2": {"warmup_epochs": 2.0},
    "clip0.5": {"grad_clip": 0.5},
    "clip1": {"grad_clip": 1.0},
    "clip2": {"grad_clip": 2.0},
    "clip5": {"grad_clip": 5.0},
    "clip10": {"grad_clip": 10.0},
    "batch32": {"batch_size": 32},  # the default clip at a small batch (noisier gradients)
}


def make_folder(work: Path, cifar: Path, per_class: tuple[int, int]) -> Path:
    """``work/data/{train,val}/<class>/*.png``: the first images of each class of CIFAR-10's train and test
    splits, resized to 64x64 (bilinear)."""
    from PIL import Image

    folder = work / "data"
    for split, source, count in (("train", "train", per_class[0]), ("val", "test", per_class[1])):
        for name in CLASSES:
            out = folder / split / name
            if out.is_dir() and len(list(out.iterdir())) == count:
                continue
            out.mkdir(parents=True, exist_ok=True)
            for path in sorted((cifar / source / name).iterdir())[:count]:
                Image.open(path).convert("RGB").resize((64, 64), Image.BILINEAR).save(out / f"{path.stem}.png")
    return folder


def pretrain(arch: str, folder: Path, epochs: int, target: Path) -> dict[str, Any]:
    """Train ``arch`` (4 classes) from scratch with plain torch (Adam 3e-4, batch 32, flips) and save its
    state_dict at ``target``; its validation top-1 per epoch."""
    import torch
    from torchvision import datasets, transforms

    torch.manual_seed(0)
    normalise = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    augment = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalise])
    train = datasets.ImageFolder(str(folder / "train"), augment)
    val = datasets.ImageFolder(str(folder / "val"), transforms.Compose([transforms.ToTensor(), normalise]))
    model = common.import_object(ARCHS[arch])(num_classes=len(CLASSES))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-4)
    top1 = []
    for _ in range(epochs):
        model.train()
        for images, labels in torch.utils.data.DataLoader(train, batch_size=32, shuffle=True):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in torch.utils.data.DataLoader(val, 200))
        top1.append(round(100.0 * correct / len(val), 2))
    torch.save(model.state_dict(), target)
    return {"epochs": epochs, "val_top1": top1}


def compress_command(arch: str, model: Path, folder: Path, output: Path) -> list[str]:
    """The user's compress command line."""
    return ["compress", str(model), "--arch", ARCHS[arch], "--arch-kwargs", '{"num_classes": 4}',
            "--input-shape", "1,3,64,64", "--calib-data", str(folder), "-o", str(output)]  # fmt: skip


def finetune_run(source: Path, folder: Path, output: Path, changes: dict[str, Any], epochs: int) -> dict[str, Any]:
    """``vconvert.finetune`` with the defaults and ``changes``: every step's loss, per epoch the largest gradient
    norm and the validation top-1, or where the run stopped."""
    import vconvert
    from vconvert.errors import CheckFailedError

    losses: list[float] = []
    config = vconvert.FinetuneConfig(data=str(folder), epochs=epochs, **changes)
    started = time.perf_counter()
    record: dict[str, Any] = {"changes": changes}
    try:
        history = vconvert.finetune(
            source, output, config, progress=lambda step, steps, info: losses.append(info["loss"])
        )
        record["val_top1"] = [round(m.val_top1, 2) for m in history]
        record["train_loss"] = [round(m.train_loss, 4) for m in history]
        record["grad_norm_max"] = [round(m.extra["grad_norm_max"], 3) for m in history]
    except CheckFailedError as error:
        record["stopped"] = str(error)
    record["step_loss"] = [round(value, 4) if value == value else None for value in losses]
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def resnet20_runs(work: Path, cifar: Path, runs: list[str], epochs: int, train_limit: int) -> dict[str, Any]:
    """The shared pretrained CIFAR-10 ResNet-20 (BatchNorm) compressed as the CIFAR benchmark does (learned s=2,
    downsample convs skipped) and fine-tuned on ``train_limit`` CIFAR-10 training images (1,000 validation
    images): the gradient norms a BatchNorm model reaches under the defaults."""
    import vconvert
    from vconvert.errors import CheckFailedError

    compressed = work / "resnet20_s2.vc.pt"
    command = ["compress", str(common.MODELS / common.RESNET20_FILE), "--arch", "sample_models.resnet_cifar:resnet20",
               "--input-shape", "1,3,32,32", "--skip", "downsample", "--mean", common.CIFAR_MEAN_ARG, "--std",
               common.CIFAR_STD_ARG, "--calib-data", str(cifar), "--calib-images", "1000", "--mode", "learned",
               "--secondary", "2", "-o", str(compressed)]  # fmt: skip
    if not compressed.exists():
        common.vconvert(*command)
    entry: dict[str, Any] = {"compress": common.shown(common.vconvert_command(*command)), "runs": {}}
    for name in runs:
        config = vconvert.FinetuneConfig(data=str(cifar), epochs=epochs, train_limit=train_limit, eval_limit=1000,
                                         **RUNS[name])  # fmt: skip
        started = time.perf_counter()
        try:
            history = vconvert.finetune(compressed, work / f"resnet20_s2.{name}.vc.pt", config)
        except CheckFailedError as error:
            entry["runs"][name] = {"stopped": str(error)}
            continue
        entry["runs"][name] = {
            "changes": RUNS[name], "epochs": epochs, "train_limit": train_limit,
            "val_top1": [round(m.val_top1, 2) for m in history],
            "train_loss": [round(m.train_loss, 4) for m in history],
            "grad_norm_max": [round(m.extra["grad_norm_max"], 3) for m in history],
            "seconds": round(time.perf_counter() - started, 1),
        }  # fmt: skip
        print("resnet20", name, entry["runs"][name], flush=True)
    return entry


def report(record: dict[str, Any]) -> list[str]:
    """The Markdown table of ``record``: per model and run, the validation top-1 after each epoch, the largest
    gradient norm of each epoch (before clipping), the first steps' losses, or where the run stopped."""
    lines = [
        "# Default fine-tuning on a model without BatchNorm (issue 29 item 2)",
        "",
        f"`{record['command']}`",
        "",
        "| model | run | val top-1 per epoch (%) | largest gradient norm per epoch | loss, first 12 steps | s |",
        "|---|---|---|---|---|---|",
    ]
    for arch, entry in record["models"].items():
        for name, run in entry["runs"].items():
            steps = ", ".join("nan" if v is None else f"{v:.3g}" for v in run.get("step_loss", [])[:12]) or "-"
            top1 = ", ".join(f"{v:.2f}" for v in run.get("val_top1", [])) or run.get("stopped", "")
            norms = ", ".join(f"{v:.3g}" for v in run.get("grad_norm_max", []))
            lines.append(f"| {arch} | {name} | {top1} | {norms} | {steps} | {run.get('seconds', '')} |")
    lines += ["", "Pretraining (plain torch) and compression:", ""]
    for arch, entry in record["models"].items():
        if "pretrain" in entry:
            lines.append(f"- {arch}: val top-1 per pretraining epoch {entry['pretrain']['val_top1']}")
        if "compress" in entry:
            lines.append(f"- {arch}: `{entry['compress']}`")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 fine-tuning epochs, 2 pretraining epochs")
    parser.add_argument("--work", type=Path, default=Path("/tmp/nobn"))
    parser.add_argument("--cifar", type=Path, default=common.CIFAR_CACHE)
    parser.add_argument("--archs", default="squeezenet1_1,resnet8")
    parser.add_argument("--runs", default="noclip,default,lr0.001", help=f"of {', '.join(RUNS)}")
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default 5, the CLI's)")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--resnet20", action="store_true", help="also the CIFAR-10 ResNet-20 s=2 (BatchNorm)")
    parser.add_argument("--train-limit", type=int, default=5120, help="ResNet-20: CIFAR-10 training images")
    args = parser.parse_args()
    quick = args.quick
    epochs = args.epochs or (2 if quick else 5)
    output = args.output or common.RESULTS / ("no_bn_divergence_quick.json" if quick else "no_bn_divergence.json")
    common.ensure_cifar(args.cifar, common.SHARED_CIFAR)
    args.work.mkdir(parents=True, exist_ok=True)
    folder = make_folder(args.work, args.cifar, (300, 100))
    record: dict[str, Any] = {"command": common.command_line(__file__), **common.host(), "models": {}}
    if output.exists():  # runs add to the record of earlier ones
        record = {**json.loads(output.read_text()), "command": record["command"]}
    for arch in filter(None, args.archs.split(",")):
        model, compressed = args.work / f"{arch}.pt", args.work / f"{arch}.vc.pt"
        entry = record["models"].setdefault(arch, {"runs": {}})
        if not model.exists():
            entry["pretrain"] = pretrain(arch, folder, 2 if quick else 5, model)
        if not compressed.exists():
            command = compress_command(arch, model, folder, compressed)
            common.vconvert(*command)
            entry["compress"] = common.shown(common.vconvert_command(*command)).replace(str(args.work), "$WORK")
        for name in args.runs.split(","):
            result = finetune_run(compressed, folder, args.work / f"{arch}.{name}.vc.pt", RUNS[name], epochs)
            entry["runs"][name] = {"epochs": epochs, **result}
            print(arch, name, {k: v for k, v in result.items() if k != "step_loss"}, flush=True)
            common.write_json(output, record)
            common.write_markdown(output.with_suffix(".md"), report(record))
    if args.resnet20:
        runs = args.runs.split(",")
        record["models"]["resnet20_cifar10_s2"] = resnet20_runs(args.work, args.cifar, runs, epochs, args.train_limit)
        common.write_json(output, record)
        common.write_markdown(output.with_suffix(".md"), report(record))


if __name__ == "__main__":
    main()
