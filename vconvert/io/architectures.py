"""Model builders named by an arch string ("package.module:function"): what one may name, and building it
offline (docs/FORMAT.md §9).

An arch the user typed, or one read from a trusted file, is any importable callable. An arch read back
from a file without ``trust=True`` is code chosen by that file: it may only be a registered model builder
(torchvision's and timm's ``list_models()``, the shipped samples' ``MODEL_BUILDERS``, the samples found by
their installed location) with plain JSON keyword arguments that name no file, URL or pretrained weights,
and no module outside torchvision.models, timm and the shipped samples is imported to check it. A package
prefix is not a boundary. Download parameters a builder defaults to weights are always passed as "none".
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from vconvert.errors import BadInputError, UntrustedCodeError, first_line, shown

# Keyword arguments of a model builder that load weights from a file or the network: never from a file.
FILE_ARCH_REFUSED_KWARGS = frozenset(
    {
        "weights",
        "weights_backbone",
        "pretrained",
        "pretrained_backbone",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "pretrained_strict",
        "checkpoint_path",
        "cache_dir",
        "file",
        "url",
        "model_dir",
    }
)
# Builder parameters that download weights when left at their default: always passed as "none" unless the user
# typed a value (torchvision's detection/segmentation builders default `weights_backbone` to ImageNet weights).
DOWNLOAD_PARAMETERS = {"weights": None, "weights_backbone": None, "pretrained": False, "pretrained_backbone": False}
SAMPLES_PACKAGE = "sample_models"
_ARCH_PATTERN = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*(?::[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)?$")


# --------------------------------------------------------------------------- arch strings
def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether dotted ``name`` is one of ``prefixes`` or inside one of them (component-wise)."""
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def _split_arch(spec: str, label: str = "`arch`") -> tuple[str, str]:
    """ "pkg.mod:fn" or "pkg.mod.fn" -> ("pkg.mod", "fn"); ``label`` names the arch in messages."""
    spec = spec.strip()
    if not _ARCH_PATTERN.match(spec) or ("." not in spec and ":" not in spec):
        raise BadInputError(
            f"{label} '{shown(spec)}' is not of the form package.module:function (e.g. torchvision.models:resnet18)."
        )
    if ":" in spec:
        module_name, attribute = spec.split(":", 1)
    else:
        module_name, attribute = spec.rsplit(".", 1)
    return module_name, attribute


def shipped_samples_folder() -> Path:
    """Where the sample models shipped with vconvert are installed (the folder next to the package)."""
    return Path(__file__).resolve().parents[2] / SAMPLES_PACKAGE


def is_shipped_samples() -> bool:
    """Whether ``import sample_models`` gives the shipped samples, not a folder of that name elsewhere on sys.path.

    Decided without running the package: ``find_spec`` of a top-level name only searches sys.path.
    """
    expected = shipped_samples_folder() / "__init__.py"
    loaded = sys.modules.get(SAMPLES_PACKAGE)
    if loaded is not None:
        origin = getattr(loaded, "__file__", None)
    else:
        try:
            found = importlib.util.find_spec(SAMPLES_PACKAGE)
        except (ImportError, ValueError):
            return False
        origin = found.origin if found is not None else None
    return origin is not None and Path(origin).resolve() == expected


def _import_under_trusted(module_name: str) -> ModuleType | None:
    """Import ``module_name`` if it is inside torchvision.models, timm or the shipped samples, else None."""
    if _under(module_name, (SAMPLES_PACKAGE,)) and not is_shipped_samples():
        return None
    if not _under(module_name, ("torchvision.models", "timm", SAMPLES_PACKAGE)):
        return None
    try:
        return importlib.import_module(module_name)
    except Exception:
        return None


