"""The ``vconvert`` command line (typer): one module per command, errors mapped to flags in one place."""

from vconvert.cli.app import app

__all__ = ["app"]
