"""The command line entry points: console script and ``python -m vconvert``."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

import vconvert
from vconvert.cli import app


def test_version_flag_prints_package_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"vconvert {vconvert.__version__}"
    assert vconvert.__version__[0].isdigit()


def test_help_describes_the_tool() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "versatile" in result.output and "--version" in result.output


def test_python_dash_m_entry_point() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "vconvert", "--version"], capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("vconvert ")
