"""An exponential moving average (EMA) of a network's weights, for fine-tuning with ``--ema``."""

from __future__ import annotations

import copy

import torch
from torch import nn

NOT_AVERAGED = ("mask_proxy", "fixed_mask")  # a mean of binary masks is no mask: masks are copied


def ema_decay(decay: float, updates: int) -> float:
    """The decay of update number ``updates`` (1-based): ``decay``, lowered early on as in TensorFlow's
    ExponentialMovingAverage, min(decay, (1 + n) / (10 + n)), so the first steps do not pin the average
    to the starting weights."""
    return min(decay, (1 + updates) / (10 + updates))


def is_averaged(name: str, tensor: torch.Tensor) -> bool:
    """Floating-point weights and BatchNorm statistics are averaged; masks and counters are copied."""
    return tensor.is_floating_point() and not name.endswith(NOT_AVERAGED)


class WeightAverage:
    """A copy of ``model`` whose floating-point parameters and buffers follow an EMA of ``model``'s
    (``update`` after each optimiser step); everything else (masks, counters) is copied as it is."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1); got {decay}.")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model`` (same architecture) by one step."""
        self.updates += 1
        weight = 1.0 - ema_decay(self.decay, self.updates)
        averages, lives = [], []
        live_state = model.state_dict()
        for name, average in self.model.state_dict().items():
            live = live_state[name]
            if is_averaged(name, live):
                averages.append(average)
                lives.append(live)
            else:
                average.copy_(live)
        torch._foreach_lerp_(averages, lives, weight)
        for average_module, live_module in zip(self.model.modules(), model.modules(), strict=True):
            if hasattr(live_module, "mask_threshold"):  # learned masks: the rule may move the threshold
                average_module.mask_threshold = live_module.mask_threshold

    def state_dict(self) -> dict:
        """The update count and the averaged weights (on the CPU), for the resume state."""
        return {"updates": self.updates, "weights": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        self.model.load_state_dict(state["weights"])
