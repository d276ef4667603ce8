"""The memory budget: what a file asks vconvert to allocate is sized first and refused above the budget.

A file is untrusted input (docs/FORMAT.md §9): a plan field, an input shape, a pickled tensor or a zip
member can ask for far more memory than the machine has. Every such request is sized from the file
*before* anything is allocated and compared with one budget: by default half of the machine's RAM,
raised or lowered with ``memory_budget`` (GB; the ``VCONVERT_MEMORY_BUDGET`` environment variable
gives the default for a whole session, e.g. a CI run).

Sizes come from shapes (:func:`tensor_bytes`) and, for what a model does with an input of a recorded
shape, from a forward worked out on the meta device (:func:`forward_peak_bytes`: the peak of the tensors a
no-grad forward holds at once); :func:`check_forward` refuses a forward beyond the budget, and a shape the
model refuses, without running it for real (docs/FORMAT.md §12).
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from vconvert.errors import BadInputError, first_line

DEFAULT_RAM_FRACTION = 0.5
ENVIRONMENT_VARIABLE = "VCONVERT_MEMORY_BUDGET"
_GB = 1024**3
_budget_bytes: int | None = None


def machine_ram_bytes() -> int:
    """Physical memory of this machine in bytes (16 GiB when the platform does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * _GB


def _parse_gb(text: str, where: str) -> int:
    try:
        gb = float(text)
    except ValueError:
        raise BadInputError(f"{where} must be a number of GB (e.g. 8), got {text!r}.") from None
    if not (gb > 0 and gb < 1e6):
        raise BadInputError(f"{where} must be a positive number of GB (e.g. 8), got {text!r}.")
    return int(gb * _GB)


def set_memory_budget(gb: float | None) -> None:
    """Set the budget for this process in GB; None goes back to the default."""
    global _budget_bytes
    _budget_bytes = None if gb is None else _parse_gb(str(gb), "`memory_budget`")


def memory_budget_bytes() -> int:
    """The budget in bytes: :func:`set_memory_budget`, else ``VCONVERT_MEMORY_BUDGET`` (GB), else half the RAM."""
    if _budget_bytes is not None:
        return _budget_bytes
    text = os.environ.get(ENVIRONMENT_VARIABLE)
    if text:
        return _parse_gb(text, f"The environment variable {ENVIRONMENT_VARIABLE}")
    return int(machine_ram_bytes() * DEFAULT_RAM_FRACTION)


def format_bytes(size: float) -> str:
    """A byte count for messages: 1.3 GB, 420 MB, 12 KB."""
    for unit, scale in (("GB", _GB), ("MB", 1024**2), ("KB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"


def check_allocation(size: float, what: str) -> None:
    """Refuse (BadInputError) before allocating ``size`` bytes that ``what`` asks for, when over the budget.

    ``what`` starts the sentence, e.g. "The plan in 'm.vc.pt' (layer 'conv1', secondary 5000000)".
    """
    budget = memory_budget_bytes()
    if size > budget:
        raise BadInputError(
            f"{what} needs {format_bytes(size)} of memory, more than the memory budget of {format_bytes(budget)}: "
            "the file is damaged or hostile, or, if you trust it and the machine has the memory, raise "
            "`memory_budget` (GB)."
        )


# --------------------------------------------------------------------------- sizing from shapes
FLOAT_BYTES = 4  # every image tensor vconvert builds is float32


def tensor_bytes(shape: Sequence[int], element_size: int = FLOAT_BYTES) -> int:
    """Bytes of a dense tensor of ``shape`` (exact Python integers: no overflow for absurd shapes)."""
    return math.prod(int(size) for size in shape) * element_size


class ForwardRejected(Exception):
    """The model's own forward refuses an input of the shape asked (a shape mismatch, not the budget); the
    caller says which file and shape in its own sentence."""


def meta_cannot_run(error: BaseException) -> bool:
    """Whether ``error`` says an op cannot run on the meta device (it reads values: ``.item()``, ``.tolist()``,
    a data-dependent size), as opposed to a shape the model refuses."""
    return isinstance(error, NotImplementedError) or "meta" in str(error).lower()


def _fresh_tensors(func: Any, outputs: Any) -> list[Any]:
    """The tensors of ``outputs`` that ``func`` allocated (views and in-place results alias an input)."""
    import torch
    from torch.utils._pytree import tree_leaves

    schema = getattr(func, "_schema", None)
    returns = schema.returns if schema is not None else []
    if any(item.alias_info is not None for item in returns):
        return []
    return [leaf for leaf in tree_leaves(outputs) if isinstance(leaf, torch.Tensor)]


def _live_bytes_mode(held: int | None, what: str) -> Any:
    """A dispatch mode that follows the bytes held by the tensors a forward allocates and frees (freed when
    Python drops them, exactly as a real no-grad forward frees them) and records the peak. With ``held``
    (a real forward; the bytes already held for its input), each op is first worked out on the meta device
    and refused when ``held`` plus what is live plus its outputs exceed the budget; a shape the op refuses
    there is raised as :class:`ForwardRejected` before it runs for real."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map_only

    class LiveBytes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live = self.peak = 0
            self.finalizers: list[weakref.finalize] = []

        def _free(self, size: int) -> None:
            self.live -= size

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if held is not None:
                meta_args, meta_kwargs = tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
                try:
                    shaped = func(*meta_args, **meta_kwargs)
                except Exception as error:  # an op that reads values: it runs unsized (a scalar, a small index)
                    if not meta_cannot_run(error):
                        raise ForwardRejected(first_line(error)) from None
                else:
                    size = sum(t.numel() * t.element_size() for t in _fresh_tensors(func, shaped))
                    check_allocation(held + self.live + size, what)
            outputs = func(*args, **kwargs)
            for tensor in _fresh_tensors(func, outputs):
                size = tensor.numel() * tensor.element_size()
                self.live += size
                self.finalizers.append(weakref.finalize(tensor, self._free, size))
            self.peak = max(self.peak, self.live)
            return outputs

        def __exit__(self, *exc: object) -> Any:
            for finalizer in self.finalizers:
                finalizer.detach()
            return super().__exit__(*exc)

    return LiveBytes()


def forward_peak_bytes(model: Any, shape: Sequence[int]) -> int:
    """Peak bytes of a no-grad forward of ``model`` (eval mode) on a float32 input of ``shape``, the input
    included, worked out on the meta device (nothing allocated): each intermediate tensor counts from the op
    that makes it until Python frees it. Raises what the forward raises there (see :func:`meta_cannot_run`)."""
    import torch

    meta = {name: tensor.to("meta") for name, tensor in [*model.named_parameters(), *model.named_buffers()]}
    example = torch.empty(*shape, device="meta")
    mode = _live_bytes_mode(None, "")
    with torch.no_grad(), mode:
        torch.func.functional_call(model, meta, (example,))
    return tensor_bytes(shape) + mode.peak


def check_forward(model: Any, shape: Sequence[int], what: str, rejected: Callable[[str], str] | None = None) -> None:
    """Refuse (BadInputError, ``what`` starting the sentence) a forward of ``model`` on ``shape`` that needs
    more than the budget: the input first, then the peak of the forward on the meta device. A forward the
    meta device cannot run (it reads values) runs for real, each op sized on the meta device before it
    allocates. A shape the model refuses never runs for real: BadInputError with the sentence
    ``rejected(reason)`` when given, else :class:`ForwardRejected`."""
    try:
        _check_forward(model, shape, what)
    except ForwardRejected as error:
        if rejected is None:
            raise
        raise BadInputError(rejected(str(error))) from None


def _check_forward(model: Any, shape: Sequence[int], what: str) -> None:
    import torch

    check_allocation(tensor_bytes(shape), what)
    try:
        check_allocation(forward_peak_bytes(model, shape), what)
        return
    except BadInputError:
        raise
    except Exception as error:  # the user's forward: whatever it raises on the meta device
        if not meta_cannot_run(error):
            raise ForwardRejected(first_line(error)) from None
    try:
        with torch.no_grad(), _live_bytes_mode(tensor_bytes(shape), what):
            model(torch.zeros(*shape))
    except (BadInputError, ForwardRejected):
        raise
    except Exception as error:  # whatever the user's model raises
        raise ForwardRejected(first_line(error)) from None


def largest_fitting_batch(per_batch: Callable[[int], int], batch: int) -> int:
    """The largest of ``batch``, ``batch``/2, ... , 1 whose ``per_batch`` bytes fit the budget (1 when none
    does: the caller then refuses at batch 1)."""
    budget = memory_budget_bytes()
    while batch > 1 and per_batch(batch) > budget:
        batch //= 2
    return max(1, batch)
