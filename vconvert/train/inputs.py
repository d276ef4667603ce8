"""The images a fine-tuning run reads: its data (``--data`` or what the checkpoint records), prepared as the
checkpoint records, checked against the model's outputs, and batched.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from vconvert.data.datasets import (
    DataSpec,
    SeededSamples,
    check_class_count,
    describe_input,
    limited,
    log,
    normalisation_origin,
    open_split,
)
from vconvert.data.digits import DIGITS
from vconvert.errors import BadInputError, first_line
from vconvert.io.checkpoint import Checkpoint
from vconvert.train.config import FinetuneConfig


def _resolve_preprocessing(config: FinetuneConfig, checkpoint: Checkpoint) -> tuple[list | None, list | None, bool]:
    """``mean``/``std``, else what compress recorded, else the data set's own default (mean, std, recorded)."""
    if config.mean is not None:
        return config.mean, config.std, False
    recorded = checkpoint.metadata.preprocessing or {}
    if config.data != DIGITS and recorded.get("mean") is not None:
        return recorded["mean"], recorded["std"], True
    return None, None, False


def open_data(
    config: FinetuneConfig,
    checkpoint: Checkpoint,
    file: Path | str = "the checkpoint",
    data_from: str = "",
    announce: bool = True,
) -> tuple[Dataset, Dataset, DataSpec, int]:
    """The (seeded, limited) training and evaluation splits of ``config.data`` as the checkpoint's model
    takes them, their DataSpec and the number of unreadable files skipped; logs (when ``announce``) the
    input line: size, normalisation and where they came from."""
    input_shape = checkpoint.metadata.input_shape
    mean, std, recorded = _resolve_preprocessing(config, checkpoint)
    size_from = f"the input shape {Path(file).name} records"
    options = {"input_size": input_shape[2:], "channels": input_shape[1], "mean": mean, "std": std,
               "size_from": size_from}  # fmt: skip
    train, spec, skipped_train = open_split(config.data, True, augment=config.augment, **options)
    options["mean"], options["std"] = spec.mean, spec.std
    evaluation, eval_spec, skipped_eval = open_split(config.data, False, augment=False, check_size=False, **options)
    if eval_spec.classes != spec.classes:
        raise BadInputError(
            f"The evaluation split's classes ({len(eval_spec.classes)}) differ from the training split's "
            f"({len(spec.classes)}); give both the same class folders."
        )
    normalisation_from = normalisation_origin(config.mean is not None, recorded, file, spec.source)
    if announce:
        log.info(describe_input(spec, size_from, normalisation_from, data_from))
    return (
        SeededSamples(limited(train, config.train_limit, config.seed), config.seed),
        limited(evaluation, config.eval_limit, config.seed),
        spec,
        skipped_train + skipped_eval,
    )


def _check_classes(model: nn.Module, dataset: Dataset, spec: DataSpec, device: torch.device) -> None:
    image, _ = dataset[0]
    try:
        with torch.no_grad():
            outputs = model.eval()(image.unsqueeze(0).to(device)).shape[-1]
    except RuntimeError as error:  # the recorded input shape does not suit the model
        reason = first_line(error)
        raise BadInputError(
            f"The model rejects the data's images of shape {list(image.shape)} ({reason}); the "
            "checkpoint's input shape does not match its model."
        ) from error
    check_class_count(outputs, len(spec.classes), "finetune")
