"""Image data for recalibration and fine-tuning.

Images are converted to what the model takes: 1 channel (grey) or 3 (RGB) of 8 bits, whatever the
file holds (16-bit grey is scaled down; CMYK, palette, alpha and grey images are converted), then
resized. Everything in an image folder is untrusted input (docs/FORMAT.md §13): only regular files
are opened, linked folders are never descended, linked files are taken only when they lead inside the
data folder, only the formats of :data:`IMAGE_FORMATS` are decoded (by content, whatever the name) and
an image over :data:`MAX_IMAGE_PIXELS` is not decoded. A file that is not taken or cannot be decoded
(corrupt, truncated, empty, unreadable) is skipped with one :class:`UnreadableImagesWarning` line per
folder naming the first such file of each kind; a folder left with no image is refused.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import stat
import statistics
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from vconvert.errors import BadInputError, VConvertWarning, shown

IMAGE_CHANNELS = (1, 3)  # what an image folder can feed: grey or RGB
_SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N")


log = logging.getLogger("vconvert")


class UnreadableImagesWarning(VConvertWarning):
    """Files of an image folder that were left out: not regular files, links leading out of the data
    folder, linked folders, images over the pixel budget, or files that cannot be decoded."""


class ImageSizeWarning(VConvertWarning):
    """The images of a folder are far from the size the model is fed (they are resized a lot)."""


# --------------------------------------------------------------------------- reading untrusted files
# Decoded by content whatever the file is named; never PostScript/EPS (Pillow hands those to ghostscript).
# JPEG includes MPO (camera JPEGs). No GIF: it is no image folder extension, and Pillow's GIF reader warns.
IMAGE_FORMATS = ("BMP", "JPEG", "PNG", "PPM", "TIFF", "WEBP")
# 8192x8192: more than any 64-megapixel camera photo (9248x6936), below Pillow's own bomb warning (89.5M),
# and at most 256 MiB decoded (4 bytes a pixel); an image over it is not decoded at all.
MAX_IMAGE_PIXELS = 8192 * 8192


class _NotRegularFile(BadInputError):
    """A path that is not a regular file (a FIFO, a device, a socket, a folder): never opened."""


class _TooManyPixels(BadInputError):
    """An image whose header gives more pixels than the budget: never decoded."""


def printable(text: object) -> str:
    """``text`` (a name read from a folder) as one line of plain text: :func:`vconvert.errors.shown`, uncut."""
    return shown(text, limit=None)


def _open_regular(path: str) -> BinaryIO:
    """``path`` (through its links) opened for reading when it is a regular file.

    Anything else is refused before it is opened; the open itself does not block (a FIFO swapped in
    after the check) and is checked again on the open descriptor.
    """
    refused = _NotRegularFile(
        f"{printable(path)} is not a regular file (a FIFO, device or socket is never read); remove it from the folder."
    )
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise refused
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    descriptor = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise refused
        if hasattr(os, "set_blocking"):
            os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def _identify(file: BinaryIO, path: str):
    """``file`` opened (header read) by the first plugin of :data:`IMAGE_FORMATS` that accepts its content,
    as ``PIL.Image.open(file, formats=IMAGE_FORMATS)`` opens it but without Pillow's size check: that check
    warns (a multi-line ``DecompressionBombWarning``) and can only be silenced by changing the warning
    filters, which are global; the caller checks the size against its own budget instead."""
    import struct

    from PIL import Image, UnidentifiedImageError

    Image.init()  # every plugin registered (once per process)
    prefix = file.read(16)
    for name in IMAGE_FORMATS:
        factory, accept = Image.OPEN[name]
        verdict = accept(prefix) if accept is not None else True
        if not verdict or isinstance(verdict, str):  # a string: "this format, but unsupported"
            continue
        file.seek(0)
        try:
            return factory(file, "")
        except (SyntaxError, IndexError, TypeError, struct.error):  # as Image.open: not this format after all
            continue
    raise UnidentifiedImageError(f"cannot identify image file {printable(path)}")


@contextlib.contextmanager
def open_image(path: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Iterator:
    """The image at ``path`` as an open PIL image (header read, pixels not decoded yet).

    Only a regular file is opened, only :data:`IMAGE_FORMATS` are tried (by content), and an image of
    more than ``max_pixels`` pixels raises BadInputError before anything is decoded; Pillow's own
    ``DecompressionBombWarning`` is never raised (its global limit and the warning filters are left as
    they are). Other files raise what Pillow raises (``UnidentifiedImageError``, ``OSError``, ...).
    """
    from PIL import Image

    with _open_regular(path) as file:
        try:
            image = _identify(file, path)
        except Image.DecompressionBombError:  # WebP's reader: over twice Pillow's own limit
            raise _too_many_pixels(path, None, max_pixels) from None
        with image:
            if image.width * image.height > max_pixels:
                raise _too_many_pixels(path, image.size, max_pixels)
            yield image


def _too_many_pixels(path: str, size: tuple[int, int] | None, max_pixels: int) -> _TooManyPixels:
    shape = f"{size[0]}x{size[1]} pixels" if size else "far larger than Pillow's own limit"
    return _TooManyPixels(
        f"{printable(path)} is {shape}, more than the {max_pixels:,} pixels an image may have; "
        "shrink it or remove it from the folder."
    )


def load_image(path: str, channels: int = 3, max_pixels: int = MAX_IMAGE_PIXELS):
    """The image at ``path`` as an 8-bit PIL image of ``channels`` channels ("L" for 1, "RGB" for 3),
    opened as :func:`open_image` opens it."""
    with open_image(path, max_pixels) as image:
        if image.mode in _SIXTEEN_BIT_GREY or (image.mode == "I" and image.getextrema()[1] > 255):
            image = image.convert("I").point(lambda value: value * (1 / 256))  # 16-bit grey to 8 bits
        return image.convert("L" if channels == 1 else "RGB")


def _check_channels(channels: int) -> None:
    if channels not in IMAGE_CHANNELS:
        raise BadInputError(
            f"Image data feeds models that take 1 (grey) or 3 (RGB) channels, and this one takes {channels}."
        )


# --------------------------------------------------------------------------- listing untrusted folders
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
# Why an entry of a folder was left out, in the order the warning lists them.
UNDECODABLE, TOO_LARGE, NOT_REGULAR, OUTSIDE, LINKED_FOLDER = (
    "undecodable", "too-large", "not-regular", "outside", "linked-folder"
)  # fmt: skip


def _inside(path: str, root: str) -> bool:
    """Whether the real path ``path`` is ``root`` (a real path) or under it."""
    return os.path.commonpath([path, root]) == root


def _is_link(entry: os.DirEntry) -> bool:
    try:
        return entry.is_symlink()
    except OSError:  # an entry gone or unreadable since it was listed: nothing to follow
        return False


def _entry_problem(entry: os.DirEntry, data_root: str) -> str | None:
    """Why a folder entry (not a real folder) is not read: None for a regular file or a link leading to a
    regular file inside ``data_root``; else NOT_REGULAR, OUTSIDE (also a dangling link or a loop of links)
    or LINKED_FOLDER. Nothing is opened."""
    try:
        if not entry.is_symlink():
            return None if entry.is_file(follow_symlinks=False) else NOT_REGULAR
        target = os.path.realpath(entry.path, strict=True)
        mode = os.stat(target).st_mode
    except (OSError, ValueError):
        return OUTSIDE
    if stat.S_ISDIR(mode):
        return LINKED_FOLDER
    if not _inside(target, data_root):
        return OUTSIDE
    return None if stat.S_ISREG(mode) else NOT_REGULAR


def scan_images(folder: str, data_root: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The image files under ``folder`` and the entries left out as (reason, path), both in the order
    torchvision's ImageFolder lists files (folders by path, then names).

    Only names ending in :data:`IMAGE_EXTENSIONS` are files to read. Real subfolders are descended; linked
    folders never (reported as LINKED_FOLDER, whatever their name), so no link can repeat a folder or
    leave it. A regular file is taken; a link only when it leads to a regular file inside ``data_root``
    (a real path, see :func:`os.path.realpath`); FIFOs, devices and sockets never. An unreadable
    subfolder adds nothing.
    """
    listed: list[tuple[str, list[str], list[tuple[str, str]]]] = []
    pending = [folder]
    while pending:  # not recursive: a hostile folder may nest deeper than Python's recursion limit
        current = pending.pop()
        try:
            with os.scandir(current) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError:
            continue
        files, skipped = [], []
        for entry in entries:
            try:
                real_folder = entry.is_dir(follow_symlinks=False)
            except OSError:
                real_folder = False
            if real_folder:
                pending.append(entry.path)
                continue
            named = entry.name.lower().endswith(IMAGE_EXTENSIONS)
            if not named and not _is_link(entry):
                continue
            problem = _entry_problem(entry, data_root)
            if problem is None and named:
                files.append(entry.path)
            elif problem is not None and (named or problem == LINKED_FOLDER):
                skipped.append((problem, entry.path))
        listed.append((current, files, skipped))
    listed.sort(key=lambda item: item[0])
    return [path for _, files, _ in listed for path in files], [entry for _, _, skipped in listed for entry in skipped]


