"""Accuracy against ONNX file size: vconvert next to INT8, 4-bit and pruning peers, every row a file in onnxruntime.

On the pretrained CIFAR-10 ResNet-20 (../shared/models, 88.57% on the 10,000 JPEG test images) one run
builds every artifact, evaluates each ONNX file with ``vconvert evaluate`` on the same test images and
measures onnxruntime latency at batch 1 and 64 for all files side by side at the end:

- dense fp32 (``vconvert.export.pipeline.export`` of the base model);
- dense + INT8 PTQ: onnxruntime's ``quantize_static`` on that file (QDQ, per-channel symmetric int8
  weights, uint8 activations, 512 calibration images): the first thing a user would try;
- dense W4: 4-bit weight-only quantization of every Conv/Gemm weight (int4 ``DequantizeLinear``,
  opset 21, one scale per output channel, no training): the ~8x peer;
- torch-pruning at 2x and 3x whole-model stored size, fine-tuned with the same budget, data, seed and
  distillation as vconvert (vconvert's own loop on the plain module), exported fp32, then INT8 PTQ;
- vconvert learned s=2 and s=4 (``compress`` defaults + ``finetune`` defaults), exported
  ``--compact`` (fp32) and ``--quantize int8 --compact``; s=4 also with ``--mask-sharing shared``;
- the same fine-tuned at 4 bits (``finetune --weight-bits 4``), exported ``--quantize int8 --compact``
  (4-bit primaries, packed at 4 bits, widened to int8 in the graph);
- ``compress --target-size R --reconstruct`` (per-layer plan, layers fitted to the original's outputs on 1,024
  unlabeled training images), fine-tuned with the same budget and exported ``--quantize int8 --compact``;
- quantization-aware peers with the same budget, loop, distillation and quantizer (one step per output
  channel): the dense network fine-tuned with 4-bit and with 3-bit weights, and torch-pruning 3x fine-tuned
  at 4 bits, each exported as int8 QDQ with 4-bit storage (3-bit values in 4-bit nibbles). Their convs are
  the ones vconvert converts (all but the stem and the downsampling 1x1s), run as one-filter-per-primary
  versatile convs (mode channel, one secondary: a dense conv with a per-output scale), so the quantizer,
  the export and its checks are vconvert's own.

Every int8 file is also run with onnxruntime's optimisations off (its QDQ graph as written: float convs on
dequantised weights and activations) and the results say on how many calibration images its int8 kernels
pick the same top-1 class: what the runtime's rounding leaves, next to what the export checked.

    python benchmarks/pareto.py --quick                 # 2,000 training images, 2 epochs, 10,000 test images
    python benchmarks/pareto.py [--work DIR]            # 50,000 images, 15 epochs, 10,000 test images (hours on CPU)
           [--rows a,b] [--epochs E] [--train-limit N] [--eval-limit N] [--precision P] [--train-only]
           [--int8-target any|vnni]
    python benchmarks/pareto.py --render RESULTS.json [--work DIR]   # only re-write its .md and .png

Every int8 file (vconvert's, the INT8 PTQ and QAT peers alike) is written for ``--int8-target`` (default any:
7-bit weights, exact on x86 CPUs without VNNI too; vnni: 8-bit weights, the tables before issue 28).

``--work DIR`` keeps the compressed and fine-tuned files there (git-ignored ``cache/`` is a good place):
a second run with the same ``--work`` reuses every fine-tuned file whose recorded options match, so the
hours of training and the minutes of measuring can run apart (``--train-only`` stops after training).
Writes benchmarks/results/pareto_cifar10[_quick].{json,md,png}; trained files never enter the repository.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `benchmarks` importable
from benchmarks import common
from benchmarks.cifar10 import (
    INPUT_SHAPE,
    MEAN,
    PUBLISHED_BASELINE,
    STD,
    measure_latencies,
    parse,
    plain_module_finetune,
    prune_to_size,
)
from vconvert.errors import VConvertError

ARCH = "sample_models.resnet_cifar:resnet20"
CALIBRATION_IMAGES = 512
RECONSTRUCT = ["--reconstruct", "--calib-images", "1024"]  # the planner rows' start: `compress --reconstruct`


@dataclass
class Row:
    """One artifact of the table."""

    name: str
    method: str  # dense | int8-ptq | w4 | pruning | qat | versatile | planner
    bits: int  # the weights' width; 0: one per layer (the planner)
    train: str | None = None  # the fine-tuned model it comes from (key of TRAININGS), None: the base
    export: list[str] = field(default_factory=list)  # vconvert export options (versatile rows)
    int8: bool = False  # INT8 PTQ of the fp32 file (peers)

    @property
    def runs_int8_kernels(self) -> bool:
        """An int8 QDQ file (QLinearConv at run time), not a float or weight-only one."""
        return self.bits <= 8 and self.method != "w4"

    @property
    def versatile(self) -> bool:
        """Exported by ``vconvert export`` from a fine-tuned ``.vc.pt``."""
        return self.method in ("versatile", "planner")


PLAN_SIZES = (0.06, 0.07, 0.08, 0.10, 0.12, 0.15, 0.20)  # compress --target-size rows

# What is trained: versatile compress options, or a pruning target (whole-model stored size ratio).
TRAININGS: dict[str, dict[str, Any]] = {  # trained in this order: the rows the targets need first
    "s2": {"compress": ["--mode", "learned", "--secondary", "2"]},
    "s4": {"compress": ["--mode", "learned", "--secondary", "4"]},
    "prune2": {"prune": 2.0},
    "prune3": {"prune": 3.0},
    "s4-shared": {"compress": ["--mode", "learned", "--secondary", "4", "--mask-sharing", "shared"]},
    "s2-w4": {"compress": ["--mode", "learned", "--secondary", "2"], "finetune": ["--weight-bits", "4"]},
    "s4-w4": {"compress": ["--mode", "learned", "--secondary", "4"], "finetune": ["--weight-bits", "4"]},
    "dense-w4": {"quantize": 4},
    "prune3-w4": {"prune": 3.0, "quantize": 4},
    "dense-w3": {"quantize": 3},  # the library takes 3 bits (the CLI offers 4 and 8)
    "s4-shared-w4": {
        "compress": ["--mode", "learned", "--secondary", "4", "--mask-sharing", "shared"],
        "finetune": ["--weight-bits", "4"],
    },
    "s2-w3": {"compress": ["--mode", "learned", "--secondary", "2"], "finetune": ["--weight-bits", "3"]},
    "s4-w3": {"compress": ["--mode", "learned", "--secondary", "4"], "finetune": ["--weight-bits", "3"]},
    "s2-w2": {"compress": ["--mode", "learned", "--secondary", "2"], "finetune": ["--weight-bits", "2"]},
    "s4-w2": {"compress": ["--mode", "learned", "--secondary", "4"], "finetune": ["--weight-bits", "2"]},
    "dense-w2": {"quantize": 2},
    "brevitas-w4": {"quantize": 4, "library": "brevitas"},  # the same convs, budget and loop; brevitas's quantizer
    # compress --target-size: per conv dense or s=2/4 at 2-8 bits, planned on unlabeled images and reconstructed
    # on 1,024 of them (no labels) before the fine-tune, which keeps every layer's width; the export writes each
    # at it
    **{
        f"plan{size:g}": {"compress": ["--mode", "learned", "--target-size", f"{size:g}", *RECONSTRUCT]}
        for size in PLAN_SIZES
    },
}
INT8 = ["--quantize", "int8", "--compact"]
ROWS = [
    Row("dense fp32", "dense", 32),
    Row("dense + INT8 PTQ", "int8-ptq", 8, int8=True),
    Row("dense W4 (weight-only int4)", "w4", 4),
    Row("vconvert s=2 fp32 compact", "versatile", 32, "s2", ["--compact"]),
    Row("vconvert s=2 + int8 compact", "versatile", 8, "s2", INT8),
    Row("vconvert s=4 fp32 compact", "versatile", 32, "s4", ["--compact"]),
    Row("vconvert s=4 + int8 compact", "versatile", 8, "s4", INT8),
    Row("vconvert s=4 shared masks + int8 compact", "versatile", 8, "s4-shared", INT8),
    Row("torch-pruning 2x fp32", "pruning", 32, "prune2"),
    Row("torch-pruning 2x + INT8 PTQ", "pruning", 8, "prune2", int8=True),
    Row("torch-pruning 3x fp32", "pruning", 32, "prune3"),
    Row("torch-pruning 3x + INT8 PTQ", "pruning", 8, "prune3", int8=True),
    Row("vconvert s=2 4-bit + int8 compact", "versatile", 4, "s2-w4", INT8),
    Row("vconvert s=4 4-bit + int8 compact", "versatile", 4, "s4-w4", INT8),
    Row("vconvert s=4 shared masks 4-bit + int8 compact", "versatile", 4, "s4-shared-w4", INT8),
    Row("vconvert s=2 3-bit + int8 compact", "versatile", 3, "s2-w3", INT8),
    Row("vconvert s=4 3-bit + int8 compact", "versatile", 3, "s4-w3", INT8),
    Row("vconvert s=2 2-bit + int8 compact", "versatile", 2, "s2-w2", INT8),
    Row("vconvert s=4 2-bit + int8 compact", "versatile", 2, "s4-w2", INT8),
    Row("dense QAT 4-bit + int8", "qat", 4, "dense-w4"),
    Row("dense QAT 3-bit + int8", "qat", 3, "dense-w3"),
    Row("dense QAT 2-bit + int8", "qat", 2, "dense-w2"),
    Row("torch-pruning 3x + QAT 4-bit + int8", "pruning", 4, "prune3-w4"),
    Row("dense QAT 4-bit by brevitas + int8", "qat", 4, "brevitas-w4"),
    *(
        Row(f"vconvert --target-size {size:g} + int8 compact", "planner", 0, f"plan{size:g}", INT8)
        for size in PLAN_SIZES
    ),
]


# --------------------------------------------------------------------------- the budget
@dataclass
class Budget:
    """The fine-tuning budget every trained row shares."""

    epochs: int
    train_limit: int | None
    batch_size: int
    lr: float
    precision: str
    seed: int

    def finetune_options(self, data: str) -> list[str]:
        options = ["--data", data, "--epochs", str(self.epochs), "--batch-size", str(self.batch_size),
                   "--lr", str(self.lr), "--seed", str(self.seed), "--precision", self.precision,
                   "--eval-limit", "2000", "--mean", MEAN, "--std", STD]  # fmt: skip
        return options + (["--train-limit", str(self.train_limit)] if self.train_limit else [])


def calibration_images(data: Path, count: int) -> torch.Tensor:
    """``count`` training images, preprocessed as the model expects (the same set for every artifact)."""
    from vconvert.data.datasets import calibration_batches

    return torch.cat(list(calibration_batches(data / "train", tuple(INPUT_SHAPE[2:]), parse(MEAN), parse(STD),
                                              batch_size=128, limit=count)))  # fmt: skip


def kernels_against_reference(path: Path, images: torch.Tensor) -> tuple[int, int]:
    """On how many of ``images`` onnxruntime's int8 kernels (QLinearConv, all optimisations) pick the top-1 class
    of the same file run as written (optimisations off: float convs on dequantised weights and activations, the
    fake-quantised network itself). What the runtime's own rounding leaves, no export can beat."""
    from vconvert.export.quantize import top1_agreement
    from vconvert.export.verify import ort_session

    fraction, count = top1_agreement(ort_session(str(path), optimised=False), ort_session(str(path)),
                                     images.split(128))  # fmt: skip
    return round(fraction * count), count


