"""Top-1/top-5 of an artifact measured on the artifact itself: a ``.vc.pt``, a plain model or an
``.onnx`` file run through onnxruntime, with the preprocessing recorded beside it."""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vconvert.data.datasets import (
    DIGITS,
    DataSpec,
    batch_loader,
    check_class_count,
    choose_data,
    default_image_size,
    describe_input,
    limited,
    log,
    normalisation_origin,
    open_split,
)
from vconvert.errors import BadInputError, CheckFailedError, VConvertWarning, first_line
from vconvert.validate import check_input_shape, check_preprocessing

ONNX_PREPROCESSING_KEY = "vconvert.preprocessing"
ONNX_INPUT_SHAPE_KEY = "vconvert.input_shape"


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[1])
    return int((logits.topk(k, dim=1).indices == labels.unsqueeze(1)).any(dim=1).sum())


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset: Dataset, device: torch.device, batch: int = 256, workers: int = 2):
    """(top-1 %, top-5 %, images) of ``model`` on ``dataset``."""
    return evaluate_batches(model, batch_loader(dataset, batch, workers), device)


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches, device: torch.device) -> tuple[float, float, int]:
    """(top-1 %, top-5 %, images) of ``model`` on (images, labels) ``batches``."""
    model.eval()
    correct1 = correct5 = total = 0
    for images, labels in batches:
        logits = model(images.to(device))
        labels = labels.to(device)
        correct1 += topk_correct(logits, labels, 1)
        correct5 += topk_correct(logits, labels, 5)
        total += len(labels)
    return 100.0 * correct1 / max(1, total), 100.0 * correct5 / max(1, total), total


class ClassNamesWarning(VConvertWarning):
    """The data's class folders are not named as the classes a checkpoint was fine-tuned on."""


@dataclass
class Evaluation:
    file: str
    kind: str  # "vconvert checkpoint", "model", "onnx"
    data: str
    images: int
    top1: float
    top5: float

    def to_dict(self) -> dict:
        return asdict(self)


def _metadata_value(props: dict[str, str], keys: tuple[str, ...], path: Path) -> tuple[str, object]:
    """(key, JSON value) of the first of ``keys`` an ONNX file's metadata holds, or (key, None)."""
    key = next((key for key in keys if key in props), keys[0])
    if key not in props:
        return key, None
    try:
        return key, json.loads(props[key])
    except (ValueError, RecursionError) as error:
        raise BadInputError(
            f"{path}'s metadata {key} is not valid JSON ({type(error).__name__}): the file is damaged."
        ) from None


def onnx_metadata(path: Path) -> tuple[dict | None, list | None]:
    """The preprocessing and the input shape (dynamic batch: None) an ONNX file's metadata_props record
    (None for either when absent), with strict types and bounds."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # onnx raises DecodeError and others for a file that is not ONNX
        raise BadInputError(f"{path} is not a readable ONNX file ({type(error).__name__}).") from None
    props = {prop.key: prop.value for prop in model.metadata_props}
    key, preprocessing = _metadata_value(props, (ONNX_PREPROCESSING_KEY, "preprocessing"), path)
    key, shape = _metadata_value(props, (ONNX_INPUT_SHAPE_KEY,), path)
    return (
        check_preprocessing(preprocessing, f"{path}'s metadata {ONNX_PREPROCESSING_KEY}"),
        None if shape is None else check_input_shape(shape, f"{path}'s metadata {key}", batch=False),
    )


def onnx_preprocessing(path: Path) -> dict:
    """The preprocessing stored in an ONNX file's metadata_props (``{}`` when absent)."""
    return onnx_metadata(path)[0] or {}


def _onnx_session(path: Path):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own types for graphs it cannot load
        raise BadInputError(f"onnxruntime cannot load {path} ({first_line(error)}).") from None


