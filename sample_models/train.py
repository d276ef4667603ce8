"""Train a sample model on the embedded digits data set and record how it was made.

    python -m sample_models.train --arch resnet20 --epochs 40 -o sample_models/weights/resnet20_digits.pt

Writes the state_dict and, beside it, a JSON file with the test accuracy, the exact command, the
seed and the versions. Digits (scikit-learn's 1,797 handwritten digits, 8x8 upsampled to 32x32,
1 channel) ship with scikit-learn, so this runs offline in about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from sample_models.resnet_cifar import resnet8, resnet20, resnet56
from sample_models.vgg_small import vgg_small
from vconvert.data.datasets import SeededSamples, open_split
from vconvert.evaluate import evaluate_model
from vconvert.io.files import atomic_save, atomic_write_bytes
from vconvert.train.finetune import warmup_cosine

ARCHS = {"resnet8": resnet8, "resnet20": resnet20, "resnet56": resnet56, "vgg_small": vgg_small}


def train(arch: str, epochs: int, lr: float, batch: int, seed: int) -> tuple[torch.nn.Module, float, dict]:
    """Train ``arch`` on digits (SGD, Nesterov, cosine with warm-up); return it, test top-1 and data spec."""
    torch.manual_seed(seed)
    train_set, spec, _ = open_split("digits", True)
    test_set, _, _ = open_split("digits", False)
    model = ARCHS[arch](num_classes=len(spec.classes), in_channels=spec.channels)
    seeded = SeededSamples(train_set, seed)
    steps_per_epoch = len(train_set) // batch
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    total = steps_per_epoch * epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: warmup_cosine(step, steps_per_epoch, total))
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        seeded.set_epoch(epoch)
        model.train()
        for images, labels in DataLoader(seeded, batch_size=batch, shuffle=True, drop_last=True, generator=generator):
            optimiser.zero_grad(set_to_none=True)
            F.cross_entropy(model(images), labels).backward()
            optimiser.step()
            scheduler.step()
        top1, _, _ = evaluate_model(model, test_set, torch.device("cpu"), workers=0)
        print(f"epoch {epoch + 1}/{epochs}: test top-1 {top1:.2f}%", flush=True)
    return model.eval(), top1, spec.to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="resnet20")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    model, top1, spec = train(args.arch, args.epochs, args.lr, args.batch, args.seed)
    atomic_save(model.state_dict(), args.output)
    record = {
        "arch": f"sample_models.resnet_cifar:{args.arch}"
        if args.arch.startswith("resnet")
        else f"sample_models.vgg_small:{args.arch}",
        "arch_kwargs": {"num_classes": len(spec["classes"]), "in_channels": spec["channels"]},
        "data": spec,
        "test_top1": round(top1, 2),
        "test_images": 360,
        "command": "python -m sample_models.train " + " ".join(sys.argv[1:]),
        "seed": args.seed,
        "train_seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "machine": platform.platform(),
    }
    atomic_write_bytes((json.dumps(record, indent=2) + "\n").encode(), args.output.with_suffix(".json"))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
