"""What every vconvert command shares: consoles, error handling, option types and parsers."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.segment import Segment
from rich.text import Text

from vconvert.errors import BadInputError, VConvertError, VConvertWarning, shown

_RAW_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 but tab and newline, DEL, C1


class SafeConsole(Console):
    """A rich Console that never writes a control character that is part of the text it prints: one a command
    did not pass through :func:`shown` (ESC, CSI, ...) comes out escaped. The escape codes rich itself writes
    (styles, cursor moves of progress bars) are not text and pass unchanged."""

    def _render_buffer(self, buffer: Iterable[Segment]) -> str:
        return super()._render_buffer(
            Segment(_RAW_CONTROL.sub(lambda m: shown(m.group()), text), style, control)
            if not control and _RAW_CONTROL.search(text)
            else Segment(text, style, control)
            for text, style, control in buffer
        )


# Piped to a file or another program, rich would wrap at 80 columns: tables lose columns and reasons split
# mid-sentence. Wide lines suit files; COLUMNS still wins when set.
PIPED_WIDTH = 240


def _width(stream) -> int | None:
    piped = not (hasattr(stream, "isatty") and stream.isatty())
    return PIPED_WIDTH if piped and "COLUMNS" not in os.environ else None


console = SafeConsole(width=_width(sys.stdout))
error_console = SafeConsole(stderr=True, width=_width(sys.stderr))
MIN_IMAGE_SIDE, MAX_IMAGE_SIDE = 4, 4096
F = TypeVar("F", bound=Callable)


# Library messages name the parameters of the Python API in backticks (`bn_mode`, `trust=True`); the command
# line shows its flags instead. Every option's flag is "--" + its parameter name with dashes, except these.
FLAG_FOR_PARAMETER = {"feature_weight": "--feature-distill", "compare_original": "--compare"}
_PARAMETER = re.compile(r"(?<!`)`([a-z][a-z0-9_]*)(?:=True)?`(?!`)")


def as_flags(text: str) -> str:
    """``text`` with each parameter named in backticks replaced by its command-line flag."""
    return _PARAMETER.sub(lambda m: FLAG_FOR_PARAMETER.get(m.group(1), "--" + m.group(1).replace("_", "-")), text)


# What a message shows of a file (names, notes, other libraries' errors) is escaped and cut where it is
# printed: one line of plain text (no control characters, no rich markup), its end (the advice) kept.
MESSAGE_LIMIT, MESSAGE_TAIL = 600, 200


def one_line(text: str) -> str:
    """A library message as the CLI prints it: flags for parameters, control characters escaped, at most
    ``MESSAGE_LIMIT`` characters (cut in the middle)."""
    return shown(as_flags(text), MESSAGE_LIMIT, tail=MESSAGE_TAIL)


def labelled(label: str, style: str, text: str) -> Text:
    """``label`` in ``style``, then ``text`` as plain text (never read as rich markup)."""
    return Text.assemble((label, style), " ", one_line(text))


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Show each VConvertWarning (once) as one "warning:" line on stderr; other warnings as Python does."""
    with warnings.catch_warnings():
        show_other = warnings.showwarning
        already_shown: set[str] = set()  # Python's own "once" forgets whenever a library changes the filters

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            if issubclass(category, VConvertWarning):
                if str(message) not in already_shown:
                    already_shown.add(str(message))
                    error_console.print(labelled("warning:", "bold yellow", str(message)), soft_wrap=True)
            else:  # other libraries' warnings as Python shows them, their message escaped when it must be
                text = shown(message, MESSAGE_LIMIT, tail=MESSAGE_TAIL)
                show_other(message if text == str(message) else text, category, filename, lineno, file, line)

        warnings.showwarning = show
        warnings.simplefilter("default", VConvertWarning)
        yield


class _ConsoleLines(logging.Handler):
    """vconvert's info lines (what a stage feeds the model, and from where) as plain lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        error_console.print(Text(one_line(record.getMessage())), soft_wrap=True)


@contextlib.contextmanager
def info_lines() -> Iterator[None]:
    logger = logging.getLogger("vconvert")
    handler, level = _ConsoleLines(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def explained_errors(command: F) -> F:
    """Turn VConvertError into one sentence on stderr and its exit code (a traceback only with --debug);
    VConvertWarning shows as one line, and so does each info line of the "vconvert" logger."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            with one_line_warnings(), info_lines():
                return command(*args, **kwargs)
        except VConvertError as error:
            if kwargs.get("debug"):
                raise
            error_console.print(labelled("error:", "bold red", str(error)), soft_wrap=True)
            raise typer.Exit(error.exit_code) from None

    return run  # type: ignore[return-value]


