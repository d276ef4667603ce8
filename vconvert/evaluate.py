"""Top-1/top-5 of an artifact measured on the artifact itself: a ``.vc.pt``, a plain model or an
``.onnx`` file run through onnxruntime, with the preprocessing recorded beside it."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vconvert.data.datasets import (
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
from vconvert.data.digits import DIGITS
from vconvert.errors import BadInputError, CheckFailedError, VConvertWarning, first_line, shown
from vconvert.io.budget import (
    ForwardRejected,
    check_allocation,
    check_forward,
    forward_peak_bytes,
    largest_fitting_batch,
    meta_cannot_run,
    tensor_bytes,
)
from vconvert.validate import check_input_shape, check_plain, check_preprocessing

ONNX_PREPROCESSING_KEY = "vconvert.preprocessing"
ONNX_INPUT_SHAPE_KEY = "vconvert.input_shape"
ONNX_CLASSES_KEY = "vconvert.classes"  # the class names the model was fine-tuned on, when its checkpoint records them
MAX_CLASSES, MAX_CLASS_NAME = 100_000, 255


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
        value = json.loads(props[key])
    except (ValueError, RecursionError) as error:
        raise BadInputError(
            f"{path}'s metadata {key} is not valid JSON ({type(error).__name__}): the file is damaged."
        ) from None
    check_plain(value, f"{path}'s metadata {key}")
    return key, value


def _load_onnx(path: Path):
    """The ModelProto of an ONNX file (its weights inline; external data is not read)."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as error:  # onnx raises DecodeError and others for a file that is not ONNX
        raise BadInputError(f"{path} is not a readable ONNX file ({type(error).__name__}).") from None


def onnx_metadata(path: Path, model=None) -> tuple[dict | None, list | None]:
    """The preprocessing and the input shape (dynamic batch: None) an ONNX file's metadata_props record
    (None for either when absent), with strict types and bounds (``model``: the file's proto, when loaded)."""
    model = model if model is not None else _load_onnx(path)
    props = {prop.key: prop.value for prop in model.metadata_props}
    key, preprocessing = _metadata_value(props, (ONNX_PREPROCESSING_KEY, "preprocessing"), path)
    key, shape = _metadata_value(props, (ONNX_INPUT_SHAPE_KEY,), path)
    return (
        check_preprocessing(preprocessing, f"{path}'s metadata {ONNX_PREPROCESSING_KEY}"),
        None if shape is None else check_input_shape(shape, f"{path}'s metadata {key}", batch=False),
    )


def onnx_classes(path: Path, model) -> list[str] | None:
    """The class names an ONNX file records (``vconvert.classes``), checked: a list of at most 100,000 strings of
    at most 255 characters; None when absent."""
    props = {prop.key: prop.value for prop in model.metadata_props}
    _, classes = _metadata_value(props, (ONNX_CLASSES_KEY,), path)
    if classes is None:
        return None
    if not (
        isinstance(classes, list)
        and len(classes) <= MAX_CLASSES
        and all(isinstance(name, str) and len(name) <= MAX_CLASS_NAME for name in classes)
    ):
        raise BadInputError(
            f"{path}'s metadata {ONNX_CLASSES_KEY} is not a list of class names (at most {MAX_CLASSES:,} strings of "
            f"at most {MAX_CLASS_NAME} characters): the file is damaged."
        )
    return classes


def _without_values(tensor):
    """A weight as shape inference needs it: its type and dims; values only for small ones (shapes, axes)."""
    from onnx import TensorProto

    if math.prod(tensor.dims) <= 1024:
        return tensor
    return TensorProto(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type)


def _with_shape(value_info, shape: list[int]):
    """A copy of a graph input's ValueInfoProto with every dimension fixed to ``shape``."""
    from onnx import ValueInfoProto

    fixed = ValueInfoProto()
    fixed.CopyFrom(value_info)
    for dim, size in zip(fixed.type.tensor_type.shape.dim, shape, strict=True):
        dim.Clear()
        dim.dim_value = int(size)
    return fixed


