"""The data sets of every stage (``digits`` or a folder of class folders), one transform policy, the
:class:`DataSpec` checkpoints record, and which data a stage reads and how it says so.

Images are converted to what the model takes (:mod:`vconvert.data.image_files`) and folders read as
untrusted input (:mod:`vconvert.data.image_folders`).
"""

from __future__ import annotations

import logging
import os
import statistics
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from vconvert.data.digits import DIGITS, DIGITS_SIZE, digits_tensors
from vconvert.data.image_files import MAX_IMAGE_PIXELS, check_channels, open_image, printable
from vconvert.data.image_folders import checked_image_folder, image_folder, split_folder
from vconvert.errors import BadInputError, VConvertWarning

log = logging.getLogger("vconvert")


class ImageSizeWarning(VConvertWarning):
    """The images of a folder are far from the size the model is fed (they are resized a lot)."""


def calibration_batches(
    root: Path,
    image_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 128,
    limit: int = 2000,
    seed: int = 0,
    size_from: str = "the model's input size",
) -> Iterator[Tensor]:
    """Yield normalised image batches (B, C, H, W) of a random subset of ``limit`` images of ``root``.

    Images are read as C = ``len(mean)`` channels and prepared as evaluation prepares them
    (:func:`image_transform`: the one policy of every stage); the subset is the same for the same ``seed``.
    Labels are dropped: recalibration needs none.
    """
    transform = image_transform(list(image_size), len(mean), mean, std, augment=False)
    dataset = image_folder(root, transform, channels=len(mean))
    check_image_size(dataset.root, [path for path, _ in dataset.samples], image_size, size_from)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit].tolist()
    for start in range(0, len(order), batch_size):
        yield torch.stack([dataset[index][0] for index in order[start : start + batch_size]])


# --------------------------------------------------------------------------- fine-tuning data sets
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class DataSpec:
    """What a data set feeds a model: recorded in checkpoints so evaluate/export preprocess alike."""

    source: str
    input_size: list[int]
    channels: int
    mean: list[float]
    std: list[float]
    classes: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


class SeededSamples(Dataset):
    """Makes a sample's random augmentation a function of (seed, epoch, index) only, so a run gives
    the same batches whatever the worker count, the number of DDP ranks or a resume."""

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base, self.seed, self.epoch = base, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
            return self.base[index]


