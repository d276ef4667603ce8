"""Library errors name Python parameters; the command line shows its flags instead, mapped in one place."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import typer.main
from conftest import error_message, invoke

from vconvert.cli import app
from vconvert.cli.common import as_flags
from vconvert.errors import BadInputError
from vconvert.train.config import FinetuneConfig

PACKAGE = Path(__file__).resolve().parents[2] / "vconvert"
PARAMETER = re.compile(r"(?<!`)`([a-z][a-z0-9_]*)(?:=True)?`(?!`)")


def cli_flags() -> set[str]:
    command = typer.main.get_command(app)
    return {opt for sub in command.commands.values() for p in sub.params for opt in getattr(p, "opts", [])}


def library_parameters() -> dict[str, str]:
    """Every parameter named in backticks in a string literal of the library (not the CLI), with where."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        if "cli" in path.relative_to(PACKAGE).parts:
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                for match in PARAMETER.finditer(node.value):
                    found.setdefault(match.group(0), f"{path.relative_to(PACKAGE)}:{node.lineno}")
    return found


def test_every_parameter_a_library_message_names_is_a_flag_of_the_command_line() -> None:
    flags, named = cli_flags(), library_parameters()
    assert len(named) >= 20, named  # the scan finds the messages (fails if the marking convention changes)
    unknown = {name: where for name, where in named.items() if as_flags(name) not in flags}
    assert not unknown, unknown


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("`bn_mode` must be 'train' or 'frozen'; got 'x'.", "--bn-mode must be 'train' or 'frozen'; got 'x'."),
        ("pass `trust=True` if you trust the file", "pass --trust if you trust the file"),
        ("`feature_weight` must be ≥ 0", "--feature-distill must be ≥ 0"),
        ("call `model.eval()` first", "call `model.eval()` first"),  # not a parameter: left as it is
    ],
    ids=["value", "bool-flag", "renamed-flag", "code-not-a-parameter"],
)
def test_as_flags(text: str, shown: str) -> None:
    assert as_flags(text) == shown


def test_a_python_caller_is_told_the_parameter_and_a_cli_user_the_flag(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match=r"^`bn_mode` must be 'train' or 'frozen'; got 'sometimes'\.$"):
        FinetuneConfig(bn_mode="sometimes").validate()
    result = invoke("finetune", tmp_path / "missing.vc.pt", "-o", tmp_path / "out.vc.pt", "--bn-mode", "sometimes")
    assert result.exit_code == 2
    message = error_message(result)
    assert "`" not in message and ("--bn-mode" in message or "missing.vc.pt" in message), message