def onnx_peak_bytes(model, shape: list[int]) -> int:
    """Peak bytes of the values an ONNX graph computes on a float32 input of ``shape``, the input included:
    shapes inferred by ``onnx.shape_inference`` with the input's sizes fixed, each value held from the node
    that makes it to the last node that reads it (values of unknown size count 0). Weights are not counted
    (the file holds them)."""
    from onnx import helper, shape_inference

    weights = {tensor.name for tensor in model.graph.initializer}
    graph_input = next((item for item in model.graph.input if item.name not in weights), None)
    if graph_input is None:
        return tensor_bytes(shape)
    shaped = helper.make_model(
        helper.make_graph(
            model.graph.node,
            model.graph.name,
            [_with_shape(graph_input, shape), *(item for item in model.graph.input if item.name in weights)],
            model.graph.output,
            [_without_values(tensor) for tensor in model.graph.initializer],
        ),
        opset_imports=model.opset_import,
        ir_version=model.ir_version,
        functions=model.functions,
    )
    try:
        inferred = shape_inference.infer_shapes(shaped).graph
    except Exception:  # a graph onnx cannot infer: only the input is sized
        return tensor_bytes(shape)
    sizes: dict[str, int] = {graph_input.name: tensor_bytes(shape)}
    for info in [*inferred.value_info, *inferred.output]:
        kind = info.type.tensor_type
        dims = [dim.dim_value if dim.HasField("dim_value") else 0 for dim in kind.shape.dim]
        if kind.elem_type and all(size > 0 for size in dims):
            itemsize = helper.tensor_dtype_to_np_dtype(kind.elem_type).itemsize
            sizes[info.name] = math.prod(dims) * itemsize
    last_use = {name: len(inferred.node) for name in (item.name for item in inferred.output)}
    for index, node in enumerate(inferred.node):
        for name in node.input:
            last_use[name] = max(last_use.get(name, index), index)
    live = peak = sizes[graph_input.name]
    for index, node in enumerate(inferred.node):
        live += sum(sizes.get(name, 0) for name in node.output)
        peak = max(peak, live)
        live -= sum(sizes.get(name, 0) for name in {*node.input, *node.output} if last_use.get(name, index) <= index)
    return peak


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


class _ResizedDigits(Dataset):
    """The digits split resized one image at a time as it is read (never the whole split at once: at a size
    a file records, 360 images can take tens of GB), then normalised as :func:`open_split` normalises it."""

    def __init__(self, base, size: list[int]) -> None:
        self.base, self.size = base, size

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.nn.functional.interpolate(
            self.base.images[index : index + 1], size=self.size, mode="bilinear", align_corners=False
        )[0]
        return self.base.transform(image), int(self.base.labels[index])


def _split(
    data: str, preprocessing: dict, input_shape: list[int] | None, limit: int | None, size_from: str
) -> tuple[Dataset, DataSpec]:
    size = preprocessing.get("input_size") or (input_shape[2:] if input_shape else None)
    channels = input_shape[1] if input_shape else len(preprocessing["mean"]) if preprocessing.get("mean") else None
    resized = data == DIGITS and size is not None and list(size) != default_image_size(DIGITS)
    dataset, spec, _ = open_split(
        data,
        False,
        input_size=None if resized else size,
        channels=channels,
        mean=preprocessing.get("mean"),
        std=preprocessing.get("std"),
        augment=False,
        size_from=size_from,
    )
    if resized:
        dataset, spec = _ResizedDigits(dataset, list(size)), replace(spec, input_size=list(size))
    return limited(dataset, limit, 0), spec


def _check_recorded_classes(recorded: list[str] | None, spec: DataSpec, path: Path) -> None:
    """Warn when a checkpoint records class names and the data's class folders are named otherwise."""
    if isinstance(recorded, list) and len(recorded) == len(spec.classes) and recorded != spec.classes:
        names = ", ".join(shown(name, 40) for name in recorded[:3]) + (", ..." if len(recorded) > 3 else "")
        folders = ", ".join(shown(name, 40) for name in spec.classes[:3])
        warnings.warn(
            ClassNamesWarning(
                f"The class folders of {shown(spec.source)} ({folders}, ...) are not the classes "
                f"{shown(path.name)} was fine-tuned on ({names}); labels follow the folders' sorted order."
            ),
            stacklevel=2,
        )


def _asked_normalisation(mean: list[float] | None, std: list[float] | None, channels: int | None) -> dict:
    """``{"mean", "std"}`` the caller asked for (empty when none), one value per input channel."""
    if mean is None or std is None:
        return {}
    if channels is not None and not len(mean) == len(std) == channels:
        raise BadInputError(
            f"`mean` and `std` need one value per input channel: the model takes {channels}, got {len(mean)} and "
            f"{len(std)}."
        )
    return {"mean": list(mean), "std": list(std)}


def _workers(dataset: Dataset, batch: int) -> int:
    """Worker processes only pay off beyond one batch."""
    return 2 if len(dataset) > batch else 0  # type: ignore[arg-type]


def _in_flight(dataset: Dataset, batch: int) -> int:
    """Batches of images held at once: the one the model runs, and two prefetched by each worker."""
    return 1 + 2 * _workers(dataset, batch)


def _onnx_batch(session, model, path: Path, shape: list[int], dataset: Dataset, batch: int) -> int:
    """The batch to feed an ONNX graph within the memory budget: its fixed batch, else the largest of
    ``batch``, ``batch``/2, ... that fits; each sized as the graph's values (:func:`onnx_peak_bytes`, the
    input included) plus the other image batches held at once (and, for a fixed batch, the padded copy of
    the last one), and refused (BadInputError) when even that one does not fit."""
    declared = session.get_inputs()[0].shape[0]
    fixed = declared if isinstance(declared, int) and declared > 0 else None

    def needs(size: int) -> int:
        images = [size, *shape[1:]]
        others = _in_flight(dataset, size) - 1 + (1 if fixed else 0)
        return onnx_peak_bytes(model, images) + others * tensor_bytes(images)

    chosen = fixed or largest_fitting_batch(needs, batch)
    check_allocation(
        needs(chosen),
        f"Evaluating {path} on batches of {chosen} images of {'x'.join(map(str, shape[1:]))}"
        + (" (the graph's fixed batch)" if fixed else ""),
    )
    return chosen


