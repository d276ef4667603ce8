"""One image policy: BatchNorm recalibration and int8 calibration see images prepared as evaluation does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import noise_image_folder

from vconvert.data.datasets import calibration_batches, open_split
from vconvert.data.image_folders import ImageFolderData

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


@pytest.mark.parametrize("side", [32, 96], ids=["small-resized", "large-resized-then-cropped"])
def test_calibration_images_are_the_evaluation_images(tmp_path: Path, side: int) -> None:
    # not the model's aspect ratio, so cropping and resizing differ
    root = noise_image_folder(tmp_path / "data", (side * 2, side + 7))
    evaluation, _, _ = open_split(str(root), False, input_size=[side, side], channels=3, mean=MEAN, std=STD)
    expected = sorted((evaluation[i][0] for i in range(len(evaluation))), key=lambda image: float(image.sum()))
    batches = list(calibration_batches(root / "val", (side, side), MEAN, STD, batch_size=4, limit=100))
    got = sorted(torch.cat(batches), key=lambda image: float(image.sum()))
    assert len(got) == len(expected) == 6
    for a, b in zip(got, expected, strict=True):
        assert a.shape == (3, side, side) and torch.equal(a, b)


def test_folder_lists_what_torchvision_lists_in_the_same_order(tmp_path: Path) -> None:
    """Reading folders as untrusted input keeps torchvision's ImageFolder classes, samples and order (seeded
    subsets pick the same images as before) on an ordinary folder: nested subfolders, odd names, other files."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    root = tmp_path / "data"
    for relative in ("b/x.png", "b/sub/deeper/y.JPG", "b/sub/a.png", "b/a-b.png", "a/Z.png", "a/z/0.bmp", "c_/1.png"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(root / relative, format="BMP" if relative.endswith("bmp") else None)
    (root / "a" / "notes.txt").write_text("not an image")
    ours = ImageFolderData(root, root)
    theirs = ImageFolder(str(root))
    assert ours.classes == theirs.classes and ours.samples == theirs.samples and ours.targets == theirs.targets
    assert not ours.skipped