def _linked_folder_error(name: str, folder: Path | str, what: str) -> BadInputError:
    return BadInputError(
        f"{what} {printable(name)} in {printable(folder)} is a link to a folder, and vconvert never follows linked "
        "folders in image data (one could repeat the data or lead out of it); replace it by a real folder."
    )


def class_folders(folder: Path | str) -> list[str]:
    """The names of ``folder``'s real subfolders (its classes), sorted.

    A linked subfolder is refused with BadInputError: following it could repeat the data or leave it,
    and leaving it out would renumber the classes after it.
    """
    try:
        with os.scandir(folder) as listing:
            entries = list(listing)
    except OSError as error:
        raise BadInputError(f"Data folder {printable(folder)} cannot be read ({error.strerror}).") from None
    names = []
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            names.append(entry.name)
        elif _is_link(entry) and os.path.isdir(entry.path):
            raise _linked_folder_error(entry.name, folder, "Class folder")
    return sorted(names)


def _subfolder(root: Path, name: str) -> Path | None:
    """``root/name`` when it is a real folder, None when there is none; a link to a folder is refused."""
    path = root / name
    if path.is_symlink() and path.is_dir():
        raise _linked_folder_error(name, root, "Split folder")
    return path if path.is_dir() else None


class ImageFolderData(Dataset):
    """The images of ``root`` laid out as ``<class>/<image>`` (torchvision's ImageFolder layout and order:
    classes sorted, subfolders of a class read too), read as untrusted input (:func:`class_folders`,
    :func:`scan_images`; links may lead anywhere inside ``data_root``). Items are (``transform(loader(path))``,
    class index); ``skipped`` holds the entries left out as (reason, path)."""

    def __init__(
        self,
        root: Path | str,
        data_root: Path | str,
        transform: Callable | None = None,
        loader: Callable = load_image,
    ) -> None:
        self.root, self.transform, self.target_transform, self.loader = str(root), transform, None, loader
        self.classes = class_folders(self.root)
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        real_root = os.path.realpath(data_root)
        self.samples: list[tuple[str, int]] = []
        self.skipped: list[tuple[str, str]] = []
        for index, name in enumerate(self.classes):
            files, skipped = scan_images(os.path.join(self.root, name), real_root)
            self.samples += [(path, index) for path in files]
            self.skipped += skipped
        self.imgs = self.samples
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple:
        path, label = self.samples[index]
        image = self.loader(path)
        return (self.transform(image) if self.transform is not None else image), label