def _evaluate_onnx(session, path: Path, dataset: Dataset, batch: int, classes: int) -> tuple[float, float, int]:
    """(top-1 %, top-5 %, images) on batches of ``batch`` (a graph's fixed batch: the last one padded)."""
    declared = session.get_inputs()[0]
    fixed = declared.shape[0] if isinstance(declared.shape[0], int) and declared.shape[0] > 0 else None
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


def _model_batch(model: nn.Module, path: Path, shape: list[int], dataset: Dataset, batch: int) -> int:
    """The batch to feed a PyTorch model within the memory budget: the largest of ``batch``, ``batch``/2, ...
    whose forward peak (sized on the meta device) plus the image batches held at once fits; refused
    (BadInputError) when even one image does not, or when the model refuses the shape."""

    def needs(size: int) -> int:
        images = [size, *shape[1:]]
        try:
            peak = forward_peak_bytes(model, images)
        except Exception as error:  # a forward the meta device cannot run is sized for real below
            if not meta_cannot_run(error):
                raise ForwardRejected(first_line(error)) from None
            peak = tensor_bytes(images)
        return peak + (_in_flight(dataset, size) - 1) * tensor_bytes(images)

    what = f"Evaluating {path} on images of {'x'.join(map(str, shape[1:]))}"
    try:
        chosen = largest_fitting_batch(needs, batch)
        check_allocation(needs(chosen), f"{what} in batches of {chosen}")
        check_forward(model, [chosen, *shape[1:]], f"{what} in batches of {chosen}")
    except ForwardRejected as error:
        raise BadInputError(
            f"The model of {path} rejects the evaluation images ({error}): give the input shape it takes."
        ) from None
    return chosen


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
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> Evaluation:
    """Measure top-1/top-5 of ``path`` on the evaluation split of ``data`` ("digits" or a folder; None: the
    data a ``.vc.pt`` records).

    ``.onnx`` files run in onnxruntime (CPU); ``.vc.pt`` files are rebuilt; other files load as
    models (``arch`` for a state_dict). Preprocessing comes from the file when it records one; ``mean`` and
    ``std`` (one per input channel, on the 0-1 scale) replace it (a plain model records none: give the
    normalisation it was trained with). The data must have as many classes as the model scores; a file that
    records class names warns when the folders are named otherwise. Logs the input line (size, normalisation,
    origins).
    """
    path = Path(path)
    if (mean is None) != (std is None):
        raise BadInputError("Pass `mean` and `std` together.")
    if not path.is_file():
        raise BadInputError(f"{path} does not exist; pass a .vc.pt, .onnx or model file.")
    if path.suffix == ".onnx":
        proto = _load_onnx(path)
        preprocessing, recorded = onnx_metadata(path, proto)
        session = _onnx_session(path)
        recorded_classes = onnx_classes(path, proto)
        data, data_from = choose_data(data, None, path)  # a damaged file is said first
        shape, size_from = _onnx_input_shape(session, path, data, preprocessing, recorded, input_shape)
        normalisation_from = normalisation_origin(mean is not None, bool(preprocessing), path, data)
        preprocessing = {**(preprocessing or {}), **_asked_normalisation(mean, std, shape[1]), "input_size": shape[2:]}
        dataset, spec = _split(data, preprocessing, shape, limit, size_from)
        log.info(describe_input(spec, size_from, normalisation_from, data_from))
        _check_recorded_classes(recorded_classes, spec, path)
        batch = _onnx_batch(session, proto, path, shape, dataset, batch)
        del proto
        top1, top5, images = _evaluate_onnx(session, path, dataset, batch, len(spec.classes))
        return Evaluation(str(path), "onnx", data, images, top1, top5)
    from vconvert.io.checkpoint import is_checkpoint, load_checkpoint

    recorded_classes = None
    if is_checkpoint(path):
        checkpoint = load_checkpoint(path, trust=trust)
        data, data_from = choose_data(
            data, checkpoint.metadata.recorded_data(), path, checkpoint.metadata.missing_data()
        )
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
    channels = input_shape[1] if input_shape else len(mean) if mean else None
    preprocessing = {**preprocessing, **_asked_normalisation(mean, std, channels)}
    dataset, spec = _split(data, preprocessing, input_shape, limit, size_from)
    normalisation_from = normalisation_origin(mean is not None, bool(preprocessing.get("mean")), path, data)
    log.info(describe_input(spec, size_from, normalisation_from, data_from))
    _check_recorded_classes(recorded_classes, spec, path)
    image, _ = dataset[0]
    batch = _model_batch(model.eval(), path, [1, *image.shape], dataset, batch)
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
