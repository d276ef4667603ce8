"""The Python API of the compress stage: save and reload converted models as ``.vc.pt`` files.

A ``.vc.pt`` file is plain data (``torch.load(weights_only=True)``): how to rebuild the base model,
the ConversionPlan, the converted state_dict, the original (teacher) weights and metadata.
Reloading builds the base, re-applies the plan by qualified name and loads strictly.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from vconvert.convert import ConversionPlan, apply_plan
from vconvert.errors import BadInputError
from vconvert.io import BaseSpec, build_base, read_checkpoint, write_checkpoint


@dataclass
class Checkpoint:
    """Everything a ``.vc.pt`` file holds, rebuilt: the converted model and its teacher."""

    model: nn.Module
    teacher: nn.Module
    plan: ConversionPlan
    base: BaseSpec
    metadata: dict = field(default_factory=dict)


def save(
    path: str | Path,
    model: nn.Module,
    plan: ConversionPlan,
    base: BaseSpec,
    teacher: nn.Module,
    metadata: dict | None = None,
) -> None:
    """Write a converted model as a ``.vc.pt`` checkpoint (atomically)."""
    payload = {
        "base": base.to_dict(),
        "plan": plan.to_dict(),
        "state_dict": model.state_dict(),
        "teacher_state_dict": teacher.state_dict(),
        "metadata": {"saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(), **(metadata or {})},
    }
    write_checkpoint(path, payload)


def _strict_load(model: nn.Module, state_dict: dict, what: str, path: Path) -> None:
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise BadInputError(
            f"{path} does not match its own base model ({what}: {str(error).splitlines()[0]}); "
            "the file is damaged or was written for another model."
        ) from error


def load_checkpoint(path: str | Path, trust: bool = False) -> Checkpoint:
    """Rebuild the converted model and its teacher from a ``.vc.pt`` file (both in eval mode).

    ``trust`` has the same meaning as for the first load: a base stored as a pickled module of
    unknown classes, or an arch string that is not a registered model builder, runs only with it.
    """
    path = Path(path)
    payload = read_checkpoint(path)
    base = BaseSpec.from_dict(payload["base"])
    plan = ConversionPlan.from_dict(payload["plan"])
    teacher = build_base(base, trust=trust, origin=str(path))
    _strict_load(teacher, payload["teacher_state_dict"], "teacher weights", path)
    model = apply_plan(build_base(base, trust=trust, origin=str(path)), plan)
    _strict_load(model, payload["state_dict"], "converted weights", path)
    return Checkpoint(model.eval(), teacher.eval(), plan, base, payload.get("metadata", {}))


def load(path: str | Path, trust: bool = False) -> nn.Module:
    """The converted model of a ``.vc.pt`` file, rebuilt and in eval mode."""
    return load_checkpoint(path, trust=trust).model


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a ``.vc.pt`` checkpoint (by name, else by content)."""
    path = Path(path)
    if path.name.endswith(".vc.pt"):
        return True
    try:
        read_checkpoint(path)
    except BadInputError:
        return False
    return True