def _onnx_input_shape(
    session, path: Path, data: str, preprocessing: dict | None, recorded: list | None, asked: list[int] | None
) -> list[int]:
    """The N,C,H,W to feed: the graph's fixed sizes, else the asked or recorded shape, else the data's
    own; every source must agree with the graph, and the result is bounded."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise BadInputError(f"{path} takes {len(inputs)} inputs; evaluate feeds a model one batch of images.")
    declared = inputs[0]
    if declared.type != "tensor(float)":
        raise BadInputError(f"{path} takes a {declared.type} input, not float images.")
    if len(declared.shape) != 4:
        raise BadInputError(f"{path} takes a rank-{len(declared.shape)} input, not images N,C,H,W.")
    fixed = [size if isinstance(size, int) and size > 0 else None for size in declared.shape]
    for what, shape in (("the input shape asked for", asked), ("its metadata input shape", recorded)):
        if shape is not None and any(f is not None and f != s for f, s in zip(fixed[1:], shape[1:], strict=True)):
            raise BadInputError(f"{path} takes images of shape {declared.shape} but {what} is {list(shape)}.")
    known = asked or recorded
    size = (known[2:] if known else None) or (preprocessing or {}).get("input_size") or default_image_size(data)
    if fixed[2] and fixed[3]:
        size_from = "the ONNX graph's fixed input size"
    elif asked:
        size_from = "`input_shape`"
    elif recorded or (preprocessing or {}).get("input_size"):
        size_from = f"the input shape {path.name} records"
    else:
        size_from = _default_size_origin(data)
    channels = fixed[1] or (known[1] if known else None)
    if channels is None:
        channels = len(preprocessing["mean"]) if preprocessing else 1 if data == DIGITS else 3
    shape = check_input_shape(
        [fixed[0] or 1, channels, fixed[2] or size[0], fixed[3] or size[1]], f"{path}'s input {declared.shape}"
    )
    if preprocessing and len(preprocessing["mean"]) != shape[1]:
        raise BadInputError(
            f"{path}'s metadata normalises {len(preprocessing['mean'])} channels but the model takes {shape[1]}: "
            "the file is damaged."
        )
    return shape, size_from


def _default_size_origin(data: str) -> str:
    size = "x".join(map(str, default_image_size(data)))
    return f"digits' own {size}" if data == DIGITS else f"the default for folders, {size}; `input_shape` sets it"


def _split(
    data: str, preprocessing: dict, input_shape: list[int] | None, limit: int | None, size_from: str
) -> tuple[Dataset, DataSpec]:
    size = preprocessing.get("input_size") or (input_shape[2:] if input_shape else None)
    channels = input_shape[1] if input_shape else len(preprocessing["mean"]) if preprocessing.get("mean") else None
    dataset, spec, _ = open_split(
        data,
        False,
        input_size=size,
        channels=channels,
        mean=preprocessing.get("mean"),
        std=preprocessing.get("std"),
        augment=False,
        size_from=size_from,
    )
    return limited(dataset, limit, 0), spec


def _check_recorded_classes(recorded: list[str] | None, spec: DataSpec, path: Path) -> None:
    """Warn when a checkpoint records class names and the data's class folders are named otherwise."""
    if isinstance(recorded, list) and len(recorded) == len(spec.classes) and recorded != spec.classes:
        shown = ", ".join(map(str, recorded[:3])) + (", ..." if len(recorded) > 3 else "")
        warnings.warn(
            ClassNamesWarning(
                f"The class folders of {spec.source} ({', '.join(spec.classes[:3])}, ...) are not the classes "
                f"{path.name} was fine-tuned on ({shown}); labels follow the folders' sorted order."
            ),
            stacklevel=2,
        )


def _workers(dataset: Dataset, batch: int) -> int:
    """Worker processes only pay off beyond one batch."""
    return 2 if len(dataset) > batch else 0  # type: ignore[arg-type]


