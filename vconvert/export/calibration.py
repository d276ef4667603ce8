"""Calibration for the int8 export: the images (``digits`` or a folder, preprocessed as the checkpoint records,
in batches sized for memory) and onnxruntime's ``quantize_static`` on them (QDQ, MinMax, uint8 activations,
int8 symmetric per-channel weights, 7-bit with ``reduce_range`` for target ``any``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor

from vconvert.errors import BadInputError
from vconvert.io.metadata import CheckpointMetadata

__all__ = [
    "CALIBRATION_PIXELS",
    "calibration_batch_size",
    "calibration_images",
    "calibration_source",
    "quantize_static_qdq",
]


def calibration_source(given: str | Path | None, metadata: CheckpointMetadata) -> str | None:
    """The calibration image source: ``given``, else the data a checkpoint records (its fine-tuning data or
    its BN recalibration folder) when that still exists; None when there is none."""
    return str(given) if given is not None else metadata.recorded_data()


def _normalisation(preprocessing: Mapping[str, Any] | None, channels: int, source: str) -> tuple[list, list]:
    from vconvert.data.datasets import IMAGENET_MEAN, IMAGENET_STD

    if preprocessing and preprocessing.get("mean") is not None and preprocessing.get("std") is not None:
        mean, std = list(preprocessing["mean"]), list(preprocessing["std"])
        if len(mean) != channels or len(std) != channels:
            raise BadInputError(
                f"The recorded preprocessing has {len(mean)} mean and {len(std)} std values for a {channels}-channel "
                "input; the calibration images cannot be normalised."
            )
        return mean, std
    if channels == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    raise BadInputError(
        f"No mean/std is recorded for the model's {channels}-channel input, so the images of {source} cannot be "
        "normalised for calibration; record the preprocessing in the checkpoint (compress or finetune with it)."
    )


def _digits(shape: Sequence[int], preprocessing: Mapping[str, Any] | None, limit: int, seed: int) -> Tensor:
    from vconvert.data.datasets import open_split

    recorded = dict(preprocessing or {})
    dataset, _, _ = open_split(
        "digits", True, input_size=list(shape[2:]), channels=int(shape[1]), mean=recorded.get("mean"),
        std=recorded.get("std"), augment=False,
    )  # fmt: skip
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit].tolist()
    return torch.stack([dataset[index][0] for index in order])


def _image_files(folder: Path, root: Path) -> list[Path]:
    """The image files under ``folder``, listed as every image folder is (regular files only, no linked folders,
    links only inside ``root``: :func:`vconvert.data.image_folders.scan_images`)."""
    from vconvert.data.image_folders import scan_images

    files, _ = scan_images(str(folder), os.path.realpath(root))
    return [Path(file) for file in files]


def _folder(
    root: Path, shape: Sequence[int], preprocessing: Mapping[str, Any] | None, limit: int, seed: int, size_from: str
) -> Tensor:
    from vconvert.data.datasets import check_image_size, image_transform
    from vconvert.data.image_files import load_image

    if not root.is_dir():
        raise BadInputError(f"Calibration folder {root} does not exist; give a folder of images or 'digits'.")
    folder = root / "train" if (root / "train").is_dir() else root
    files = _image_files(folder, root)
    if not files:
        raise BadInputError(f"Calibration folder {folder} holds no image files (searched recursively).")
    channels, size = int(shape[1]), [int(s) for s in shape[2:]]
    check_image_size(folder, [str(file) for file in files], size, size_from)
    mean, std = _normalisation(preprocessing, channels, str(folder))
    transform = image_transform(size, channels, mean, std, augment=False)
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    images = []
    for index in order:
        try:
            images.append(transform(load_image(str(files[index]), channels)))
        except Exception:  # not an image, over the pixel budget, not a regular file: skip it
            continue
        if len(images) == limit:
            break
    if not images:
        raise BadInputError(f"None of the {len(files)} image files in calibration folder {folder} could be read.")
    return torch.stack(images)


def calibration_images(
    source: str | Path,
    input_shape: Sequence[int],
    preprocessing: Mapping[str, Any] | None = None,
    *,
    limit: int = 512,
    batch_size: int | None = None,
    seed: int = 0,
    size_from: str = "the model's input size",
) -> tuple[list[Tensor], str]:
    """Up to ``limit`` preprocessed calibration images in batches (of ``batch_size``, default
    :func:`calibration_batch_size`), and a note saying where they came from.

    ``source`` is ``"digits"`` or a folder of images, read recursively (its ``train/`` split when it has
    one; labels are not needed). Images are resized to ``input_shape`` (N, C, H, W) and normalised with
    the mean/std ``preprocessing`` records (ImageNet's for RGB when it records none), the same random
    subset for the same ``seed``; unreadable files are skipped.
    """
    if limit < 1:
        raise BadInputError(f"The number of calibration images must be at least 1, got {limit}.")
    if str(source) == "digits":
        images = _digits(input_shape, preprocessing, limit, seed)
        note = f"{len(images)} digits training images"
    else:
        root = Path(source).expanduser()
        images = _folder(root, input_shape, preprocessing, limit, seed, size_from)
        note = f"{len(images)} images from {root}"
    if list(images.shape[1:]) != [int(s) for s in input_shape[1:]]:
        raise BadInputError(
            f"The calibration images of {source} are {'x'.join(map(str, images.shape[1:]))} and the model takes "
            f"{'x'.join(map(str, input_shape[1:]))}; calibrate on images the model can take."
        )
    return list(images.split(batch_size or calibration_batch_size(input_shape))), note


CALIBRATION_PIXELS = 2 * 224 * 224  # per batch: every onnxruntime session sizes its memory arena by its largest run


def calibration_batch_size(input_shape: Sequence[int]) -> int:
    """Images per calibration batch: 32 for small images, fewer for large ones (2 at 224x224), so that the
    calibration and check sessions do not each keep several GB of activations (resnet50 at 224: 2 per batch
    peaks at 2.69 GB RSS, 4 at 3.11 GB, 8 at 3.98 GB). Batching changes no result
    (MinMax ranges and top-1 agreement are taken over all images)."""
    return max(1, min(32, CALIBRATION_PIXELS // (int(input_shape[2]) * int(input_shape[3]))))


class _Batches:
    """An onnxruntime CalibrationDataReader over in-memory batches."""

    def __init__(self, batches: Sequence[Tensor], input_name: str) -> None:
        self._batches, self._name = batches, input_name
        self._next: Iterator[Tensor] = iter(batches)

    def get_next(self) -> dict | None:
        batch = next(self._next, None)
        return None if batch is None else {self._name: batch.numpy()}

    def __len__(self) -> int:
        return len(self._batches)

    def rewind(self) -> None:
        self._next = iter(self._batches)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence onnxruntime.quantization's root-logger advice ("consider pre-processing") and warnings.

    Its module-level ``logging.info``/``logging.warning`` calls also install a stderr handler on a root logger
    that has none (``logging.basicConfig``), which would print every later log line of the process twice: the
    root's handlers are put back as they were.
    """
    previous, handlers = logging.root.manager.disable, list(logging.root.handlers)
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
        logging.root.handlers[:] = handlers


def quantize_static_qdq(
    fp32_bytes: bytes, batches: Sequence[Tensor], input_name: str, *, reduce_range: bool = True
) -> onnx.ModelProto:
    """onnxruntime's ``quantize_static`` on ``batches``: QDQ, MinMax, uint8 activations per tensor, int8 symmetric
    weights per output channel; with ``reduce_range`` the weights are 7-bit (|q| ≤ 64: 2 · 255 · 64 = 32640 fits
    the int16 pair sums of x86 CPUs without VNNI)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    reader = _Batches(batches, input_name)
    assert isinstance(reader, CalibrationDataReader)  # structural: get_next is all it needs
    with tempfile.TemporaryDirectory(prefix="vconvert-int8-") as folder, _quiet():
        source, target = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        source.write_bytes(fp32_bytes)
        quantize_static(
            str(source),
            str(target),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            reduce_range=reduce_range,
            # no CalibMaxIntermediateOutputs: the calibrator keeps only per-batch min/max scalars anyway, and in
            # onnxruntime 1.32 that option drops every full chunk of batches instead of merging its range
        )
        return onnx.load(str(target))
