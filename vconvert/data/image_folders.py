"""Listing and reading untrusted image folders (docs/FORMAT.md §13), in torchvision's ImageFolder layout
and order.

Only regular files are taken, linked folders are never descended, linked files only when they lead inside
the data folder; a file that is not taken or cannot be decoded (corrupt, truncated, empty, unreadable, over
the pixel budget) is skipped with one :class:`UnreadableImagesWarning` line per folder naming the first such
file of each kind, and a folder left with no image is refused.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import stat
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from torch.utils.data import Dataset

from vconvert.data.image_files import (
    MAX_IMAGE_PIXELS,
    NotRegularFileError,
    TooManyPixelsError,
    check_channels,
    load_image,
    open_image,
    printable,
)
from vconvert.errors import BadInputError, VConvertWarning


class UnreadableImagesWarning(VConvertWarning):
    """Files of an image folder that were left out: not regular files, links leading out of the data
    folder, linked folders, images over the pixel budget, or files that cannot be decoded."""


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
    check_channels(channels)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise BadInputError(
            f"Data folder {printable(root)} does not exist; pass a folder of images (one subfolder per class)."
        )
    folder = _subfolder(root, "train") or root
    return checked_image_folder(folder, root, transform, channels, max_pixels)[0]


def checked_image_folder(
    folder: Path, data_root: Path, transform: Callable | None, channels: int, max_pixels: int
) -> tuple[ImageFolderData, int]:
    """The images of ``folder`` (class folders inside ``data_root``) read as ``channels`` channels, with what
    cannot be read left out (:func:`drop_unreadable`), and how many entries were left out.

    Raises BadInputError with one sentence when there are no class folders, one holds no image or no image
    can be read.
    """
    loader = functools.partial(load_image, channels=channels, max_pixels=max_pixels)
    dataset = ImageFolderData(folder, data_root, transform, loader)
    error = _empty_classes_error(dataset)
    if error is not None:
        raise error
    return dataset, drop_unreadable(dataset, max_pixels)


def split_folder(root: Path, train: bool) -> Path:
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
    except NotRegularFileError:  # replaced by a FIFO or a device since the folder was listed
        return NOT_REGULAR
    except TooManyPixelsError:
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
