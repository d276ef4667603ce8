"""Image data for recalibration and fine-tuning.

Images are converted to what the model takes: 1 channel (grey) or 3 (RGB) of 8 bits, whatever the
file holds (16-bit grey is scaled down; CMYK, palette, alpha and grey images are converted), then
resized. A file that cannot be decoded (corrupt, truncated, empty, unreadable) is skipped with a
one-line :class:`UnreadableImagesWarning` naming the first such file; a folder left with no image
is refused.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from vconvert.errors import BadInputError, VConvertWarning

IMAGE_CHANNELS = (1, 3)  # what an image folder can feed: grey or RGB
_SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N")


class UnreadableImagesWarning(VConvertWarning):
    """Files of an image folder that cannot be decoded were left out."""


def load_image(path: str, channels: int = 3):
    """The image at ``path`` as an 8-bit PIL image of ``channels`` channels ("L" for 1, "RGB" for 3)."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode in _SIXTEEN_BIT_GREY or (image.mode == "I" and image.getextrema()[1] > 255):
            image = image.convert("I").point(lambda value: value * (1 / 256))  # 16-bit grey to 8 bits
        return image.convert("L" if channels == 1 else "RGB")


def _check_channels(channels: int) -> None:
    if channels not in IMAGE_CHANNELS:
        raise BadInputError(
            f"Image data feeds models that take 1 (grey) or 3 (RGB) channels, and this one takes {channels}."
        )


def image_folder(root: Path, transform=None, channels: int = 3):
    """``torchvision.datasets.ImageFolder`` on ``root`` (or ``root/train`` when that exists), its images
    read as ``channels`` channels and undecodable files left out (with a warning).

    Raises BadInputError with one sentence when the folder is missing or holds no images.
    """
    from torchvision.datasets import ImageFolder

    _check_channels(channels)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise BadInputError(f"Data folder {root} does not exist; pass a folder of images (one subfolder per class).")
    if (root / "train").is_dir():
        root = root / "train"
    try:
        dataset = ImageFolder(str(root), transform=transform, loader=functools.partial(load_image, channels=channels))
    except (FileNotFoundError, RuntimeError) as error:
        raise BadInputError(
            f"Data folder {root} holds no images in class subfolders ({error}); "
            "pass a folder laid out as <class>/<image>."
        ) from None
    drop_unreadable(dataset)
    if not dataset.samples:
        raise BadInputError(f"No readable image in {root}.")
    return dataset


def calibration_batches(
    root: Path,
    image_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 128,
    limit: int = 2000,
    seed: int = 0,
) -> Iterator[Tensor]:
    """Yield normalised image batches (B, C, H, W) of a random subset of ``limit`` images of ``root``.

    Images are read as C = ``len(mean)`` channels, resized to ``image_size`` and normalised with
    ``mean``/``std``; the subset is the same for the same ``seed``. Labels are dropped: recalibration
    needs none.
    """
    from torchvision import transforms

    transform = transforms.Compose(
        [transforms.Resize(tuple(image_size)), transforms.ToTensor(), transforms.Normalize(mean, std)]
    )
    dataset = image_folder(root, transform, channels=len(mean))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit].tolist()
    for start in range(0, len(order), batch_size):
        yield torch.stack([dataset[index][0] for index in order[start : start + batch_size]])


# --------------------------------------------------------------------------- fine-tuning data sets
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DIGITS = "digits"
DIGITS_SIZE = 32
DIGITS_TEST_FRACTION = 0.2


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


def _split_folder(root: Path, train: bool) -> Path:
    names = ("train",) if train else ("val", "test")
    for name in names:
        if (root / name).is_dir():
            return root / name
    wanted = "train/" if train else "val/ or test/"
    raise BadInputError(f"Data folder {root} has no {wanted} subfolder; lay it out as {root}/{wanted}<class>/<image>.")


