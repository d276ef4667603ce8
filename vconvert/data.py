"""Image data for recalibration (and, later, fine-tuning)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from vconvert.errors import BadInputError


def image_folder(root: Path, transform=None):
    """``torchvision.datasets.ImageFolder`` on ``root`` (or ``root/train`` when that exists).

    Raises BadInputError with one sentence when the folder is missing or holds no images.
    """
    from torchvision.datasets import ImageFolder

    root = Path(root).expanduser()
    if not root.is_dir():
        raise BadInputError(f"Data folder {root} does not exist; pass a folder of images (one subfolder per class).")
    if (root / "train").is_dir():
        root = root / "train"
    try:
        return ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as error:
        raise BadInputError(
            f"Data folder {root} holds no images in class subfolders ({error}); "
            "pass a folder laid out as <class>/<image>."
        ) from None


def calibration_batches(
    root: Path,
    image_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 128,
    limit: int = 2000,
    seed: int = 0,
) -> Iterator[Tensor]:
    """Yield normalised image batches (B, 3, H, W) of a random subset of ``limit`` images of ``root``.

    Images are resized to ``image_size`` and normalised with ``mean``/``std``; the subset is the
    same for the same ``seed``. Labels are dropped: recalibration needs none.
    """
    from torchvision import transforms

    transform = transforms.Compose(
        [transforms.Resize(tuple(image_size)), transforms.ToTensor(), transforms.Normalize(mean, std)]
    )
    dataset = image_folder(root, transform)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit].tolist()
    for start in range(0, len(order), batch_size):
        yield torch.stack([dataset[index][0] for index in order[start : start + batch_size]])
