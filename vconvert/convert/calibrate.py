"""BatchNorm recalibration: re-estimate running statistics of a converted network on unlabeled images.

A converted conv approximates the original one, so the statistics the following BatchNorm layers
learned no longer match its outputs (docs/ALGEBRA.md §11). Averaging the batch statistics over a
few thousand training images, with no labels and no gradient, restores most of the accuracy.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from rich.progress import Progress
from torch import Tensor, nn

_PROGRESS_AFTER_S = 2.0


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of ``model`` that tracks running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


class _LateProgress:
    """A transient progress bar that appears only once the work has run for more than a few seconds."""

    def __init__(self, description: str, total: int) -> None:
        self.description, self.total = description, total
        self.started = time.perf_counter()
        self.bar: Progress | None = None

    def update(self, completed: int) -> None:
        if self.bar is None and time.perf_counter() - self.started > _PROGRESS_AFTER_S:
            self.bar = Progress(transient=True)
            self.task = self.bar.add_task(self.description, total=self.total)
            self.bar.start()
        if self.bar is not None:
            self.bar.update(self.task, completed=completed)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Tensor], max_images: int = 2000) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them on up to ``max_images`` images.

    Runs ``model`` in train mode (cumulative averaging, ``momentum=None``) under ``torch.no_grad``;
    the original momenta and training flags of all modules are restored afterwards, even on error.
    ``batches`` yields image tensors (or tuples whose first item is the images). Returns the number
    of images used. Shows a progress bar when it runs for more than a few seconds.
    """
    norms = batchnorm_layers(model)
    if not norms:
        return 0
    flags = {module: module.training for module in model.modules()}
    momenta = {norm: norm.momentum for norm in norms}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    used = 0
    progress = _LateProgress("BatchNorm recalibration", max_images)
    try:
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
        model.train()
        for batch in batches:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            images = images[: max_images - used]
            if images.shape[0] == 0:
                break
            model(images.to(device))
            used += images.shape[0]
            progress.update(used)
            if used >= max_images:
                break
    finally:
        progress.stop()
        for norm, momentum in momenta.items():
            norm.momentum = momentum
        for module, training in flags.items():
            module.train(training)
    return used


@torch.no_grad()
def outputs_of(model: nn.Module, batches: Sequence[Tensor]) -> list[Tensor]:
    """``model``'s outputs on each of ``batches``, run in eval mode (its modes are restored)."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    outputs: list[Tensor] = []
    done = 0
    progress = _LateProgress("model outputs", sum(len(batch) for batch in batches))
    try:
        for batch in batches:
            outputs.append(model(batch))
            done += len(batch)
            progress.update(done)
    finally:
        progress.stop()
        for module, training in flags.items():
            module.train(training)
    return outputs


def output_divergence(model: nn.Module, original: nn.Module | Sequence[Tensor], batches: Sequence[Tensor]) -> float:
    """Mean KL divergence of ``model``'s softmax outputs from ``original``'s over the images of ``batches``
    (``original`` a network, or its outputs on ``batches`` from :func:`outputs_of`)."""
    from vconvert.convert.target_size import divergence

    reference = outputs_of(original, batches) if isinstance(original, nn.Module) else original
    pairs = zip(reference, outputs_of(model, batches), strict=True)
    total = sum(divergence(theirs, ours) * len(ours) for theirs, ours in pairs)
    count = sum(len(batch) for batch in batches)
    return total / count if count else 0.0


@dataclass
class Recalibration:
    """What :func:`recalibrate_if_closer` did: the images it re-estimated on, the output divergence from the
    original network before and after, and whether the new statistics were kept."""

    images: int
    divergence_before: float
    divergence_after: float
    kept: bool


def recalibrate_if_closer(
    model: nn.Module, original: nn.Module, batches: Sequence[Tensor], max_images: int
) -> Recalibration:
    """:func:`recalibrate_batchnorm` on ``batches``, kept only when it brings ``model``'s outputs closer to
    ``original``'s on those images (:func:`output_divergence`; no labels), else the statistics ``model`` had are
    put back. After output reconstruction the layers already match the original's outputs, and the statistics
    the original network learned on its whole (augmented) training set usually fit them better than a re-estimate
    on ~1,000 unaugmented images (docs/FIT.md §18)."""
    norms = batchnorm_layers(model)
    saved = [{key: value.clone() for key, value in norm.state_dict().items()} for norm in norms]
    reference = outputs_of(original, batches)  # once for both measurements
    before = output_divergence(model, reference, batches)
    used = recalibrate_batchnorm(model, batches, max_images=max_images)
    after = output_divergence(model, reference, batches)
    kept = after < before
    if not kept:
        for norm, state in zip(norms, saved, strict=True):
            norm.load_state_dict(state)
    return Recalibration(used, before, after, kept)
