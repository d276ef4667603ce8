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
from init_quality import MEAN, STD
from torchvision import datasets, transforms

from sample_models.resnet_cifar import resnet20

RESULTS = Path(__file__).resolve().parent / "results"


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
    parser.add_argument("--models", type=Path, default=Path("/work/shared/models"))
    parser.add_argument("--cifar", type=Path, default=Path.home() / ".cache/vconvert/cifar10")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--temperatures", default="1,2,4")
    parser.add_argument("--output", type=Path, default=RESULTS / "teacher_temperature.json")
    args = parser.parse_args()

    teacher = resnet20()
    teacher.load_state_dict(torch.load(args.models / "resnet20_cifar10.pt", weights_only=True))
    teacher.eval()
    preprocess = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    images = datasets.ImageFolder(str(args.cifar / "train"), preprocess)
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[: args.images].tolist()
    inputs = torch.stack([images[i][0] for i in chosen])
    labels = torch.tensor([images[i][1] for i in chosen])
    with torch.no_grad():
        logits = teacher(inputs)
    rows = [softness(logits, labels, float(t)) for t in args.temperatures.split(",")]
    record = {
        "command": "python benchmarks/teacher_temperature.py " + " ".join(sys.argv[1:]),
        "teacher": "pretrained CIFAR-10 ResNet-20 (88.57%, trained with label smoothing 0.1)",
        "images": f"{args.images} training images (seed 0), no augmentation",
        "teacher_train_top1": round(100.0 * (logits.argmax(dim=1) == labels).float().mean().item(), 2),
        "uniform_entropy_nats": round(math.log(logits.shape[1]), 4),
        "rows": rows,
    }
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
