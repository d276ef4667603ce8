"""The ``.vc.pt`` container (docs/FORMAT.md §1-§2): a format tag, library versions and plain data and tensors
only, so that it loads with ``torch.load(weights_only=True)`` and nothing in it can run code.
"""

from __future__ import annotations

import collections
import pickle
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vconvert.errors import BadInputError, first_line, shown
from vconvert.io.files import atomic_save
from vconvert.io.untrusted import check_input_file, file_kind

CHECKPOINT_FORMAT = "vconvert.checkpoint/1"


# --------------------------------------------------------------------------- checkpoint format
def _versions() -> dict[str, str]:
    """Versions of the libraries that wrote a checkpoint."""
    import torchvision

    try:
        vconvert_version = version("vconvert")
    except PackageNotFoundError:
        vconvert_version = "unknown"
    return {"vconvert": vconvert_version, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__)}


# Exact types (a str subclass such as torch.__version__ pickles as its class); tensors may be subclasses.
_PLAIN_TYPES = (str, int, float, bool, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _check_plain(value: Any, where: str) -> None:
    """Raise TypeError if ``value`` holds anything ``torch.load(weights_only=True)`` would refuse."""
    if type(value) in (list, tuple):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
    elif type(value) in (dict, collections.OrderedDict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"checkpoint key {where}[{key!r}] must be a str or int")
            _check_plain(item, f"{where}[{key!r}]")
    elif type(value) not in _PLAIN_TYPES and not isinstance(value, Tensor):
        raise TypeError(f"checkpoint field {where} holds a {type(value).__name__}; only plain data and tensors")


def write_checkpoint(path: str | Path, payload: dict) -> None:
    """Write a ``.vc.pt``: ``payload`` (plain data and tensors) plus "format" and "versions", atomically."""
    data = dict(payload)
    data["format"] = CHECKPOINT_FORMAT
    data["versions"] = _versions()
    _check_plain(data, "checkpoint")
    atomic_save(data, path)


def read_checkpoint(path: str | Path) -> dict:
    """Read a ``.vc.pt`` with ``torch.load(weights_only=True)`` and check its format."""
    path = check_input_file(path, "Checkpoint")
    label = f"Checkpoint '{shown(path)}'"
    file_kind(path, label)
    try:
        with warnings.catch_warnings():  # a sparse tensor is refused later as a weight: no warning first
            warnings.filterwarnings("ignore", message="Validating sparse tensor invariants", category=UserWarning)
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise BadInputError(
            f"{label} is not a vconvert checkpoint (it holds pickled Python objects, not plain data): create one "
            "with vconvert compress."
        ) from error
    except Exception as error:
        raise BadInputError(f"{label} is truncated or corrupt ({first_line(error)}): write it again.") from error
    if not isinstance(data, dict) or "format" not in data:
        raise BadInputError(
            f"{label} is not a vconvert checkpoint (no format field): create one with vconvert compress."
        )
    found = data["format"]
    if found != CHECKPOINT_FORMAT:
        if isinstance(found, str) and found.startswith("vconvert.checkpoint/"):
            raise BadInputError(
                f"{label} is in format {found!r} but this vconvert reads {CHECKPOINT_FORMAT!r}: use the vconvert "
                "version that wrote it, or re-create it with vconvert compress."
            )
        described = f"'{shown(found, 80)}'" if isinstance(found, str) else f"a {type(found).__name__}"
        raise BadInputError(
            f"{label} is not a vconvert checkpoint (format {described}): create one with vconvert compress."
        )
    versions = data.get("versions")
    if not all(isinstance(key, str) for key in data) or not (
        isinstance(versions, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in versions.items())
    ):
        raise BadInputError(
            f"{label} is damaged (its fields must be named by strings and its versions field must map library "
            "names to version strings): write it again."
        )
    return data
