"""Writes that never leave a half-written file: a temp file in the target folder, fsynced, then renamed over
the target (docs/FORMAT.md §10); and the check that a target can be written before any work starts.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

from vconvert.errors import BadInputError


# --------------------------------------------------------------------------- atomic writes
def check_writable(path: str | Path) -> Path:
    """The output path as a Path if a file can be written there, else BadInputError (call before heavy work)."""
    path = Path(path)
    if path.is_dir():
        raise BadInputError(f"Output path {str(path)!r} is a directory: give a file name.")
    parent = path.parent
    if not parent.exists():
        raise BadInputError(f"Output folder {str(parent)!r} does not exist: create it or choose another output path.")
    if not parent.is_dir():
        raise BadInputError(f"Output path {str(path)!r} is inside {str(parent)!r}, which is not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInputError(f"Output folder {str(parent)!r} is not writable: choose another output path.")
    return path


def _atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through ``write`` into a temp file next to ``path``, fsync, then rename it over ``path``."""
    path = check_writable(path)
    parent = path.parent
    while True:
        temp = parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
        except OSError as error:
            raise BadInputError(
                f"Cannot write in {str(parent)!r} ({error.strerror}): choose another output path."
            ) from error
    try:
        with os.fdopen(fd, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            temp.unlink()
        if isinstance(error, OSError):
            raise BadInputError(
                f"Writing {str(path)!r} failed ({error.strerror or error}): check free disk space and permissions."
            ) from error
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every platform)
        directory = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def atomic_save(obj: object, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically: the target is either untouched or complete."""
    _atomic_write(path, lambda stream: torch.save(obj, stream))


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    """Write ``data`` to ``path`` atomically (ONNX files, reports)."""
    _atomic_write(path, lambda stream: stream.write(data))
