"""Named exceptions. Each carries the process exit code the CLI uses and a one-sentence message
that says what went wrong and what to do."""

from __future__ import annotations


class VConvertError(Exception):
    """Base class: a failure vconvert explains to the user instead of showing a traceback."""

    exit_code = 2


class VConvertWarning(UserWarning):
    """Something vconvert worked around and the user should know (the CLI shows it as one line)."""


class BadInputError(VConvertError):
    """Bad usage or bad input (a missing file, a wrong option, a model vconvert cannot read): exit 2."""

    exit_code = 2


class UntrustedCodeError(BadInputError):
    """Loading would run code from a file (an unknown pickled class, an arch string read from a file)."""


class CheckFailedError(VConvertError):
    """A verification failed (e.g. ONNX parity): exit 1."""

    exit_code = 1


class MissingCalibrationError(BadInputError):
    """Int8 quantization was asked for without calibration images (none given, none recorded)."""


def first_line(error: BaseException, limit: int | None = 160) -> str:
    """The first line of an exception's message (its type name when empty), cut to ``limit`` characters
    with "..." so that it fits in a one-sentence error."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    if limit is None or len(line) <= limit:
        return line
    return line[: limit - 3] + "..."
