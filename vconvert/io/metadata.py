"""The metadata of a ``.vc.pt``: what compress, fine-tuning and export hand to the next stage besides the
weights (docs/FORMAT.md §6), as one typed record that :func:`vconvert.save` requires and
:func:`vconvert.load_checkpoint` validates field by field.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from vconvert.data.datasets import DataSpec
from vconvert.data.digits import DIGITS
from vconvert.errors import BadInputError
from vconvert.nn.quantize import QUANTIZERS
from vconvert.validate import (
    check_fields,
    check_float,
    check_input_shape,
    check_int,
    check_mapping,
    check_plain,
    check_preprocessing,
    check_str,
)


@dataclass
class CheckpointMetadata:
    """What a ``.vc.pt`` records besides its weights.

    ``input_shape`` (N, C, H, W) is the size every later stage feeds the model unless told otherwise;
    ``preprocessing`` ({"mean", "std", "input_size"}) how images are normalised; ``bn_recalibration``
    ({"data", "images"}) the folder compress re-estimated BatchNorm statistics on; ``data``
    (:meth:`DataSpec.to_dict`) the data a fine-tuning run read; ``finetune`` ({"config", "epochs_done",
    "complete", "val_top1", "val_top5"}) that run's record; ``finetune_state`` the state to resume it from
    (the run's last file only; kept as read, checked when a run resumes from it); ``saved_at`` when
    :func:`vconvert.save` wrote the file; ``weight_quantization`` ({"bits", "quantizer"}) how the primary
    filters are fake-quantised (``finetune --weight-bits``), so that loading rebuilds their quantizers;
    ``reconstruction`` (:func:`check_reconstruction`) that ``compress --reconstruct`` refit the layers and on what. Keys
    written by a later version are kept, unread, in ``extra``.
    """

    input_shape: list[int]
    preprocessing: dict | None = None
    bn_recalibration: dict | None = None
    data: dict | None = None
    finetune: dict | None = None
    finetune_state: Any = None  # as read: checked in full only when a run resumes from it
    saved_at: str | None = None
    weight_quantization: dict | None = None  # {"bits", "quantizer"} of the primaries, None: float
    reconstruction: dict | None = None  # compress --reconstruct: check_reconstruction's fields
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the file (fields that are None are left out)."""
        values = {item.name: getattr(self, item.name) for item in fields(self) if item.name != "extra"}
        return {**self.extra, **{key: value for key, value in values.items() if value is not None}}

    def carried(self) -> CheckpointMetadata:
        """What a fine-tuning run carries from its source into the files it writes: all but the source's own
        resume state and save time."""
        return replace(self, finetune_state=None, saved_at=None)

    def _recorded_candidates(self) -> list[str]:
        candidates = (
            (self.data or {}).get("source"),
            (self.bn_recalibration or {}).get("data"),
            (self.reconstruction or {}).get("data"),
        )
        return [candidate for candidate in candidates if isinstance(candidate, str)]

    def recorded_data(self) -> str | None:
        """The data this file records (its fine-tuning data, else its BatchNorm recalibration or reconstruction
        folder) when that is ``digits`` or a folder that still exists here; else None."""
        for candidate in self._recorded_candidates():
            if candidate == DIGITS or Path(candidate).expanduser().is_dir():
                return candidate
        return None

    def missing_data(self) -> str | None:
        """The folder this file records that is not here (for messages), or None."""
        candidates = self._recorded_candidates()
        return None if self.recorded_data() is not None or not candidates else candidates[0]

    @classmethod
    def from_dict(cls, value: object, where: str, channels: int, default_shape: list[int]) -> CheckpointMetadata:
        """Checked metadata read from a file: ``input_shape`` (N,C,H,W within bounds, C = ``channels``, the
        model's input channels; ``default_shape``, the shape compress traced with, for files that record
        none), ``preprocessing`` (a mean and std per channel), ``bn_recalibration`` and ``data`` exactly as
        vconvert writes them; the other fields as plain mappings or strings. Nothing may nest deeper than
        :data:`~vconvert.validate.MAX_DEPTH` levels, and no float but the resume state's may be NaN or
        infinite."""
        metadata = dict(check_mapping(value, where))
        check_plain(metadata.get("finetune_state"), f"{where}'s finetune_state", finite=False)
        check_plain({key: item for key, item in metadata.items() if key != "finetune_state"}, where)
        shape = metadata.pop("input_shape", None)
        shape = check_input_shape(shape if shape is not None else default_shape, f"{where}'s input_shape")
        if shape[1] != channels:
            raise BadInputError(
                f"{where}'s input_shape {shape} has {shape[1]} channels but the model was traced with {channels}: "
                "the file is damaged."
            )
        preprocessing = metadata.pop("preprocessing", None)
        if preprocessing is not None:
            preprocessing = check_preprocessing(preprocessing, f"{where}'s preprocessing", channels)
        recalibration = metadata.pop("bn_recalibration", None)
        if recalibration is not None:
            recalibration = check_fields(recalibration, f"{where}'s bn_recalibration", ("data", "images"), ("seed",))
            check_str(recalibration["data"], f"{where}'s bn_recalibration data")
            check_int(recalibration["images"], f"{where}'s bn_recalibration images")
            if "seed" in recalibration:
                check_int(recalibration["seed"], f"{where}'s bn_recalibration seed")
        data = metadata.pop("data", None)
        if data is not None:
            data = check_fields(data, f"{where}'s data", tuple(item.name for item in fields(DataSpec)))
            check_str(data["source"], f"{where}'s data source")
            check_preprocessing({key: data[key] for key in ("mean", "std", "input_size")}, f"{where}'s data", channels)
            check_int(data["channels"], f"{where}'s data channels", channels, channels)
            if not isinstance(data["classes"], list) or not all(isinstance(name, str) for name in data["classes"]):
                raise BadInputError(f"{where}'s data classes must be a list of names: the file is damaged.")
        finetune = metadata.pop("finetune", None)
        if finetune is not None:
            finetune = check_mapping(finetune, f"{where}'s finetune")
        state = metadata.pop("finetune_state", None)  # a damaged one stops `resume` only, not inspect or export
        saved_at = metadata.pop("saved_at", None)
        if saved_at is not None:
            check_str(saved_at, f"{where}'s saved_at")
        quantization = metadata.pop("weight_quantization", None)
        if quantization is not None:
            quantization = check_fields(
                quantization, f"{where}'s weight_quantization", ("bits", "quantizer"), ("layers",)
            )
            check_int(quantization["bits"], f"{where}'s weight_quantization bits", 2, 8)
            if "layers" in quantization:
                _check_layer_widths(quantization["layers"], f"{where}'s weight_quantization layers")
            if quantization["quantizer"] not in QUANTIZERS:
                raise BadInputError(
                    f"{where}'s weight_quantization quantizer must be one of {', '.join(QUANTIZERS)}: the file is "
                    "damaged."
                )
        reconstruction = metadata.pop("reconstruction", None)
        if reconstruction is not None:
            reconstruction = check_reconstruction(reconstruction, f"{where}'s reconstruction")
        return cls(
            shape, preprocessing, recalibration, data, finetune, state, saved_at, quantization, reconstruction, metadata
        )


RECONSTRUCTION_FIELDS = ("data", "images", "settings", "layers", "error_before", "error_after", "seconds")
RECONSTRUCTION_SETTINGS = ("rounds", "mask_sweeps", "damping", "weight_bits", "normalise", "positions")
REFINEMENT_FIELDS = (
    "steps", "batch_size", "lr", "mask_lr", "drop", "seed", "held_out", "blocks", "kept", "error_before",
    "error_after", "seconds",
)  # fmt: skip


def check_reconstruction(value: object, where: str) -> dict:
    """The record ``compress --reconstruct`` writes (:meth:`vconvert.convert.reconstruct.Reconstruction.record`):
    the image folder, the image count, the settings, the layers refit and their mean relative output error before
    and after, the seconds it took, and (files since block refinement) the ``refinement`` record and (files of a
    subset other than the default) the ``seed`` the images were drawn with; exactly these fields, each of its
    type."""
    record = check_fields(value, where, RECONSTRUCTION_FIELDS, ("refinement", "seed"))
    if "refinement" in record:
        check_refinement(record["refinement"], f"{where} refinement")
    if "seed" in record:
        check_int(record["seed"], f"{where} seed")
    check_str(record["data"], f"{where} data")
    check_int(record["images"], f"{where} images", 1)
    check_int(record["layers"], f"{where} layers")
    for key in ("error_before", "error_after", "seconds"):
        if check_float(record[key], f"{where} {key}") < 0:
            raise BadInputError(f"{where} {key} must not be negative: the file is damaged.")
    settings = check_fields(record["settings"], f"{where} settings", RECONSTRUCTION_SETTINGS)
    check_int(settings["rounds"], f"{where} settings rounds", 1)
    check_int(settings["mask_sweeps"], f"{where} settings mask_sweeps")
    check_int(settings["positions"], f"{where} settings positions", 1)
    check_float(settings["damping"], f"{where} settings damping", positive=True)
    if settings["weight_bits"] is not None:
        check_int(settings["weight_bits"], f"{where} settings weight_bits", 2, 8)
    if not isinstance(settings["normalise"], bool):
        raise BadInputError(f"{where} settings normalise must be true or false: the file is damaged.")
    return record


def check_refinement(value: object, where: str) -> dict:
    """The block refinement's record (:meth:`vconvert.convert.refine.Refinement.record`)."""
    record = check_fields(value, where, REFINEMENT_FIELDS)
    for key in ("steps", "seed", "blocks", "kept"):
        check_int(record[key], f"{where} {key}")
    check_int(record["batch_size"], f"{where} batch_size", 1)
    if record["kept"] > record["blocks"]:
        raise BadInputError(f"{where} kept must not exceed blocks: the file is damaged.")
    check_float(record["lr"], f"{where} lr", positive=True)
    for key in ("mask_lr", "error_before", "error_after", "seconds"):
        if check_float(record[key], f"{where} {key}") < 0:
            raise BadInputError(f"{where} {key} must not be negative: the file is damaged.")
    if not 0 <= check_float(record["drop"], f"{where} drop") <= 1:
        raise BadInputError(f"{where} drop must be between 0 and 1: the file is damaged.")
    if not 0 <= check_float(record["held_out"], f"{where} held_out") < 1:
        raise BadInputError(f"{where} held_out must be at least 0 and below 1: the file is damaged.")
    return record


def _check_layer_widths(value: object, where: str) -> dict[str, int | None]:
    """{layer name: weight bits 2..8 or None}: the per-layer widths of a mixed-width model."""
    widths = check_mapping(value, where)
    for name, bits in widths.items():
        if bits is not None:
            check_int(bits, f"{where} {name!r}", 2, 8)
    return widths
