"""Cost of ``compress --reconstruct`` on a large network (issue 31): torchvision ResNet-50 at 224x224.

Random weights (``torchvision.models.resnet50()``, no download) and random-noise images: enough for time and
memory, not for accuracy. Stages, each timed in this process: ``compress`` (data-free fit), then reconstruction
by the single pass (both networks run once, node by node: ``single_pass_inputs``), split into the forward walk,
the moments (``moments_of_inputs``) and the fits (``fit_layer``). The old path (both networks run from the start
up to each layer: ``prefix_inputs``) is timed on its first ``--old-layers`` layers only and extrapolated: each
layer's prefix costs the full forward of both networks times the share of multiply-accumulates before it, plus
the same moments and fit as in the single pass. Peak RSS is the process's high-water mark after each stage; with
``--quick`` the activations the single pass would hold at 256 images are estimated from one image.

    python benchmarks/reconstruct_large.py --quick   # 32 images (walk and moments scaled to 256 in the report)
    python benchmarks/reconstruct_large.py           # 256 images (run only when the machine is otherwise idle)

Writes benchmarks/results/reconstruct_resnet50{,_quick}.json and .md.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `benchmarks` importable
from benchmarks import common
from vconvert.convert import reconstruct as module
from vconvert.convert.compress import compress
from vconvert.convert.reconstruct import reconstruct
from vconvert.convert.replay import GraphStepper, LayerReplay, values_bytes

RESULTS = Path(__file__).resolve().parent / "results"
FULL_IMAGES = 256


def peak_rss_gb() -> float:
    """This process's peak resident set size so far, in GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