# --------------------------------------------------------------------------- option parsing
def parse_floats(text: str, option: str, count: int | None = None) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BadInputError(f"{option} must be comma-separated numbers, got {text!r}.") from None
    if count is not None and len(values) != count:
        raise BadInputError(f"{option} needs {count} comma-separated numbers, got {text!r}.")
    return values


def parse_shape(text: str) -> list[int]:
    try:
        shape = [int(part) for part in text.split(",")]
    except ValueError:
        raise BadInputError(f"--input-shape must be comma-separated integers like 1,3,224,224, got {text!r}.") from None
    if len(shape) != 4 or min(shape) < 1:
        raise BadInputError(f"--input-shape must be four positive integers N,C,H,W, got {text!r}.")
    if min(shape[2:]) < MIN_IMAGE_SIDE or max(shape[2:]) > MAX_IMAGE_SIDE or shape[1] > 64:
        raise BadInputError(
            f"--input-shape {text!r} is not an image a CNN takes: height and width must be {MIN_IMAGE_SIDE} to "
            f"{MAX_IMAGE_SIDE} pixels and channels at most 64 (e.g. 1,3,32,32 or 1,3,224,224)."
        )
    return shape


def parse_kwargs(text: str | None) -> dict:
    if not text:
        return {}
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadInputError(
            f"--arch-kwargs is not valid JSON ({error.msg}); write it like '{{\"num_classes\": 10}}'."
        ) from None
    if not isinstance(kwargs, dict):
        raise BadInputError("--arch-kwargs must be a JSON object, like '{\"num_classes\": 10}'.")
    return kwargs


def parse_preprocessing(mean: str | None, std: str | None, shape: list[int], required: bool) -> dict | None:
    """Input normalisation as {"mean", "std", "input_size"}; ImageNet's for 3 channels when not given."""
    channels = shape[1]
    if mean is None and std is None:
        if channels != 3:
            if required:
                raise BadInputError(f"The model takes {channels} input channels: pass --mean and --std for them.")
            return None
        from vconvert.data.datasets import IMAGENET_MEAN, IMAGENET_STD  # the command's own data needs torch anyway

        return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "input_size": shape[2:]}
    if mean is None or std is None:
        raise BadInputError("Pass --mean and --std together.")
    return {
        "mean": parse_normalisation(mean, "--mean", channels),
        "std": parse_normalisation(std, "--std", channels),
        "input_size": shape[2:],
    }


def parse_normalisation(text: str, option: str, channels: int | None = None) -> list[float]:
    """``--mean`` or ``--std`` as floats on the 0-1 scale vconvert reads images at: values on the 0-255 scale
    (any above 1, e.g. 125,123,114) are refused with the fix, and so are a std that is not positive and NaN."""
    values = parse_floats(text, option, channels)
    if any(value > 1 for value in values):
        scaled = ",".join(f"{value / 255:.4g}" for value in values)
        raise BadInputError(
            f"{option} {text} looks like the 0-255 scale, but vconvert reads images as 0-1: divide by 255 "
            f"({option} {scaled})."
        )
    lowest = 1e-6 if option == "--std" else -1.0
    if not all(lowest <= value <= 1 for value in values):
        raise BadInputError(f"{option} must be numbers from {lowest:g} to 1 (images are read as 0-1), got {text!r}.")
    return values


def fitting_progress(progress: Progress, description: str) -> Callable[[int, int, str], None]:
    task = progress.add_task(description, total=None)

    def update(done: int, total: int, name: str) -> None:
        progress.update(task, completed=done, total=total, description=f"{description} {name}")

    return update


