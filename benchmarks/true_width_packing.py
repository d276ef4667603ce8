"""Every width at its true size (issue 30 item 1): the compact int8 file of the shipped digits ResNet-20 with its
primaries fake-quantised (min-max) at b = 2..8 bits, for vconvert's versatile layers (compress defaults) and for
the dense network (each converted conv as a one-secondary versatile conv, as benchmarks/pareto.py builds its
dense QAT peers), with the bytes per width, the bits per weight and what the in-graph unpacking costs.

    python benchmarks/true_width_packing.py [--quick] [--widths 2,3,4,5,6,8] [--output STEM]

Each file is written by ``vconvert.export.pipeline.export(..., quantize="int8", compact=True)`` with the export's
own checks (compact = dense int8 exactly, dequantized primaries = fake-quantised weights, every converted conv
runs as QLinearConv in onnxruntime); 8 bits are written for ``--int8-target vnni`` (true 8-bit weights), the
others for ``any``. File sizes do not depend on training, so the primaries are min-max fake-quantised rather than
fine-tuned (a layer fine-tuned at b bits stores the same number of b-bit integers). ``--quick``: widths 2, 4 and 8,
the versatile model only, 32 calibration images.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import TensorProto, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `benchmarks` importable
from benchmarks import common

WIDTHS = (2, 3, 4, 5, 6, 7, 8)
QUICK_WIDTHS = (2, 4, 8)
VARIANTS = ("versatile s=2 (compress defaults)", "dense (s=1 versatile, as pareto.py's QAT peers)")


def digits_resnet20() -> tuple[torch.nn.Module, dict[str, Any]]:
    """The shipped sample ResNet-20 (digits, 1 channel) and its training record."""
    from vconvert.demo import sample_model_files

    weights, record = sample_model_files()
    module, name = record["arch"].split(":")
    model = getattr(importlib.import_module(module), name)(**record["arch_kwargs"])
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval(), record


def variant_model(teacher: torch.nn.Module, variant: str) -> torch.nn.Module:
    """The float model a variant exports: compress with its defaults, or the dense one-secondary peer."""
    from benchmarks.pareto import as_one_filter_per_primary
    from vconvert import compress

    if variant.startswith("dense"):
        return as_one_filter_per_primary(copy.deepcopy(teacher)).eval()
    model, _ = compress(copy.deepcopy(teacher), torch.randn(2, 1, 32, 32))
    return model.eval()


def weight_count(model: torch.nn.Module) -> int:
    """Weights of every conv and linear layer of the original network (what bits per weight divide by)."""
    layers = (torch.nn.Conv2d, torch.nn.Linear)
    return sum(module.weight.numel() for module in model.modules() if isinstance(module, layers))


def primary_values(model: torch.nn.Module) -> int:
    """Integers the versatile primaries hold (the packed payload divided by the width)."""
    from vconvert.nn.versatile import versatile_layers

    return sum(layer.primary.numel() for _, layer in versatile_layers(model))


def unpacking_bytes(path: Path) -> list[dict[str, int]]:
    """Per packed pool of the file: its payload (the packed bytes) and what the graph spends to unpack it (the
    unpacking nodes, their small constants and the payload tensor's own header), from the file itself. A pool
    is a 2-D uint8 initializer from which every path of nodes ends in one Split within a dozen nodes."""
    model = onnx.load(str(path))
    inits = {tensor.name: tensor for tensor in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    pools = []
    for name, tensor in inits.items():
        if tensor.data_type != TensorProto.UINT8 or len(tensor.dims) != 2 or name not in consumers:
            continue
        nodes: list[onnx.NodeProto] = []
        frontier = list(consumers[name])
        while frontier and len(nodes) < 12:
            node = frontier.pop()
            if all(node is not seen for seen in nodes):
                nodes.append(node)
                frontier += [] if node.op_type == "Split" else consumers.get(node.output[0], [])
        if frontier or [node.op_type for node in nodes].count("Split") != 1:
            continue
        payload = numpy_helper.to_array(tensor).nbytes
        constants = {i for node in nodes for i in node.input if i in inits and i != name}
        graph = sum(node.ByteSize() for node in nodes) + sum(inits[c].ByteSize() for c in constants)
        pools.append({"payload_bytes": payload, "graph_bytes": graph + tensor.ByteSize() - payload})
    return pools


def measure(teacher: torch.nn.Module, variant: str, bits: int, calibration: list, folder: Path) -> dict[str, Any]:
    """One compact int8 file at ``bits``: its bytes, the dense int8 file's, the payload and the checks."""
    from vconvert.export.pipeline import export
    from vconvert.nn.versatile import set_weight_bits_

    model = variant_model(teacher, variant)
    set_weight_bits_(model, bits, "minmax")
    output = folder / f"{common.slug(variant)[:8]}_w{bits}.onnx"
    clock = time.perf_counter()
    report = export(model, output, input_shape=[1, 1, 32, 32], compact=True, quantize="int8", calibration=calibration,
                    measure=False, min_agreement=0.0, weight_bits=bits,
                    int8_target="vnni" if bits == 8 else "any")  # fmt: skip
    seconds = time.perf_counter() - clock
    info = report.quantization
    rows = {row["model"]: row for row in report.table}
    values = primary_values(model)
    size = output.stat().st_size
    weights = weight_count(teacher)
    return {
        "variant": variant,
        "bits": info["weight_bits"],
        "compact_bytes": size,
        "dense_int8_bytes": rows["int8 dense"]["file_bytes"],
        "fp32_dense_bytes": rows["dense fold"]["file_bytes"],
        "bits_per_weight": round(8 * size / weights, 3),
        "primary_values": values,
        "primary_payload_bytes": -(-values * bits // 8) if bits < 8 else values,
        "pools": unpacking_bytes(output),
        "primary_storage": report.metadata["vconvert.quantization"]["primary_storage"],
        "compact_equals_dense": info["compact_equals_dense"],
        "weights_equal_fake_quantised": info["weights_equal_fake_quantised"],
        "converted_as_qlinear": f"{info['converted_as_qlinear']}/{info['converted_convs']}",
        "export_s": round(seconds, 1),
    }


def markdown(result: dict[str, Any]) -> list[str]:
    """The results table, one row per variant and width."""
    lines = [
        "# Every width at its true size: compact int8 files of the digits ResNet-20",
        "",
        f"Command: `{result['command']}` ({result['calibration_images']} digits calibration images; weights of the "
        f"original network: {result['weights']:,}; its fp32 file: {result['fp32_bytes']:,} B).",
        "",
        "| model | bits | compact int8 file (B) | x fp32 | bits / weight | primaries (values → payload B) | "
        "unpacking graph (B, primaries + masks) | dense int8 file (B) | checks |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        graph = " + ".join(str(pool["graph_bytes"]) for pool in row["pools"]) or "0"
        checks = "compact = dense, = fake-quantised, QLinearConv " + row["converted_as_qlinear"]
        ok = row["compact_equals_dense"] and row["weights_equal_fake_quantised"]
        lines.append(
            f"| {row['variant']} | {row['bits']} | {row['compact_bytes']:,} | "
            f"{row['compact_bytes'] / result['fp32_bytes']:.3f} | {row['bits_per_weight']} | "
            f"{row['primary_values']:,} → {row['primary_payload_bytes']:,} | {graph} | {row['dense_int8_bytes']:,} | "
            f"{checks if ok else 'FAILED'} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="widths 2, 4, 8; the versatile model; 32 images")
    parser.add_argument("--widths", help="comma-separated widths (default 2..8)")
    parser.add_argument("--calib-images", type=int, default=128)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/true_width_packing"))
    args = parser.parse_args()
    widths = QUICK_WIDTHS if args.quick else WIDTHS
    if args.widths:
        widths = tuple(int(b) for b in args.widths.split(","))
    variants = VARIANTS[:1] if args.quick else VARIANTS
    images = 32 if args.quick else args.calib_images

    from vconvert.export.quantize import calibration_images

    teacher, record = digits_resnet20()
    preprocessing = {"mean": record["data"]["mean"], "std": record["data"]["std"]}
    calibration = calibration_images("digits", [1, 1, 32, 32], preprocessing, limit=images)[0]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for variant in variants:
            for bits in widths:
                rows.append(measure(teacher, variant, bits, calibration, Path(folder)))
                print(f"{variant} {bits}-bit: {rows[-1]['compact_bytes']:,} B", flush=True)
    result = {
        "command": common.command_line(__file__).rstrip(),
        "calibration_images": images,
        "weights": weight_count(teacher),
        "fp32_bytes": rows[0]["fp32_dense_bytes"],
        "rows": rows,
        **common.versions("python", "torch", "onnx", "onnxruntime"),
        **common.host(),
        "load_average": common.load_average(),
    }
    common.write_json(args.output.with_suffix(".json"), result)
    common.write_markdown(args.output.with_suffix(".md"), markdown(result))


if __name__ == "__main__":
    main()
