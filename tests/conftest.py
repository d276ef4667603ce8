"""Shared test helpers."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest


def error_message(result) -> str:
    """The one-sentence error of a refused command: the last line of its stderr and the only one starting
    with "error:" (the stage's info lines about its input may come before it)."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


def write_user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, forward: str) -> type:
    """A user package ``name`` (not an allowlisted model library) holding TinyNet, whose forward body
    is ``forward``; returns the class. Give each test its own name: Python caches imported modules."""
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class TinyNet(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a = nn.Conv2d(3, 8, 3, padding=1)\n"
        "        self.b = nn.Conv2d(8, 16, 3, padding=1)\n"
        "    def forward(self, x):\n"
        f"        {forward}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module(f"{name}.nets").TinyNet


def finetune_cut(source: Path, output: Path, config) -> None:
    """Fine-tune ``source`` into ``output`` with ``config``, stopped by an exception after the first
    epoch's checkpoint (which holds the state to resume from)."""
    from vconvert.finetune import finetune

    class Stop(Exception):
        pass

    def stop_after_first_epoch(metrics) -> None:
        raise Stop

    with pytest.raises(Stop):
        finetune(source, output, config, on_epoch=stop_after_first_epoch)


def finetune_cut_and_resumed(source: Path, output: Path, config) -> None:
    """:func:`finetune_cut`, then the run finished with ``resume=True``."""
    from vconvert.finetune import finetune

    finetune_cut(source, output, config)
    finetune(source, output, config, resume=True)