def epoch_progress(epochs: int, enabled: bool = True) -> tuple[Progress, Callable[[int, int, dict], None]]:
    """A progress bar for training epochs and the callback that ``finetune`` feeds it.

    On a terminal: a live bar (labelled "preparing" until the first step). Otherwise (a log file, a
    pipe, CI): a plain line on stderr about every tenth of an epoch, flushed at once.
    """
    live = enabled and error_console.is_terminal
    progress = Progress(
        TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=error_console,
        transient=True,
        disable=not live,
    )
    task = progress.add_task("train", total=None, epoch=1, epochs=epochs, status="preparing data and teacher")

    def on_step(step: int, steps: int, info: dict) -> None:
        if live:
            progress.update(
                task, completed=step, total=steps, epoch=info["epoch"], epochs=info.get("epochs", epochs),
                status=f"loss {info['loss']:.3f}",
            )  # fmt: skip
        elif enabled and (step == 1 or step == steps or step % max(1, steps // 10) == 0):
            total = info.get("epochs", epochs)  # a resumed run's own count
            error_console.print(f"epoch {info['epoch']}/{total} step {step}/{steps} loss {info['loss']:.3f}")
            error_console.file.flush()

    return progress, on_step


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=error_console,
        transient=True,
        disable=not error_console.is_terminal,
    )


# --------------------------------------------------------------------------- shared options
FileArg = Annotated[Path, typer.Argument(help="A model file: a pickled nn.Module, or a state_dict with --arch.")]
ArchOpt = Annotated[
    str | None,
    typer.Option("--arch", help="package.module:function that builds the network; FILE is then its state_dict."),
]
ArchKwargsOpt = Annotated[
    str | None, typer.Option("--arch-kwargs", help="JSON keyword arguments for --arch, e.g. '{\"num_classes\": 10}'.")
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust",
        help="Run code the file chooses: unpickle classes outside torch.nn/torchvision/timm/sample_models, and "
        "build an arch string read from a .vc.pt that is not a registered model builder.",
        metavar="",
    ),
]
InputShapeOpt = Annotated[str, typer.Option("--input-shape", help="Example input N,C,H,W used to trace the model.")]
ModeOpt = Annotated[str, typer.Option("--mode", help="learned | spatial | channel | spatial+channel.")]
SecondaryOpt = Annotated[
    int,
    typer.Option(
        "--secondary", "-s", help="Secondary filters per primary (learned/channel); 1: dense, below 8 bits only."
    ),
]
ChannelWindowOpt = Annotated[
    int | None, typer.Option("--channel-window", help="Channels per primary filter in the channel modes.")
]
ChannelStrideOpt = Annotated[int, typer.Option("--channel-stride", help="Channel stride g of the channel window.")]
MaskSharingOpt = Annotated[
    str, typer.Option("--mask-sharing", help="per-filter (own mask per secondary) | shared (per layer).")
]
TargetRatioOpt = Annotated[
    float | None,
    typer.Option("--target-ratio", help="Pick per-layer settings so the whole model's stored size shrinks by R."),
]
ConvertFirstOpt = Annotated[
    bool, typer.Option("--convert-first", help="Also convert the stem (the first conv).", metavar="")
]
MinParamsOpt = Annotated[int, typer.Option("--min-params", help="Skip convs with fewer weights than this.")]
SkipOpt = Annotated[
    list[str] | None, typer.Option("--skip", help="Skip convs whose name matches this regex (repeatable).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.", metavar="")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.", metavar="")]


def _apply_memory_budget(gb: float | None) -> float | None:
    """Set the process's memory budget from --memory-budget (None: the default) as the command starts."""
    from vconvert.io.budget import set_memory_budget

    try:
        set_memory_budget(gb)
    except BadInputError as error:
        raise typer.BadParameter(as_flags(str(error))) from None
    return gb


MemoryBudgetOpt = Annotated[
    float | None,
    typer.Option(
        "--memory-budget",
        help="GB that a file may make vconvert allocate (shapes, plans, batches are sized first and refused "
        "beyond it). Default: $VCONVERT_MEMORY_BUDGET, else half the RAM.",
        callback=_apply_memory_budget,
        metavar="GB",
    ),
]

DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="A folder with train/<class>/ and val/<class>/ (or test/) images, or 'digits' (scikit-learn's, for "
        "the 1-channel shipped sample). Default: the data a .vc.pt records (its fine-tuning data or "
        "--calib-data folder), when it exists here.",
    ),
]


def check_weight_bits(bits: int | None) -> None:
    """The CLI offers primaries of 2 to 8 bits, as the library (each stored at its width in int8 files)."""
    from vconvert.nn.quantize import WEIGHT_BITS

    if bits is not None and bits not in WEIGHT_BITS:
        raise BadInputError(f"--weight-bits must be an integer from 2 to 8; got {bits}.")
