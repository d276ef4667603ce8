"""``python -m vconvert`` (also what ``torchrun -m vconvert`` runs)."""

from vconvert.cli import app

app(prog_name="vconvert")
