"""Reading one untrusted image file as 8-bit grey or RGB (docs/FORMAT.md §13).

Only a regular file is opened, only the formats of :data:`IMAGE_FORMATS` are decoded (by content, whatever
the name), an image over :data:`MAX_IMAGE_PIXELS` is not decoded, and what is read is converted (16-bit grey
scaled down; CMYK, palette and alpha converted).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from typing import BinaryIO

from vconvert.errors import BadInputError, shown

IMAGE_CHANNELS = (1, 3)  # what an image folder can feed: grey or RGB
_SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N")

# Decoded by content whatever the file is named; never PostScript/EPS (Pillow hands those to ghostscript).
# JPEG includes MPO (camera JPEGs). No GIF: it is no image folder extension, and Pillow's GIF reader warns.
IMAGE_FORMATS = ("BMP", "JPEG", "PNG", "PPM", "TIFF", "WEBP")
# 8192x8192: more than any 64-megapixel camera photo (9248x6936), below Pillow's own bomb warning (89.5M),
# and at most 256 MiB decoded (4 bytes a pixel); an image over it is not decoded at all.
MAX_IMAGE_PIXELS = 8192 * 8192


class NotRegularFileError(BadInputError):
    """A path that is not a regular file (a FIFO, a device, a socket, a folder): never opened."""


class TooManyPixelsError(BadInputError):
    """An image whose header gives more pixels than the budget: never decoded."""


def printable(text: object) -> str:
    """``text`` (a name read from a folder) as one line of plain text: :func:`vconvert.errors.shown`, uncut."""
    return shown(text, limit=None)


def _open_regular(path: str) -> BinaryIO:
    """``path`` (through its links) opened for reading when it is a regular file.

    Anything else is refused before it is opened; the open itself does not block (a FIFO swapped in
    after the check) and is checked again on the open descriptor.
    """
    refused = NotRegularFileError(
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


def _too_many_pixels(path: str, size: tuple[int, int] | None, max_pixels: int) -> TooManyPixelsError:
    shape = f"{size[0]}x{size[1]} pixels" if size else "far larger than Pillow's own limit"
    return TooManyPixelsError(
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


def check_channels(channels: int) -> None:
    """Refuse a model that takes other than 1 (grey) or 3 (RGB) channels: image files feed no other."""
    if channels not in IMAGE_CHANNELS:
        raise BadInputError(
            f"Image data feeds models that take 1 (grey) or 3 (RGB) channels, and this one takes {channels}."
        )
