"""Checks on values read back from files (a ``.vc.pt``'s plan and metadata, an ONNX file's
``vconvert.*`` metadata): strict JSON-like types and bounds, so that a damaged or hostile file is
refused with one sentence before anything is allocated or run, never half-used.

Every check raises :class:`~vconvert.errors.BadInputError` whose message starts with ``where`` (the
file and the field) and returns the value in its canonical form (lists of ints or floats).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from vconvert.errors import BadInputError

MAX_SIDE = 4096  # pixels a side of an input image declared by a file
MAX_CHANNELS = 64  # input channels of an image model
MAX_BATCH = 65536  # the batch of a recorded example input (unused by vconvert beyond tracing)
MAX_INT = 2**63 - 1  # integers read from a file fit in int64
MAX_DEPTH = 32  # nesting of a mapping or list read from a file (vconvert writes at most ~8)
NORMALISATION_LIMIT = 1e6  # |mean| ≤ this, std from 1/this to this: a normalisation float32 images can take


def is_int(value: object) -> bool:
    """An int that is not a bool (JSON and pickles both tell them apart)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return is_int(value) or isinstance(value, float)


def check_int(value: object, where: str, low: int = 0, high: int = MAX_INT) -> int:
    if not is_int(value) or not low <= value <= high:
        bounds = f"≥ {low}" if high == MAX_INT else f"from {low} to {high}"
        raise BadInputError(f"{where} must be an integer {bounds}, not {_show(value)}: the file is damaged.")
    return int(value)


def check_float(value: object, where: str, *, positive: bool = False, finite: bool = True) -> float:
    ok = is_number(value) and (not finite or math.isfinite(value)) and (not positive or value > 0)
    if not ok:
        kind = "a positive finite number" if positive else "a finite number" if finite else "a number"
        raise BadInputError(f"{where} must be {kind}, not {_show(value)}: the file is damaged.")
    return float(value)


def check_str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise BadInputError(f"{where} must be a string, not {_show(value)}: the file is damaged.")
    return value


def check_mapping(value: object, where: str) -> dict[str, Any]:
    """A dict with str keys (returned as a plain dict)."""
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise BadInputError(f"{where} must be a mapping with string keys, not {_show(value)}: the file is damaged.")
    return dict(value)