def _evaluate_onnx(session, path: Path, dataset: Dataset, batch: int, classes: int) -> tuple[float, float, int]:
    """(top-1 %, top-5 %, images); a graph with a fixed batch gets batches of that size (the last padded)."""
    declared = session.get_inputs()[0]
    fixed = declared.shape[0] if isinstance(declared.shape[0], int) and declared.shape[0] > 0 else None
    batch = fixed or batch
    correct1 = correct5 = total = 0
    for images, labels in DataLoader(dataset, batch_size=batch, num_workers=_workers(dataset, batch)):
        if fixed and len(images) < fixed:
            images = torch.cat([images, images.new_zeros(fixed - len(images), *images.shape[1:])])
        try:
            logits = torch.from_numpy(session.run(None, {declared.name: images.numpy()})[0])[: len(labels)]
        except Exception as error:  # onnxruntime raises its own types
            raise BadInputError(
                f"onnxruntime cannot run {path} on images of shape {list(images.shape)} ({first_line(error)})."
            ) from None
        if logits.ndim != 2 or len(logits) != len(labels) or not logits.is_floating_point():
            raise BadInputError(f"{path} gives outputs of shape {list(logits.shape)}, not (batch, classes) scores.")
        check_class_count(len(logits[0]), classes, "evaluate")
        if not bool(torch.isfinite(logits).all()):
            raise CheckFailedError(f"{path} gives NaN or infinite scores on the evaluation images: it is damaged.")
        correct1 += topk_correct(logits, labels, 1)
        correct5 += topk_correct(logits, labels, 5)
        total += len(labels)
    return 100.0 * correct1 / max(1, total), 100.0 * correct5 / max(1, total), total


def evaluate_file(
    path: str | Path,
    data: str | None = None,
    *,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    trust: bool = False,
    limit: int | None = None,
    batch: int = 256,
    input_shape: list[int] | None = None,
) -> Evaluation:
    """Measure top-1/top-5 of ``path`` on the evaluation split of ``data`` ("digits" or a folder; None: the
    data a ``.vc.pt`` records).

    ``.onnx`` files run in onnxruntime (CPU); ``.vc.pt`` files are rebuilt; other files load as
    models (``arch`` for a state_dict). Preprocessing comes from the file when it records one. The data
    must have as many classes as the model scores. Logs the input line (size, normalisation, origins).
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path} does not exist; pass a .vc.pt, .onnx or model file.")
    if path.suffix == ".onnx":
        preprocessing, recorded = onnx_metadata(path)
        session = _onnx_session(path)
        data, data_from = choose_data(data, None, path)  # a damaged file is said first
        shape, size_from = _onnx_input_shape(session, path, data, preprocessing, recorded, input_shape)
        normalisation_from = normalisation_origin(False, bool(preprocessing), path, data)
        preprocessing = {**(preprocessing or {}), "input_size": shape[2:]}  # the graph's sizes win
        dataset, spec = _split(data, preprocessing, shape, limit, size_from)
        log.info(describe_input(spec, size_from, normalisation_from, data_from))
        top1, top5, images = _evaluate_onnx(session, path, dataset, batch, len(spec.classes))
        return Evaluation(str(path), "onnx", data, images, top1, top5)
    from vconvert.io.checkpoint import is_checkpoint, load_checkpoint

    recorded_classes = None
    if is_checkpoint(path):
        checkpoint = load_checkpoint(path, trust=trust)
        data, data_from = choose_data(data, checkpoint.metadata.recorded_data(), path)
        model, kind = checkpoint.model, "vconvert checkpoint"
        preprocessing = checkpoint.metadata.preprocessing or {}
        recorded_classes = (checkpoint.metadata.data or {}).get("classes")
        size_from = "`input_shape`" if input_shape else f"the input shape {path.name} records"
        input_shape = input_shape or checkpoint.metadata.input_shape
    else:
        from vconvert.io.untrusted import load_model

        model, _ = load_model(path, arch=arch, arch_kwargs=arch_kwargs, trust=trust)
        data, data_from = choose_data(data, None, path)
        kind, preprocessing = "model", {}
        size_from = "`input_shape`" if input_shape else _default_size_origin(data)
    dataset, spec = _split(data, preprocessing, input_shape, limit, size_from)
    normalisation_from = normalisation_origin(False, bool(preprocessing.get("mean")), path, data)
    log.info(describe_input(spec, size_from, normalisation_from, data_from))
    _check_recorded_classes(recorded_classes, spec, path)
    image, _ = dataset[0]
    try:
        with torch.no_grad():
            check_class_count(model.eval()(image.unsqueeze(0)).shape[-1], len(spec.classes), "evaluate")
        workers = _workers(dataset, batch)
        top1, top5, images = evaluate_model(model, dataset, torch.device("cpu"), batch=batch, workers=workers)
    except RuntimeError as error:  # the model's own forward refuses the images
        raise BadInputError(
            f"The model of {path} rejects the evaluation images ({first_line(error)}): give the input shape it takes."
        ) from error
    return Evaluation(str(path), kind, data, images, top1, top5)
