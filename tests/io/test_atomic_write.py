"""Atomic writes and their temp files (security issue 27, part 6): SIGTERM during a write removes the temp
file and still ends the process as SIGTERM does; a temp a SIGKILLed write left behind is removed by the next
write of that target, and nothing else is (other names, symlinks, folders, a write running now)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vconvert.io.files import _atomic_write, atomic_write_bytes, remove_stale_temps, temp_name_pattern

ROOT = Path(__file__).resolve().parents[2]

# Writes a first chunk, says so on stdout, then writes slowly until it is stopped.
SLOW_WRITER = textwrap.dedent(
    """
    import signal, sys, time
    from vconvert.io.files import _atomic_write

    if sys.argv[2] == "handler":  # a program that handles SIGTERM itself, by exiting with 143
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))

    def slow(stream):
        stream.write(b"x" * 65536)
        stream.flush()
        print("writing", flush=True)
        for _ in range(600):
            stream.write(b"x" * 1024)
            time.sleep(0.05)

    _atomic_write(sys.argv[1], slow)
    print("finished", flush=True)
    """
)


def _temps(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.name.endswith(".tmp"))


@pytest.mark.parametrize("handler", ["default", "handler"])
def test_sigterm_during_a_write_removes_the_temp_file(handler: str, tmp_path: Path) -> None:
    target = tmp_path / "model.vc.pt"
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, str(target), handler],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert child.stdout.readline() == b"writing\n", child.stderr.read().decode()
        (temp,) = _temps(tmp_path)
        assert temp_name_pattern(target.name).fullmatch(temp.name) and temp.stat().st_size >= 65536
        child.send_signal(signal.SIGTERM)
        code = child.wait(timeout=60)
    finally:
        child.kill()
        child.wait()
    assert code == (-signal.SIGTERM if handler == "default" else 143), child.stderr.read().decode()
    assert b"finished" not in child.stdout.read()
    assert not target.exists() and _temps(tmp_path) == []


def test_the_sigterm_handler_is_restored_after_a_write(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    seen = []
    _atomic_write(tmp_path / "out.bin", lambda stream: seen.append(signal.getsignal(signal.SIGTERM)))
    assert seen[0] is not before and signal.getsignal(signal.SIGTERM) is before


def test_an_ignored_sigterm_stays_ignored_during_a_write(tmp_path: Path) -> None:
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        seen = []
        _atomic_write(tmp_path / "out.bin", lambda stream: seen.append(signal.getsignal(signal.SIGTERM)))
        assert seen == [signal.SIG_IGN] and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_killed_writes_temp_is_removed_by_the_next_write_and_nothing_else(tmp_path: Path) -> None:
    target, old = tmp_path / "out.onnx", time.time() - 3600
    stale = tmp_path / ".out.onnx.0123456789ab.tmp"  # what a SIGKILLed write leaves
    kept = {
        "running": tmp_path / ".out.onnx.aaaaaaaaaaaa.tmp",  # a write of the same target running now
        "short": tmp_path / ".out.onnx.0123.tmp",
        "upper": tmp_path / ".out.onnx.0123456789AB.tmp",
        "longer": tmp_path / ".out.onnx.0123456789abc.tmp",
        "suffix": tmp_path / ".out.onnx.0123456789ab.tmp.keep",
        "other": tmp_path / ".other.onnx.0123456789ab.tmp",
        "unhidden": tmp_path / "out.onnx.0123456789ab.tmp",
    }
    for path in [stale, *kept.values()]:
        path.write_bytes(b"partial")
        if path != kept["running"]:
            os.utime(path, (old, old))
    os.utime(kept["running"], (time.time() + 60, time.time() + 60))
    outside = tmp_path / "elsewhere" / "precious.bin"
    outside.parent.mkdir()
    outside.write_bytes(b"precious")
    link = tmp_path / ".out.onnx.bbbbbbbbbbbb.tmp"  # a symlink of a temp's name: neither it nor its target goes
    link.symlink_to(outside)
    folder = tmp_path / ".out.onnx.cccccccccccc.tmp"
    folder.mkdir()
    os.utime(outside, (old, old))

    atomic_write_bytes(b"complete", target)

    assert target.read_bytes() == b"complete" and not stale.exists()
    assert all(path.exists() for path in kept.values())
    assert link.is_symlink() and outside.read_bytes() == b"precious" and folder.is_dir()


def test_remove_stale_temps_only_touches_older_matching_regular_files(tmp_path: Path) -> None:
    target = tmp_path / "a.b[1].vc.pt"  # regex characters in the name are taken literally
    old = tmp_path / ".a.b[1].vc.pt.ffffffffffff.tmp"
    look_alike = tmp_path / ".aXb[1].vc.pt.ffffffffffff.tmp"
    for path in (old, look_alike):
        path.write_bytes(b"")
    assert remove_stale_temps(target, time.time() + 10) == [old]
    assert look_alike.exists() and remove_stale_temps(tmp_path / "missing" / "x", time.time()) == []
