"""The Python API of the compress stage: save and reload converted models as ``.vc.pt`` files.

A ``.vc.pt`` file is plain data (``torch.load(weights_only=True)``): how to rebuild the base model,
the ConversionPlan, the converted state_dict, the original (teacher) weights and metadata.
Reloading builds the base, re-applies the plan by qualified name and loads strictly.

Everything read back is checked before it is used (a damaged or hostile file is refused with one
sentence): the plan and the metadata for types and bounds, each weight for its presence, shape,
dtype, finiteness and real size, an arch base first on the meta device (nothing allocated) against
the stored weights, and the versatile layers' index buffers for their ranges.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vconvert.convert.plan import ConversionPlan, apply_plan
from vconvert.errors import BadInputError, UntrustedCodeError, first_line, shown
from vconvert.io.architectures import resolve_arch
from vconvert.io.format import read_checkpoint, write_checkpoint
from vconvert.io.metadata import CheckpointMetadata
from vconvert.io.untrusted import BaseSpec, build_base
from vconvert.nn.versatile import set_weight_quantization_, versatile_layers, weight_quantization
from vconvert.validate import (
    all_finite,
    check_mapping,
)

CHECKPOINT_FIELDS = ("base", "plan", "state_dict", "teacher_state_dict", "metadata")


@dataclass
class Checkpoint:
    """Everything a ``.vc.pt`` file holds, rebuilt: the converted model and its teacher."""

    model: nn.Module
    teacher: nn.Module
    plan: ConversionPlan
    base: BaseSpec
    metadata: CheckpointMetadata

    @property
    def finetuned(self) -> bool:
        """Whether ``vconvert finetune`` wrote it (else its accuracy is the data-free fit's)."""
        return self.metadata.finetune is not None


NOT_FINETUNED = "not fine-tuned: its accuracy is the data-free fit's (vconvert finetune trains it)."


def save(
    path: str | Path,
    model: nn.Module,
    plan: ConversionPlan,
    base: BaseSpec,
    teacher: nn.Module,
    metadata: CheckpointMetadata,
) -> None:
    """Write a converted model as a ``.vc.pt`` checkpoint (atomically), stamped with the time of writing and
    with how its primary filters are quantized (read from the model's layers)."""
    if not isinstance(metadata, CheckpointMetadata):
        raise TypeError(
            "metadata must be a vconvert.CheckpointMetadata, e.g. CheckpointMetadata(input_shape=[1, 3, 224, 224]); "
            f"got {type(metadata).__name__}."
        )
    stamped = replace(
        metadata,
        saved_at=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        weight_quantization=weight_quantization(model),
    )
    payload = {
        "base": base.to_dict(),
        "plan": plan.to_dict(),
        "state_dict": model.state_dict(),
        "teacher_state_dict": teacher.state_dict(),
        "metadata": stamped.to_dict(),
    }
    write_checkpoint(path, payload)


def _strict_load(model: nn.Module, state_dict: dict, what: str, path: Path) -> None:
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise BadInputError(
            f"{path} does not match its own base model ({what}: {first_line(error)}); "
            "the file is damaged or was written for another model."
        ) from error


def _tensors(value: object, what: str, path: Path) -> Mapping[str, Any]:
    """A stored state_dict: str keys, tensor values (``_extra_state`` entries may hold anything). The
    mapping itself is returned: its ``_metadata`` (module versions) matters to some modules' loading."""
    check_mapping(value, f"{path}'s {what}")
    state: Mapping[str, Any] = value  # type: ignore[assignment]
    for key, item in state.items():
        if not isinstance(item, Tensor) and not key.endswith("_extra_state"):
            raise BadInputError(
                f"{path}'s {what} hold a {type(item).__name__} at {key!r}, not a tensor: the file is damaged."
            )
    return state


def _tensor_problem(got: Tensor, want: Tensor) -> str | None:
    """Why a stored tensor cannot stand for the model's ``want`` (None if it can)."""
    if got.layout != torch.strided or got.is_quantized or got.device.type == "meta":
        return f"is a {got.layout} tensor, not a dense one"
    if got.shape != want.shape:
        return f"has shape {list(got.shape)} where the model has {list(want.shape)}"
    if got.dtype != want.dtype:
        return f"is {got.dtype} where the model has {want.dtype}"
    if got.numel() * got.element_size() > got.untyped_storage().nbytes():
        return "repeats its stored values (an expanded or overlapping view)"
    return None


def _check_state(
    expected: Mapping[str, Any], state: Mapping[str, Any], what: str, path: Path, finite: bool = True
) -> None:
    """Refuse ``state`` unless it has exactly the keys of ``expected`` (a model's state_dict, perhaps on the
    meta device) with dense tensors of the same shapes and dtypes, finite ones when ``finite``."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        keys = missing or unexpected
        more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
        raise BadInputError(
            f"{path} does not match its own base model ({what}: {'missing' if missing else 'unexpected'} "
            f"{', '.join(keys[:3])}{more}): the file is damaged or was written for another model."
        )
    for key, want in expected.items():
        if isinstance(want, Tensor) and (problem := _tensor_problem(state[key], want)):
            raise BadInputError(f"{path}'s {what} {key!r} {problem}: the file is damaged.")
    floats = {
        key: state[key] for key, want in expected.items() if isinstance(want, Tensor) and want.is_floating_point()
    }
    if finite and not all_finite(list(floats.values())):  # same dtypes as the model's, checked above
        key = next(key for key, tensor in floats.items() if not all_finite([tensor]))
        raise BadInputError(f"{path}'s {what} {key!r} holds NaN or infinite values: the file is damaged.")


def _check_base_on_meta(base: BaseSpec, teacher_state: Mapping[str, Any], trust: bool, path: Path) -> None:
    """Build an arch base on the meta device (nothing allocated) and compare it with the stored teacher
    weights, so that a builder or arguments asking for another, perhaps huge, network are refused before
    anything is allocated. Builders that cannot run on the meta device are checked after the real build."""
    if base.arch is None:  # a pickled base holds its tensors in the file: its size is the file's
        return
    # refuses what it must refuse and imports the builder's module outside the meta device
    resolve_arch(base.arch, trust=trust, typed_by_user=False, origin=str(path), kwargs=base.arch_kwargs)
    try:
        with torch.device("meta"):
            shaped = build_base(base, trust=trust, origin=str(path))
    except UntrustedCodeError:
        raise
    except BadInputError:
        return
    _check_state(shaped.state_dict(), teacher_state, "teacher weights", path, finite=False)


def _check_index_ranges(model: nn.Module, path: Path) -> None:
    """Each versatile layer's index buffers point inside its primary filters, slots and input channels."""
    for name, layer in versatile_layers(model):
        limits = {
            "primary_index": layer.num_primary - 1,
            "secondary_index": layer.group_size - 1,
            "channel_offset": layer.in_channels - layer.channel_window,
        }
        for buffer, high in limits.items():
            values = getattr(layer, buffer)
            if values.numel() and not (int(values.min()) >= 0 and int(values.max()) <= high):
                raise BadInputError(
                    f"{path}'s layer {name!r} has {buffer} values outside 0..{high}: the file is damaged."
                )
        mask = layer.fixed_mask
        if mask is not None and not bool(((mask == 0) | (mask == 1)).all()):
            raise BadInputError(f"{path}'s layer {name!r} has a fixed mask that is not binary: the file is damaged.")


def _check_input_fits(model: nn.Module, input_shape: list[int], path: Path) -> None:
    """The model accepts an input of the shape it was traced with (batch 1) within the memory budget: the
    input and the forward's peak are sized on the meta device, so only shapes are worked out; a forward that
    cannot run there (a value read back in Python) runs for real, each op sized before it allocates. A shape
    the model refuses (a channel mismatch) is refused without a real forward."""
    from vconvert.io.budget import check_forward

    shape = [1, *input_shape[1:]]
    check_forward(
        model,
        shape,
        f"A forward of {path}'s model on its recorded input shape {shape}",
        lambda reason: (
            f"{path}'s model rejects an input of its own recorded shape {shape} ({reason}): the file is damaged."
        ),
    )


def load_checkpoint(path: str | Path, trust: bool = False) -> Checkpoint:
    """Rebuild the converted model and its teacher from a ``.vc.pt`` file (both in eval mode).

    ``trust`` has the same meaning as for the first load: a base stored as a pickled module of
    unknown classes, or an arch string that is not a registered model builder, runs only with it.
    Anything damaged (a field missing or of the wrong type, a weight of the wrong shape or dtype or
    not finite, a plan the base cannot take) raises BadInputError before it is used.
    """
    path = Path(path)
    payload = read_checkpoint(path)
    missing = [key for key in CHECKPOINT_FIELDS if key not in payload]
    if missing:
        raise BadInputError(
            f"{path} has no {missing[0]!r} field: the file is damaged; re-create it with vconvert compress."
        )
    base = BaseSpec.from_dict(payload["base"])
    plan = ConversionPlan.from_dict(payload["plan"])
    metadata = CheckpointMetadata.from_dict(
        payload["metadata"], f"{path}'s metadata", plan.input_shape[1], plan.input_shape
    )
    teacher_state = _tensors(payload["teacher_state_dict"], "teacher weights", path)
    state = _tensors(payload["state_dict"], "converted weights", path)
    _check_base_on_meta(base, teacher_state, trust, path)
    teacher = build_base(base, trust=trust, origin=str(path))
    _check_state(teacher.state_dict(), teacher_state, "teacher weights", path)
    _strict_load(teacher, teacher_state, "teacher weights", path)
    model = apply_plan(build_base(base, trust=trust, origin=str(path)), plan)
    _check_layer_widths(model, metadata.weight_quantization, path)
    set_weight_quantization_(model, metadata.weight_quantization)
    _check_state(model.state_dict(), state, "converted weights", path)
    _strict_load(model, state, "converted weights", path)
    _check_index_ranges(model, path)
    _check_input_fits(model.eval(), plan.input_shape, path)
    return Checkpoint(model.eval(), teacher.eval(), plan, base, metadata)


def _check_layer_widths(model: nn.Module, record: dict | None, path: Path) -> None:
    """Per-layer widths, when recorded, name exactly the plan's versatile layers."""
    widths = (record or {}).get("layers")
    if widths is None:
        return
    names = {name for name, _ in versatile_layers(model)}
    stray = sorted(set(widths) ^ names)
    if stray:
        raise BadInputError(
            f"{shown(path)}'s weight_quantization gives widths for other layers than its plan converts (e.g. "
            f"{shown(stray[0])}): the file is damaged."
        )


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
