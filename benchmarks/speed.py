"""Speed and size, each as a ratio measured side by side in one run (this machine's CPU).

For torchvision resnet18 and resnet50 (random weights, 224x224, learned s=2, fitted init):
- `vconvert compress` and `vconvert export` (dense, and `--compact`) wall times of the real CLI;
- onnxruntime latency of the exported files against the original network's ONNX at batch 1 and 32,
  all sessions measured interleaved in one process;
- compact vs dense ONNX file sizes.
Plus the ResNet-20 train-step time versatile/dense on this CPU (benchmarks/train_step.py's timing,
interleaved rounds), and the GPU one copied from benchmarks/results/train_step_cuda.json where a GPU
run left it (that file says which GPU and command).

    python benchmarks/speed.py [--archs resnet18,resnet50] [--latency-seconds 3] [--rounds 20]

Writes benchmarks/results/speed.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `benchmarks` importable
from benchmarks import common
from benchmarks.train_step import make_versatile, time_steps
from sample_models.resnet_cifar import resnet20
from vconvert.export.pipeline import export
from vconvert.export.verify import measure_latency, ort_session


def train_step_ratio(rounds: int, batch: int = 128) -> dict:
    """ResNet-20 train step versatile (learned s=2) / dense on this CPU, interleaved rounds."""
    torch.manual_seed(0)
    dense = resnet20().train()
    versatile = make_versatile(resnet20(), mode="learned", secondary=2).train()
    images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    for model in (dense, versatile):
        time_steps(model, images, labels, 3)
    times: dict[str, list[float]] = {"dense": [], "versatile": []}
    for _ in range(rounds):
        times["dense"].append(time_steps(dense, images, labels, 3))
        times["versatile"].append(time_steps(versatile, images, labels, 3))
    dense_s, versatile_s = statistics.median(times["dense"]), statistics.median(times["versatile"])
    return {"batch": batch, "dense_step_s": dense_s, "versatile_step_s": versatile_s, "ratio": versatile_s / dense_s}


def arch_row(arch: str, folder: Path, latency_seconds: float) -> dict:
    """compress/export times, latencies and file sizes of one torchvision architecture."""
    torch.manual_seed(0)
    original = getattr(torchvision.models, arch)(weights=None).eval()
    weights, original_onnx = folder / f"{arch}.pt", folder / f"{arch}.onnx"
    torch.save(original.state_dict(), weights)
    export(original, original_onnx, input_shape=[1, 3, 224, 224], measure=False)
    compressed = folder / f"{arch}.vc.pt"
    plan, compress_s = common.vconvert_json(
        "compress", str(weights), "--arch", f"torchvision.models:{arch}", "-o", str(compressed)
    )
    files = {"original": original_onnx, "dense": folder / f"{arch}.dense.onnx", "compact": folder / f"{arch}.c.onnx"}
    _, dense_s = common.vconvert_json("export", str(compressed), "-o", str(files["dense"]))
    _, compact_s = common.vconvert_json("export", str(compressed), "-o", str(files["compact"]), "--compact")
    sessions = {name: ort_session(str(path)) for name, path in files.items()}
    latency: dict[str, dict[str, float]] = {}
    for batch in (1, 32):
        example = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        latency[f"b{batch}"] = measure_latency(sessions, example, seconds=latency_seconds, rounds=200)
    sizes = {name: path.stat().st_size for name, path in files.items()}
    return {
        "arch": arch,
        "stored_ratio": plan["plan"]["model_dense_bits"] / plan["plan"]["model_stored_bits"],
        "compress_s": round(compress_s, 2),
        "export_dense_s": round(dense_s, 2),
        "export_compact_s": round(compact_s, 2),
        "latency_ms": {b: {k: round(v, 3) for k, v in row.items()} for b, row in latency.items()},
        "latency_ratio_exported_over_original": {
            b: {"dense": row["dense"] / row["original"], "compact": row["compact"] / row["original"]}
            for b, row in latency.items()
        },
        "file_bytes": sizes,
        "file_ratio_compact_over_dense": sizes["compact"] / sizes["dense"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="resnet18,resnet50")
    parser.add_argument("--latency-seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=20, help="train-step timing rounds")
    args = parser.parse_args()
    result: dict = {
        "benchmark": "speed",
        "command": common.command_line(__file__),
        **common.host(),
        "torch_threads": torch.get_num_threads(),
        "versions": common.versions("torch", "onnxruntime"),
        "load_average_start": common.load_average(),
        "train_step_cpu": train_step_ratio(args.rounds),
    }
    gpu = common.RESULTS / "train_step_cuda.json"
    if gpu.exists():
        recorded = json.loads(gpu.read_text())
        result["train_step_gpu"] = {
            "from": "benchmarks/results/train_step_cuda.json (a separate GPU run)",
            "device": recorded["device"],
            "command": recorded["command"],
            "ratio": recorded["ratio_versatile_over_dense"],
        }
    with tempfile.TemporaryDirectory() as folder:
        result["archs"] = [arch_row(arch, Path(folder), args.latency_seconds) for arch in args.archs.split(",")]
    result["load_average_end"] = common.load_average()
    common.write_json(common.RESULTS / "speed.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
