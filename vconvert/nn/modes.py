"""Running modules in eval mode for a while."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put every module of ``models`` in eval mode; give each its own train/eval flag back afterwards."""
    flags = {module: module.training for model in models for module in model.modules()}
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for module, training in flags.items():
            module.train(training)
