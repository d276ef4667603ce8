"""Rebuilding a pickled model (``torch.save(model)``) the way torch writes one, and in no other way.

``torch.save(model)`` writes each module as "create an object of this class without calling its
``__init__``, then set its state" (pickle's NEWOBJ + BUILD) and each tensor as a call to one of
torch's tensor rebuild functions. This unpickler allows exactly that (docs/FORMAT.md §9):

- a class may be *instantiated without ``__init__``* (NEWOBJ with no arguments) and given a state
  dict (BUILD) only if it is an ``nn.Module`` subclass defined in ``torch.nn``, in torchvision's or
  timm's model and layer packages (the classes their model registries build) or in the shipped
  sample models;
- the only *calls* (REDUCE) are torch's tensor rebuild functions, ``OrderedDict``/``set``/``torch.Size``
  and friends, ``functools.partial`` over an allowed module class (``norm_layer=partial(...)``) and the
  value lookup of an ``Enum`` defined there; a module class is never called, so no constructor runs;
- tensors may not be views larger than their storage, storages not larger than their zip record, and
  no hook (a callable run later) may come from the file.

Anything else (readers, teachers, loaders, datasets, builtins such as ``eval``) raises
:class:`RefusedPickle` before it is imported or called.
"""

from __future__ import annotations

import _compat_pickle
import collections
import enum
import functools
import importlib
import io
import math
import pickle
import types
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

# Packages whose nn.Module classes (and Enums) a pickled model may use: torch.nn's layers, the packages
# torchvision's and timm's model registries build from, and the shipped samples (the caller decides
# whether `sample_models` is the shipped one).
MODULE_PACKAGES = (
    "torch.nn.modules",
    "torchvision.models",
    "torchvision.ops",
    "timm.models",
    "timm.layers",
    "sample_models",
)
_REBUILD_FUNCTIONS = (
    torch._utils._rebuild_tensor,
    torch._utils._rebuild_tensor_v2,
    torch._utils._rebuild_parameter,
    torch._utils._rebuild_parameter_with_state,
)
# Callables a pickle may call, besides the rebuild functions: containers and torch value types.
_PLAIN_CALLABLES: dict[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.bytearray": bytearray,
    "builtins.complex": complex,
    "builtins.slice": slice,
    "_codecs.encode": __import__("_codecs").encode,
    "torch.Size": torch.Size,
    "torch.device": torch.device,
    "torch.serialization._get_layout": torch.serialization._get_layout,
    "functools.partial": functools.partial,
}
_CALLABLES: dict[str, Any] = {
    **_PLAIN_CALLABLES,
    **{f"torch._utils.{function.__name__}": function for function in _REBUILD_FUNCTIONS},
    "torch._tensor._rebuild_from_type_v2": torch._tensor._rebuild_from_type_v2,
}
# Values a pickle may name without calling them: dtypes, tensor classes.
_VALUES: dict[str, Any] = {
    "torch.Tensor": Tensor,
    "torch.nn.parameter.Parameter": nn.Parameter,
    **{str(dtype): dtype for dtype in vars(torch).values() if isinstance(dtype, torch.dtype)},
}
_TENSOR_TYPES = (Tensor, nn.Parameter)


class RefusedPickle(pickle.UnpicklingError):
    """The pickle asks for something a torch.save(model) file never does (its message says what)."""


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def resolve_module_class(name: str, packages: tuple[str, ...] = MODULE_PACKAGES) -> type | None:
    """The nn.Module subclass or Enum that dotted ``name`` names inside ``packages``, else None.

    Only modules inside ``packages`` are ever imported, and the class's own ``__module__.__qualname__``
    must be ``name`` (no re-exports of something defined elsewhere).
    """
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        if not _under(module_name, packages):
            continue
        try:
            obj: Any = importlib.import_module(module_name)
        except Exception:
            continue
        for part in parts[cut:]:
            obj = getattr(obj, part, None)
        if not isinstance(obj, type) or f"{obj.__module__}.{obj.__qualname__}" != name:
            return None
        return obj if issubclass(obj, (nn.Module, enum.Enum)) else None
    return None


