"""What each epoch writes: metadata carried from the source (not its resume state or save time), and no
non-finite weights."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import QUICK, converted_checkpoint
from torch import nn

from vconvert import load_checkpoint
from vconvert.errors import CheckFailedError
from vconvert.train.config import FinetuneConfig
from vconvert.train.finetune import _check_finite_weights, finetune


def test_a_run_started_from_a_last_file_carries_its_metadata_but_not_its_resume_state(tmp_path: Path) -> None:
    source = converted_checkpoint(tmp_path / "m.vc.pt")
    config = FinetuneConfig(**{**QUICK, "epochs": 1})
    finetune(source, tmp_path / "a.vc.pt", config)
    finetune(tmp_path / "a.vc.pt", tmp_path / "b.vc.pt", config)  # a new run from a's last file, not --resume
    first, second = load_checkpoint(tmp_path / "a.vc.pt"), load_checkpoint(tmp_path / "b.vc.pt")
    assert first.metadata.finetune_state is not None and second.metadata.finetune_state is not None
    carried = second.metadata.finetune_state["base_metadata"]
    assert "finetune_state" not in carried and "saved_at" not in carried  # no nesting: files do not grow
    assert carried["input_shape"] == first.metadata.input_shape == [1, 1, 32, 32]
    assert second.metadata.saved_at > first.metadata.saved_at  # each file says when it was written
    assert load_checkpoint(tmp_path / "b.best.vc.pt").metadata.finetune_state is None


@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=["inf", "nan"])
def test_weights_that_overflowed_are_refused_before_writing(bad: float, tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    _check_finite_weights(model, 0, tmp_path / "last.vc.pt", 0.01)  # finite: nothing raised
    with torch.no_grad():
        model[1].weight[2] = bad
    with pytest.raises(CheckFailedError, match=r"non-finite at epoch 3 \(1\.weight\)"):
        _check_finite_weights(model, 2, tmp_path / "last.vc.pt", 0.01)