def _decodes(path: str) -> bool:
    """Whether the whole file decodes as an image (a JPEG at 1/8 scale: every byte is still read)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.draft(image.mode, (1, 1))
            image.load()
        return True
    except Exception:  # PIL raises many types for a file that is not an image, or a cut one
        return False


_UNDECODABLE: dict[str, frozenset[str]] = {}  # per process: the files of a folder found undecodable
_REMEMBERED_FOLDERS = 32


def drop_unreadable(dataset) -> int:
    """Remove the samples of an ImageFolder whose file does not decode as an image, warn with the first
    of them, and return how many were removed. A folder already checked in this process is not decoded
    again."""
    from concurrent.futures import ThreadPoolExecutor

    paths = [path for path, _ in dataset.samples]
    key = hashlib.sha256("\0".join([str(dataset.root), *paths]).encode()).hexdigest()
    if key not in _UNDECODABLE:
        with ThreadPoolExecutor(max_workers=8) as pool:
            decodes = list(pool.map(_decodes, paths))
        if len(_UNDECODABLE) >= _REMEMBERED_FOLDERS:
            _UNDECODABLE.pop(next(iter(_UNDECODABLE)))
        _UNDECODABLE[key] = frozenset(path for path, ok in zip(paths, decodes, strict=True) if not ok)
    bad = _UNDECODABLE[key]
    if not bad:
        return 0
    kept = [sample for sample in dataset.samples if sample[0] not in bad]
    first = next(path for path in paths if path in bad)
    if not kept:
        raise BadInputError(f"No file in {dataset.root} decodes as an image (the first: {first}).")
    dataset.samples = dataset.imgs = kept
    dataset.targets = [label for _, label in kept]
    warnings.warn(
        UnreadableImagesWarning(
            f"Skipped {len(bad)} file(s) in {dataset.root} that do not decode as images (the first: {first})."
        ),
        stacklevel=2,
    )
    return len(bad)


def _folder_transforms(size: list[int], channels: int, mean, std, augment: bool):
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
) -> tuple[Dataset, DataSpec, int]:
    """The train (augmented when ``augment``) or evaluation split of ``data``: ``"digits"`` or an
    image folder with ``train/`` and ``val/`` (or ``test/``) subfolders of class folders.

    Returns (dataset of (image, label), its DataSpec, number of unreadable files skipped).
    ImageNet's mean/std are the default for folders; digits use their own. Images, the digits too,
    come as ``channels`` channels (1 or 3; default: digits' 1, a folder's 3) of ``input_size``.
    """
    channels = channels or (1 if data == DIGITS else 3)
    _check_channels(channels)
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

    from torchvision.datasets import ImageFolder

    root = Path(data).expanduser()
    if not root.is_dir():
        raise BadInputError(f"Data folder {root} does not exist; pass an image folder or 'digits'.")
    folder = _split_folder(root, train)
    size = list(input_size) if input_size else default_image_size(data)
    mean = list(mean) if mean is not None else list(IMAGENET_MEAN[:channels])
    std = list(std) if std is not None else list(IMAGENET_STD[:channels])
    transform = _folder_transforms(size, channels, mean, std, augment and train)
    loader = functools.partial(load_image, channels=channels)
    try:
        dataset = ImageFolder(str(folder), transform=transform, loader=loader, allow_empty=True)
    except FileNotFoundError as error:
        raise BadInputError(f"Data folder {folder} has no class subfolders ({error}).") from None
    empty = [name for index, name in enumerate(dataset.classes) if index not in set(dataset.targets)]
    if empty:
        raise BadInputError(
            f"Class folder(s) {', '.join(empty[:3])} in {folder} hold no images; remove them or add images."
        )
    skipped = drop_unreadable(dataset)
    if not dataset.samples:
        raise BadInputError(f"No readable image in {folder}.")
    spec = DataSpec(str(root), size, channels, mean, std, list(dataset.classes))
    return dataset, spec, skipped
