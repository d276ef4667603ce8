"""One image policy: BatchNorm recalibration and int8 calibration see images prepared as evaluation does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vconvert.data.datasets import calibration_batches, open_split

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _folder(root: Path, size: tuple[int, int]) -> Path:
    """val/ with two classes of three non-square images of ``size`` (W, H), distinct textures."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(3):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


@pytest.mark.parametrize("side", [32, 96], ids=["small-resized", "large-resized-then-cropped"])
def test_calibration_images_are_the_evaluation_images(tmp_path: Path, side: int) -> None:
    root = _folder(tmp_path / "data", (side * 2, side + 7))  # not the model's aspect ratio: crop and resize differ
    evaluation, _, _ = open_split(str(root), False, input_size=[side, side], channels=3, mean=MEAN, std=STD)
    expected = sorted((evaluation[i][0] for i in range(len(evaluation))), key=lambda image: float(image.sum()))
    batches = list(calibration_batches(root / "val", (side, side), MEAN, STD, batch_size=4, limit=100))
    got = sorted(torch.cat(batches), key=lambda image: float(image.sum()))
    assert len(got) == len(expected) == 6
    for a, b in zip(got, expected, strict=True):
        assert a.shape == (3, side, side) and torch.equal(a, b)
