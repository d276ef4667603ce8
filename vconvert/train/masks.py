"""How the binary masks of learned VersatileConv2d layers change during fine-tuning.

Five strategies (docs/FIT.md §11-§16; what the measurements say: §17):

- ``project`` (the default): a dense latent weight per layer, started from the original network's (or, for
  layers that already moved from their data-free fit, reconstructed or fine-tuned, from the layer's own
  weight, so that the run starts where the file is), is what SGD trains (straight-through: it receives the
  gradient of the materialised versatile weight). After every step the layer is set to the latent weight's
  nearest versatile weight for the layer's fixed grouping and scale direction
  (:func:`vconvert.fit.initialise.project_onto_groups`): masks, primaries and scales all follow. The direction
  is searched once, at the start; re-searching it after every step kept ~30k of ResNet-20's 270k bits
  switching per epoch to the end and lost a point. From ``anneal`` of the run on the masks stay as they are
  and only primaries and scales follow. With small batches the projection (a fixed cost per step) is done
  every ``every`` steps instead, and always at the end of an epoch: the latent weights take every step's
  gradient meanwhile. With ``ramp`` > 0 the forward starts from the dense latent weight itself and blends into
  the projection by the cubic schedule of gradual pruning, reaching it at ``ramp`` of the run.
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

from vconvert.fit.initialise import project_onto_groups
from vconvert.nn.versatile import (
    MASK_THRESHOLD,
    PROXY_OFF,
    PROXY_ON,
    VersatileConv2d,
    group_members,
    versatile_layers,
)

STRATEGIES = ("frozen", "ste", "tpami", "flip", "project")
PROJECTED = ("latent_weight", "primary", "scale", "mask_proxy")


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
        layer.mask_proxy.copy_(torch.where(on, PROXY_ON, PROXY_OFF).to(layer.mask_proxy))
        layer.mask_threshold = MASK_THRESHOLD


def drop_latent_weights_(model: nn.Module) -> None:
    """Remove the ``project`` rule's latent weights (a checkpoint holds the versatile layers only)."""
    for _, layer in versatile_layers(model):
        layer._parameters.pop("latent_weight", None)
        layer.latent_share = 0.0


def projectable(layer: VersatileConv2d) -> bool:
    """The ``project`` rule handles per-filter learned masks with scales over all input channels."""
    return layer.mask_sharing == "per-filter" and layer.scale is not None and layer.channel_window == layer.in_channels


@torch.no_grad()
def project_layer_(
    layer: VersatileConv2d, members: torch.Tensor, keep_masks: bool = False, search: bool = False
) -> None:
    """Set primaries, masks and scales to the versatile weight nearest the layer's ``latent_weight``
    for its current scale direction (``search``: the best of several), or with ``keep_masks``
    primaries and scales only (one least-squares step for the current masks). ``members`` is the
    layer's :func:`group_members` table (fixed while the rule runs)."""
    valid = members >= 0
    latent = layer.latent_weight.detach().float().flatten(1)
    scale = layer.scale.detach().float()[members.clamp_min(0)] * valid
    current = None
    if keep_masks:
        on = (layer.mask_proxy.detach() > layer.mask_threshold).flatten(1).float()
        current = on[members.clamp_min(0)] * valid.unsqueeze(-1)
    masks, primary, scale = project_onto_groups(latent, members, scale, current, search)
    layer.primary.copy_(primary.view_as(layer.primary))
    layer.scale[members[valid]] = scale[valid].to(layer.scale.dtype)
    if keep_masks:
        return
    on = masks[valid].view(-1, *layer.mask_proxy.shape[1:]) > 0.5
    layer.mask_proxy[members[valid]] = torch.where(on, PROXY_ON, PROXY_OFF).to(layer.mask_proxy.dtype)


def latent_share(progress: float, ramp: float) -> float:
    """Weight of the dense latent weight in the forward at ``progress`` of the run: (1 − progress/ramp)³,
    0 from ``ramp`` on (the cubic schedule of gradual pruning, Zhu & Gupta 2017)."""
    if ramp <= 0 or progress >= ramp:
        return 0.0
    return (1.0 - progress / ramp) ** 3


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
    anneal: float = 0.6  # flip, project: fraction of training after which masks stop changing
    evidence_decay: float = 0.9
    ramp: float = 0.0  # project: fraction of the run over which the forward moves from latent to projected weight
    every: int = 1  # project: steps between projections (always at the end of an epoch)
    latent_from_layer: bool = False  # project: start the latent weights from the layers, not from the teacher


