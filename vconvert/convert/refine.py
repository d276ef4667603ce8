"""Block refinement: gradient steps on each block's output error after the layer-wise reconstruction.

The layer-wise fit (:mod:`vconvert.convert.reconstruct`) solves each conv alone, exactly, against the original
conv's output. What the next layers see is the *block's* output: after BatchNorm, the ReLU, the second conv and
the shortcut. BRECQ (Li et al., 2021) refits whole blocks for that reason, and QDrop (Wei et al., 2022) feeds
each element of the block's input from the original network with probability ``drop`` (else from the converted
one), which keeps the fit from leaning on the errors of the blocks before it. Here, per block in execution order:

    min  E ‖ block_s(x̃) − block_t(x_t) ‖²,   x̃ = where(u < drop, x_t, x_s),  u ~ U(0, 1) per element

over the block's primaries, scales, learned quantization steps, biases and BatchNorm affine parameters (Adam,
cosine-decayed), and over its learned masks through their straight-through proxies (their own learning rate;
a bit flips when its proxy crosses the threshold). BatchNorm statistics stay as they are (eval mode). The
inputs x_s (from the already refined blocks before) and x_t, and the target, are computed once per block for
every calibration image and sampled in mini-batches. The last ``held_out`` share of the images (1/8) is not
stepped on: a block whose output error on those (the converted network's own inputs, no drop) did not fall
keeps its previous parameters.

A block is the outermost module below the model that is an element of an ``nn.Sequential`` and holds a
versatile layer (a ResNet's BasicBlock or Bottleneck, a MobileNet's InvertedResidual, a VGG conv); a versatile
layer in no such module is its own block. Blocks are visited in the order their layers first run; a block whose
input is not one tensor is left as the layer-wise fit made it.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vconvert.convert.reconstruct import execution_order, layer_inputs
from vconvert.nn.modes import eval_mode
from vconvert.nn.versatile import VersatileConv2d, versatile_layers

MASK_PARAMETER = "mask_proxy"
DEFAULT_STEPS = 300
# Refinement costs about `steps` forward and backward passes of every block on a mini-batch: ~2 minutes for
# ResNet-20 (41 M multiply-accumulates an image) on 2 CPU cores, and 100 times that per image for ResNet-50 at
# 224 px. By default it runs for networks up to this many per image only (`compress --refine-steps` overrides).
AUTO_LIMIT_MACS = 10**9


def default_steps(macs_per_image: int) -> int:
    """Block refinement steps when the user chose none: :data:`DEFAULT_STEPS` up to :data:`AUTO_LIMIT_MACS`
    multiply-accumulates per image, else 0."""
    return DEFAULT_STEPS if macs_per_image <= AUTO_LIMIT_MACS else 0


@dataclass
class RefineSettings:
    """``steps`` Adam steps per block on ``batch_size`` images, learning rate ``lr`` (``mask_lr`` for the mask
    proxies; 0 keeps the masks), ``drop`` (the probability of each input element coming from the original
    network), ``seed`` (mini-batches and drops) and ``held_out`` (the fraction of the images, the last ones, that
    the steps do not see and that decide whether a block keeps its refinement)."""

    steps: int = DEFAULT_STEPS
    batch_size: int = 64
    lr: float = 1e-4
    mask_lr: float = 2e-3
    drop: float = 0.5
    seed: int = 0
    held_out: float = 0.125

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or not self.lr > 0 or self.mask_lr < 0 or not 0 <= self.drop <= 1:
            raise ValueError("steps must be ≥ 0, batch_size ≥ 1, lr > 0, mask_lr ≥ 0 and drop in [0, 1].")
        if not 0 <= self.held_out < 1:
            raise ValueError("held_out must be in [0, 1).")


@dataclass
class BlockResult:
    """One block's refinement: its relative output error on the calibration images before and after, the mask
    bits that changed, and whether the refined parameters were kept."""

    name: str
    error_before: float = 0.0
    error_after: float = 0.0
    mask_flips: int = 0
    kept: bool = False
    seconds: float = 0.0
    skipped: str | None = None


@dataclass
class Refinement:
    """What :func:`refine_blocks` did."""

    settings: RefineSettings
    blocks: list[BlockResult] = field(default_factory=list)
    seconds: float = 0.0

    def record(self) -> dict:
        """The ``refinement`` part of a ``.vc.pt``'s reconstruction record (docs/FORMAT.md §6): the settings, the
        blocks refined and kept, their mean relative output error before and after (a block put back counts at its
        error before), the seconds it took."""
        done = [block for block in self.blocks if block.skipped is None]
        count = max(len(done), 1)
        return {
            **asdict(self.settings),
            "blocks": len(done),
            "kept": sum(block.kept for block in done),
            "error_before": round(sum(block.error_before for block in done) / count, 6),
            "error_after": round(sum(min(block.error_after, block.error_before) for block in done) / count, 6),
            "seconds": round(self.seconds, 1),
        }


# --------------------------------------------------------------------------- which blocks
def refinement_blocks(model: nn.Module, batch: Tensor) -> list[str]:
    """Names of the blocks to refine, in the order their versatile layers run on ``batch``."""
    elements = {
        f"{name}.{child}" if name else child
        for name, module in model.named_modules()
        if isinstance(module, nn.Sequential)
        for child, _ in module.named_children()
    }
    blocks: list[str] = []
    for layer in execution_order(model, batch):
        block = block_of(layer, elements)
        if block not in blocks:
            blocks.append(block)
    return blocks


def block_of(layer: str, elements: set[str]) -> str:
    """The shortest prefix of ``layer`` (by dotted parts, ``layer`` included) among ``elements``, else ``layer``."""
    parts = layer.split(".")
    prefixes = (".".join(parts[:end]) for end in range(1, len(parts) + 1))
    return next((prefix for prefix in prefixes if prefix in elements), layer)


# --------------------------------------------------------------------------- the pass
def refine_blocks(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[Tensor],
    settings: RefineSettings | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> Refinement:
    """Refine ``student``'s blocks in place so that each block's output matches the same-named block of
    ``teacher`` (the original model) on ``batches`` of unlabeled, preprocessed images; both models in eval mode.
    ``progress`` is called as (blocks done, blocks in all, block name)."""
    settings = settings or RefineSettings()
    if not batches:
        raise ValueError("refinement needs at least one batch of calibration images.")
    begin = time.perf_counter()
    report = Refinement(settings)
    generator = torch.Generator().manual_seed(settings.seed)
    with eval_mode(student, teacher):
        names = refinement_blocks(student, batches[0])
        for done, name in enumerate(names):
            if progress:
                progress(done, len(names), name)
            report.blocks.append(_refine_block(student, teacher, name, batches, settings, generator))
        if progress:
            progress(len(names), len(names), "")
    report.seconds = time.perf_counter() - begin
    return report


def _refine_block(
    student: nn.Module,
    teacher: nn.Module,
    name: str,
    batches: Sequence[Tensor],
    settings: RefineSettings,
    generator: torch.Generator,
) -> BlockResult:
    started = time.perf_counter()
    block, original = student.get_submodule(name), teacher.get_submodule(name)
    seen = list(layer_inputs(student, name, batches))
    if not all(isinstance(value, Tensor) for value in seen):
        return BlockResult(name=name, skipped="its input is not one tensor")
    inputs = torch.cat(seen)
    originals = torch.cat(list(layer_inputs(teacher, name, batches)))
    with torch.no_grad():
        targets = torch.cat([original(chunk) for chunk in originals.split(settings.batch_size)])
    fit = inputs.shape[0] - held_out_count(inputs.shape[0], settings.held_out)
    checked = slice(fit, None) if fit < inputs.shape[0] else slice(None)
    held = inputs[checked], targets[checked]
    result = BlockResult(name=name, error_before=block_error(block, *held, settings.batch_size))
    saved = copy.deepcopy(block.state_dict())
    masks_before = _masks(block)
    if settings.steps:
        _descend(block, inputs[:fit], originals[:fit], targets[:fit], settings, generator)
    result.error_after = block_error(block, *held, settings.batch_size)
    result.kept = result.error_after < result.error_before
    if result.kept:
        result.mask_flips = sum(
            int((after != before).sum()) for after, before in zip(_masks(block), masks_before, strict=True)
        )
    else:
        block.load_state_dict(saved)
    result.seconds = time.perf_counter() - started
    return result


def _descend(
    block: nn.Module, inputs: Tensor, originals: Tensor, targets: Tensor, settings: RefineSettings,
    generator: torch.Generator,
) -> None:  # fmt: skip
    """Adam steps on the block's QDrop objective."""
    weights = [p for n, p in block.named_parameters() if not n.endswith(MASK_PARAMETER) and p.requires_grad]
    masks = [p for n, p in block.named_parameters() if n.endswith(MASK_PARAMETER)] if settings.mask_lr > 0 else []
    groups = [{"params": weights, "lr": settings.lr}] + ([{"params": masks, "lr": settings.mask_lr}] if masks else [])
    optimiser = torch.optim.Adam(groups)
    base = [group["lr"] for group in groups]
    layers = [module for module in block.modules() if isinstance(module, VersatileConv2d)]
    count = inputs.shape[0]
    with torch.enable_grad():
        for step in range(settings.steps):
            for group, lr in zip(optimiser.param_groups, base, strict=True):
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / settings.steps))
            index = torch.randint(0, count, (min(settings.batch_size, count),), generator=generator)
            x_s, x_t = inputs[index], originals[index]
            if settings.drop > 0:
                x_s = torch.where(torch.rand(x_s.shape, generator=generator) < settings.drop, x_t, x_s)
            loss = F.mse_loss(block(x_s), targets[index])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            for layer in layers:
                layer.clip_mask_proxy_()


def held_out_count(images: int, fraction: float) -> int:
    """How many of ``images`` judge the refinement instead of feeding it (none when that would leave none to fit)."""
    count = int(images * fraction)
    return count if 0 < count < images else 0


@torch.no_grad()
def block_error(block: nn.Module, inputs: Tensor, targets: Tensor, batch_size: int) -> float:
    """Relative output error ‖y_s − y_t‖² / ‖y_t − mean‖² of ``block`` on ``inputs`` against ``targets``."""
    error = total = 0.0
    mean = targets.double().mean(dim=0, keepdim=True)
    for x, y in zip(inputs.split(batch_size), targets.split(batch_size), strict=True):
        error += float((block(x).double() - y.double()).square().sum())
        total += float((y.double() - mean).square().sum())
    return error / total if total > 0 else 0.0


def _masks(block: nn.Module) -> list[Tensor]:
    return [
        (layer.mask_proxy > layer.mask_threshold).clone()
        for _, layer in versatile_layers(block)
        if layer.mask_proxy is not None
    ]