def _registered_name(module_name: str, attribute: str, kwargs: Mapping[str, Any]) -> str | None:
    """The registry name of the model builder an arch string read from a file names, or None.

    Registered builders: torchvision's ``list_models()``, timm's ``list_models()`` and
    :data:`sample_models.MODEL_BUILDERS` of the shipped samples; also ``get_model`` /
    ``create_model`` when their name argument is registered. Identity, not the name, decides: the
    resolved object must be the very function the registry holds.
    """
    if attribute.startswith("_") or "." in attribute:
        return None
    module = _import_under_trusted(module_name)
    obj = getattr(module, attribute, None) if module is not None else None
    if obj is None:
        return None
    if _under(module_name, ("torchvision.models",)):
        import torchvision.models as tv_models

        if obj is tv_models.get_model:
            name = kwargs.get("name")
            return name if isinstance(name, str) and name in tv_models.list_models() else None
        return next((n for n in tv_models.list_models() if tv_models.get_model_builder(n) is obj), None)
    if _under(module_name, ("timm",)):
        import timm

        if obj is timm.create_model:
            name = kwargs.get("model_name")
            return name if isinstance(name, str) and timm.is_model(name) else None
        name = getattr(obj, "__name__", "")
        return name if timm.is_model(name) and timm.models.model_entrypoint(name) is obj else None
    samples = importlib.import_module(SAMPLES_PACKAGE)
    for entry in getattr(samples, "MODEL_BUILDERS", ()):
        sub, _, function = entry.partition(":")
        builder = getattr(importlib.import_module(f"{SAMPLES_PACKAGE}.{sub}"), function)
        if builder is obj:
            return f"{SAMPLES_PACKAGE}.{entry}"
    return None


def _looks_like_path(value: str) -> bool:
    """A string that could name a file or a URL: it has a separator, a home or drive prefix, or exists here."""
    if any(mark in value for mark in ("/", "\\", "~")) or re.match(r"^[A-Za-z]:", value):
        return True
    try:
        return value in (".", "..") or os.path.lexists(value)
    except (OSError, ValueError):
        return True


MAX_KWARGS_DEPTH = 32


def kwargs_depth_problem(value: Any, limit: int = MAX_KWARGS_DEPTH) -> str | None:
    """Why ``value`` (JSON-like data read from a file) is nested too deeply to walk, or None; iterative, so a
    hostile depth never reaches Python's recursion limit."""
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if depth > limit:
            return f"it is nested more than {limit} levels deep"
        if isinstance(item, dict):
            pending.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend((child, depth + 1) for child in item)
    return None


def _file_kwargs_problem(value: Any, where: str = "") -> str | None:
    """Why keyword arguments read from a file are not plain, offline JSON data (None if they are)."""
    if (problem := kwargs_depth_problem(value)) is not None:
        return problem
    if isinstance(value, bool) or value is None or isinstance(value, (int, float)):
        return None
    if isinstance(value, str):
        return (
            f"{where or 'a value'} = '{shown(value, 80)}' looks like a path or URL" if _looks_like_path(value) else None
        )
    if isinstance(value, list):
        return next((p for i, v in enumerate(value) if (p := _file_kwargs_problem(v, f"{where}[{i}]"))), None)
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{where or 'a key'} is not a string"
            if key in FILE_ARCH_REFUSED_KWARGS:
                return f"'{shown(key, 80)}' loads weights or reaches the network"
            if problem := _file_kwargs_problem(item, f"{where}.{key}" if where else key):
                return problem
        return None
    return f"{where or 'a value'} is a {type(value).__name__}, not JSON data"


def _untrusted_arch(spec: str, where: str, why: str) -> UntrustedCodeError:
    return UntrustedCodeError(
        f"The architecture '{shown(spec)}'{where} {why}, so building it would run code chosen by that file: pass "
        "`trust=True` if you trust the file (you do if you compressed it yourself with that `arch`)."
    )


