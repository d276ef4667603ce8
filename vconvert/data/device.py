"""A whole data split held on the training device, augmented there batch by batch.

For small images (CIFAR-sized) the worker-process pipeline (decode, crop, flip per sample in
Python) is what bounds a GPU run; decoding the split once into one uint8 tensor on the device and
doing the crop and flip there removes that bound. The random choices are a function of (seed,
epoch, sample index) only, as in ``vconvert.data.datasets.SeededSamples``, so the batches do not depend on
the number of DDP ranks and a resumed run sees the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset

from vconvert.data.datasets import SeededSamples, TensorImages
from vconvert.data.image_files import load_image
from vconvert.errors import BadInputError

MAX_SIDE = 64  # larger images use random-resized crops, which this loader does not implement
MAX_BYTES = 4 << 30
AUTO_HOST_BYTES = 1 << 30  # --loader auto keeps a split in host memory (CPU training) up to this size


def random_crop_offsets(count: int, padding: int, generator: torch.Generator) -> Tensor:
    """(count, 2) integer (row, column) offsets in [0, 2·padding] of a crop from a padded image."""
    return torch.randint(0, 2 * padding + 1, (count, 2), generator=generator)


def crop_and_flip(images: Tensor, offsets: Tensor, flips: Tensor, padding: int, pad_mode: str) -> Tensor:
    """Pad ``images`` (B, C, H, W) by ``padding`` on each side, cut the (H, W) window at each image's
    ``offsets`` (B, 2) and mirror the images where ``flips`` (B,) is true."""
    batch, _, height, width = images.shape
    if padding:
        padded = F.pad(images, (padding,) * 4, mode=pad_mode)
        rows = offsets[:, :1] + torch.arange(height, device=images.device)  # (B, H)
        cols = offsets[:, 1:] + torch.arange(width, device=images.device)  # (B, W)
        picked = padded[torch.arange(batch, device=images.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        images = picked.permute(0, 3, 1, 2)  # advanced indexing put the channel axis last
    return torch.where(flips[:, None, None, None], images.flip(3), images)


def _unwrap(dataset: Dataset) -> tuple[Dataset, list[int]]:
    """The innermost data set under SeededSamples/Subset wrappers and the indices into it."""
    if isinstance(dataset, SeededSamples):
        return _unwrap(dataset.base)
    if isinstance(dataset, Subset):
        inner, indices = _unwrap(dataset.dataset)
        return inner, [indices[i] for i in dataset.indices]
    return dataset, list(range(len(dataset)))  # type: ignore[arg-type]


def _decode_folder(folder, indices: list[int], size: Sequence[int], channels: int) -> Tensor:
    from torchvision.transforms import functional as TF

    def decode(index: int) -> Tensor:
        path, _ = folder.samples[index]
        image = load_image(path, channels)
        if list(image.size[::-1]) != list(size):
            image = TF.resize(image, list(size))
        return TF.pil_to_tensor(image)

    with ThreadPoolExecutor(max_workers=8) as pool:
        return torch.stack(list(pool.map(decode, indices)))


class DeviceImageSet:
    """A split as one tensor on ``device``; yields normalised (images, labels) batches.

    Training batches are padded random crops, plus horizontal flips where ``flip`` (the small-image
    augmentation of ``vconvert.data``: folders flip, digits do not), drawn per (seed, epoch, index).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        augment: bool,
        padding: int,
        pad_mode: str = "reflect",
        seed: int = 0,
        channels_last: bool = False,
        flip: bool = True,
    ) -> None:
        self.images, self.labels = images, labels
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=images.device).view(shape)
        self.std = torch.tensor(std, dtype=torch.float32, device=images.device).view(shape)
        self.augment, self.padding, self.pad_mode, self.seed = augment, padding, pad_mode, seed
        self.channels_last, self.flip = channels_last, flip
        self.epoch = 0

    @classmethod
    def from_dataset(
        cls,
        dataset: Dataset,
        *,
        input_size: Sequence[int],
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool,
        seed: int,
        device: torch.device,
        channels_last: bool = False,
    ) -> DeviceImageSet:
        """Decode the images of ``dataset`` (an image folder or digits, possibly under Subset /
        SeededSamples) once and move them to ``device``."""
        inner, indices = _unwrap(dataset)
        side = max(input_size)
        if side > MAX_SIDE:
            raise BadInputError(
                f"`loader` device handles images up to {MAX_SIDE} pixels a side, these are {side}; "
                "use `loader` workers."
            )
        if isinstance(inner, TensorImages):  # digits: floats in [0, 1], zero-padded crops, never mirrored
            images, pad_mode, padding, flip = inner.images[indices], "constant", 2, False
        else:
            images = _decode_folder(inner, indices, input_size, channels)
            pad_mode, padding, flip = "reflect", max(1, input_size[0] // 8), True
        if images.numel() * images.element_size() > MAX_BYTES:
            raise BadInputError(
                f"The split needs {images.numel() * images.element_size() / 2**30:.1f} GiB on the device "
                f"(limit {MAX_BYTES >> 30}); use `loader` workers."
            )
        all_labels = inner.targets if hasattr(inner, "targets") else inner.labels.tolist()
        labels = torch.tensor([all_labels[i] for i in indices])
        return cls(
            images.to(device),
            labels.to(device),
            mean,
            std,
            augment=augment,
            padding=padding,
            pad_mode=pad_mode,
            seed=seed,
            channels_last=channels_last,
            flip=flip,
        )

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _normalise(self, images: Tensor) -> Tensor:
        images = images.float()
        if self.images.dtype == torch.uint8:
            images = images / 255.0
        images = (images - self.mean) / self.std
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def batches(self, indices: Sequence[int] | Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(images, labels) batches of the samples ``indices`` in that order (the last may be short)."""
        order = torch.as_tensor(indices, dtype=torch.long)
        if self.augment:
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019)
            offsets = random_crop_offsets(len(self), self.padding, generator)
            flips = (torch.rand(len(self), generator=generator) < 0.5) & self.flip
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            on_device = chosen.to(self.images.device)
            images = self.images[on_device]
            if self.augment:
                images = crop_and_flip(
                    images.float(),
                    offsets[chosen].to(images.device),
                    flips[chosen].to(images.device),
                    self.padding,
                    self.pad_mode,
                )
            yield self._normalise(images), self.labels[on_device]