# --------------------------------------------------------------------------- training
def trained_file(work: Path, key: str) -> Path:
    """The fine-tuned .vc.pt (vconvert rows), the fine-tuned module (quantization-aware peers: exported when
    measured) or the fp32 ONNX file (pruning peers)."""
    recipe = TRAININGS[key]
    if "compress" in recipe:
        return work / f"{key}.ft.vc.pt"
    return work / (f"{key}.qat.pt" if "quantize" in recipe else f"{key}.fp32.onnx")


def train(key: str, budget: Budget, args: argparse.Namespace, run: common.Runner) -> dict[str, Any]:
    """Compress + fine-tune (versatile) or prune + fine-tune + export fp32 (pruning) unless the work folder
    already holds the result of the same options; returns what the record keeps about it."""
    work: Path = args.work
    recipe = {"training": TRAININGS[key], "budget": budget.__dict__}
    stamp = work / f"{key}.options.json"
    output = trained_file(work, key)
    if output.exists() and stamp.exists() and json.loads(stamp.read_text())["recipe"] == recipe:
        print(f"{key}: reusing {output}", flush=True)
        return json.loads(stamp.read_text())["info"]
    started = time.perf_counter()
    if "compress" in TRAININGS[key]:
        compressed = work / f"{key}.vc.pt"
        result, _ = run("compress", str(args.models / common.RESNET20_FILE), "--arch", ARCH, "--input-shape",
                     ",".join(map(str, INPUT_SHAPE)), "--skip", "downsample", "--mean", MEAN, "--std", STD,
                     "--calib-data", str(args.cifar), *TRAININGS[key]["compress"], "-o", str(compressed))  # fmt: skip
        history, _ = run("finetune", str(compressed), "-o", str(output), *budget.finetune_options(str(args.cifar)),
                         *TRAININGS[key].get("finetune", []))  # fmt: skip
        plan = result["plan"]
        info = {"stored_ratio": round(plan["model_dense_bits"] / plan["model_stored_bits"], 3),
                "finetune_val_top1": [round(e["val_top1"], 2) for e in history["history"]]}  # fmt: skip
    elif "quantize" in TRAININGS[key]:
        info = quantization_aware_peer(TRAININGS[key], budget, args, output)
    else:
        info = prune_and_finetune(TRAININGS[key]["prune"], budget, args, output)
    info["train_s"] = round(time.perf_counter() - started, 1)
    stamp.write_text(json.dumps({"recipe": recipe, "info": info}, indent=2))
    return info