def allowed_global(name: str, packages: tuple[str, ...] = MODULE_PACKAGES) -> Any | None:
    """What a pickled global may stand for under this policy (None: refused)."""
    if name.startswith("__builtin__."):  # protocol-2 pickles name builtins by their Python 2 module
        name = "builtins." + name.removeprefix("__builtin__.")
    if name in _CALLABLES:
        return _CALLABLES[name]
    if name in _VALUES:
        return _VALUES[name]
    return resolve_module_class(name, packages)


def _is_module_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, nn.Module)


def _check_hooks(hooks: Any, what: str) -> None:
    if hooks is not None and not (isinstance(hooks, Mapping) and not hooks):
        raise RefusedPickle(f"{what} comes with hooks (code run later), which torch.save never writes")


def _check_view(storage: Any, offset: Any, size: Any, stride: Any) -> None:
    """A rebuilt tensor must be a plain view inside its storage, no larger than the storage (no expansion)."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise RefusedPickle("a tensor is rebuilt from something that is not a storage of the file")
    if not (
        isinstance(offset, int)
        and isinstance(size, (tuple, torch.Size))
        and isinstance(stride, tuple)
        and len(size) == len(stride)
        and all(isinstance(v, int) and v >= 0 for v in (*size, *stride))
        and offset >= 0
    ):
        raise RefusedPickle("a tensor has a malformed shape, stride or offset")
    numel = math.prod(size)
    if numel == 0:
        return
    end = offset + sum((extent - 1) * step for extent, step in zip(size, stride, strict=True)) + 1
    if end > storage._size() or numel > storage._size():  # _size(): size() warns that TypedStorage is deprecated
        raise RefusedPickle("a tensor is a view larger than its stored values (an expanded or overlapping view)")


def _check_call(function: Any, args: tuple) -> None:
    """Refuse any call a torch.save(model) pickle does not make."""
    if _is_module_class(function):
        raise RefusedPickle(
            f"it calls the constructor of {function.__module__}.{function.__qualname__} (torch.save never does: "
            "modules are rebuilt from their state without running their code)"
        )
    if isinstance(function, type) and issubclass(function, enum.Enum):
        if len(args) != 1 or not isinstance(args[0], (str, int, float, bool, type(None))):
            raise RefusedPickle(f"it calls the Enum {function.__qualname__} with other than one plain value")
        return
    if not any(function is allowed for allowed in _CALLABLES.values()):
        raise RefusedPickle(f"it calls {getattr(function, '__qualname__', type(function).__name__)}")
    if function is functools.partial:
        if not args or not _is_module_class(args[0]):
            raise RefusedPickle("it makes a functools.partial of something that is not an allowed module class")
    elif function in (torch._utils._rebuild_tensor, torch._utils._rebuild_tensor_v2):
        if len(args) < 4:
            raise RefusedPickle("a tensor is rebuilt with too few arguments")
        _check_view(*args[:4])
        if function is torch._utils._rebuild_tensor_v2:
            _check_hooks(args[5] if len(args) > 5 else None, "a tensor")
            metadata = args[6] if len(args) > 6 else None
            if metadata is not None and not (
                isinstance(metadata, dict) and all(isinstance(v, bool) for v in metadata.values())
            ):
                raise RefusedPickle("a tensor comes with metadata that is not a few flags")
    elif function in (torch._utils._rebuild_parameter, torch._utils._rebuild_parameter_with_state):
        if len(args) < 3 or not isinstance(args[0], Tensor):
            raise RefusedPickle("a parameter is rebuilt from something that is not a tensor")
        _check_hooks(args[2], "a parameter")
    elif function is torch._tensor._rebuild_from_type_v2:
        if len(args) != 4 or args[0] not in _REBUILD_FUNCTIONS or args[1] not in _TENSOR_TYPES:
            raise RefusedPickle("a tensor subclass is rebuilt by something other than torch's tensor rebuild functions")
        _check_call(args[0], tuple(args[2]) if isinstance(args[2], tuple) else ())


class ModuleUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its opcodes can be overridden one by one
    """A pickle.Unpickler that rebuilds only what :mod:`vconvert.io.pickled_modules` allows.

    ``storage_bytes`` maps each storage key of the zip archive to its record's size: a storage may not
    claim more. ``packages`` are the packages whose module classes may be rebuilt.
    """

    dispatch: ClassVar[dict] = dict(pickle._Unpickler.dispatch)
    storage_bytes: ClassVar[Mapping[str, int]] = {}
    packages: ClassVar[tuple[str, ...]] = MODULE_PACKAGES

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3:
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        obj = allowed_global(full, self.packages)
        if obj is None:
            raise RefusedPickle(f"it uses {full}, which is not a module class of a known model library")
        return obj

    # torch's loader sets `persistent_load` after construction: keep its function, check each storage first.
    @property
    def persistent_load(self):  # type: ignore[override]
        return self._checked_persistent_load

    @persistent_load.setter
    def persistent_load(self, function) -> None:
        self._torch_persistent_load = function

    def _checked_persistent_load(self, saved_id: Any) -> Any:
        if not (isinstance(saved_id, tuple) and len(saved_id) == 5 and saved_id[0] == "storage"):
            raise RefusedPickle("a storage is named in a form torch.save does not write")
        _, storage_type, key, _location, numel = saved_id
        dtype = getattr(storage_type, "dtype", torch.uint8)
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0 or not isinstance(dtype, torch.dtype):
            raise RefusedPickle("a storage is named in a form torch.save does not write")
        recorded = self.storage_bytes.get(key)
        if recorded is None or numel * torch._utils._element_size(dtype) > recorded:
            raise RefusedPickle(f"storage {key!r} claims more bytes than the file holds for it")
        return self._torch_persistent_load(saved_id)

    def load_reduce(self) -> None:
        args = self.stack.pop()
        function = self.stack[-1]
        _check_call(function, args if isinstance(args, tuple) else ())
        self.stack[-1] = function(*args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if not _is_module_class(cls) or args != ():
            raise RefusedPickle(f"it creates a {getattr(cls, '__qualname__', cls)!s} in a way torch.save does not")
        self.append(cls.__new__(cls))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if kwargs:
            raise RefusedPickle("it creates an object with keyword arguments")
        self.stack.extend([cls, args])
        self.load_newobj()

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, nn.Module):
            if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
                raise RefusedPickle(f"a {type(inst).__qualname__} is given a state that is not a dict")
            for key, value in state.items():
                if "hooks" in key:
                    _check_hooks(value, f"a {type(inst).__qualname__}")
            inst.__setstate__(state)
        elif isinstance(inst, functools.partial):
            if not (isinstance(state, tuple) and len(state) == 4 and _is_module_class(state[0])):
                raise RefusedPickle("a functools.partial is given a state that is not an allowed module class")
            inst.__setstate__(state)
        else:
            raise RefusedPickle(f"it sets the state of a {type(inst).__qualname__}, which torch.save never does")

    def _refuse(self) -> None:
        raise RefusedPickle("it builds objects with opcodes torch.save never writes (INST, OBJ or EXT)")

    for _opcode, _method in (
        (pickle.REDUCE, load_reduce),
        (pickle.NEWOBJ, load_newobj),
        (pickle.NEWOBJ_EX, load_newobj_ex),
        (pickle.BUILD, load_build),
        (pickle.INST, _refuse),
        (pickle.OBJ, _refuse),
        (pickle.EXT1, _refuse),
        (pickle.EXT2, _refuse),
        (pickle.EXT4, _refuse),
    ):
        dispatch[_opcode[0]] = _method
    del _opcode, _method


def load_pickled_modules(
    data: bytes, storage_bytes: Mapping[str, int], packages: tuple[str, ...] = MODULE_PACKAGES
) -> Any:
    """Unpickle a torch.save zip archive (``data``) under this module's rules; RefusedPickle if it asks for more.

    ``storage_bytes``: size of each ``data/<key>`` record of the archive, by key.
    """

    class Unpickler(ModuleUnpickler):
        pass

    Unpickler.storage_bytes = dict(storage_bytes)
    Unpickler.packages = packages
    restricted = types.ModuleType("vconvert_restricted_pickle")
    restricted.Unpickler = Unpickler  # type: ignore[attr-defined]
    restricted.load = None  # type: ignore[attr-defined]  # only the legacy format calls it: never given here
    # weights_only=False only hands the archive to the restricted Unpickler above (it never runs pickle's own).
    return torch.load(io.BytesIO(data), map_location="cpu", pickle_module=restricted, weights_only=False)
