"""`vconvert export --ring` against the dense fold: onnxruntime (CPU) latency and MACs, per layer and per model.

A spatial versatile conv with d x d kernels has s = ceil(d/2) nested masks; secondary j only uses the
centred (d-2j) x (d-2j) window. The dense fold runs every output as a d x d conv; the ring form
(:class:`vconvert.export.ring.RingConv2d`, what ``--ring`` exports) runs one cropped conv per slot,
concatenates them and restores channel order with one Gather: 5/9 of the MACs for d = 3.

1. Layers: the 3x3 conv shapes of resnet18/50 at 224x224 (batch 1), each as a dense fold and as a
   RingConv2d, both exported by torch.onnx and timed side by side.
2. Models: torchvision resnet18 and resnet50 converted in spatial mode (random weights, naive init),
   written by the real ``export(..., ring=True)`` and ``export(...)`` (both verified in onnxruntime),
   then the two files timed side by side (batch 1, 224x224).

    python benchmarks/ring_export.py [--seconds 3] [--models resnet18,resnet50]

Writes benchmarks/results/ring_export.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `benchmarks` importable
from benchmarks import common
from vconvert.convert.compress import compress
from vconvert.convert.report import count_macs
from vconvert.export.onnx_file import to_onnx
from vconvert.export.pipeline import export
from vconvert.export.ring import RingConv2d
from vconvert.export.verify import measure_latency, ort_session
from vconvert.fit.initialise import from_conv

# (channels, feature map) of the 3x3 convs of resnet18 and resnet50 (bottleneck middles) at 224x224
SHAPES = [(64, 56), (128, 28), (256, 14), (512, 7)]


def layer_row(channels: int, size: int, seconds: float) -> dict:
    """One 3x3 spatial layer: dense fold vs RingConv2d, exported and timed side by side."""
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    layer = from_conv(conv, init="naive", mode="spatial").eval()
    dense = layer.fold().eval()
    ring = RingConv2d(dense, layer.secondary_index % layer.spatial_masks).eval()
    x = torch.randn(1, channels, size, size)
    with torch.no_grad():
        assert torch.allclose(ring(x), dense(x), atol=1e-4), "the ring form must compute the same outputs"
    sessions = {name: ort_session(to_onnx(m, x).SerializeToString()) for name, m in (("dense", dense), ("ring", ring))}
    latency = measure_latency(sessions, x, seconds=seconds, rounds=100000)
    return {
        "layer": f"{channels}x{channels}x3x3 @ {size}x{size}",
        "macs_dense": count_macs(dense, x),
        "macs_ring": count_macs(ring, x),
        "latency_ms": latency,
        "ring_over_dense": latency["ring"] / latency["dense"],
    }


def model_row(arch: str, seconds: float, folder: Path) -> dict:
    """A spatial-converted torchvision model written by export() with and without ring, timed side by side."""
    torch.manual_seed(0)
    base = getattr(torchvision.models, arch)(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    model, _ = compress(base, x, mode="spatial", init="naive")
    reports = {
        name: export(model, folder / f"{arch}-{name}.onnx", input_shape=[1, 3, 224, 224], ring=ring, measure=False)
        for name, ring in (("dense", False), ("ring", True))
    }
    sessions = {name: ort_session(report.output) for name, report in reports.items()}
    latency = measure_latency(sessions, x, seconds=seconds, rounds=100000)
    return {
        "model": f"{arch} (spatial mode, {len(reports['ring'].graph['ring'])} ring convs) @ 224x224",
        "macs_dense": reports["dense"].table[0]["macs"],
        "macs_ring": reports["ring"].table[0]["macs"],
        "file_bytes": {name: report.file_bytes for name, report in reports.items()},
        "parity_max_abs_diff": {name: report.parity["max_abs_diff"] for name, report in reports.items()},
        "export_s": {name: sum(report.timings_s.values()) for name, report in reports.items()},
        "latency_ms": latency,
        "ring_over_dense": latency["ring"] / latency["dense"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--models", default="resnet18,resnet50")
    args = parser.parse_args()
    layers = []
    for channels, size in SHAPES:
        layers.append(layer_row(channels, size, args.seconds))
        print(json.dumps(layers[-1]))
    models = []
    with tempfile.TemporaryDirectory() as folder:
        for arch in filter(None, args.models.split(",")):
            models.append(model_row(arch, args.seconds, Path(folder)))
            print(json.dumps(models[-1]))
    result = {
        "benchmark": "ring_export",
        "command": common.command_line(__file__, ["--seconds", str(args.seconds), "--models", args.models]),
        "layers": layers,
        "sum_layers_ring_over_dense": sum(r["latency_ms"]["ring"] for r in layers)
        / sum(r["latency_ms"]["dense"] for r in layers),
        "models": models,
        **common.host(),
        "versions": common.versions("torch", "onnxruntime"),
    }
    common.write_json(common.RESULTS / "ring_export.json", result)
    print(json.dumps({"sum_layers_ring_over_dense": result["sum_layers_ring_over_dense"]}))


if __name__ == "__main__":
    main()