def _finetune_module(model: torch.nn.Module, teacher: torch.nn.Module, budget: Budget, args: argparse.Namespace,
                     weight_bits: int | None = None) -> tuple[torch.nn.Module, list]:  # fmt: skip
    """vconvert's fine-tuning loop (the budget every row shares) on a module that is no ``.vc.pt``."""
    from vconvert.train.config import FinetuneConfig
    from vconvert.train.finetune import finetune as run_finetune

    config = FinetuneConfig(
        data=str(args.cifar), epochs=budget.epochs, batch_size=budget.batch_size, lr=budget.lr, seed=budget.seed,
        train_limit=budget.train_limit, eval_limit=2000, precision=budget.precision, mean=parse(MEAN), std=parse(STD),
        weight_bits=weight_bits,
    )  # fmt: skip
    saved: dict[str, torch.nn.Module] = {}
    with tempfile.TemporaryDirectory(prefix="vconvert-peer-") as folder:
        target_path = Path(folder) / "peer.ft.vc.pt"
        with plain_module_finetune(model, teacher, saved):
            history = run_finetune(Path(folder) / "unused.vc.pt", target_path, config)
        return saved[str(target_path)].eval(), history


def prune_and_finetune(target: float, budget: Budget, args: argparse.Namespace, output: Path) -> dict[str, Any]:
    """torch-pruning to ``target``x stored size, vconvert's fine-tuning loop on the plain module, fp32 ONNX."""
    from vconvert.convert.report import model_stored_bits
    from vconvert.export.pipeline import export as export_model

    base = common.pretrained_resnet20(args.models)
    pruned, channel_ratio = prune_to_size(base, target)
    tuned, history = _finetune_module(pruned, copy.deepcopy(base), budget, args)
    export_model(tuned, output, input_shape=INPUT_SHAPE, measure=False, metadata=_preprocessing_metadata())
    return {
        "pruning": f"torch-pruning {channel_ratio:.4f} of the channels of every layer (L2 magnitude)",
        "stored_ratio": round(model_stored_bits(base) / model_stored_bits(tuned), 3),
        "finetune_val_top1": [round(e.val_top1, 2) for e in history],
    }