def resolve_arch(
    spec: str,
    *,
    trust: bool,
    typed_by_user: bool,
    origin: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> Callable[..., nn.Module]:
    """Turn "package.module:function" (or "package.module.function") into the callable it names.

    An arch the user typed (``typed_by_user``) or one from a trusted file is any importable callable.
    An arch read back from a file without ``trust`` may only be a registered model builder
    (:func:`_registered_name`) called with ``kwargs`` that are plain JSON data naming no file, URL or
    pretrained weights (:data:`FILE_ARCH_REFUSED_KWARGS`); else :class:`UntrustedCodeError`, and no
    module outside torchvision.models, timm and the shipped samples is imported. ``origin`` names
    that file in messages. Import failures, a missing attribute or an object that is not callable
    raise :class:`BadInputError`.
    """
    where = f" recorded in {shown(origin)}" if origin else ""
    label = "`arch`" if typed_by_user else "The arch"
    module_name, attribute = _split_arch(spec, label)
    if not typed_by_user and not trust:
        if _registered_name(module_name, attribute, kwargs or {}) is None:
            raise _untrusted_arch(
                spec, where, "is not a registered model builder of torchvision, timm or vconvert's sample models"
            )
        if problem := _file_kwargs_problem(dict(kwargs or {})):
            raise _untrusted_arch(spec, where, f"comes with arguments that are not plain offline data ({problem})")
    try:
        module = _import_from_here_too(module_name)
    except Exception as error:
        raise BadInputError(
            f"{label} '{shown(spec)}'{where} does not import ({type(error).__name__}: {first_line(error)}): check the "
            "spelling, that the package is installed, or run vconvert in the folder that holds the module."
        ) from error
    obj: Any = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise BadInputError(
                f"{label} '{shown(spec)}'{where}: module '{shown(module_name)}' has no attribute '{shown(attribute)}'; "
                "check the function name."
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise BadInputError(
            f"{label} '{shown(spec)}'{where} names a {type(obj).__name__}, not a function or class that builds an "
            "nn.Module."
        )
    return obj


@contextlib.contextmanager
def working_directory_importable() -> Iterator[None]:
    """Put the working directory on ``sys.path`` (if it is not there) for the duration: code the user chose
    (a typed arch, a pickle loaded with ``trust``) may live in a file next to where vconvert runs."""
    here = os.getcwd()
    if here in sys.path or "" in sys.path:
        yield
        return
    sys.path.insert(0, here)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(here)


def _import_from_here_too(module_name: str) -> ModuleType:
    """Import ``module_name``; a top-level module that is not installed is also looked up in the working
    directory, as ``python -m`` and other Python command-line tools do (only for archs the user chose)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name.split(".")[0]:
            raise
    with working_directory_importable():
        return importlib.import_module(module_name)


def _downloading_function(builder: Callable[..., Any], kwargs: Mapping[str, Any]) -> Callable[..., Any]:
    """The function whose parameters decide downloads: the registered builder behind torchvision's get_model."""
    if getattr(builder, "__module__", "").startswith("torchvision.models") and builder.__name__ == "get_model":
        import torchvision.models as tv_models

        name = kwargs.get("name")
        if isinstance(name, str) and name in tv_models.list_models():
            return tv_models.get_model_builder(name)
    return builder


def offline_kwargs(builder: Callable[..., Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` plus every download parameter the builder takes (:data:`DOWNLOAD_PARAMETERS`) set to "none"
    where ``kwargs`` does not set it, so that no default (e.g. ``weights_backbone``) reaches the network."""
    try:
        parameters = inspect.signature(_downloading_function(builder, kwargs)).parameters
    except (TypeError, ValueError):
        return dict(kwargs)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    extra = {
        name: value
        for name, value in DOWNLOAD_PARAMETERS.items()
        if name not in kwargs and (name in parameters or (takes_any and name == "pretrained" and _is_timm(builder)))
    }
    return {**kwargs, **extra}


def _is_timm(builder: Callable[..., Any]) -> bool:
    return getattr(builder, "__module__", "").split(".")[0] == "timm"


def normalise_arch(spec: str) -> str:
    """Canonical "package.module:function" form of an arch string."""
    module_name, attribute = _split_arch(spec)
    return f"{module_name}:{attribute}"


def build_arch(
    spec: str, kwargs: Mapping[str, Any], *, trust: bool, typed_by_user: bool, origin: str | None
) -> nn.Module:
    """Resolve ``spec`` and call it with ``kwargs``; the result must be an nn.Module."""
    if not isinstance(kwargs, Mapping) or not all(isinstance(key, str) for key in kwargs):
        raise BadInputError("`arch_kwargs` must be a JSON object with string keys, e.g. '{\"num_classes\": 10}'.")
    builder = resolve_arch(spec, trust=trust, typed_by_user=typed_by_user, origin=origin, kwargs=kwargs)
    if typed_by_user and not trust:
        downloading = [key for key in DOWNLOAD_PARAMETERS if kwargs.get(key) not in (None, False)]
        if downloading:
            raise UntrustedCodeError(
                f"`arch_kwargs` sets {downloading[0]!r}, which downloads weights from the network: the model file "
                "holds the weights, so drop it (or pass `trust=True` to allow the download)."
            )
    kwargs = offline_kwargs(builder, kwargs)
    try:
        model = builder(**kwargs)
    except Exception as error:
        raise BadInputError(
            f"Building `arch` '{shown(spec)}' with `arch_kwargs` {shown(dict(kwargs))} failed ({type(error).__name__}: "
            f"{first_line(error)}): check the arguments the function accepts."
        ) from error
    if not isinstance(model, nn.Module):
        raise BadInputError(
            f"`arch` '{shown(spec)}' returned a {type(model).__name__}, not an nn.Module: name a model builder."
        )
    return model
