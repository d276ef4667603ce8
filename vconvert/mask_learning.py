"""How the binary masks of learned VersatileConv2d layers change during fine-tuning.

Four strategies (METHOD.md §4 and the measurements at the end of §6):

- ``frozen``: masks keep their data-free fit; only primary filters, scales, biases (and the rest of
  the network) train.
- ``ste``: the common variant: proxies H in [0, 1] trained by SGD at ``mask_lr`` through the
  straight-through estimator, binarised at 0.5, clipped after every step.
- ``tpami``: the TPAMI text literally: before every step H is reset to the binary M, M = [H > 0],
  plain SGD at ``mask_lr``.
- ``flip``: the step size is set on purpose. Straight-through gradients are averaged (EMA) into an
  evidence score per bit; after each step, every layer flips the bits whose evidence most strongly
  says flipping lowers the loss (first order: ΔL ≈ g·ΔM), as many as a flip budget allows. The
  budget is a fraction of the layer's bits per epoch, annealed (cosine) to zero at ``anneal`` of the
  run so that the weights settle around the final masks. Flips are counted for the logs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vconvert.layers import _PROXY_OFF, _PROXY_ON, MASK_THRESHOLD, VersatileConv2d, versatile_layers

STRATEGIES = ("frozen", "ste", "tpami", "flip")


def learned_layers(model: nn.Module) -> list[tuple[str, VersatileConv2d]]:
    """(name, layer) of every VersatileConv2d with learned masks."""
    return [(name, layer) for name, layer in versatile_layers(model) if layer.mask_proxy is not None]


def binary_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Current binary mask of every learned layer (bool tensors, detached copies)."""
    return {name: layer.mask_proxy.detach() > layer.mask_threshold for name, layer in learned_layers(model)}


def count_flips(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> int:
    """How many mask bits differ between two snapshots of ``binary_masks``."""
    return int(sum((before[name] != after[name]).sum() for name in before))


@torch.no_grad()
def canonicalise_masks_(model: nn.Module) -> None:
    """Store every learned mask as proxies 0.75/0.25 with threshold 0.5 (the checkpoint convention)."""
    for _, layer in learned_layers(model):
        on = layer.mask_proxy > layer.mask_threshold
        layer.mask_proxy.copy_(torch.where(on, _PROXY_ON, _PROXY_OFF).to(layer.mask_proxy))
        layer.mask_threshold = MASK_THRESHOLD


def anneal_factor(progress: float, anneal: float) -> float:
    """Cosine from 1 at the start to 0 at ``anneal`` (a fraction of training), 0 afterwards."""
    if anneal <= 0 or progress >= anneal:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * progress / anneal))


@dataclass
class MaskSettings:
    strategy: str = "frozen"
    mask_lr: float = 0.05
    flip_rate: float = 0.01  # flip: fraction of a layer's mask bits flipped per epoch at the start
    anneal: float = 0.6  # flip: fraction of training after which masks stop changing
    evidence_decay: float = 0.9


class MaskLearner:
    """Applies one strategy around the optimiser step: ``before_step()`` then ``after_step()``."""

    def __init__(self, model: nn.Module, settings: MaskSettings, total_steps: int, steps_per_epoch: int) -> None:
        if settings.strategy not in STRATEGIES:
            raise ValueError(f"mask strategy must be one of {', '.join(STRATEGIES)}; got {settings.strategy!r}.")
        self.settings, self.total_steps, self.steps_per_epoch = settings, total_steps, steps_per_epoch
        self.layers = learned_layers(model)
        self.step = 0
        self.evidence = {name: torch.zeros_like(layer.mask_proxy) for name, layer in self.layers}
        self._carry = dict.fromkeys(self.evidence, 0.0)  # fractional flip budget carried between steps
        for _, layer in self.layers:
            layer.mask_proxy.requires_grad_(settings.strategy != "frozen")
            if settings.strategy == "tpami":  # same masks, in the TPAMI convention: H = M in {0, 1}, M = [H > 0]
                with torch.no_grad():
                    layer.mask_proxy.copy_((layer.mask_proxy > layer.mask_threshold).to(layer.mask_proxy))
                layer.mask_threshold = 0.0

    @property
    def learns(self) -> bool:
        return self.settings.strategy != "frozen" and bool(self.layers)

    def optimiser_parameters(self) -> list[nn.Parameter]:
        """Proxies that a gradient optimiser should update (ste, tpami); the flip rule does its own."""
        if self.settings.strategy in ("ste", "tpami"):
            return [layer.mask_proxy for _, layer in self.layers]
        return []

    @torch.no_grad()
    def before_step(self) -> None:
        """tpami: reset every proxy to its binary mask before the forward pass."""
        if self.settings.strategy == "tpami":
            for _, layer in self.layers:
                layer.mask_proxy.copy_((layer.mask_proxy > layer.mask_threshold).to(layer.mask_proxy))

    @torch.no_grad()
    def after_step(self) -> int:
        """Clip (ste) or flip (flip) after the optimiser step; returns bits flipped by the flip rule."""
        self.step += 1
        if self.settings.strategy == "ste":
            for _, layer in self.layers:
                layer.clip_mask_proxy_()
        if self.settings.strategy != "flip":
            return 0
        flipped = 0
        factor = anneal_factor((self.step - 1) / max(1, self.total_steps), self.settings.anneal)
        for name, layer in self.layers:
            proxy, grad = layer.mask_proxy, layer.mask_proxy.grad
            if grad is None:
                continue
            evidence = self.evidence[name]
            evidence.mul_(self.settings.evidence_decay).add_(grad, alpha=1 - self.settings.evidence_decay)
            budget = self._carry[name] + factor * self.settings.flip_rate * proxy.numel() / self.steps_per_epoch
            count = int(budget)
            self._carry[name] = budget - count
            if count == 0:
                continue
            on = proxy > layer.mask_threshold
            gain = torch.where(on, evidence, -evidence).flatten()  # > 0: flipping lowers the loss (first order)
            top = torch.topk(gain, min(count, gain.numel()))
            chosen = top.indices[top.values > 0]
            if chosen.numel():
                # a copy in logical order (flatten() may be a view that overlaps proxy), written back whole
                values = proxy.flatten().clone()
                values[chosen] = torch.where(on.flatten()[chosen], _PROXY_OFF, _PROXY_ON).to(values)
                proxy.copy_(values.view(proxy.shape))
                cleared = evidence.flatten()
                cleared[chosen] = 0
                evidence.copy_(cleared.view(evidence.shape))
                flipped += chosen.numel()
        for _, layer in self.layers:
            layer.mask_proxy.grad = None
        return flipped

    def state_dict(self) -> dict:
        return {"step": self.step, "evidence": self.evidence, "carry": self._carry}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        for name, tensor in state["evidence"].items():
            self.evidence[name].copy_(tensor)
        self._carry = dict(state["carry"])