def quantizable_convs(model: torch.nn.Module) -> list[str]:
    """The convs vconvert's rows convert (``compress --skip downsample``: all but the stem and the 1x1
    downsampling convs), by qualified name."""
    convs = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)]
    return [name for name in convs[1:] if "downsample" not in name]


def as_one_filter_per_primary(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with each of its :func:`quantizable_convs` as a versatile conv with one secondary per primary
    (mode channel: a dense conv with a per-output scale), computing the same function, so that vconvert's
    quantizer (one step per primary filter = per output channel) and int8 export apply to the dense network."""
    from vconvert import from_conv

    for name in quantizable_convs(model):
        model.set_submodule(name, from_conv(model.get_submodule(name), mode="channel", secondary=1))
    return model


def quantization_aware_peer(recipe: dict[str, Any], budget: Budget, args: argparse.Namespace,
                            output: Path) -> dict[str, Any]:  # fmt: skip
    """The dense (or torch-pruned) network fine-tuned with ``recipe["quantize"]``-bit weights by vconvert's loop
    and quantizer; the fine-tuned module is saved to ``output`` (exported when the rows are measured)."""
    base = common.pretrained_resnet20(args.models)
    start, info = copy.deepcopy(base), {}
    if "prune" in recipe:
        start, channel_ratio = prune_to_size(base, recipe["prune"])
        info["pruning"] = f"torch-pruning {channel_ratio:.4f} of the channels of every layer (L2 magnitude)"
    if recipe.get("library") == "brevitas":
        from benchmarks.brevitas_peer import QUANTIZER_NAME, as_brevitas_qat, to_vconvert_quantized

        convs = quantizable_convs(start)
        tuned, history = _finetune_module(as_brevitas_qat(start, convs, recipe["quantize"]), base, budget, args)
        tuned = to_vconvert_quantized(tuned, convs, recipe["quantize"])  # brevitas's integers and scales, exactly
        info["quantizer"] = QUANTIZER_NAME
    else:
        tuned, history = _finetune_module(as_one_filter_per_primary(start), base, budget, args, recipe["quantize"])
    torch.save(tuned, output)
    info["weight_bits"] = recipe["quantize"]
    info["finetune_val_top1"] = [round(e.val_top1, 2) for e in history]
    return info


def export_quantization_aware(trained: Path, output: Path, images: torch.Tensor, bits: int,
                              min_agreement: float = 0.9, int8_target: str = "any") -> dict[str, Any]:  # fmt: skip
    """A quantization-aware peer exported like ``vconvert export --quantize int8 --compact --int8-target T`` at its
    bit width; returns what the export checked."""
    from vconvert.export.pipeline import export as export_model
    from vconvert.export.quantize import default_int8_target

    model = torch.load(trained, weights_only=False).eval()  # our own fine-tuned module, written by this script
    with default_int8_target(int8_target):
        report = export_model(model, output, input_shape=INPUT_SHAPE, measure=False,
                              metadata=_preprocessing_metadata(), quantize="int8", compact=True, weight_bits=bits,
                              calibration=list(images.split(32)), min_agreement=min_agreement)  # fmt: skip
    return report.quantization or {}


def _preprocessing_metadata() -> dict[str, Any]:
    return {"vconvert.preprocessing": {"mean": parse(MEAN), "std": parse(STD), "input_size": INPUT_SHAPE[2:]}}


# --------------------------------------------------------------------------- peers built from an fp32 file
class ImageReader:
    """onnxruntime's CalibrationDataReader over preprocessed images, one batch of 32 at a time."""

    def __init__(self, images: torch.Tensor, input_name: str = "input") -> None:
        self.batches: Iterator[torch.Tensor] = iter(images.split(32))
        self.input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch.numpy()}


