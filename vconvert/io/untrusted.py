"""Loading model files safely: every file vconvert reads is untrusted input.

The loading policy (docs/FORMAT.md §9):

- ``--arch package.module:function`` typed by the user is always allowed; the file is then a
  state_dict, read with ``torch.load(weights_only=True)`` and loaded with ``strict=True``.
- A pickled ``nn.Module`` whose classes all come from known model libraries (torch.nn, torchvision,
  timm, sample_models) is read with ``weights_only=True`` and exactly those classes allowlisted.
  The classes a file needs are listed *before* anything is imported, and a module outside the
  allowlist is never imported to resolve a name.
- Anything else would run code from the file: it loads only with ``trust=True`` (``--trust``).
- An arch string read back from a file is code to call: without ``trust=True`` it may only be a
  registered model builder with plain offline arguments (:mod:`vconvert.io.architectures`).
- A ``.vc.pt`` checkpoint holds plain data and tensors only, so it loads with ``weights_only=True``
  (:mod:`vconvert.io.format`).
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import pickletools
import stat
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn

from vconvert.errors import BadInputError, UntrustedCodeError, first_line, shown
from vconvert.io.architectures import (
    SAMPLES_PACKAGE,
    build_arch,
    is_shipped_samples,
    kwargs_depth_problem,
    normalise_arch,
    working_directory_importable,
)
from vconvert.io.budget import check_allocation
from vconvert.io.pickled_modules import MODULE_PACKAGES, RefusedPickle, allowed_global, load_pickled_modules

_KNOWN_LIBRARIES_TEXT = "torch.nn, torchvision's and timm's models and layers, sample_models"
# Zip members torch.save writes are stored, not compressed: a member that inflates more than this is hostile.
MAX_ZIP_INFLATION = 100
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
_MODULE_KEYS = ("model", "module", "net")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# The first pickle of a legacy-format torch.save file (after the protocol byte).
_LEGACY_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)


# --------------------------------------------------------------------------- base model spec
@dataclass
class BaseSpec:
    """How to rebuild the user's original model (stored in a ``.vc.pt`` as plain data).

    Exactly one of ``arch`` ("package.module:function", called with ``arch_kwargs``) and
    ``pickled`` (the bytes of the original ``torch.save(model)`` file) is set.
    """

    arch: str | None
    arch_kwargs: dict = field(default_factory=dict)
    pickled: bytes | None = None
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain data (str, dict, bytes, None) for a checkpoint that loads with ``weights_only=True``."""
        return {
            "arch": self.arch,
            "arch_kwargs": dict(self.arch_kwargs),
            "pickled": self.pickled,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BaseSpec:
        """Inverse of :meth:`to_dict`; a malformed spec (a damaged checkpoint) is a BadInputError."""
        if not isinstance(data, Mapping):
            raise BadInputError("The checkpoint's base-model spec is not a mapping: re-create the checkpoint.")
        arch, kwargs, pickled = data.get("arch"), data.get("arch_kwargs", {}), data.get("pickled")
        source = data.get("source", "")
        valid = (
            (arch is None or isinstance(arch, str))
            and isinstance(kwargs, dict)
            and all(isinstance(key, str) for key in kwargs)
            and (pickled is None or isinstance(pickled, bytes))
            and isinstance(source, str)
            and (arch is None) != (pickled is None)
            and kwargs_depth_problem(kwargs) is None
        )
        if not valid:
            raise BadInputError(
                "The checkpoint's base-model spec is malformed (it needs either an arch string or the pickled "
                "base model): re-create the checkpoint with vconvert compress."
            )
        return cls(arch=arch, arch_kwargs=dict(kwargs), pickled=pickled, source=source)


# --------------------------------------------------------------------------- reading torch files
def check_input_file(path: str | Path, what: str = "Model file") -> Path:
    """The path as a Path if it is an existing, non-empty regular file, else BadInputError."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{what} '{shown(path)}' does not exist: check the path.")
    if path.is_dir():
        raise BadInputError(f"{what} '{shown(path)}' is a directory, not a file: give the path of the file itself.")
    try:
        status = path.stat()
    except OSError as error:
        raise BadInputError(
            f"{what} '{shown(path)}' cannot be read ({error.strerror}): check its permissions."
        ) from error
    if not stat.S_ISREG(status.st_mode):  # a FIFO or device would block or never end
        raise BadInputError(f"{what} '{shown(path)}' is not a regular file (a pipe or device): give a saved file.")
    size = status.st_size
    if size == 0:
        raise BadInputError(f"{what} '{shown(path)}' is empty: it was probably not written completely, save it again.")
    if not os.access(path, os.R_OK):
        raise BadInputError(f"{what} '{shown(path)}' is not readable: check its permissions.")
    return path


@contextlib.contextmanager
def _opened(source: Path | bytes) -> Iterator[BinaryIO]:
    """A binary stream over a file or over bytes held in memory."""
    if isinstance(source, bytes):
        yield io.BytesIO(source)
    else:
        with open(source, "rb") as stream:
            yield stream


@dataclass
class TorchFile:
    """What the container of a torch.save file says before anything in it is unpickled."""

    kind: str  # "zip" (torch.save) or "legacy" (pre-1.6 torch.save)
    storage_bytes: dict[str, int] = field(default_factory=dict)  # zip: size of each data/<key> record


def _check_zip_members(members: list[zipfile.ZipInfo], label: str) -> None:
    """Refuse an archive whose members would inflate absurdly or, all together, past the memory budget,
    before any member is inflated (sizes from the central directory)."""
    for member in members:
        if member.compress_type != zipfile.ZIP_STORED and member.file_size > MAX_ZIP_INFLATION * max(
            member.compress_size, 1
        ):
            raise BadInputError(
                f"{label} holds a zip member that would inflate {member.file_size // max(member.compress_size, 1)}x "
                f"(torch.save stores its members uncompressed): the file is damaged or hostile."
            )
    check_allocation(sum(member.file_size for member in members), label)


def file_kind(source: Path | bytes, label: str) -> TorchFile:
    """The file's container, checked; BadInputError for anything that is not a torch.save file."""
    with _opened(source) as stream:
        head = stream.read(len(_LEGACY_MAGIC))
        stream.seek(0)
        if head.startswith(b"PK"):
            try:
                with zipfile.ZipFile(stream) as archive:
                    members = archive.infolist()
            except (zipfile.BadZipFile, OSError, ValueError) as error:
                raise BadInputError(
                    f"{label} is truncated or corrupt (its zip archive cannot be opened): copy or save it again."
                ) from error
            names = [member.filename for member in members]
            if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
                raise BadInputError(
                    f"{label} is a TorchScript archive, not a torch.save file: give the eager model's state_dict with "
                    "`arch` package.module:function instead."
                )
            if not any(name.endswith("/data.pkl") for name in names):
                raise BadInputError(f"{label} is a zip file but not a PyTorch file written by torch.save.")
            _check_zip_members(members, label)
            storages = {}
            for member in members:
                parts = member.filename.split("/")
                if len(parts) == 3 and parts[1] == "data":
                    storages[parts[2]] = member.file_size
            return TorchFile("zip", storages)
    if head[:1] == b"\x80" and head[2:] == _LEGACY_MAGIC[2:]:  # the pre-1.6 torch.save format
        return TorchFile("legacy")
    if head[:1] == b"\x08" or (isinstance(source, Path) and source.suffix.lower() == ".onnx"):  # ModelProto field 1
        raise BadInputError(
            f"{label} looks like an ONNX file, not a PyTorch file: pass the .vc.pt (or the PyTorch model) it was "
            "exported from; vconvert evaluate takes ONNX files."
        )
    raise BadInputError(f"{label} is not a PyTorch file (torch.save writes a zip archive): check the path.")


def _torch_default_safe_globals() -> set[str]:
    """Names torch's weights_only unpickler allows by default (private API; empty, hence stricter, if gone)."""
    try:
        from torch import _weights_only_unpickler

        names = set(_weights_only_unpickler._get_allowed_globals())
    except Exception:
        return set()
    return names | {name.replace("builtins.", "__builtin__.", 1) for name in names if name.startswith("builtins.")}


def _legacy_globals(source: Path | bytes) -> list[str]:
    """Globals named by a legacy-format torch.save file, found by scanning its opcodes (nothing runs).

    That format is four pickles in a row (magic number, protocol, system info, the object) followed by
    raw storages. A STACK_GLOBAL whose operands cannot be followed is reported as "<unknown>".
    """
    found: list[str] = []
    with _opened(source) as stream:
        for _ in range(4):
            memo: dict[int, Any] = {}
            strings: list[Any] = []
            last: Any = None
            for opcode, arg, _position in pickletools.genops(stream):
                name, pushed = opcode.name, None
                if name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif name == "STACK_GLOBAL":
                    if len(strings) >= 2 and isinstance(strings[-2], str) and isinstance(strings[-1], str):
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    else:
                        found.append("<unknown>")
                elif isinstance(arg, str) and ("UNICODE" in name or name.endswith("STRING")):
                    pushed = arg
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = last
                elif name == "MEMOIZE":
                    memo[len(memo)] = last
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed = memo.get(int(arg))
                if pushed is not None:
                    strings.append(pushed)
                if name not in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                    last = pushed
    safe = _torch_default_safe_globals()
    return [name for name in found if name not in safe]


def _module_packages() -> tuple[str, ...]:
    """The packages whose module classes a pickle may use: the shipped samples only when they are the ones
    ``import sample_models`` gives (not a folder of that name elsewhere on sys.path)."""
    if is_shipped_samples():
        return MODULE_PACKAGES
    return tuple(package for package in MODULE_PACKAGES if package != SAMPLES_PACKAGE)


def _untrusted_message(label: str, reason: str) -> str:
    return (
        f"{label} is a pickle that {reason}, so loading it would run code from the file (vconvert rebuilds pickled "
        f"models only from the module classes of {_KNOWN_LIBRARIES_TEXT}, the way torch.save writes them): pass "
        "`trust=True` if you trust the file, or save model.state_dict() instead and pass `arch` "
        "package.module:function."
    )


def _full_unpickle(source: Path | bytes, label: str) -> Any:
    """torch.load with pickle's own unpickler: runs whatever the file asks (only ever with ``trust``)."""
    try:
        with _opened(source) as stream, working_directory_importable():
            return torch.load(stream, map_location="cpu", weights_only=False)
    except AttributeError as error:
        if "__main__" in str(error):
            raise BadInputError(
                f"{label} was saved from a class defined in the script that saved it (in `__main__`), which no "
                "other program can import: move the class into a file of its own (e.g. mynet.py next to where you "
                "run vconvert) and save the model again, or save model.state_dict() and pass `arch` mynet:Net."
            ) from error
        raise _cannot_import(label, error) from error
    except ImportError as error:
        raise _cannot_import(label, error) from error
    except Exception as error:
        raise _unreadable(label, error) from error


def _cannot_import(label: str, error: BaseException) -> BadInputError:
    return BadInputError(
        f"{label} needs code that cannot be imported here ({first_line(error)}): its module must be installed or be "
        "a file in the folder you run vconvert from; or save model.state_dict() and pass `arch` "
        "package.module:function."
    )


def _unreadable(label: str, error: BaseException) -> BadInputError:
    return BadInputError(
        f"{label} could not be read ({type(error).__name__}: {first_line(error)}): it may be truncated or corrupt, "
        "save it again."
    )


def _load_torch_file(source: Path | bytes, label: str, *, trust: bool) -> Any:
    """Read a torch.save file under the trust policy (docs/FORMAT.md §9) and return the unpickled object.

    Plain data and tensors: torch's ``weights_only`` unpickler. Pickled modules of known libraries:
    :func:`~vconvert.io.pickled_modules.load_pickled_modules` (no constructor runs). Anything else, or
    a legacy-format pickled model: only with ``trust``, by a full unpickle.
    """
    container = file_kind(source, label)
    try:
        if container.kind == "zip":
            with _opened(source) as stream:
                needed = torch.serialization.get_unsafe_globals_in_checkpoint(stream)
        else:
            needed = _legacy_globals(source)
    except Exception as error:
        raise BadInputError(f"{label} is truncated or corrupt ({first_line(error)}): copy or save it again.") from error
    packages = _module_packages()
    refused = [name for name in dict.fromkeys(needed) if allowed_global(name, packages) is None]
    if refused and not trust:
        names = ", ".join(shown(name, 80) for name in refused[:3])
        more = f" and {len(refused) - 3} more" if len(refused) > 3 else ""
        raise UntrustedCodeError(_untrusted_message(label, f"uses {names}{more}"))
    if refused or (container.kind == "legacy" and needed):
        if not trust:  # a legacy file's modules carry source code that cannot be read without running it
            raise UntrustedCodeError(_untrusted_message(label, "is a pickled model in the pre-1.6 torch.save format"))
        return _full_unpickle(source, label)
    try:
        if not needed:  # plain data and tensors only
            with _opened(source) as stream:
                return torch.load(stream, map_location="cpu", weights_only=True)
        with _opened(source) as stream:
            data = stream.read()
        return load_pickled_modules(data, container.storage_bytes, packages)
    except RefusedPickle as error:
        if trust:
            return _full_unpickle(source, label)
        raise UntrustedCodeError(_untrusted_message(label, str(error))) from error
    except Exception as error:
        raise _unreadable(label, error) from error


def _is_state_dict(obj: Any) -> bool:
    """A mapping of str keys to tensors (``_extra_state`` entries may hold anything)."""
    if not isinstance(obj, Mapping) or not obj:
        return False
    if not all(isinstance(key, str) for key in obj):
        return False
    return all(isinstance(value, Tensor) or key.endswith("_extra_state") for key, value in obj.items())


def _strip_wrapper_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop a "module." (DataParallel/DDP) or "_orig_mod." (torch.compile) prefix shared by every key."""
    state = dict(state)
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if state and all(key.startswith(prefix) for key in state):
                state = {key[len(prefix) :]: value for key, value in state.items()}
                changed = True
    return state


def extract_state_dict(obj: Any) -> dict[str, Any] | None:
    """The state_dict inside what a file held, or None if there is none.

    Accepts a bare state_dict, a module, the wrappers ``{"state_dict": ...}``, ``{"model": ...}``,
    ``{"model_state_dict": ...}`` (also nested once more), and strips "module." / "_orig_mod." prefixes.
    """
    for _ in range(3):
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if _is_state_dict(obj):
            return _strip_wrapper_prefixes(obj)
        if not isinstance(obj, Mapping):
            return None
        inner = next((obj[key] for key in _STATE_DICT_KEYS if key in obj), None)
        if inner is None:
            return None
        obj = inner
    return None


def _extract_module(obj: Any) -> nn.Module | None:
    """The nn.Module a file held: the object itself or ``{"model": module, ...}``."""
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping):
        for key in _MODULE_KEYS:
            if isinstance(obj.get(key), nn.Module):
                return obj[key]
    return None


def _describe(obj: Any) -> str:
    return f"a {type(obj).__module__}.{type(obj).__qualname__}" if not isinstance(obj, Mapping) else "a dict"


def _load_state_dict_strict(model: nn.Module, state: Mapping[str, Any], label: str, arch: str) -> None:
    """``load_state_dict(strict=True)`` with a one-sentence error naming a few mismatched keys."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mis_shaped = [
        f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
        for key in expected
        if key in state
        and isinstance(state[key], Tensor)
        and isinstance(expected[key], Tensor)
        and state[key].shape != expected[key].shape
    ]
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped (file vs model)", mis_shaped)):
        if items:
            more = f", +{len(items) - 3} more" if len(items) > 3 else ""
            problems.append(f"{len(items)} {title}: {', '.join(items[:3])}{more}")
    if problems:
        raise BadInputError(
            f"The state_dict in {label} does not match `arch` {arch} ({'; '.join(problems)}): check `arch` and "
            "`arch_kwargs` (e.g. num_classes)."
        )
    try:
        model.load_state_dict(state, strict=True)
    except Exception as error:
        raise BadInputError(
            f"The state_dict in {label} does not load into `arch` {arch} ({first_line(error)}): check `arch` and "
            "`arch_kwargs`."
        ) from error


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    trust: bool = False,
) -> tuple[nn.Module, BaseSpec]:
    """Load the user's model (in eval mode) and the spec to rebuild it.

    With ``arch`` the network is built by that (user-typed, so always allowed) function and the file is
    a state_dict (common wrappers and "module." prefixes accepted), loaded with ``strict=True``.
    Without ``arch`` the file is a pickled nn.Module (``torch.save(model)``): classes from known model
    libraries load with ``weights_only=True``; anything else needs ``trust=True``.
    """
    path = check_input_file(path)
    label = f"Model file '{shown(path)}'"
    if arch is not None:
        kwargs = dict(arch_kwargs or {})
        model = build_arch(arch, kwargs, trust=trust, typed_by_user=True, origin=None)
        obj = _load_torch_file(path, label, trust=trust)
        state = extract_state_dict(obj)
        if state is None:
            raise BadInputError(f"{label} holds {_describe(obj)}, not a state_dict or model, so `arch` cannot use it.")
        _load_state_dict_strict(model, state, label, arch)
        spec = BaseSpec(arch=normalise_arch(arch), arch_kwargs=kwargs, pickled=None, source=str(path))
        return model.eval(), spec
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BadInputError(f"{label} cannot be read ({error.strerror}): check its permissions.") from error
    obj = _load_torch_file(data, label, trust=trust)
    model = _extract_module(obj)
    if model is None:
        if extract_state_dict(obj) is not None:
            raise BadInputError(
                f"{label} holds a state_dict (weights only), not a model: pass `arch` package.module:function "
                "(e.g. torchvision.models:resnet18) to say which network to build."
            )
        raise BadInputError(f"{label} holds {_describe(obj)}, not a PyTorch model (nn.Module) or a state_dict.")
    return model.eval(), BaseSpec(arch=None, arch_kwargs={}, pickled=data, source=str(path))


def build_base(spec: BaseSpec, *, trust: bool = False, origin: str | None = None) -> nn.Module:
    """Rebuild the original architecture from a spec read back from a checkpoint (eval mode).

    The arch string, being read from a file, must be a registered model builder with plain offline
    arguments (or ``trust``); a pickled base is unpickled under the same allowlist / ``trust`` policy as
    :func:`load_model`. ``origin`` names the file in messages (default: where the spec says the base
    came from). Weights are whatever the constructor or pickle gives; the caller loads its state_dict.
    """
    origin = origin or spec.source or "the checkpoint"
    if spec.arch is not None:
        model = build_arch(spec.arch, spec.arch_kwargs, trust=trust, typed_by_user=False, origin=origin)
        return model.eval()
    if spec.pickled is None:
        raise BadInputError("The checkpoint's base-model spec has neither an arch nor a pickled model: re-create it.")
    label = f"The pickled base model stored in the checkpoint (from '{shown(origin)}')"
    obj = _load_torch_file(spec.pickled, label, trust=trust)
    model = _extract_module(obj)
    if model is None:
        raise BadInputError(f"{label} holds {_describe(obj)}, not an nn.Module: re-create the checkpoint.")
    return model.eval()
