"""How soft are the teacher's targets at each distillation temperature?

The pretrained CIFAR-10 ResNet-20 was trained with label smoothing 0.1, which bounds its logit gaps;
this measures, on training images (the distillation inputs, without augmentation), the mean
probability of the teacher's top class, of the true class and the entropy of softmax(logits / T).

    python benchmarks/teacher_temperature.py [--images 1000] [--temperatures 1,2,4]

Writes benchmarks/results/teacher_temperature.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `benchmarks` importable
from benchmarks import common


def softness(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict[str, float]:
    """Mean top-class probability, true-class probability and entropy (nats) of softmax(logits / T)."""
    probabilities = F.softmax(logits / temperature, dim=1)
    entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(dim=1)
    return {
        "temperature": temperature,
        "mean_top_probability": round(probabilities.max(dim=1).values.mean().item(), 4),
        "mean_true_class_probability": round(probabilities[torch.arange(len(labels)), labels].mean().item(), 4),
        "mean_entropy_nats": round(entropy.mean().item(), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=common.MODELS)
    parser.add_argument("--cifar", type=Path, default=common.CIFAR_CACHE)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--temperatures", default="1,2,4")
    parser.add_argument("--output", type=Path, default=common.RESULTS / "teacher_temperature.json")
    args = parser.parse_args()

    teacher = common.pretrained_resnet20(args.models)
    preprocess = transforms.Compose([transforms.ToTensor(), transforms.Normalize(common.CIFAR_MEAN, common.CIFAR_STD)])
    images = datasets.ImageFolder(str(args.cifar / "train"), preprocess)
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[: args.images].tolist()
    inputs = torch.stack([images[i][0] for i in chosen])
    labels = torch.tensor([images[i][1] for i in chosen])
    with torch.no_grad():
        logits = teacher(inputs)
    rows = [softness(logits, labels, float(t)) for t in args.temperatures.split(",")]
    record = {
        "command": common.command_line(__file__),
        "teacher": "pretrained CIFAR-10 ResNet-20 (88.57%, trained with label smoothing 0.1)",
        "images": f"{args.images} training images (seed 0), no augmentation",
        "teacher_train_top1": round(100.0 * (logits.argmax(dim=1) == labels).float().mean().item(), 2),
        "uniform_entropy_nats": round(math.log(logits.shape[1]), 4),
        "rows": rows,
    }
    common.write_json(args.output, record)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