class TensorImages(Dataset):
    """In-memory images (N, C, H, W) and labels, with an optional per-sample transform."""

    def __init__(self, images: Tensor, labels: Tensor, transform: Callable[[Tensor], Tensor] | None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        return (self.transform(image) if self.transform else image), int(self.labels[index])


def _digits_spec(
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    input_size: Sequence[int] = (DIGITS_SIZE, DIGITS_SIZE),
    channels: int = 1,
) -> DataSpec:
    images, _ = digits_tensors("train")
    return DataSpec(
        source=DIGITS,
        input_size=list(input_size),
        channels=channels,
        mean=list(mean) if mean is not None else [round(float(images.mean()), 4)] * channels,
        std=list(std) if std is not None else [round(float(images.std()), 4)] * channels,
        classes=[str(digit) for digit in range(10)],
    )


def default_image_size(data: str) -> list[int]:
    """The image size of ``data`` when the model records none: digits' own, else 224x224."""
    return [DIGITS_SIZE, DIGITS_SIZE] if data == DIGITS else [224, 224]


def absolute_data(data: str) -> str:
    """``data`` as files record it: ``digits`` as is, a folder as its absolute path (so that a later stage run
    from another folder finds it)."""
    return data if data == DIGITS else str(Path(data).expanduser().resolve())


def choose_data(
    asked: str | None, recorded: str | None, file: Path | str, recorded_missing: str | None = None
) -> tuple[str, str]:
    """(data, where it came from): ``asked`` (a folder made absolute), else the data ``file`` records
    (``recorded``, :meth:`vconvert.io.metadata.CheckpointMetadata.recorded_data`); a file that records none
    needs ``data`` (a default data set would not fit most models: digits are 1-channel 32x32), and the
    message names what it records that is not here (``recorded_missing``)."""
    if asked is not None:
        return absolute_data(asked), "`data`"
    if recorded is not None:
        return recorded, f"recorded in {printable(Path(file).name)}"
    records = (
        f"records {printable(recorded_missing)}, which is not a folder here"
        if recorded_missing
        else "records no data set"
    )
    raise BadInputError(
        f"Pass `data`: a folder with train/ and val/ (or test/) class folders ({printable(Path(file).name)} "
        f"{records}; 'digits' fits only 1-channel 32x32 models such as the shipped sample)."
    )


def check_class_count(outputs: int, classes: int, stage: str) -> None:
    """Refuse data whose class folders are not as many as the scores the model gives."""
    if outputs != classes:
        raise BadInputError(
            f"The data has {classes} classes but the model scores {outputs}; {stage} needs the data of the "
            "model's classes, one class folder each (or a model built for these classes)."
        )


def _numbers(values: Sequence[float]) -> str:
    return ",".join(f"{value:.4g}" for value in values)


def describe_input(
    spec: DataSpec | None,
    size_from: str,
    normalisation_from: str,
    data_from: str = "",
    *,
    shape: Sequence[int] | None = None,
    preprocessing: dict | None = None,
    data: str | None = None,
) -> str:
    """One line: the image size and normalisation a stage feeds the model (``spec``'s, or ``shape`` N,C,H,W
    and ``preprocessing``), the data read (``spec``'s or ``data``; none: what compress records), and where
    each came from."""
    if spec is not None:
        size, channels, mean, std, data = spec.input_size, spec.channels, spec.mean, spec.std, spec.source
    else:
        size, channels = list(shape[2:]), shape[1]  # type: ignore[index]
        mean, std = (preprocessing or {}).get("mean"), (preprocessing or {}).get("std")
    origin = f" ({data_from})" if data_from else ""
    prefix = f"data {data_as_typed(data)}{origin}: " if data else "input recorded: "
    kind = {1: "grey", 3: "RGB"}.get(channels, f"{channels}-channel")
    line = f"{prefix}{'x'.join(map(str, size))} {kind} images (size: {size_from})"
    if mean is None or std is None:
        return line + ", no normalisation (pass `mean` and `std` to record one)."
    return line + f", normalised with mean {_numbers(mean)} and std {_numbers(std)} ({normalisation_from})."


def data_as_typed(data: str) -> str:
    """A data folder as a user would type it here: relative to the working folder when it is inside it (files
    record absolute paths, :func:`absolute_data`)."""
    if data == DIGITS or not os.path.isabs(data):
        return printable(data)
    try:
        relative = os.path.relpath(data)
    except ValueError:  # another drive
        return printable(data)
    return printable(data if relative.startswith("..") else relative)


def normalisation_origin(asked: bool, recorded: bool, file: Path | str | None, data: str) -> str:
    """Where a mean/std came from, as :func:`describe_input` says it."""
    if asked:
        return "`mean`/`std`"
    if recorded and file is not None:
        return f"recorded in {Path(file).name}"
    return "digits' own" if data == DIGITS else "ImageNet's, the default for folders"


# Per side, images this many times smaller than the input are upsampled a lot (32x32 images fed at 224),
# and this many times larger are shrunk more than a 224 model on ordinary photos ever is: worth a warning.
UPSAMPLED_FACTOR, DOWNSAMPLED_FACTOR = 2.0, 8.0
_SIZE_SAMPLE = 16


def typical_image_size(paths: Sequence[str]) -> list[int] | None:
    """The median height and width of up to 16 evenly spaced images of ``paths`` (headers only, opened as
    :func:`open_image` opens them), or None when none can be read."""
    step = max(1, len(paths) // _SIZE_SAMPLE)
    sizes = []
    for path in list(paths)[::step][:_SIZE_SAMPLE]:
        try:
            with open_image(path) as image:
                sizes.append(image.size)  # (width, height)
        except Exception:  # PIL raises many types; undecodable files are reported elsewhere
            continue
    if not sizes:
        return None
    return [round(statistics.median(h for _, h in sizes)), round(statistics.median(w for w, _ in sizes))]


def check_image_size(root: Path | str, paths: Sequence[str], size: Sequence[int], size_from: str) -> None:
    """Warn when ``root``'s images are more than 2x smaller or 8x larger per side than the ``size`` they
    are resized to."""
    typical = typical_image_size(paths)
    if typical is None:
        return
    pairs = list(zip(typical, size, strict=True))
    if any(want / have > UPSAMPLED_FACTOR or have / want > DOWNSAMPLED_FACTOR for have, want in pairs):
        warnings.warn(
            ImageSizeWarning(
                f"The images in {printable(root)} are about {typical[0]}x{typical[1]} pixels but are resized to "
                f"{size[0]}x{size[1]} ({size_from}); if the model was trained at their size, give it that size with "
                f"`input_shape` N,C,{typical[0]},{typical[1]} (for a .vc.pt, at compress)."
            ),
            stacklevel=2,
        )


def image_transform(size: list[int], channels: int, mean, std, augment: bool):
    """How every stage prepares a folder's images for a model taking ``size`` (H, W): small images (≤ 64 a
    side) are resized to it; larger ones resized to ``size``/0.875 and centre-cropped (the ImageNet
    evaluation convention); with ``augment`` (training only), random crops and flips instead. Then
    ``ToTensor`` and normalisation with ``mean``/``std``."""
    from torchvision import transforms

    steps: list = [transforms.Grayscale(1)] if channels == 1 else []
    small = max(size) <= 64
    if augment and small:
        steps += [
            transforms.Resize(size),
            transforms.RandomCrop(size, padding=max(1, size[0] // 8), padding_mode="reflect"),
            transforms.RandomHorizontalFlip(),
        ]
    elif augment:
        steps += [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
    elif small:
        steps += [transforms.Resize(size)]
    else:
        steps += [transforms.Resize([round(s / 0.875) for s in size]), transforms.CenterCrop(size)]
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean, std)])


def open_split(
    data: str,
    train: bool,
    *,
    input_size: Sequence[int] | None = None,
    channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    augment: bool = True,
    size_from: str = "the size asked for",
    check_size: bool = True,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[Dataset, DataSpec, int]:
    """The train (augmented when ``augment``) or evaluation split of ``data``: ``"digits"`` or an
    image folder with ``train/`` and ``val/`` (or ``test/``) subfolders of class folders.

    Returns (dataset of (image, label), its DataSpec, number of folder entries skipped: see
    :func:`drop_unreadable`; images over ``max_pixels`` pixels are among them).
    ImageNet's mean/std are the default for folders; digits use their own. Images, the digits too,
    come as ``channels`` channels (1 or 3; default: digits' 1, a folder's 3) of ``input_size``; a folder
    whose images are far from that size gets an :class:`ImageSizeWarning` naming ``size_from`` (unless
    ``check_size`` is off: the caller checked the other split).
    """
    channels = channels or (1 if data == DIGITS else 3)
    check_channels(channels)
    if data == DIGITS:
        size = list(input_size) if input_size else default_image_size(data)
        spec = _digits_spec(mean, std, size, channels)
        images, labels = digits_tensors("train" if train else "test")
        if size != [DIGITS_SIZE, DIGITS_SIZE]:
            images = torch.nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False)
        images = images.repeat(1, channels, 1, 1) if channels != 1 else images
        from torchvision import transforms

        steps: list = [transforms.Normalize(spec.mean, spec.std)]
        if train and augment:
            steps.insert(0, transforms.RandomCrop(size, padding=2))
        return TensorImages(images, labels, transforms.Compose(steps)), spec, 0

    root = Path(data).expanduser()
    if not root.is_dir():
        raise BadInputError(f"Data folder {printable(root)} does not exist; pass an image folder or 'digits'.")
    folder = split_folder(root, train)
    size = list(input_size) if input_size else default_image_size(data)
    mean = list(mean) if mean is not None else list(IMAGENET_MEAN[:channels])
    std = list(std) if std is not None else list(IMAGENET_STD[:channels])
    transform = image_transform(size, channels, mean, std, augment and train)
    dataset, skipped = checked_image_folder(folder, root, transform, channels, max_pixels)
    if check_size:
        check_image_size(root, [path for path, _ in dataset.samples], size, size_from)
    spec = DataSpec(str(root), size, channels, mean, std, list(dataset.classes))
    return dataset, spec, skipped


def limited(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    """A seeded random subset of ``limit`` images of ``dataset`` (all of it when ``limit`` is None or larger)."""
    if limit is None or limit >= len(dataset):  # type: ignore[arg-type]
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit]  # type: ignore[arg-type]
    return Subset(dataset, order.tolist())


def batch_loader(dataset: Dataset, batch: int, workers: int, sampler=None) -> DataLoader:
    """Batches of ``dataset`` in order (or as ``sampler`` draws them, dropping the last partial batch)."""
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        drop_last=sampler is not None,
        persistent_workers=False,
    )
