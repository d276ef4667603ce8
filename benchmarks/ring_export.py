"""Beyond the folded dense graph: spatial (nested) versatile convs exported as one conv per ring size.

A spatial versatile conv with d x d kernels has s = ceil(d/2) nested masks; secondary j only uses the
centred (d-2j) x (d-2j) window. The dense fold runs every output as a d x d conv. The ring form
runs, for each j, one conv with the cropped (d-2j) kernel (padding reduced by j) over the outputs of
slot j, concatenates them and restores channel order with one Gather — fewer MACs (5/9 of the dense
fold for d = 3, s = 2). This measures whether onnxruntime (CPU) turns those MACs into time, on the
3x3 conv shapes of resnet18/50 at 224x224 input (batch 1), both graphs exported by torch.onnx.

    python benchmarks/ring_export.py [--seconds 3]

Writes benchmarks/results/ring_export.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import onnxruntime
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vconvert import VersatileConv2d
from vconvert.export import count_macs, measure_latency, ort_session, to_onnx

RESULTS = Path(__file__).resolve().parent / "results"
# (channels, feature map) of the 3x3 convs of resnet18 and resnet50 (bottleneck middles) at 224x224
SHAPES = [(64, 56), (128, 28), (256, 14), (512, 7)]


class RingConv2d(nn.Module):
    """A folded spatial versatile conv as one cropped conv per ring size, then channel order restored."""

    def __init__(self, layer: VersatileConv2d, reorder: bool = True) -> None:
        super().__init__()
        if isinstance(layer.padding, str) or layer.dilation != (1, 1):
            raise ValueError("ring export needs numeric padding and dilation 1")
        dense = layer.fold()
        slots = layer.secondary_index % layer.spatial_masks
        kh, kw = layer.kernel_size
        self.convs = nn.ModuleList()
        order = []
        for j in range(layer.spatial_masks):
            index = torch.nonzero(slots == j).flatten()
            if index.numel() == 0:
                continue
            conv = nn.Conv2d(
                layer.in_channels,
                index.numel(),
                (kh - 2 * j, kw - 2 * j),
                layer.stride,
                (layer.padding[0] - j, layer.padding[1] - j),
                bias=dense.bias is not None,
            )
            with torch.no_grad():
                conv.weight.copy_(dense.weight[index][:, :, j : kh - j, j : kw - j])
                if dense.bias is not None:
                    conv.bias.copy_(dense.bias[index])
            self.convs.append(conv)
            order.append(index)
        self.register_buffer("restore", torch.argsort(torch.cat(order)))
        self.reorder = reorder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([conv(x) for conv in self.convs], dim=1)
        return y.index_select(1, self.restore) if self.reorder else y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    rows = []
    for channels, size in SHAPES:
        torch.manual_seed(0)
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        layer = VersatileConv2d.from_conv(conv, init="naive", mode="spatial").eval()
        dense = layer.fold().eval()
        ring = RingConv2d(layer).eval()
        ring_unordered = RingConv2d(layer, reorder=False).eval()
        x = torch.randn(1, channels, size, size)
        with torch.no_grad():
            assert torch.allclose(ring(x), dense(x), atol=1e-4), "the ring form must compute the same outputs"
        sessions = {
            name: ort_session(to_onnx(module, x).SerializeToString())
            for name, module in (("dense", dense), ("ring", ring), ("ring_no_reorder", ring_unordered))
        }
        latency = measure_latency(sessions, x, seconds=args.seconds, rounds=100000)
        row = {
            "layer": f"{channels}x{channels}x3x3 @ {size}x{size}",
            "macs_dense": count_macs(dense, x),
            "macs_ring": count_macs(ring, x),
            "latency_ms": latency,
            "ring_over_dense": latency["ring"] / latency["dense"],
            "ring_no_reorder_over_dense": latency["ring_no_reorder"] / latency["dense"],
        }
        rows.append(row)
        print(json.dumps(row))
    total_dense = sum(r["latency_ms"]["dense"] for r in rows)
    total_ring = sum(r["latency_ms"]["ring"] for r in rows)
    result = {
        "benchmark": "ring_export",
        "command": f"python benchmarks/ring_export.py --seconds {args.seconds}",
        "rows": rows,
        "sum_ring_over_dense": total_ring / total_dense,
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ring_export.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"sum_ring_over_dense": result["sum_ring_over_dense"]}))


if __name__ == "__main__":
    main()
