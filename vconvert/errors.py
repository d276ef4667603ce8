"""Named exceptions. Each carries the process exit code the CLI uses and a one-sentence message
that says what went wrong and what to do."""

from __future__ import annotations

from collections.abc import Iterable


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


SHOWN_LIMIT = 200  # characters of one value read from a file that a message shows
_SHORT_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escaped(character: str) -> str:
    """``character`` itself when a terminal shows it as text, else a Python-style escape: every C0/C1
    control (ESC, CR, LF, CSI ``\\x9b``, ...), DEL, and the other non-printables (format characters such
    as bidirectional overrides, line and paragraph separators, unassigned code points)."""
    if character.isprintable():
        return character
    if character in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[character]
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def shown(value: object, limit: int | None = SHOWN_LIMIT, tail: int = 0) -> str:
    """A value read from a file (a file name, a layer or class name, a note, an error's message) as text
    that is safe to print: control and other non-printable characters escaped (``\\x1b``, ``\\n``), so it
    can neither move the cursor, clear the screen nor start a line of its own, and at most ``limit``
    characters, cut with "..." (which keeps the last ``tail`` characters after it). Rich markup is left as
    it is: print the result as plain text (``markup=False`` or a ``rich.text.Text``)."""
    text = value if isinstance(value, str) else str(value)
    if limit is None:
        return "".join(map(_escaped, text))
    if len(text) <= limit:  # escaping only lengthens: a longer text is cut anyway
        escaped = "".join(map(_escaped, text))
        if len(escaped) <= limit:
            return escaped
    end = "".join(reversed(_fitting(reversed(text[-tail:]), min(tail, limit - 3)))) if tail > 0 else ""
    return "".join(_fitting(text[:limit], max(0, limit - 3 - len(end)))) + "..." + end


def _fitting(characters: Iterable[str], width: int) -> list[str]:
    """The escapes of ``characters`` in turn, as many as fit in ``width`` characters (none split)."""
    pieces, used = [], 0
    for character in characters:
        piece = _escaped(character)
        if used + len(piece) > width:
            break
        pieces.append(piece)
        used += len(piece)
    return pieces
