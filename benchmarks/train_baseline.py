"""Train a dense CIFAR-10 baseline (ResNet-20/56 of sample_models.resnet_cifar) from scratch, for
running the CIFAR-10 table on the project's own baselines (`benchmarks/cifar10.py --base FILE --arch A`).

Recipe: SGD + Nesterov (momentum 0.9), linear warm-up then cosine, weight decay on conv and linear
weights only (vconvert.train.finetune.parameter_groups), label smoothing, random crop (pad 4, reflect) +
horizontal flip; the whole split held on the device (vconvert.data.device), channels_last and bf16
autocast on CUDA. Meant for a GPU: on 2 CPU cores an epoch of ResNet-20 takes minutes, so there use
``--train-limit`` and few epochs to check it runs.

    python benchmarks/train_baseline.py --arch resnet20 --epochs 200 [--seconds S] [--batch-size 256] [--lr 0.1]
           [--label-smoothing 0.1] [--seed 0] [--cifar ~/.cache/vconvert/cifar10]
           [--output ~/.cache/vconvert/baselines/resnet20_cifar10.pt] [--results benchmarks/results/...]

The trained state_dict goes to ``--output``, which must lie outside the repository (trained models are
never committed); the recipe, per-epoch losses and the final top-1 on the test split go to
``--results`` (JSON).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `benchmarks` importable
from benchmarks import common
from vconvert.train.finetune import parameter_groups, warmup_cosine

MEAN, STD = common.CIFAR_MEAN, common.CIFAR_STD
ARCHS = ("resnet8", "resnet20", "resnet56")
CACHE = Path.home() / ".cache" / "vconvert"


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` (resolved) lies in ``folder``."""
    return path.resolve().is_relative_to(folder.resolve())


def evaluate(model: nn.Module, split, batch_size: int) -> float:
    """Top-1 (percent, fp32) of ``model`` on every image of a device split."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for images, labels in split.batches(range(len(split)), batch_size):
            correct += int((model(images).argmax(1) == labels).sum())
    return 100.0 * correct / len(split)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=ARCHS, default="resnet20")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    parser.add_argument(
        "--seconds",
        type=float,
        help="time budget: after the first epoch, lower --epochs to what fits (the cosine schedule is "
        "set for the lowered count; warm-up is still running then)",
    )
    parser.add_argument("--warmup-epochs", type=float, default=2.0)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--train-limit", type=int, default=0, help="training images (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cifar", type=Path, default=common.CIFAR_CACHE, help="unpacked CIFAR-10 (train/, test/)")
    parser.add_argument("--shared-data", type=Path, default=common.SHARED_CIFAR)
    parser.add_argument("--output", type=Path, help="state_dict path (default ~/.cache/vconvert/baselines/)")
    parser.add_argument("--results", type=Path, help="results JSON (default benchmarks/results/baseline_ARCH.json)")
    args = parser.parse_args()
    output = args.output or CACHE / "baselines" / f"{args.arch}_cifar10.pt"
    results = args.results or common.RESULTS / f"baseline_{args.arch}.json"
    if inside(output, common.ROOT):
        sys.exit(f"--output {output} is inside the repository; trained models are kept outside it.")
    if args.epochs < 1 or args.batch_size < 1:
        sys.exit("--epochs and --batch-size must be at least 1.")

    from rich.progress import Progress

    from sample_models import resnet_cifar
    from vconvert.data.datasets import open_split
    from vconvert.data.device import DeviceImageSet

    common.ensure_cifar(args.cifar, args.shared_data)
    torch.manual_seed(args.seed)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    def device_split(train: bool) -> DeviceImageSet:
        dataset, spec, _ = open_split(str(args.cifar), train, input_size=[32, 32], mean=MEAN, std=STD)
        if train and args.train_limit:
            chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))
            dataset = torch.utils.data.Subset(dataset, chosen[: args.train_limit].tolist())  # folders are class-sorted
        return DeviceImageSet.from_dataset(
            dataset, input_size=spec.input_size, channels=3, mean=MEAN, std=STD,
            augment=train, seed=args.seed, device=device, channels_last=cuda,
        )  # fmt: skip

    started = time.perf_counter()
    train, test = device_split(True), device_split(False)
    model = getattr(resnet_cifar, args.arch)().to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimiser = torch.optim.SGD(parameter_groups(model, args.weight_decay), lr=args.lr, momentum=0.9, nesterov=True)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    warmup = max(1, round(args.warmup_epochs * steps_per_epoch))
    epochs = args.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: warmup_cosine(step, warmup, epochs * steps_per_epoch)
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    history: list[dict] = []
    with Progress() as progress:
        task = progress.add_task(f"{args.arch}: training", total=epochs)
        epoch = 0
        while epoch < epochs:
            model.train()
            train.set_epoch(epoch)
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
            loss_sum = torch.zeros((), device=device)
            epoch_started = time.perf_counter()
            for images, labels in train.batches(order, args.batch_size):
                with autocast():
                    loss = criterion(model(images), labels)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                scheduler.step()
                loss_sum += loss.detach() * len(labels)
            mean_loss = float(loss_sum) / len(train)  # one host sync per epoch
            if not math.isfinite(mean_loss):
                sys.exit(f"The training loss became {mean_loss} in epoch {epoch + 1}; lower --lr.")
            seconds = time.perf_counter() - epoch_started
            history.append({"epoch": epoch + 1, "train_loss": round(mean_loss, 4), "seconds": round(seconds, 2)})
            if epoch == 0 and args.seconds:  # the first epoch includes warm-up costs: a safe estimate
                epochs = max(1, min(epochs, int(args.seconds // seconds)))
                progress.update(task, total=epochs)
            progress.update(task, advance=1, description=f"{args.arch}: epoch {epoch + 1}, loss {mean_loss:.3f}")
            epoch += 1
    top1 = evaluate(model, test, 512)
    output.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    partial = output.with_name(output.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, output)
    record = {
        "benchmark": "train_baseline",
        "command": common.command_line(__file__),
        "arch": f"sample_models.resnet_cifar:{args.arch}",
        "recipe": {"epochs": epochs, **{key: getattr(args, key) for key in
                   ("batch_size", "lr", "warmup_epochs", "weight_decay", "label_smoothing", "seed", "seconds")}},
        "train_images": len(train),
        "test_images": len(test),
        "top1_test": round(top1, 2),
        **common.device_fields(),
        "wall_s": round(time.perf_counter() - started, 1),
        "model_file": str(output),
        "history": history,
    }  # fmt: skip
    common.write_json(results, record)
    print(f"{args.arch}: top-1 {top1:.2f}% on {len(test)} test images; model {output}, results {results}")


if __name__ == "__main__":
    main()
