"""Writes that never leave a half-written file: a temp file in the target folder, fsynced, then renamed over
the target, the temp removed on SIGTERM and a killed run's temp removed by the next write of that target
(docs/FORMAT.md §10); and the checks that a target can be written, and is not an input, before any work starts.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
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


def same_file(first: str | Path, second: str | Path) -> bool:
    """Whether two paths name one file: the same path once symlinks and ``..`` are resolved, or (when both
    exist) the same file through a symlink or a hard link (``os.path.samefile``)."""
    first, second = Path(first), Path(second)
    with contextlib.suppress(OSError):
        if os.path.samefile(first, second):
            return True
    return first.resolve() == second.resolve()


TEMP_HEX = 12  # hex digits of the random part of a temp file's name: .<name>.<12 hex>.tmp


def temp_name_pattern(name: str) -> re.Pattern[str]:
    """The names of the temp files a write of a target called ``name`` creates beside it."""
    return re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{{TEMP_HEX}}}\.tmp")


def remove_stale_temps(path: Path, before: float) -> list[Path]:
    """Remove the temp files an earlier, killed write of ``path`` left beside it (SIGKILL cannot be caught):
    only names of exactly ``.<name>.<12 hex>.tmp`` in ``path``'s folder, only regular files (never a
    symlink, whatever it points at) of this user, last modified before ``before`` (a time.time()) so that a
    write of the same target running now keeps its temp. Returns the paths removed; errors are ignored."""
    pattern, removed = temp_name_pattern(path.name), []
    with contextlib.suppress(OSError), os.scandir(path.parent) as entries:
        for entry in entries:
            if not pattern.fullmatch(entry.name):
                continue
            with contextlib.suppress(OSError):
                info = entry.stat(follow_symlinks=False)
                own = not hasattr(os, "getuid") or info.st_uid == os.getuid()  # no owners on Windows
                if stat.S_ISREG(info.st_mode) and own and info.st_mtime < before:
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


class _Terminated(BaseException):
    """SIGTERM arrived during a write (raised by the handler :func:`_temp_removed_on_sigterm` installs)."""


@contextlib.contextmanager
def _temp_removed_on_sigterm() -> Iterator[None]:
    """While a write runs, SIGTERM stops it (the write's cleanup removes its temp file), then the previous
    handler is restored and the signal delivered again: a default SIGTERM still ends the process as SIGTERM
    does (exit status 143 in a shell). A handler of the program's own runs first and decides (the write goes
    on if it returns); an ignored SIGTERM stays ignored. Only the main thread can handle signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL and not callable(previous):  # ignored, or set outside Python
        yield
        return
    arrived = []

    def stop(signum: int, frame: object) -> None:
        if callable(previous):
            previous(signum, frame)  # the program's handler decides: raising ends the write, returning does not
            return
        arrived.append(signum)
        raise _Terminated  # however the writer passes it on (torch.save may wrap it), `arrived` says it came

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if arrived:
            signal.raise_signal(signal.SIGTERM)  # the default action: the process ends here


def _atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through ``write`` into a temp file next to ``path``, fsync, then rename it over ``path``; the
    temp file is removed on any failure, KeyboardInterrupt and SIGTERM included, and temps of this target
    that a killed earlier write left behind are removed once the target is written."""
    path = check_writable(path)
    parent, started = path.parent, time.time()
    with _temp_removed_on_sigterm():
        temp = None
        try:
            while temp is None:  # named before it exists, so that a signal right after its creation removes it
                temp = parent / f".{path.name}.{secrets.token_hex(TEMP_HEX // 2)}.tmp"
                try:
                    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                except FileExistsError:
                    temp = None
                except OSError as error:
                    temp = None
                    raise BadInputError(
                        f"Cannot write in {str(parent)!r} ({error.strerror}): choose another output path."
                    ) from error
            with os.fdopen(fd, "wb") as stream:
                write(stream)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temp, path)
        except BaseException as error:
            if temp is not None:
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
    remove_stale_temps(path, started)


def atomic_save(obj: object, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically: the target is either untouched or complete."""
    _atomic_write(path, lambda stream: torch.save(obj, stream))


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    """Write ``data`` to ``path`` atomically (ONNX files, reports)."""
    _atomic_write(path, lambda stream: stream.write(data))
