"""Export a ``.vc.pt``: its model, its teacher (for the before/after table), the input shape and
preprocessing it records, real verification images when it names an image folder, and, for int8, the
calibration images (``calib_data`` or the data it records) prepared as it records.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from vconvert.errors import BadInputError, first_line, shown
from vconvert.export.pipeline import ExportReport, check_export_memory, export
from vconvert.io.files import check_writable
from vconvert.io.metadata import CheckpointMetadata


def load_verification_images(
    metadata: CheckpointMetadata, input_shape: Sequence[int], folder: str | Path | None = None
) -> tuple[list[Tensor] | None, str]:
    """Batches of 1 and 4 real images from ``folder`` (an image folder: the int8 export's ``calib_data``), else
    from the image folder the checkpoint records if it exists here (its fine-tuning data or its BatchNorm
    recalibration folder), else None."""
    folder = str(folder) if folder is not None and os.path.isdir(folder) else metadata.recorded_data()
    preprocessing = metadata.preprocessing or {}
    if not folder or not os.path.isdir(folder) or not preprocessing or input_shape[1] != 3:
        return None, "random normal inputs (the checkpoint names no image folder)"
    try:
        from vconvert.data.datasets import calibration_batches

        images = next(
            iter(
                calibration_batches(
                    Path(folder),
                    tuple(input_shape[2:]),
                    preprocessing["mean"],
                    preprocessing["std"],
                    batch_size=4,
                    limit=4,
                )
            )
        )
    except Exception as error:
        return None, f"random normal inputs (reading {folder} failed: {first_line(error, 200)})"
    if len(images) < 4:
        return None, f"random normal inputs ({folder} holds fewer than 4 images)"
    return [images[:1], images], f"4 real images from {folder}"


def check_calibration_memory(model: Any, source: str | Path, shape: Sequence[int], limit: int) -> None:
    """Refuse (BadInputError) int8 calibration that does not fit the memory budget: the images are prepared
    all at once (up to ``limit``; for digits the whole training split is resized first), and each
    calibration batch runs through the model (its forward's peak sized on the meta device)."""
    from vconvert.export.quantize import calibration_batch_size
    from vconvert.io.budget import check_allocation, check_forward, tensor_bytes

    image = [1, *(int(v) for v in shape[1:])]
    count = limit
    if str(source) == "digits":
        from vconvert.data.digits import digits_tensors

        count += len(digits_tensors("train")[1])
    size = "x".join(map(str, image[1:]))
    check_allocation(count * tensor_bytes(image), f"Calibrating on {limit} images of {source} at {size}")
    batch = [calibration_batch_size(shape), *image[1:]]
    check_forward(
        model,
        batch,
        f"Calibrating on batches of {batch[0]} images at {size}",
        lambda reason: f"The model rejects calibration batches of shape {batch} ({reason}).",
    )


def export_checkpoint(
    path: str | Path,
    output: str | Path,
    *,
    trust: bool = False,
    compact: bool = False,
    ring: bool = False,
    fold_bn: bool = True,
    input_shape: Sequence[int] | None = None,
    compare_original: bool = True,
    tolerance: float = 1e-4,
    progress: Callable[[str], None] | None = None,
    quantize: str = "none",
    calib_data: str | Path | None = None,
    calib_images: int = 512,
    min_agreement: float = 0.9,
    weight_bits: int | None = None,
    int8_target: str | None = None,
) -> ExportReport:
    """:func:`export` for a ``.vc.pt`` file: its model, its teacher, its preprocessing and input shape.

    With ``quantize="int8"`` the calibration images come from ``calib_data`` ("digits" or an image
    folder), else from the data the checkpoint records (its fine-tuning data or BN recalibration folder);
    up to ``calib_images`` of them, preprocessed as the checkpoint records. ``weight_bits``: the width of the
    int8 primaries (default: the width the checkpoint was fine-tuned at, else 8; see :func:`export`);
    ``int8_target``: ``any`` (default, exact on every CPU) or ``vnni`` (see :func:`export`).
    """
    from vconvert.data.datasets import describe_input, log, normalisation_origin
    from vconvert.errors import MissingCalibrationError
    from vconvert.export.quantize import calibration_images, calibration_source, check_quantize
    from vconvert.io.checkpoint import NOT_FINETUNED, load_checkpoint

    check_quantize(quantize, ring, weight_bits)
    output = check_writable(output)
    if Path(output).resolve() == Path(path).resolve():
        raise BadInputError(f"The output {output} would overwrite the checkpoint; choose another -o.")
    checkpoint = load_checkpoint(path, trust=trust)
    if not checkpoint.finetuned:
        log.info(f"{Path(path).name} is {NOT_FINETUNED}")
    shape = list(input_shape or checkpoint.metadata.input_shape)
    check_export_memory(checkpoint.model, shape)  # before any image is read
    inputs, note = load_verification_images(checkpoint.metadata, shape, calib_data if quantize != "none" else None)
    metadata: dict[str, Any] = {"vconvert.source": Path(path).name}
    if checkpoint.metadata.preprocessing:
        metadata["vconvert.preprocessing"] = checkpoint.metadata.preprocessing
    classes = (checkpoint.metadata.data or {}).get("classes")
    if isinstance(classes, list) and classes:  # so that evaluating the file on other classes warns
        metadata["vconvert.classes"] = classes
    calibration, calibration_note = None, ""
    if quantize != "none":
        source = calibration_source(calib_data, checkpoint.metadata)
        if source is None:
            missing = checkpoint.metadata.missing_data()
            records = f"records {shown(missing)}, which is not here" if missing else "records no image source"
            raise MissingCalibrationError(
                f"Int8 quantization needs calibration images: pass `calib_data` (a folder of images, or digits; none "
                f"was given and the checkpoint {records})."
            )
        recorded = checkpoint.metadata.preprocessing
        size_from = "`input_shape`" if input_shape else f"the input shape {Path(path).name} records"
        data_from = "`calib_data`" if calib_data is not None else f"recorded in {Path(path).name}"
        normalisation_from = normalisation_origin(False, bool(recorded), path, source)
        line = describe_input(None, size_from, normalisation_from, data_from, shape=shape, preprocessing=recorded,
                              data=source)  # fmt: skip
        log.info(f"calibration {line}")
        check_calibration_memory(checkpoint.model, source, shape, calib_images)
        calibration, calibration_note = calibration_images(
            source, shape, recorded, limit=calib_images, size_from=size_from
        )
    report = export(
        checkpoint.model,
        output,
        input_shape=shape,
        compact=compact,
        ring=ring,
        fold_bn=fold_bn,
        teacher=checkpoint.teacher if compare_original else None,
        inputs=inputs,
        inputs_note=note,
        metadata=metadata,
        tolerance=tolerance,
        progress=progress,
        quantize=quantize,
        calibration=calibration,
        min_agreement=min_agreement,
        int8_target=int8_target,
        weight_bits=weight_bits,
        source_name=Path(path).name,
    )
    if report.quantization is not None:
        report.quantization["calibration"] = calibration_note
    return report