def int8_ptq(fp32: Path, output: Path, images: torch.Tensor, int8_target: str = "any") -> None:
    """onnxruntime ``quantize_static``: QDQ, per-channel symmetric int8 weights, uint8 activations (MinMax); 7-bit
    weights (``reduce_range``) for ``int8_target`` any, as vconvert's own int8 files (like with like)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    reader = type("Reader", (ImageReader, CalibrationDataReader), {})(images)
    quantize_static(str(fp32), str(output), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    reduce_range=int8_target == "any")  # fmt: skip


def weight_only_int4(fp32: Path, output: Path) -> None:
    """Every Conv/Gemm weight as int4 (symmetric, one scale per output channel) + DequantizeLinear, opset 21."""
    from onnx import helper, numpy_helper, version_converter

    model = version_converter.convert_version(onnx.load(str(fp32)), 21)
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    graph_nodes = list(model.graph.node)
    for node in graph_nodes:
        if node.op_type not in ("Conv", "Gemm") or node.input[1] not in initializers:
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
        axis = 1 if node.op_type == "Gemm" and not _gemm_transposed(node) else 0  # the output-channel axis
        reduce = tuple(i for i in range(weight.ndim) if i != axis)
        scale = np.abs(weight).max(axis=reduce) / 7.0
        scale[scale == 0] = 1.0
        shape = [1] * weight.ndim
        shape[axis] = -1
        quantised = np.clip(np.round(weight / scale.reshape(shape)), -8, 7).astype(np.int8)
        name = node.input[1]
        model.graph.initializer.remove(initializers[name])
        q_name, s_name = f"{name}_int4", f"{name}_scale"
        model.graph.initializer.append(helper.make_tensor(q_name, onnx.TensorProto.INT4, quantised.shape,
                                                          quantised.flatten().tolist()))  # fmt: skip
        model.graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32), s_name))
        dequantise = helper.make_node("DequantizeLinear", [q_name, s_name], [name], axis=axis, name=f"{name}_dq")
        model.graph.node.insert(list(model.graph.node).index(node), dequantise)
    onnx.checker.check_model(model)
    output.write_bytes(model.SerializeToString())


def _gemm_transposed(node: onnx.NodeProto) -> bool:
    return any(attribute.name == "transB" and attribute.i == 1 for attribute in node.attribute)


# --------------------------------------------------------------------------- measuring
def macs_of(path: Path) -> int:
    """MACs per image of the Conv and Gemm nodes of an ONNX file (shapes from onnx's shape inference)."""
    from onnx import numpy_helper, shape_inference

    model = onnx.load(str(path))
    graph = model.graph
    graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    inferred = shape_inference.infer_shapes(model).graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*inferred.value_info,
              *inferred.output, *inferred.input]}  # fmt: skip
    weights = {t.name: numpy_helper.to_array(t).shape for t in graph.initializer}
    macs = 0
    for node in inferred.node:
        if node.op_type in ("Conv", "QLinearConv", "Gemm", "ConvInteger"):
            out = shapes.get(node.output[0])
            weight_name = node.input[3] if node.op_type == "QLinearConv" else node.input[1]
            weight = weights.get(weight_name) or shapes.get(weight_name)
            if out and weight:
                macs += int(np.prod(out[1:])) * int(np.prod(weight[1:]))
    return macs