def _empty_classes_error(dataset: ImageFolderData) -> BadInputError | None:
    if not dataset.classes:
        return BadInputError(
            f"Data folder {printable(dataset.root)} has no class subfolders; lay it out as <class>/<image>."
        )
    filled = set(dataset.targets)
    empty = [printable(name) for index, name in enumerate(dataset.classes) if index not in filled]
    if empty:
        return BadInputError(
            f"Class folder(s) {', '.join(empty[:3])} in {printable(dataset.root)} hold no images; remove them or "
            "add images."
        )
    return None


def image_folder(root: Path, transform=None, channels: int = 3, max_pixels: int = MAX_IMAGE_PIXELS) -> ImageFolderData:
    """The images of ``root`` (or ``root/train`` when that exists) laid out as ``<class>/<image>``, read as
    ``channels`` channels; entries that are not taken (:func:`scan_images`), images over ``max_pixels``
    and undecodable files are left out with one warning line (:func:`drop_unreadable`).

    Raises BadInputError with one sentence when the folder is missing, has a class folder with no image
    or holds no readable image.
    """
    _check_channels(channels)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise BadInputError(
            f"Data folder {printable(root)} does not exist; pass a folder of images (one subfolder per class)."
        )
    folder = _subfolder(root, "train") or root
    loader = functools.partial(load_image, channels=channels, max_pixels=max_pixels)
    dataset = ImageFolderData(folder, root, transform, loader)
    error = _empty_classes_error(dataset)
    if error is not None:
        raise error
    drop_unreadable(dataset, max_pixels)
    return dataset


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


def _split_folder(root: Path, train: bool) -> Path:
    names = ("train",) if train else ("val", "test")
    for name in names:
        folder = _subfolder(root, name)
        if folder is not None:
            return folder
    wanted = "train/" if train else "val/ or test/"
    root_text = printable(root)
    raise BadInputError(
        f"Data folder {root_text} has no {wanted} subfolder; lay it out as {root_text}/{wanted}<class>/<image>."
    )


class _PixelGate:
    """Lets decodes run side by side while their pixels together stay within ``budget`` (a larger image
    waits to run alone): the memory the decode check takes is bounded whatever the folder holds."""

    def __init__(self, budget: int) -> None:
        self._budget = self._free = budget
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def held(self, pixels: int) -> Iterator[None]:
        """Wait until ``pixels`` fit in what is free, hold them while the block runs."""
        pixels = min(pixels, self._budget)
        with self._changed:
            self._changed.wait_for(lambda: self._free >= pixels)
            self._free -= pixels
        try:
            yield
        finally:
            with self._changed:
                self._free += pixels
                self._changed.notify_all()


