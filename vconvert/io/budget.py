"""The memory budget: what a file asks vconvert to allocate is sized first and refused above the budget.

A file is untrusted input (docs/FORMAT.md §9): a plan field, an input shape, a pickled tensor or a zip
member can ask for far more memory than the machine has. Every such request is sized from the file
*before* anything is allocated and compared with one budget: by default half of the machine's RAM,
raised or lowered with ``memory_budget`` (GB; the ``VCONVERT_MEMORY_BUDGET`` environment variable
gives the default for a whole session, e.g. a CI run).
"""

from __future__ import annotations

import os

from vconvert.errors import BadInputError

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