def write(record: dict[str, Any], stem: Path) -> None:
    """The JSON, the Markdown table and the plot (top-1 against file size, Pareto front drawn)."""
    common.write_json(stem.with_suffix(".json"), record)
    rows = [row for row in record["rows"] if "top1" in row]
    lines = [
        f"# Accuracy against ONNX file size, CIFAR-10 ResNet-20 ({record['mode']} run"
        f"{'' if record['complete'] else ', partial'})",
        "",
        f"Command: `{record['command']}`  ",
        f"{record['epochs']} fine-tuning epochs on {record['train_images']} training images (batch "
        f"{record['batch_size']}, lr {record['lr']}, {record['precision']}, seed {record['seed']}); top-1 of each "
        f"ONNX file in onnxruntime on {record['eval_images']} test images; {record['calibration_images']} "
        f"calibration images for INT8, every int8 file written for --int8-target {record.get('int8_target', 'vnni')} "
        f"({'7-bit weights, exact on every CPU' if record.get('int8_target') == 'any' else '8-bit weights'}); "
        f"latency measured side by side at the end on {record['device']}.",
        "",
        "| artifact | method | bits | file bytes | file / fp32 | file bits / weight | top-1 | Δ vs dense | "
        "latency b1 / fp32 | latency b64 / fp32 | MACs | epochs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        bits = row["bits"] or "per layer"
        per_weight = f"{row['bits_per_weight']:.2f}" if "bits_per_weight" in row else "-"
        lines.append(
            f"| {row['artifact']} | {row['method']} | {bits} | {row['file_bytes']:,} | {row['file_ratio']:.3f} "
            f"| {per_weight} "
            f"| {row['top1']:.2f} | {row['delta_vs_dense']:+.2f} | {row.get('latency_b1_ratio', float('nan')):.2f} | "
            f"{row.get('latency_b64_ratio', float('nan')):.2f} | {row['macs'] / 1e6:.1f} M | {row['epochs']} |"
        )
    planner = next((recipe for key, recipe in record.get("recipes", {}).items() if key.startswith("plan")), None)
    if planner:
        compress = planner["compress"]
        options = ["S" if before == "--target-size" else option
                   for before, option in zip(["", *compress], compress, strict=False)]  # fmt: skip
        lines += ["", f"Planner rows: `vconvert compress ... {' '.join(options)}` (S: the row's size), "
                      "then the same fine-tune as every trained row."]  # fmt: skip
    lines += ["", *record.get("verdicts", [])]
    checked = [row for row in rows if "kernels_vs_qdq_reference" in row]
    if checked:
        lines += [
            "",
            "Top-1 on the calibration images: the int8 file against the fake-quantised network (the row's "
            "own fp32 file, as the export checks it) and onnxruntime's int8 kernels against the same file run "
            "as written (optimisations off: float convs on dequantised weights and activations).",
            "",
        ]
        for row in checked:
            reference, export_checks = row["kernels_vs_qdq_reference"], row.get("export_checks") or {}
            against_fp32 = (f"{round(export_checks['top1_agreement'] * export_checks['agreement_images'])}/"
                            f"{export_checks['agreement_images']} with its fp32 file, "
                            if export_checks.get("top1_agreement") is not None else "")  # fmt: skip
            lines.append(f"- {row['artifact']}: {against_fp32}"
                         f"kernels {reference['same_top1']}/{reference['images']} with the QDQ reference")  # fmt: skip
    for failed in record.get("failed", []):
        reason = failed["error"].split("error: ")[-1]
        lines += ["", f"- {failed['artifact']}: no file; vconvert refused it: `{reason}`"]
    common.write_markdown(stem.with_suffix(".md"), lines)
    if rows:
        _plot(rows, stem.with_suffix(".png"), record)


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows no other row beats on both file size (smaller) and top-1 (higher), by size."""
    return sorted(
        (r for r in rows if not any(o["file_bytes"] <= r["file_bytes"] and o["top1"] > r["top1"] for o in rows)),
        key=lambda r: r["file_bytes"],
    )


def _plot(rows: list[dict[str, Any]], path: Path, record: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"dense": "black", "int8-ptq": "tab:blue", "w4": "tab:purple", "pruning": "tab:orange",
               "versatile": "tab:green", "qat": "tab:red", "planner": "tab:cyan"}  # fmt: skip
    front = pareto_front(rows)
    dense = next((r["top1"] for r in rows if r["method"] == "dense"), max(r["top1"] for r in rows))
    figure, panels = plt.subplots(1, 2, figsize=(14, 5.5))
    for axes, zoomed in zip(panels, (False, True), strict=True):
        shown = [r for r in rows if not zoomed or r["top1"] >= dense - 6]
        for row in shown:
            marker = "*" if row["method"] == "planner" else "o" if row["bits"] > 8 else "s" if row["bits"] == 8 else "^"
            axes.scatter(row["file_ratio"], row["top1"], color=colours[row["method"]], marker=marker)
            if row in front or (zoomed and row["method"] != "planner"):  # the full view names the frontier only
                axes.annotate(row["artifact"], (row["file_ratio"], row["top1"]), fontsize=6, xytext=(4, 2),
                              textcoords="offset points")  # fmt: skip
        steps = [r for r in front if r in shown]
        axes.step([r["file_ratio"] for r in steps], [r["top1"] for r in steps], where="post", color="grey", lw=0.8)
        axes.set_xscale("log")
        axes.set_xlabel("ONNX file size / dense fp32 file (log)")
        axes.set_ylabel(f"top-1 (%), {record['eval_images']} CIFAR-10 test images")
        budget = f"{record['epochs']} epochs on {record['train_images']} images"
        axes.set_title(
            "within 6 points of dense (grey: the frontier)" if zoomed else f"all rows, frontier named; {budget}"
        )
    figure.suptitle(f"ResNet-20 CIFAR-10, {record['mode']} run: circles fp32, squares 8 bits, triangles ≤ 4, stars "
                    "compress --target-size")  # fmt: skip
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """Plain sentences: at every size ≤ 0.30x, is vconvert's best row as accurate as the best peer row?"""
    lines = []
    ours = [r for r in rows if r["method"] in ("versatile", "planner")]
    peers = [r for r in rows if r["method"] not in ("versatile", "planner")]
    for row in sorted(ours, key=lambda r: r["file_ratio"]):
        if row["file_ratio"] > 0.30:
            continue
        rivals = [p for p in peers if p["file_bytes"] <= row["file_bytes"]]
        best = max(rivals, key=lambda p: p["top1"], default=None)
        if best is None:
            lines.append(f"- {row['artifact']} ({row['file_ratio']:.3f}x, {row['top1']:.2f}%): no peer is this small.")
        else:
            word = "wins" if row["top1"] >= best["top1"] else "LOSES"
            lines.append(f"- {row['artifact']} ({row['file_ratio']:.3f}x, {row['top1']:.2f}%) {word} against the best "
                         f"peer of the same or smaller size, {best['artifact']} ({best['file_ratio']:.3f}x, "
                         f"{best['top1']:.2f}%).")  # fmt: skip
    beaten_by = {}  # peers with no vconvert row at least as accurate at their size or smaller
    for peer in peers:
        if peer["file_ratio"] <= 0.30:
            ours_small = [r for r in ours if r["file_bytes"] <= peer["file_bytes"]]
            if not ours_small or max(r["top1"] for r in ours_small) < peer["top1"]:
                beaten_by[peer["artifact"]] = peer
                lines.append(f"- Peer {peer['artifact']} ({peer['file_ratio']:.3f}x, {peer['top1']:.2f}%) has no "
                             "vconvert row at least as accurate at its size or smaller.")  # fmt: skip
    small = [peer for peer in peers if peer["file_ratio"] <= 0.15]
    missed = [peer for peer in small if peer["artifact"] in beaten_by]
    lines.append(f"- Target (every size ≤ 0.15x, vconvert's best row at least as accurate as every peer of the same "
                 f"or smaller size): {'missed, by ' + ', '.join(p['artifact'] for p in missed) if missed else 'met'} "
                 f"({len(small)} peer rows ≤ 0.15x).")  # fmt: skip
    return lines + planner_verdicts(rows)


TIE = 0.15  # top-1 points: closer than this, one seed does not decide (issue 30: three seeds do)


def planner_verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 30's targets in plain sentences: each ``--target-size`` row against every other row of the same or
    smaller file (fixed vconvert rows and peers alike), and the 0.10x and 0.07x rows against dense."""
    planned = sorted((r for r in rows if r["method"] == "planner"), key=lambda r: r["file_bytes"])
    if not planned:
        return []
    lines = []
    for row in planned:
        rivals = [o for o in rows if o["method"] != "planner" and o["file_bytes"] <= row["file_bytes"]]
        best = max(rivals, key=lambda o: o["top1"], default=None)
        if best is None:
            lines.append(f"- {row['artifact']} ({row['file_ratio']:.3f}x, {row['top1']:.2f}%): no other row is this "
                         "small.")  # fmt: skip
            continue
        margin = row["top1"] - best["top1"]
        word = ("is at least as accurate as" if margin >= TIE else "is within 0.15 of (seeds decide)"
                if margin > -TIE else "LOSES to")  # fmt: skip
        lines.append(f"- {row['artifact']} ({row['file_ratio']:.3f}x, {row['top1']:.2f}%) {word} the best other "
                     f"row of the same or smaller file, {best['artifact']} ({best['file_ratio']:.3f}x, "
                     f"{best['top1']:.2f}%): {margin:+.2f}.")  # fmt: skip
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for size, allowed in ((0.10, 0.3), (0.07, 1.5)):
        row = next((r for r in planned if r["artifact"].startswith(f"vconvert --target-size {size:g} ")), None)
        if row and dense:
            gap = dense["top1"] - row["top1"]
            lines.append(
                f"- Target {size:g}x within {allowed} of dense: {row['top1']:.2f} vs {dense['top1']:.2f} "
                f"({-gap:+.2f}, file {row['file_ratio']:.3f}x): {'met' if gap <= allowed else 'missed'}."
            )
    return lines


def weights_stored(model: torch.nn.Module) -> int:
    """The conv and linear weights of the dense network: the denominator of a row's file bits per weight."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear))


# --------------------------------------------------------------------------- the run
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 training images, 2 epochs (CPU, ~15 min)")
    parser.add_argument("--models", type=Path, default=common.MODELS)
    parser.add_argument("--cifar", type=Path, default=common.CIFAR_CACHE)
    parser.add_argument("--shared-data", type=Path, default=common.SHARED_CIFAR)
    parser.add_argument("--work", type=Path, help="folder for compressed/fine-tuned files (reused when options match)")
    parser.add_argument("--rows", help="comma-separated subset of row names")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--train-limit", type=int)
    parser.add_argument("--eval-limit", type=int)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--precision", default="auto", help="vconvert finetune --precision (bf16 on capable CPUs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency-seconds", type=float, default=3.0)
    parser.add_argument("--train-only", action="store_true", help="stop after fine-tuning (fill --work)")
    parser.add_argument("--output", type=Path, help="results stem (default pareto_cifar10[_quick])")
    parser.add_argument("--int8-target", default="any", choices=("any", "vnni"),
                        help="every int8 file: any (7-bit weights, exact on every CPU) or vnni (8-bit)")  # fmt: skip
    parser.add_argument("--render", type=Path, help="only re-write the .md and .png of this results .json (recipes "
                        "it lacks from --work's option stamps)")  # fmt: skip
    args = parser.parse_args()
    if args.render:
        render(args.render, args.work)
        return
    quick = args.quick
    budget = Budget(args.epochs or (2 if quick else 15), args.train_limit or (2000 if quick else None),
                    args.batch_size, args.lr, args.precision, args.seed)  # fmt: skip
    eval_limit = args.eval_limit or 10000  # the whole test set in both modes: int8 vs fp32 gaps are tenths
    stem = args.output or common.RESULTS / ("pareto_cifar10_quick" if quick else "pareto_cifar10")
    chosen = [row for row in ROWS if not args.rows or row.name in args.rows.split(",") or row.method == "dense"]
    common.ensure_cifar(args.cifar, args.shared_data)
    with tempfile.TemporaryDirectory(prefix="vconvert-pareto-") as scratch:
        args.work = args.work or Path(scratch)
        args.work.mkdir(parents=True, exist_ok=True)
        run_all(args, budget, eval_limit, stem, chosen, quick)


def render(results: Path, work: Path | None) -> None:
    """Re-write a finished run's report from its JSON: verdicts recomputed, recipes read from the work folder's
    option stamps where the record predates them."""
    record = json.loads(results.read_text())
    if work is not None and "recipes" not in record:
        stamps = {key: work / f"{key}.options.json" for key in record["trainings"]}
        record["recipes"] = {key: json.loads(path.read_text())["recipe"]["training"] for key, path in stamps.items()
                             if path.exists()}  # fmt: skip
    if record.get("complete"):
        record["verdicts"] = verdicts(record["rows"])
    write(record, results.with_suffix(""))


def run_all(args: argparse.Namespace, budget: Budget, eval_limit: int, stem: Path, chosen: list[Row],
            quick: bool) -> None:  # fmt: skip
    started = time.perf_counter()
    work: Path = args.work
    run = common.Runner(work, echo=True)
    record: dict[str, Any] = {
        "benchmark": "pareto_cifar10",
        "mode": "quick" if quick else "full",
        "complete": False,
        "command": common.command_line(__file__, quote=True),
        "network": f"pretrained CIFAR-10 ResNet-20 ({PUBLISHED_BASELINE}% published), arch {ARCH}",
        "epochs": budget.epochs,
        "train_images": budget.train_limit or 50000,
        "eval_images": eval_limit,
        "calibration_images": CALIBRATION_IMAGES,
        "batch_size": budget.batch_size,
        "lr": budget.lr,
        "precision": budget.precision,
        "seed": budget.seed,
        "int8_target": args.int8_target,
        "device": common.device_name(),
        "machine": {"platform": platform.platform(), **common.versions("python", "torch", "onnxruntime", "onnx"),
                    "load_average_start": common.load_average()},
        "commands": run.commands,
        "trainings": {},
        "rows": [],
    }  # fmt: skip
    for key in [key for key in TRAININGS if any(row.train == key for row in chosen)]:
        record.setdefault("recipes", {})[key] = TRAININGS[key]
        try:
            record["trainings"][key] = train(key, budget, args, run)
        except RuntimeError as error:  # a refused compress (a size out of reach) is a result too: its rows go
            reason = str(error).split("error: ")[-1]
            record.setdefault("failed", []).extend({"artifact": row.name, "error": reason} for row in chosen
                                                   if row.train == key)  # fmt: skip
            chosen = [row for row in chosen if row.train != key]
        write(record, stem)
    if args.train_only:
        return
    from vconvert.export.pipeline import export as export_model

    base = common.pretrained_resnet20(args.models)
    fp32 = work / "dense.fp32.onnx"
    export_model(base, fp32, input_shape=INPUT_SHAPE, measure=False, metadata=_preprocessing_metadata())
    images = calibration_images(args.cifar, CALIBRATION_IMAGES)
    files: dict[str, Path] = {}
    for row in chosen:
        path = work / f"{common.slug(row.name)}.onnx"
        clock = time.perf_counter()
        source = fp32 if row.train is None else trained_file(work, row.train)
        checked: dict[str, Any] = {}  # what an int8 export checked (vconvert's rows and the QAT peers)
        if row.versatile:
            try:
                int8 = ["--calib-data", str(args.cifar / "train"), "--int8-target", args.int8_target]
                exported, _ = run("export", str(source), "-o", str(path), *row.export,
                                  *(int8 if "--quantize" in row.export else []), "--no-compare")  # fmt: skip
                checked = exported.get("quantization") or {}
            except RuntimeError as error:  # a refused export is a result too: recorded, the run goes on
                record.setdefault("failed", []).append({"artifact": row.name, "error": str(error)[-600:]})
                print(f"{row.name}: export refused", flush=True)
                continue
        elif row.method == "qat" or (row.train and "quantize" in TRAININGS[row.train]):
            try:
                checked = export_quantization_aware(source, path, images, row.bits, int8_target=args.int8_target)
            except VConvertError as error:  # a refused export is a result too
                record.setdefault("failed", []).append({"artifact": row.name, "error": str(error)[-600:]})
                print(f"{row.name}: export refused", flush=True)
                continue
        elif row.int8:
            int8_ptq(source, path, images, args.int8_target)
        elif row.method == "w4":
            weight_only_int4(source, path)
        else:
            path = source
        build_s = round(time.perf_counter() - clock, 1)
        evaluation, _ = run("evaluate", str(path), "--data", str(args.cifar), "--limit", str(eval_limit))
        files[row.name] = path
        record["rows"].append({
            "artifact": row.name, "method": row.method, "bits": row.bits, "file_bytes": path.stat().st_size,
            "top1": evaluation["top1"], "top5": evaluation["top5"], "eval_images": evaluation["images"],
            "macs": macs_of(path), "epochs": budget.epochs if row.train else 0, "build_s": build_s,
            "from": row.train or "base", "export_options": " ".join(row.export),
            "bits_per_weight": round(path.stat().st_size * 8 / weights_stored(base), 3),
        })  # fmt: skip
        if checked:
            record["rows"][-1]["export_checks"] = {key: checked.get(key) for key in (
                "weight_bits", "top1_agreement", "agreement_images", "compact_equals_dense", "converted_as_qlinear",
                "float_conv", "weights_equal_fake_quantised", "int8_target", "agreement")}  # fmt: skip
        if row.runs_int8_kernels:
            same, count = kernels_against_reference(path, images)
            record["rows"][-1]["kernels_vs_qdq_reference"] = {"same_top1": same, "images": count}
        dense = record["rows"][0]  # "dense fp32" comes first
        record["rows"][-1]["file_ratio"] = round(record["rows"][-1]["file_bytes"] / dense["file_bytes"], 4)
        record["rows"][-1]["delta_vs_dense"] = round(record["rows"][-1]["top1"] - dense["top1"], 2)
        print(json.dumps(record["rows"][-1]), flush=True)
        write(record, stem)
    timing = measure_latencies(files, args.latency_seconds, batches=(1, 64))
    for row in record["rows"]:
        row["latency_b1_ms"], row["latency_b64_ms"] = timing[row["artifact"]]["b1"], timing[row["artifact"]]["b64"]
        row["latency_b1_ratio"] = round(row["latency_b1_ms"] / timing["dense fp32"]["b1"], 3)
        row["latency_b64_ratio"] = round(row["latency_b64_ms"] / timing["dense fp32"]["b64"], 3)
    record["verdicts"] = verdicts(record["rows"])
    record["wall_s"] = round(time.perf_counter() - started, 1)
    record["machine"]["load_average_end"] = common.load_average()
    record["complete"] = True
    write(record, stem)
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