class MaskLearner:
    """Applies one strategy around the optimiser step: ``before_step()`` then ``after_step()``."""

    def __init__(
        self,
        model: nn.Module,
        settings: MaskSettings,
        total_steps: int,
        steps_per_epoch: int,
        teacher: nn.Module | None = None,
    ) -> None:
        if settings.strategy not in STRATEGIES:
            raise ValueError(f"mask strategy must be one of {', '.join(STRATEGIES)}; got {settings.strategy!r}.")
        self.settings, self.total_steps, self.steps_per_epoch = settings, total_steps, steps_per_epoch
        self.layers = learned_layers(model)
        self._members: dict[str, torch.Tensor] = {}  # project: each layer's grouping, fixed during the run
        if settings.strategy == "project":
            self.layers = [(name, layer) for name, layer in self.layers if projectable(layer)]
            for name, layer in self.layers:
                self._members[name] = group_members(layer.primary_index, layer.secondary_index, layer.num_primary)
                from_layer = settings.latent_from_layer or teacher is None
                start = layer.dense_weight() if from_layer else teacher.get_submodule(name).weight
                layer.register_parameter("latent_weight", nn.Parameter(start.detach().clone()))
                for parameter in (layer.primary, layer.scale, layer.mask_proxy):
                    parameter.requires_grad_(False)
                # a layer's own weight is already versatile: its projection for its own scales is itself
                project_layer_(layer, self._members[name], search=not from_layer)
                layer.latent_share = latent_share(0.0, settings.ramp)
        self.step = 0
        self.evidence = {name: torch.zeros_like(layer.mask_proxy) for name, layer in self.layers}
        self._carry = dict.fromkeys(self.evidence, 0.0)  # fractional flip budget carried between steps
        for _, layer in self.layers:
            layer.mask_proxy.requires_grad_(settings.strategy not in ("frozen", "project"))
            if settings.strategy == "tpami":  # same masks, in the TPAMI convention: H = M in {0, 1}, M = [H > 0]
                with torch.no_grad():
                    layer.mask_proxy.copy_((layer.mask_proxy > layer.mask_threshold).to(layer.mask_proxy))
                layer.mask_threshold = 0.0

    @property
    def learns(self) -> bool:
        """Whether the orthogonality penalty can move the masks: they learn through their proxies."""
        return self.settings.strategy in ("ste", "tpami", "flip") and bool(self.layers)

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
        """Project (project), clip (ste) or flip (flip) after the optimiser step; returns the mask bits
        that project or flip changed."""
        self.step += 1
        if self.settings.strategy == "project":
            changed = []  # summed on the device and read back once per step, not once per layer
            progress = self.step / max(1, self.total_steps)
            keep_masks = (self.step - 1) / max(1, self.total_steps) >= self.settings.anneal
            share = latent_share(progress, self.settings.ramp)
            for _, layer in self.layers:
                layer.latent_share = share
            if self.step % self.settings.every and self.step % self.steps_per_epoch:
                return 0  # the latent weights keep learning; the layers follow them at the next projection
            for name, layer in self.layers:
                before = None if keep_masks else layer.mask_proxy > layer.mask_threshold  # kept masks: none change
                project_layer_(layer, self._members[name], keep_masks)
                if before is not None:
                    changed.append((before != (layer.mask_proxy > layer.mask_threshold)).sum())
            return int(torch.stack(changed).sum()) if changed else 0
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
                values[chosen] = torch.where(on.flatten()[chosen], PROXY_OFF, PROXY_ON).to(values)
                proxy.copy_(values.view(proxy.shape))
                cleared = evidence.flatten()
                cleared[chosen] = 0
                evidence.copy_(cleared.view(evidence.shape))
                flipped += chosen.numel()
        for _, layer in self.layers:
            layer.mask_proxy.grad = None
        return flipped

    def state_dict(self) -> dict:
        state = {"step": self.step, "evidence": self.evidence, "carry": self._carry}
        if self.settings.strategy == "project":  # the latent weights and what they project to
            state["projected"] = {
                name: {key: getattr(layer, key).detach().cpu() for key in PROJECTED} for name, layer in self.layers
            }
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        for name, tensor in state["evidence"].items():
            self.evidence[name].copy_(tensor)
        self._carry = dict(state["carry"])
        for name, layer in self.layers:
            for key, tensor in state.get("projected", {}).get(name, {}).items():
                getattr(layer, key).copy_(tensor)
            if self.settings.strategy == "project":
                layer.latent_share = latent_share(self.step / max(1, self.total_steps), self.settings.ramp)