class StageTimer:
    """Wraps ``moments_of_inputs`` and ``fit_layer`` of the reconstruct module to add up the seconds spent in each."""

    def __init__(self) -> None:
        self.seconds = {"moments": 0.0, "fit": 0.0}
        self._originals = {"moments": module.moments_of_inputs, "fit": module.fit_layer}

    def __enter__(self) -> StageTimer:
        for stage, attribute in (("moments", "moments_of_inputs"), ("fit", "fit_layer")):
            setattr(module, attribute, self._timed(stage, self._originals[stage]))
        return self

    def __exit__(self, *_: object) -> None:
        module.moments_of_inputs, module.fit_layer = self._originals["moments"], self._originals["fit"]

    def _timed(self, stage: str, function: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - started

        return timed


def log_progress(stage: str) -> Any:
    """A ``reconstruct`` progress callback that prints each layer as it starts, with the elapsed seconds."""
    started = time.perf_counter()

    def progress(done: int, total: int, name: str) -> None:
        print(f"{stage} {done}/{total} {name} {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)

    return progress


def live_activation_gb(model: nn.Module, size: int, images: int) -> float:
    """Peak GB of activations the single pass holds for both networks over ``images`` images: the largest set of
    live values of one network on one image (:class:`GraphStepper`), times two, times ``images``."""
    stepper = GraphStepper(LayerReplay(model), [torch.randn(1, 3, size, size)])
    peak = 0
    for node in stepper.replay.nodes:
        stepper.step(node)
        peak = max(peak, values_bytes(stepper.values[0]))
    return 2 * images * peak / 1e9


def mac_shares(model: nn.Module, image: torch.Tensor) -> dict[str, float]:
    """For each conv, the share of the network's conv multiply-accumulates that run before it (one image)."""
    macs: list[tuple[str, int]] = []
    handles = [
        conv.register_forward_hook(lambda m, _a, out, name=name: macs.append((name, out.numel() * m.weight[0].numel())))
        for name, conv in model.named_modules()
        if isinstance(conv, nn.Conv2d)
    ]
    with torch.no_grad():
        model(image)
    for handle in handles:
        handle.remove()
    total, before, shares = sum(m for _, m in macs), 0, {}
    for name, count in macs:
        shares.setdefault(name, before / total)
        before += count
    return shares


def main(argv: list[str] | None = None) -> None:
    """Parse the options, time the stages, write the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="32 images; walk and moments scaled to 256")
    parser.add_argument("--images", type=int, default=None, help="calibration images (default 256, 32 quick)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--old-layers", type=int, default=3, help="layers of the old path to time (0: skip)")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args(argv)
    images_count = args.images or (32 if args.quick else FULL_IMAGES)
    scale = FULL_IMAGES / images_count
    load = common.load_average()
    torch.manual_seed(0)
    from torchvision import models

    teacher = models.resnet50().eval()
    images = torch.randn(images_count, 3, args.size, args.size)
    batches = list(images.split(args.batch))
    record: dict[str, Any] = {
        "model": "torchvision resnet50 (random weights)",
        "input": [3, args.size, args.size],
        "images": images_count,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "load_average_at_start": load,
        **common.host(),
        **common.versions("torch", "torchvision"),
    }
    started = time.perf_counter()
    student, _ = compress(teacher, images[:1])
    record["compress_s"] = round(time.perf_counter() - started, 1)
    record["peak_rss_gb_after_compress"] = round(peak_rss_gb(), 2)
    order = [
        name
        for name in module.execution_order(student, images[:1])
        if module.reconstructable(student.get_submodule(name)) is None
    ]
    record["layers"] = len(order)

    if args.old_layers:  # the old path on the first layers, from a copy so the single pass starts fresh
        import copy

        old_student = copy.deepcopy(student)
        original = module.single_pass_inputs
        module.single_pass_inputs = lambda *_: None
        try:
            with StageTimer() as timer:
                started = time.perf_counter()
                reconstruct(old_student, teacher, batches, None, log_progress("old"), order[: args.old_layers])
                old_seconds = time.perf_counter() - started
        finally:
            module.single_pass_inputs = original
        del old_student
        record["old_path_first_layers"] = {
            "layers": order[: args.old_layers],
            "seconds": round(old_seconds, 1),
            "fit_s": round(timer.seconds["fit"], 1),
            "moments_and_prefix_s": round(timer.seconds["moments"], 1),
        }

    with StageTimer() as timer:
        started = time.perf_counter()
        report = reconstruct(student, teacher, batches, None, log_progress("single"))
        single_seconds = time.perf_counter() - started
    walk = single_seconds - timer.seconds["moments"] - timer.seconds["fit"]
    record["single_pass"] = {
        "seconds": round(single_seconds, 1),
        "walk_s": round(walk, 1),
        "moments_s": round(timer.seconds["moments"], 1),
        "fit_s": round(timer.seconds["fit"], 1),
        "layers_reconstructed": sum(layer.skipped is None for layer in report.layers),
        "peak_rss_gb": round(peak_rss_gb(), 2),
    }
    record["single_pass_at_256_images_s"] = round((walk + timer.seconds["moments"]) * scale + timer.seconds["fit"], 1)

    # the old path's extrapolation: per layer, a forward of both networks up to it (walk x share of MACs before it)
    # over the same images, with the same moments and fits as the single pass
    shares = mac_shares(teacher, images[:1])
    prefix_total = walk * sum(shares.get(name, 1.0) for name in order)
    record["old_path_extrapolated_s"] = round(prefix_total + timer.seconds["moments"] + timer.seconds["fit"], 1)
    record["old_path_extrapolated_at_256_images_s"] = round(
        (prefix_total + timer.seconds["moments"]) * scale + timer.seconds["fit"], 1
    )
    record["live_activations_gb_at_256_images"] = round(live_activation_gb(teacher, args.size, FULL_IMAGES), 2)
    record["load_average_at_end"] = common.load_average()
    stem = "reconstruct_resnet50_quick" if args.quick else "reconstruct_resnet50"
    common.write_json(RESULTS / f"{stem}.json", record)
    single = record["single_pass"]
    lines = [
        "# Reconstruction cost on ResNet-50 (224x224, random weights, noise images)",
        "",
        f"`{common.command_line('benchmarks/reconstruct_large.py', argv)}`: {images_count} images in batches of "
        f"{args.batch}, {record['threads']} thread(s); load average {load[0]:.2f} at the start, "
        f"{record['load_average_at_end'][0]:.2f} at the end (other jobs on the machine inflate these times).",
        "",
        "| stage | seconds | peak RSS (GB) |",
        "|---|---:|---:|",
        f"| compress (data-free) | {record['compress_s']} | {record['peak_rss_gb_after_compress']} |",
        f"| single pass: forward walk | {single['walk_s']} | |",
        f"| single pass: moments | {single['moments_s']} | |",
        f"| single pass: fits ({single['layers_reconstructed']} layers) | {single['fit_s']} | |",
        f"| single pass, all | {single['seconds']} | {single['peak_rss_gb']} |",
        f"| old path, extrapolated (prefix per layer) | {record['old_path_extrapolated_s']} | |",
    ]
    if images_count != FULL_IMAGES:
        lines += [
            f"| single pass at {FULL_IMAGES} images (walk and moments scaled) | "
            f"{record['single_pass_at_256_images_s']} | |",
            f"| old path at {FULL_IMAGES} images, extrapolated | {record['old_path_extrapolated_at_256_images_s']} | |",
            "",
            f"At {FULL_IMAGES} images the single pass holds about {record['live_activations_gb_at_256_images']} GB of "
            "activations at its peak (both networks; largest live set of one image, scaled), on top of the RSS above.",
        ]
    if args.old_layers:
        old = record["old_path_first_layers"]
        lines += [
            "",
            f"Old path measured on its first {len(old['layers'])} layers only: {old['seconds']} s "
            f"({old['moments_and_prefix_s']} s prefix forwards and moments, {old['fit_s']} s fits). Its whole-network "
            "figure is extrapolated: each layer's prefix costs the single pass's forward walk times the share of "
            "conv multiply-accumulates before it, plus the single pass's moments and fits.",
        ]
    common.write_markdown(RESULTS / f"{stem}.md", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
