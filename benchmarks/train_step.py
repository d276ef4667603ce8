"""Training-step time of a CIFAR ResNet-20: dense vs every 3x3 conv (but the stem) versatile.

Both networks are timed side by side in one run (interleaved rounds, same batch, same optimiser),
so the reported ratio does not depend on machine load drifting between two runs.

    python benchmarks/train_step.py [--device cpu|cuda] [--batch 128] [--rounds 20]

Writes benchmarks/results/train_step.json (or train_step_<device>.json for a non-CPU device).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `benchmarks` importable
from benchmarks import common
from sample_models.resnet_cifar import resnet20
from vconvert import versatile_layers
from vconvert.fit.initialise import from_conv


def make_versatile(model: nn.Module, **options) -> nn.Module:
    """Swap every 3x3 Conv2d except the stem for a VersatileConv2d initialised from it."""
    for name, child in list(model.named_modules()):
        if type(child) is nn.Conv2d and child.kernel_size == (3, 3) and name != "conv1":
            model.set_submodule(name, from_conv(child, **options))
    return model


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model: nn.Module, batch: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    """Seconds per training step (forward, cross-entropy, backward, SGD step), mean over ``steps``."""
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    _synchronise(batch.device)
    start = time.perf_counter()
    for _ in range(steps):
        optimiser.zero_grad(set_to_none=True)
        F.cross_entropy(model(batch), labels).backward()
        optimiser.step()
    _synchronise(batch.device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds per model")
    parser.add_argument("--steps", type=int, default=3, help="training steps per round")
    parser.add_argument("--mode", default="learned")
    parser.add_argument("--secondary", type=int, default=2)
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    dense = resnet20().to(device).train()
    versatile = make_versatile(resnet20().to(device), mode=args.mode, secondary=args.secondary).train()
    converted = len(list(versatile_layers(versatile)))
    batch = torch.randn(args.batch, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)

    for model in (dense, versatile):  # warm-up: allocator, kernels, autograd graph caches
        time_steps(model, batch, labels, 3)
    times: dict[str, list[float]] = {"dense": [], "versatile": []}
    for _ in range(args.rounds):
        times["dense"].append(time_steps(dense, batch, labels, args.steps))
        times["versatile"].append(time_steps(versatile, batch, labels, args.steps))

    median = {name: statistics.median(values) for name, values in times.items()}
    options = ["--device", args.device, "--batch", str(args.batch), "--rounds", str(args.rounds), "--steps",
               str(args.steps), "--mode", args.mode, "--secondary", str(args.secondary)]  # fmt: skip
    result = {
        "benchmark": "train_step",
        "command": common.command_line(__file__, options),
        "network": "CIFAR ResNet-20 (sample_models.resnet_cifar:resnet20), 32x32 inputs",
        "converted_layers": converted,
        "mode": args.mode,
        "secondary": args.secondary,
        "batch": args.batch,
        **common.device_fields(device),
        "dense_step_s": median["dense"],
        "versatile_step_s": median["versatile"],
        "ratio_versatile_over_dense": median["versatile"] / median["dense"],
        "target_ratio": 1.10 if device.type == "cpu" else 1.25,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
    }
    name = "train_step.json" if device.type == "cpu" else f"train_step_{device.type}.json"
    common.write_json(common.RESULTS / name, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
