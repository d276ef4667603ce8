"""Top-1/top-5 of an artifact measured on the artifact itself: a ``.vc.pt``, a plain model or an
``.onnx`` file run through onnxruntime, with the preprocessing recorded beside it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from vconvert.data import open_split
from vconvert.errors import BadInputError
from vconvert.finetune import _limited, evaluate_model, topk_correct

ONNX_PREPROCESSING_KEY = "vconvert.preprocessing"


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


def onnx_preprocessing(path: Path) -> dict:
    """The preprocessing stored in an ONNX file's metadata_props (``{}`` when absent)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # onnx raises DecodeError and others for a file that is not ONNX
        raise BadInputError(f"{path} is not a readable ONNX file ({type(error).__name__}).") from None
    for prop in model.metadata_props:
        if prop.key in (ONNX_PREPROCESSING_KEY, "preprocessing"):
            return json.loads(prop.value)
    return {}


def _split(data: str, preprocessing: dict, input_shape: list[int] | None, limit: int | None) -> Dataset:
    shape = input_shape or [1, 3, *preprocessing.get("input_size", [224, 224])]
    dataset, _, _ = open_split(
        data,
        False,
        input_size=preprocessing.get("input_size") or shape[2:],
        channels=shape[1],
        mean=preprocessing.get("mean"),
        std=preprocessing.get("std"),
        augment=False,
    )
    return _limited(dataset, limit, 0)


def _evaluate_onnx(path: Path, dataset: Dataset, batch: int) -> tuple[float, float, int]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    correct1 = correct5 = total = 0
    for images, labels in DataLoader(dataset, batch_size=batch, num_workers=2):
        logits = torch.from_numpy(session.run(None, {input_name: images.numpy()})[0])
        correct1 += topk_correct(logits, labels, 1)
        correct5 += topk_correct(logits, labels, 5)
        total += len(labels)
    return 100.0 * correct1 / max(1, total), 100.0 * correct5 / max(1, total), total


def evaluate_file(
    path: str | Path,
    data: str,
    *,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    trust: bool = False,
    limit: int | None = None,
    batch: int = 256,
    input_shape: list[int] | None = None,
) -> Evaluation:
    """Measure top-1/top-5 of ``path`` on the evaluation split of ``data`` ("digits" or a folder).

    ``.onnx`` files run in onnxruntime (CPU); ``.vc.pt`` files are rebuilt; other files load as
    models (``arch`` for a state_dict). Preprocessing comes from the file when it records one.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path} does not exist; pass a .vc.pt, .onnx or model file.")
    if path.suffix == ".onnx":
        preprocessing = onnx_preprocessing(path)
        dataset = _split(data, preprocessing, input_shape, limit)
        top1, top5, images = _evaluate_onnx(path, dataset, batch)
        return Evaluation(str(path), "onnx", data, images, top1, top5)
    from vconvert.api import is_checkpoint, load_checkpoint

    if is_checkpoint(path):
        checkpoint = load_checkpoint(path, trust=trust)
        metadata = checkpoint.metadata or {}
        model, kind = checkpoint.model, "vconvert checkpoint"
        preprocessing = metadata.get("preprocessing") or {}
        input_shape = input_shape or metadata.get("input_shape")
    else:
        from vconvert.io import load_model

        model, _ = load_model(path, arch=arch, arch_kwargs=arch_kwargs, trust=trust)
        kind, preprocessing = "model", {}
    dataset = _split(data, preprocessing, input_shape, limit)
    top1, top5, images = evaluate_model(model, dataset, torch.device("cpu"), batch=batch)
    return Evaluation(str(path), kind, data, images, top1, top5)
