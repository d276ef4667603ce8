"""scikit-learn's handwritten digits: the data set vconvert ships with (no download), as 32x32 grey
images with a fixed train/test split."""

from __future__ import annotations

import torch
from torch import Tensor

DIGITS = "digits"
DIGITS_SIZE = 32
DIGITS_TEST_FRACTION = 0.2


def digits_tensors(split: str) -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 handwritten digits as (N, 1, 32, 32) floats in [0, 1] and labels.

    A fixed 80/20 split (seed 0) gives "train" and "test".
    """
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)
    images = F.interpolate(images, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    labels = torch.from_numpy(digits.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    cut = int(len(labels) * (1 - DIGITS_TEST_FRACTION))
    chosen = order[:cut] if split == "train" else order[cut:]
    return images[chosen], labels[chosen]
