"""Ctrl-C during ``finetune`` and ``--resume`` as a user meets them (issue 29 item 4): the interrupt says what is on
disk and the command that continues; a resumed run takes the options it recorded, and an option typed
differently is named with both values."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import QUICK, assert_one_sentence_error, converted_checkpoint, finetune_cut, invoke

from vconvert import load_checkpoint
from vconvert.errors import BadInputError
from vconvert.train.config import FinetuneConfig

ARGS = ["--data", "digits", "--epochs", "3", "--batch-size", "64", "--train-limit", "384", "--eval-limit", "64",
        "--workers", "0", "--recalibrate-images", "64", "--masks", "frozen", "--lr", "0.02"]  # fmt: skip


def _restore_ctrl_c() -> None:
    """A shell starts background jobs (`make test &`, CI runners) with SIGINT ignored, and children inherit
    that; a user's terminal delivers Ctrl-C, so the child gets the default disposition back."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _finetune(*args: object) -> subprocess.Popen:
    command = [sys.executable, "-m", "vconvert", "finetune", *map(str, args)]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_restore_ctrl_c
    )


def test_ctrl_c_says_what_is_on_disk_and_a_bare_resume_ends_as_an_uninterrupted_run(tmp_path: Path) -> None:
    source = converted_checkpoint(tmp_path / "m.vc.pt")
    straight = tmp_path / "straight.vc.pt"
    assert _finetune(source, "-o", straight, *ARGS).wait(timeout=600) == 0

    cut = tmp_path / "cut.vc.pt"
    process = _finetune(source, "-o", cut, *ARGS)
    metrics = tmp_path / "cut.metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted:") and "holds epoch" in last and "Traceback" not in stderr, stderr
    assert f"vconvert finetune {source} -o {cut} --resume" in last, last
    assert not load_checkpoint(cut).metadata.finetune["complete"], "the interrupt must land before the run ends"

    resumed = _finetune(source, "-o", cut, "--resume")  # no options: the recorded ones
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    expected, actual = load_checkpoint(straight).model.state_dict(), load_checkpoint(cut).model.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_ctrl_c_before_the_first_epoch_says_nothing_was_written(tmp_path: Path) -> None:
    source = converted_checkpoint(tmp_path / "m.vc.pt")
    output = tmp_path / "out.vc.pt"
    process = _finetune(source, "-o", output, *ARGS)
    deadline = time.time() + 300
    seen = ""
    while time.time() < deadline and "step" not in seen:  # training has begun
        seen += process.stderr.readline()
    os.kill(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, seen + stderr
    assert "no epoch was written" in stderr.strip().splitlines()[-1], stderr
    assert not output.exists()


def test_resume_names_each_option_typed_differently_from_the_run(tmp_path: Path) -> None:
    source = converted_checkpoint(tmp_path / "m.vc.pt")
    output = tmp_path / "out.vc.pt"
    finetune_cut(source, output, FinetuneConfig(**QUICK))
    before = output.read_bytes()
    result = invoke("finetune", source, "-o", output, "--resume", "--lr", "0.5", "--epochs", "7")
    assert_one_sentence_error(result, 2, "--lr 0.5 here, 0.01 in the run", "--epochs 7 here, 2 in the run")
    assert output.read_bytes() == before


def test_a_run_recorded_by_an_older_version_resumes_with_the_default_of_an_option_it_lacks(tmp_path: Path) -> None:
    from vconvert.io.format import read_checkpoint, write_checkpoint
    from vconvert.train.finetune import finetune

    source = converted_checkpoint(tmp_path / "m.vc.pt")
    output = tmp_path / "out.vc.pt"
    finetune_cut(source, output, FinetuneConfig(**QUICK))
    payload = read_checkpoint(output)
    del payload["metadata"]["finetune_state"]["config"]["grad_clip"]  # older files ran without clipping
    write_checkpoint(output, {key: value for key, value in payload.items() if key not in ("format", "versions")})
    history = finetune(source, output, FinetuneConfig(**QUICK, grad_clip=0.0), resume=True)  # as that run did
    assert [entry.epoch for entry in history] == [1, 2]
    with pytest.raises(BadInputError, match=re.escape("`grad_clip` 10.0 here, 0.0 in the run")):
        finetune(source, output, FinetuneConfig(**QUICK), resume=True)
