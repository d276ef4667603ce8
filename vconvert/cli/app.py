"""The ``vconvert`` command line: a thin typer layer over the Python API, one module per command.

Each command module holds a plain function; this module builds the typer app and registers them in the
order ``--help`` lists them. Library errors are mapped to one-sentence messages and exit codes in one
place, :func:`vconvert.cli.common.explained_errors`.
"""

from __future__ import annotations

import typer

from vconvert import __version__
from vconvert.cli.compress import compress
from vconvert.cli.demo import demo
from vconvert.cli.evaluate import evaluate
from vconvert.cli.export import export
from vconvert.cli.finetune import finetune
from vconvert.cli.inspect import inspect

app = typer.Typer(
    name="vconvert",
    help="Convert the convolutions of a pretrained PyTorch CNN into versatile convolutions "
    "(few primary filters expanded by binary masks), fine-tune them and export to ONNX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"vconvert {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit.", metavar=""
    ),
) -> None:
    """vconvert: compress, fine-tune and export CNNs with versatile convolutions."""


for command in (compress, inspect, finetune, evaluate, export, demo):
    app.command()(command)