def _decode_problem(path: str, max_pixels: int, gate: _PixelGate) -> str | None:
    """None when the whole file decodes as an image of at most ``max_pixels`` pixels (a JPEG at 1/8 scale:
    every byte is still read), else why not: NOT_REGULAR, TOO_LARGE or UNDECODABLE."""
    try:
        with open_image(path, max_pixels) as image:
            image.draft(image.mode, (1, 1))
            with gate.held(image.width * image.height):
                image.load()
        return None
    except _NotRegularFile:  # replaced by a FIFO or a device since the folder was listed
        return NOT_REGULAR
    except _TooManyPixels:
        return TOO_LARGE
    except Exception:  # PIL raises many types for a file that is not an image, or a cut one
        return UNDECODABLE


_UNDECODABLE: dict[str, dict[str, str]] = {}  # per process: the files of a folder not decoded, and why
_REMEMBERED_FOLDERS = 32
_DECODE_THREADS = 8


def _skipped_clauses(skipped: Sequence[tuple[str, str]], max_pixels: int) -> list[str]:
    """One clause per reason, in the order of the reasons: "N <what they are> (the first: <path>)"."""
    what = {
        UNDECODABLE: "file(s) that do not decode as images",
        TOO_LARGE: f"image(s) over the budget of {max_pixels:,} pixels",
        NOT_REGULAR: "special file(s) (FIFO, device, socket)",
        OUTSIDE: "link(s) out of the data folder, dangling or looping",
        LINKED_FOLDER: "linked folder(s), never followed",
    }
    clauses = []
    for reason, text in what.items():
        paths = [path for kind, path in skipped if kind == reason]
        if paths:
            clauses.append(f"{len(paths)} {text} (the first: {printable(paths[0])})")
    return clauses


def drop_unreadable(dataset, max_pixels: int = MAX_IMAGE_PIXELS) -> int:
    """Remove the samples of an image folder data set whose file is over ``max_pixels`` pixels or does not
    decode as an image, and return how many entries were left out in all, these and the ones its listing
    left out (``dataset.skipped``, see :func:`scan_images`).

    One :class:`UnreadableImagesWarning` line names the first entry left out for each reason; no sample
    left raises BadInputError. A folder already checked in this process is not decoded again.
    """
    from concurrent.futures import ThreadPoolExecutor

    paths = [path for path, _ in dataset.samples]
    key = hashlib.sha256("\0".join([str(dataset.root), str(max_pixels), *paths]).encode()).hexdigest()
    if key not in _UNDECODABLE:
        gate = _PixelGate(max(max_pixels, 1))
        with ThreadPoolExecutor(max_workers=_DECODE_THREADS) as pool:
            problems = list(pool.map(lambda path: _decode_problem(path, max_pixels, gate), paths))
        if len(_UNDECODABLE) >= _REMEMBERED_FOLDERS:
            _UNDECODABLE.pop(next(iter(_UNDECODABLE)))
        _UNDECODABLE[key] = {path: problem for path, problem in zip(paths, problems, strict=True) if problem}
    bad = _UNDECODABLE[key]
    skipped = [*getattr(dataset, "skipped", []), *((bad[path], path) for path in paths if path in bad)]
    if not skipped:
        return 0
    clauses = "; ".join(_skipped_clauses(skipped, max_pixels))
    root = printable(dataset.root)
    kept = [sample for sample in dataset.samples if sample[0] not in bad]
    if not kept:
        raise BadInputError(f"No file in {root} can be read as an image: {clauses}.")
    dataset.samples = dataset.imgs = kept
    dataset.targets = [label for _, label in kept]
    warnings.warn(UnreadableImagesWarning(f"Skipped in {root}: {clauses}."), stacklevel=2)
    return len(skipped)


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

    root = Path(data).expanduser()
    if not root.is_dir():
        raise BadInputError(f"Data folder {printable(root)} does not exist; pass an image folder or 'digits'.")
    folder = _split_folder(root, train)
    size = list(input_size) if input_size else default_image_size(data)
    mean = list(mean) if mean is not None else list(IMAGENET_MEAN[:channels])
    std = list(std) if std is not None else list(IMAGENET_STD[:channels])
    transform = image_transform(size, channels, mean, std, augment and train)
    loader = functools.partial(load_image, channels=channels, max_pixels=max_pixels)
    dataset = ImageFolderData(folder, root, transform, loader)
    error = _empty_classes_error(dataset)
    if error is not None:
        raise error
    skipped = drop_unreadable(dataset, max_pixels)
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