def check_fields(value: object, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    """A mapping holding every ``required`` key, perhaps ``optional`` ones, and nothing else."""
    data = check_mapping(value, where)
    missing = [key for key in required if key not in data]
    unknown = [key for key in data if key not in required and key not in optional]
    if missing or unknown:
        problem = f"lacks {', '.join(missing)}" if missing else f"has unknown field(s) {', '.join(unknown[:3])}"
        raise BadInputError(f"{where} {problem}: the file is damaged or was written by another vconvert version.")
    return data


def check_int_list(
    value: object, where: str, length: int | None = None, low: int = 0, high: int = MAX_INT
) -> list[int]:
    if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
        count = f"{length} " if length is not None else ""
        raise BadInputError(f"{where} must be a list of {count}integers, not {_show(value)}: the file is damaged.")
    return [check_int(item, where, low, high) for item in value]


def check_input_shape(value: object, where: str, *, batch: bool = True) -> list[int]:
    """An image input shape N,C,H,W within :data:`MAX_BATCH`, :data:`MAX_CHANNELS` and :data:`MAX_SIDE`
    (``batch`` False: the first entry may be None, a dynamic batch)."""
    if not batch and isinstance(value, (list, tuple)) and len(value) == 4 and value[0] is None:
        return [None, *check_input_shape([1, *value[1:]], where)[1:]]  # type: ignore[list-item]
    ok = isinstance(value, (list, tuple)) and len(value) == 4 and all(is_int(v) and v >= 1 for v in value)
    if not ok:
        raise BadInputError(f"{where} must be four positive integers N,C,H,W, not {_show(value)}: the file is damaged.")
    n, c, h, w = (int(v) for v in value)  # type: ignore[union-attr]
    if n > MAX_BATCH or c > MAX_CHANNELS or max(h, w) > MAX_SIDE:
        raise BadInputError(
            f"{where} is {[n, c, h, w]}, beyond what vconvert accepts from a file (batch ≤ {MAX_BATCH}, channels ≤ "
            f"{MAX_CHANNELS}, sides ≤ {MAX_SIDE} pixels): the file is damaged."
        )
    return [n, c, h, w]


def check_normalisation(value: object, where: str, *, std: bool) -> float:
    """A mean (``std`` False: |value| ≤ :data:`NORMALISATION_LIMIT`) or a std (from 1/limit to the limit):
    bounds that float32 holds with room to spare, so that neither rounds to 0 or overflows when an image is
    normalised (a std of 1e-320 is 0 in float32, a mean of 1e308 is infinite)."""
    low, high = (1 / NORMALISATION_LIMIT, NORMALISATION_LIMIT) if std else (-NORMALISATION_LIMIT, NORMALISATION_LIMIT)
    if not (is_number(value) and math.isfinite(value) and low <= value <= high):
        raise BadInputError(
            f"{where} must hold numbers from {low:g} to {high:g} (a normalisation float32 images can take), not "
            f"{_show(value)}: the file is damaged."
        )
    return float(value)


def check_plain(value: object, where: str, *, finite: bool = True, max_depth: int = MAX_DEPTH) -> None:
    """Refuse a JSON-like value read from a file (mappings, lists, scalars; tensors are leaves) that nests
    deeper than ``max_depth`` (later stages walk it recursively: copying, writing, printing) or, with
    ``finite``, holds a NaN or infinite float anywhere. Walked without recursion; the message names the
    first key under ``where``."""
    pending: list[tuple[object, int, str]] = [(value, 0, where)]
    while pending:
        item, depth, at = pending.pop()
        if isinstance(item, (Mapping, list, tuple)):
            if depth >= max_depth:
                raise BadInputError(
                    f"{at} nests deeper than {max_depth} levels (vconvert writes a few): the file is damaged."
                )
            if isinstance(item, Mapping):
                for key, child in item.items():
                    name = f"{where}'s {_show(key)}" if depth == 0 else at  # the top-level field
                    pending.extend([(key, depth + 1, name), (child, depth + 1, name)])
            else:
                pending.extend((child, depth + 1, at) for child in item)
        elif finite and isinstance(item, float) and not math.isfinite(item):
            raise BadInputError(f"{at} holds a {item!r} value: the file is damaged.")


def check_image_size(value: object, where: str) -> list[int]:
    """Height and width, each from 1 to :data:`MAX_SIDE`."""
    return check_int_list(value, where, 2, 1, MAX_SIDE)


def check_preprocessing(value: object, where: str, channels: int | None = None) -> dict | None:
    """``{"mean", "std", "input_size"}`` (None stays None): a finite mean and a positive std per input
    channel (``channels`` when known) and an image size."""
    if value is None:
        return None
    data = check_fields(value, where, ("mean", "std"), ("input_size",))
    stats = {}
    for key in ("mean", "std"):
        items = data[key]
        if not isinstance(items, (list, tuple)) or not 1 <= len(items) <= MAX_CHANNELS:
            raise BadInputError(f"{where}'s {key} must be a list of numbers, not {_show(items)}: the file is damaged.")
        stats[key] = [check_normalisation(item, f"{where}'s {key}", std=key == "std") for item in items]
    if len(stats["mean"]) != len(stats["std"]) or (channels is not None and len(stats["mean"]) != channels):
        expected = f"{channels} (the model's input channels)" if channels is not None else "the same count"
        raise BadInputError(
            f"{where} holds {len(stats['mean'])} mean and {len(stats['std'])} std values, not {expected}: the file "
            "is damaged."
        )
    result: dict[str, Any] = {**data, **stats}
    if "input_size" in data:
        result["input_size"] = check_image_size(data["input_size"], f"{where}'s input_size")
    return result


def _show(value: object) -> str:
    """A short description of a wrong value for a message."""
    text = repr(value) if isinstance(value, (str, int, float, bool, type(None))) else f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def all_finite(tensors: list) -> bool:
    """Whether every floating-point value of ``tensors`` is finite (one fused pass per dtype)."""
    import torch

    tensors = [tensor.detach() for tensor in tensors if tensor.numel()]
    if not tensors:
        return True
    return math.isfinite(float(torch.nn.utils.get_total_norm(tensors, float("inf"))))


def check_like(template: object, value: object, where: str) -> None:
    """Refuse ``value`` (read from a file) unless it has the structure of ``template`` (what this run
    itself would write): the same mapping keys and list lengths, tensors of the same shape and dtype
    (finite when floating point), and scalars of the same kind (finite floats)."""
    import torch

    if isinstance(template, torch.Tensor):
        ok = (
            isinstance(value, torch.Tensor)
            and value.layout == torch.strided
            and value.shape == template.shape
            and value.dtype == template.dtype
            and (not value.is_floating_point() or all_finite([value]))
        )
        expected = f"finite {template.dtype} values of shape {list(template.shape)}"
    elif isinstance(template, Mapping):
        ok = isinstance(value, Mapping) and set(value) == set(template)
        expected = f"a mapping of {', '.join(map(str, list(template)[:4]))}{'...' if len(template) > 4 else ''}"
    elif isinstance(template, (list, tuple)):
        ok = isinstance(value, (list, tuple)) and len(value) == len(template)
        expected = f"a list of {len(template)}"
    elif isinstance(template, bool) or template is None or isinstance(template, str):
        ok = type(value) is type(template) or (template is None and isinstance(value, (bool, int, float, str)))
        expected = f"a {type(template).__name__}"
    elif is_int(template):
        ok, expected = is_int(value), "an integer"
    elif isinstance(template, float):
        ok, expected = is_number(value) and math.isfinite(value), "a finite number"
    else:
        ok, expected = True, ""
    if not ok:
        raise BadInputError(f"{where} is damaged (it should hold {expected}, not {_show(value)}).")
    if isinstance(template, Mapping):
        for key, item in template.items():
            check_like(item, value[key], f"{where}[{key!r}]")  # type: ignore[index]
    elif isinstance(template, (list, tuple)):
        for index, (item, got) in enumerate(zip(template, value, strict=True)):  # type: ignore[arg-type]
            check_like(item, got, f"{where}[{index}]")
