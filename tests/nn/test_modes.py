"""eval_mode: every module in eval mode inside, each module's own flag back afterwards, also after an error."""

from __future__ import annotations

import pytest
from torch import nn

from vconvert.nn.modes import eval_mode


def test_each_module_gets_its_own_flag_back_even_after_an_error() -> None:
    first = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    first[1].eval()  # a frozen BatchNorm inside a training model stays frozen
    second = nn.Dropout().eval()
    with pytest.raises(RuntimeError), eval_mode(first, second):
        assert not any(module.training for module in (*first.modules(), second))
        raise RuntimeError("stop")
    assert first.training and first[0].training and not first[1].training and not second.training
