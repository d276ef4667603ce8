"""The ``vconvert`` command line: a thin typer layer over the Python API."""

from __future__ import annotations

import typer

from vconvert import __version__

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
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """vconvert: compress, fine-tune and export CNNs with versatile convolutions."""
