"""Small without labels or training (issue 31): ``compress --reconstruct`` against the data-free fit, as int8 files.

For each row the real CLI runs: ``vconvert compress`` of the shared CIFAR-10 ResNet-20 (as benchmarks/pareto.py:
``--skip downsample --mode learned --secondary S``, or ``--target-size F``: each layer at its planned form and
width), data-free (BatchNorm recalibration only) or with
``--reconstruct [--weight-bits B]`` (with compress's default block refinement, docs/FIT.md §19, unless
``--refine-steps`` says otherwise), both on the same unlabeled training images (``--calib-images``, no labels);
then ``vconvert export --quantize int8 --compact`` (default ``--int8-target any``) and ``vconvert evaluate`` of the
ONNX file in onnxruntime on the test images. Each compress runs as a child process whose wall time and peak RSS
are recorded. The dense row is the original model's fp32 ONNX file (file size reference), evaluated the same way.

    python benchmarks/reconstruct.py --quick   # 256 calibration images, 1,000 test images, s=2 only (minutes)
    python benchmarks/reconstruct.py           # 1,024 calibration images, 10,000 test images, s=2 and s=4

Rows: data-free int8 (the exporter rounds the float primaries, 7-bit under ``any``); reconstructed at 7 bits (the
width ``any`` stores, so the file holds the integers the reconstruction chose); data-free 4-bit (the exporter's
min-max rounding, ``--weight-bits 4``: "4-bit weights without training"); reconstructed at 4 bits; planned
(``--target-size``) data-free and reconstructed, each layer rounded at its planned width; every converted conv
dense (``--secondary 1``) reconstructed at 4 and 3 bits (vconvert's own rounding of the dense network, against the
brevitas GPTQ peer).
Writes benchmarks/results/reconstruct_{quick,full}.json and .md (``--output STEM``: elsewhere; ``--rows 6,7``:
some rows). Trained files stay in ``--work``.

No-label peers on the dense network, the same unlabeled images (``--peers with|only|none``, default with):
onnxruntime INT8 PTQ (``quantize_static`` of the dense fp32 file, all calibration images), W4 (4-bit weight-only,
no data) and brevitas GPTQ at 4 and 3 bits (:mod:`benchmarks.brevitas_ptq`; vconvert's int8 exporter stores
brevitas's integers, activations calibrated on 512 of the images like vconvert's rows). Each quantization step
(images read, quantize, file or module written) runs as a child process whose wall time and peak RSS are recorded.

    python benchmarks/reconstruct.py --peers only --output benchmarks/results/reconstruct_peers
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `benchmarks` importable
from benchmarks import common

ARCH = "sample_models.resnet_cifar:resnet20"
SHAPE = "1,3,32,32"
DENSE_TOP1 = 88.57  # the shared model on the 10,000 test images (fp32 ONNX; benchmarks/results/pareto*)

LAYOUTS = {  # compress options of each converted network
    "s2": ["--secondary", "2"],
    "s4": ["--secondary", "4"],
    # compress --target-size: every layer at its planned form and width (reconstructed at it, exported at it)
    "plan0.1": ["--target-size", "0.1"],
    "plan0.07": ["--target-size", "0.07"],
    # at or under the file sizes of the fixed rows: s=2 int8 (0.162x), s=2 4-bit (0.117x), s=4 int8 (0.109x)
    "plan0.16": ["--target-size", "0.16"],
    "plan0.116": ["--target-size", "0.116"],
    "plan0.108": ["--target-size", "0.108"],
    "plan0.145": ["--target-size", "0.145"],  # the size of the brevitas GPTQ 4-bit peer
    "dense": ["--secondary", "1"],  # every converted conv dense at the reconstruction's width
}
# (row name, layout, reconstruct, reconstruction bits, export bits)
FULL_ROWS = [
    ("s=2 data-free, int8", "s2", False, None, None),
    ("s=2 reconstructed, int8 (7-bit primaries)", "s2", True, 7, None),
    ("s=2 data-free, 4-bit primaries", "s2", False, None, 4),
    ("s=2 reconstructed, 4-bit primaries", "s2", True, 4, None),
    ("s=4 data-free, int8", "s4", False, None, None),
    ("s=4 reconstructed, int8 (7-bit primaries)", "s4", True, 7, None),
    ("--target-size 0.1 data-free (planned widths)", "plan0.1", False, None, None),
    ("--target-size 0.1 reconstructed (planned widths)", "plan0.1", True, None, None),
    ("--target-size 0.07 data-free (planned widths)", "plan0.07", False, None, None),
    ("--target-size 0.07 reconstructed (planned widths)", "plan0.07", True, None, None),
    ("--target-size 0.16 reconstructed (planned widths)", "plan0.16", True, None, None),
    ("--target-size 0.116 reconstructed (planned widths)", "plan0.116", True, None, None),
    ("--target-size 0.108 reconstructed (planned widths)", "plan0.108", True, None, None),
    ("dense (--secondary 1) reconstructed, 4-bit", "dense", True, 4, None),
    ("dense (--secondary 1) reconstructed, 3-bit", "dense", True, 3, None),
    ("--target-size 0.145 reconstructed (planned widths)", "plan0.145", True, None, None),
]
QUICK_ROWS = FULL_ROWS[:4]
# no-label peers on the dense network: (row name, method, weight bits)
PEERS = [
    ("dense + INT8 PTQ (onnxruntime quantize_static)", "int8-ptq", 8),
    ("dense W4 (4-bit weight-only, round to nearest, no data)", "w4", 4),
    ("dense brevitas GPTQ 4-bit", "brevitas-gptq", 4),
    ("dense brevitas GPTQ 3-bit", "brevitas-gptq", 3),
]
EXPORT_CALIBRATION_IMAGES = 512  # activation calibration of the int8 exports (vconvert export --calib-images 512)


def compress(args: argparse.Namespace, output: Path, layout: str, reconstruct: bool, bits: int | None) -> dict:
    """Run ``vconvert compress`` as a measured child; its JSON output plus wall seconds and peak RSS (GB)."""
    options = ["--reconstruct"] + (["--weight-bits", str(bits)] if bits else []) if reconstruct else []
    if reconstruct and args.refine_steps is not None:
        options += ["--refine-steps", str(args.refine_steps)]
    if args.calib_seed:
        options += ["--calib-seed", str(args.calib_seed)]
    command = common.vconvert_command(
        "compress", str(args.models / common.RESNET20_FILE), "--arch", ARCH, "--input-shape", SHAPE,
        "--skip", "downsample", "--mean", common.CIFAR_MEAN_ARG, "--std", common.CIFAR_STD_ARG,
        "--mode", "learned", *LAYOUTS[layout], "--calib-data", str(args.cifar / "train"),
        "--calib-images", str(args.calib_images), *options, "-o", str(output), "--json",
    )  # fmt: skip
    folder = output.parent / f"{output.name}.log"
    folder.mkdir(exist_ok=True)
    peak, wall, stdout = common.run_measured(command, folder)
    result = json.loads(stdout)
    return {
        "command": common.shown(command).replace(str(args.work), "$WORK"),
        "wall_s": round(wall, 1),
        "peak_rss_gb": round(peak, 3),
        "reconstruction": result.get("reconstruction"),
        "bn_recalibration": result.get("bn_recalibration"),  # with --reconstruct: kept only where closer
    }


def make_peer(args: argparse.Namespace) -> dict[str, Any]:
    """The child process of one peer's quantization step (``--make-peer METHOD,BITS``): read the unlabeled
    calibration images, quantize, write ``--peer-file`` (the ONNX file, or the brevitas module handed over to
    versatile convs for vconvert's exporter); what it did, as JSON-ready data."""
    import torch

    from benchmarks import pareto

    method, bits = args.make_peer.split(",")
    started = time.perf_counter()
    if method == "w4":
        pareto.weight_only_int4(args.fp32, args.peer_file)
        return {"images": 0, "quantize_s": round(time.perf_counter() - started, 1)}
    images = pareto.calibration_images(args.cifar, args.calib_images)  # calibration_batches: labels never read
    loaded = time.perf_counter()
    info: dict[str, Any] = {"images": len(images), "read_images_s": round(loaded - started, 1)}
    if method == "int8-ptq":
        pareto.int8_ptq(args.fp32, args.peer_file, images)
    elif method == "brevitas-gptq":
        from benchmarks.brevitas_ptq import ALGORITHM, brevitas_gptq_peer

        base = common.pretrained_resnet20(args.models)
        convs = pareto.quantizable_convs(base)
        model, _ = brevitas_gptq_peer(base, convs, int(bits), images.split(128))
        torch.save(model, args.peer_file)
        info["algorithm"] = ALGORITHM
    else:
        raise ValueError(f"unknown peer method {method!r}")
    info["quantize_s"] = round(time.perf_counter() - loaded, 1)
    return info


def run_peers(args: argparse.Namespace, record: dict[str, Any], output: Path,
              evaluate: Callable[[Path], dict]) -> None:  # fmt: skip
    """The no-label peer rows (:data:`PEERS`): the dense fp32 file, then each peer's quantization step as a
    measured child, its int8 export where it needs one, and the evaluation of each file."""
    from benchmarks import pareto
    from vconvert.export.pipeline import export as export_model

    fp32 = args.work / "peers.dense.fp32.onnx"
    base = common.pretrained_resnet20(args.models)
    export_model(base, fp32, input_shape=pareto.INPUT_SHAPE, measure=False, metadata=pareto._preprocessing_metadata())
    record["peers_fp32"] = {"file_bytes": fp32.stat().st_size, **evaluate(fp32)}
    export_images = pareto.calibration_images(args.cifar, EXPORT_CALIBRATION_IMAGES)
    for name, method, bits in PEERS:
        stem = f"peer.{method}.b{bits}"
        made = args.work / (f"{stem}.qat.pt" if method == "brevitas-gptq" else f"{stem}.onnx")
        command = [sys.executable, str(Path(__file__).resolve()), "--make-peer", f"{method},{bits}",
                   "--peer-file", str(made), "--fp32", str(fp32), "--models", str(args.models),
                   "--cifar", str(args.cifar), "--calib-images", str(args.calib_images)]  # fmt: skip
        folder = args.work / f"{stem}.log"
        folder.mkdir(exist_ok=True)
        print(f"$ peer {method} {bits}-bit", flush=True)
        peak, wall, stdout = common.run_measured(command, folder)
        row: dict[str, Any] = {"row": name, "method": method, "weight_bits": bits,
                               "quantization": {**json.loads(stdout), "wall_s": round(wall, 1),
                                                "peak_rss_gb": round(peak, 3)}}  # fmt: skip
        onnx_file = made
        if method == "brevitas-gptq":
            onnx_file = args.work / f"{stem}.int8.onnx"
            started = time.perf_counter()
            checked = pareto.export_quantization_aware(made, onnx_file, export_images, bits)
            row["export"] = {"seconds": round(time.perf_counter() - started, 1), **checked}
        row["file_bytes"] = onnx_file.stat().st_size
        row.update(evaluate(onnx_file))
        record["peers"].append(row)
        print({key: value for key, value in row.items() if key not in ("quantization", "export")}, flush=True)
        write(record, output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 calibration images, 1,000 test images, s=2 only")
    parser.add_argument("--work", type=Path, default=common.ROOT / "cache" / "reconstruct")
    parser.add_argument("--models", type=Path, default=common.MODELS)
    parser.add_argument("--cifar", type=Path, default=common.CIFAR_CACHE)
    parser.add_argument("--shared-data", type=Path, default=common.SHARED_CIFAR)
    parser.add_argument("--calib-images", type=int, help="unlabeled training images (default 1024; quick 256)")
    parser.add_argument("--eval-limit", type=int, help="test images (default 10,000; quick 1,000)")
    parser.add_argument("--rows", help="comma-separated row numbers to run (default all)")
    parser.add_argument("--refine-steps", type=int, help="compress --refine-steps of the reconstructed rows "
                        "(default: compress's own, 300 for this network)")  # fmt: skip
    parser.add_argument("--calib-seed", type=int, default=0, help="compress --calib-seed of vconvert's rows: another "
                        "subset of the training images, for the spread over subsets (with --peers none)")  # fmt: skip
    parser.add_argument("--output", type=Path, help="results stem (default benchmarks/results/reconstruct_MODE)")
    parser.add_argument("--peers", choices=("with", "only", "none"), default="with",
                        help="no-label peer rows (dense network): with the rows (default), only, none")  # fmt: skip
    parser.add_argument("--make-peer", help=argparse.SUPPRESS)  # METHOD,BITS: the measured child of one peer
    parser.add_argument("--peer-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--fp32", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_peer:
        print(json.dumps(make_peer(args)))
        return
    if args.calib_seed and args.peers != "none":
        parser.error("--calib-seed draws vconvert's rows' images only: pass --peers none with it.")
    mode = "quick" if args.quick else "full"
    args.calib_images = args.calib_images or (256 if args.quick else 1024)
    args.eval_limit = args.eval_limit or (1000 if args.quick else 10000)
    rows = QUICK_ROWS if args.quick else FULL_ROWS
    if args.rows:
        rows = [rows[int(index)] for index in args.rows.split(",")]
    if args.peers == "only":
        rows = []
    common.ensure_cifar(args.cifar, args.shared_data)
    args.work.mkdir(parents=True, exist_ok=True)
    output = args.output or common.RESULTS / f"reconstruct_{mode}"
    run = common.Runner(args.work, echo=True)
    started = time.perf_counter()
    record: dict[str, Any] = {
        "benchmark": "reconstruct",
        "mode": mode,
        "command": common.command_line(__file__, quote=True),
        "calibration_images": args.calib_images,
        "calibration_seed": args.calib_seed,
        "calibration_split": "train (labels not read)",
        "eval_images": args.eval_limit,
        "dense_top1_10k": DENSE_TOP1,
        "machine": {
            **common.host(),
            **common.versions("python", "torch", "onnxruntime", "onnx"),
            "load_average_start": common.load_average(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset (torch's default)"),
        },
        "commands": run.commands,
        "rows": [],
        "peers": [],
    }

    def evaluate(path: Path) -> dict:
        result, seconds = run("evaluate", str(path), "--data", str(args.cifar), "--limit", str(args.eval_limit))
        return {"top1": result["top1"], "images": result["images"], "evaluate_s": round(seconds, 1)}

    dense_checkpoint = args.work / "s2.datafree.vc.pt"
    made: dict[str, dict] = {}
    for name, layout, reconstruct, bits, export_bits in rows:
        stem = f"{layout}." + (f"reconstructed.b{bits or 'planned'}" if reconstruct else "datafree")
        checkpoint = args.work / f"{stem}.vc.pt"
        if stem not in made:
            print(f"$ compress {stem}", flush=True)
            made[stem] = compress(args, checkpoint, layout, reconstruct, bits)
        onnx_file = args.work / f"{stem}.int8{'.b' + str(export_bits) if export_bits else ''}.onnx"
        exported, _ = run("export", str(checkpoint), "-o", str(onnx_file), "--quantize", "int8", "--compact",
                          "--calib-images", "512", "--no-compare", *(["--weight-bits", str(export_bits)]
                                                                     if export_bits else []))  # fmt: skip
        row = {
            "row": name,
            "layout": " ".join(LAYOUTS[layout]),
            "reconstructed": reconstruct,
            "file_bytes": onnx_file.stat().st_size,
            "weight_bits": exported["quantization"]["weight_bits"],
            "compress": made[stem],
            **evaluate(onnx_file),
        }
        record["rows"].append(row)
        print({key: value for key, value in row.items() if key != "compress"}, flush=True)
        write(record, output)
    if args.peers != "none":
        run_peers(args, record, output, evaluate)
    if rows and dense_checkpoint.exists():
        fp32 = args.work / "dense.fp32.onnx"
        run("export", str(dense_checkpoint), "-o", str(fp32), "--no-compare")
        record["fp32_file_bytes"] = fp32.stat().st_size  # the dense fold: the original network's fp32 graph
    record["wall_s"] = round(time.perf_counter() - started, 1)
    record["machine"]["load_average_end"] = common.load_average()
    record["complete"] = True
    write(record, output)
    print(output.with_suffix(".md").read_text())


def write(record: dict[str, Any], stem: Path) -> None:
    """The JSON record and a Markdown table (top-1, Δ against the dense fp32 model, size, time, memory)."""
    common.write_json(stem.with_suffix(".json"), record)
    fp32 = record.get("fp32_file_bytes")
    lines = [
        f"# Reconstruction on unlabeled images vs the data-free fit ({record['mode']})",
        "",
        f"Command: `{record['command']}`  ",
        f"Shared CIFAR-10 ResNet-20 (dense fp32 {record['dense_top1_10k']} on the 10,000 test images); "
        f"{record['calibration_images']} unlabeled training images for reconstruction and BatchNorm recalibration "
        f"(subset {record.get('calibration_seed', 0)}; and the peers' calibration); "
        f"top-1 of each ONNX file (int8: --int8-target any) in onnxruntime on {record['eval_images']} test "
        f"images. Load average at the start {record['machine']['load_average_start']}, at the end "
        f"{record['machine'].get('load_average_end', 'n/a')} (2 cores shared with other jobs; OMP_NUM_THREADS "
        f"{record['machine']['OMP_NUM_THREADS']}).",
    ]
    if record["rows"]:
        lines += [
            "",
            "| row | weight bits | file bytes | ratio to fp32 | top-1 | Δ vs dense | output error before → after | "
            "block refinement: blocks kept, block error before → after (s) | "
            "BatchNorm statistics (output divergence without → with recalibration) | "
            "compress wall s (reconstruction s) | peak RSS GB |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    for row in record["rows"]:
        made = row["compress"]
        rebuilt = made.get("reconstruction")
        error = f"{rebuilt['error_before']:.4f} → {rebuilt['error_after']:.4f}" if rebuilt else ""
        seconds = f"{made['wall_s']}" + (f" ({rebuilt['seconds']})" if rebuilt else "")
        ratio = f"{row['file_bytes'] / fp32:.3f}x" if fp32 else ""
        delta = f"{row['top1'] - record['dense_top1_10k']:+.2f}"
        cells = [row["row"], row["weight_bits"], f"{row['file_bytes']:,}", ratio, f"{row['top1']:.2f}", delta, error,
                 refinement_cell(rebuilt), batchnorm_cell(made), seconds, f"{made['peak_rss_gb']:.2f}"]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    if record["rows"]:
        lines += ["", "Commands (compress, measured as child processes):", ""]
        lines += [f"- `{command}`" for command in dict.fromkeys(row["compress"]["command"] for row in record["rows"])]
    if record.get("fp32_file_bytes_from"):
        lines += ["", f"fp32 file bytes ({fp32:,}) from {record['fp32_file_bytes_from']}."]
    if record.get("peers"):
        lines += peer_lines(record)
    if record["eval_images"] != 10000:
        lines += [
            "",
            f"Δ vs dense compares {record['eval_images']} test images with the dense model's 10,000: indicative.",
        ]
    common.write_markdown(stem.with_suffix(".md"), lines)


def refinement_cell(rebuilt: dict[str, Any] | None) -> str:
    """A reconstructed row's block refinement (docs/FIT.md §19): blocks kept of those refined, the mean block output
    error before and after, its seconds; "none" where compress ran without it."""
    if rebuilt is None:
        return ""
    refined = rebuilt.get("refinement")
    if refined is None:
        return "none"
    return (
        f"{refined['kept']}/{refined['blocks']}, {refined['error_before']:.4f} → {refined['error_after']:.4f} "
        f"({refined['seconds']})"
    )


def batchnorm_cell(made: dict[str, Any]) -> str:
    """What became of a row's BatchNorm statistics: recalibrated (data-free rows, or where that brought the outputs
    closer to the original's) or kept as trained, with the two divergences."""
    outcome = made.get("bn_recalibration")
    if outcome is None:
        return "recalibrated" if made.get("reconstruction") is None else ""
    verdict = "recalibrated" if outcome["kept"] else "kept as trained"
    return f"{verdict} ({outcome['divergence_before']:.4f} → {outcome['divergence_after']:.4f})"


def peer_lines(record: dict[str, Any]) -> list[str]:
    """The Markdown section of the no-label peers: each file's size, top-1 and its quantization step's cost."""
    fp32 = record["peers_fp32"]
    lines = [
        "",
        "## No-label peers on the dense network (same unlabeled training images, no training)",
        "",
        f"The dense fp32 file: {fp32['file_bytes']:,} bytes, top-1 {fp32['top1']:.2f} on {fp32['images']} test "
        "images. Quantization step = a child process that reads the calibration images, quantizes and writes the "
        "file (brevitas: the handed-over module; its int8 export, activation calibration on "
        f"{EXPORT_CALIBRATION_IMAGES} of the images, is timed apart).",
        "",
        "| row | weight bits | file bytes | ratio to fp32 | top-1 | Δ vs dense | quantization wall s (algorithm s) | "
        "peak RSS GB | export s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in record["peers"]:
        made = row["quantization"]
        export = row.get("export")
        ratio = row["file_bytes"] / fp32["file_bytes"]
        cells = [row["row"], row["weight_bits"], f"{row['file_bytes']:,}", f"{ratio:.3f}x",
                 f"{row['top1']:.2f}", f"{row['top1'] - record['dense_top1_10k']:+.2f}",
                 f"{made['wall_s']} ({made['quantize_s']})", f"{made['peak_rss_gb']:.2f}",
                 export["seconds"] if export else ""]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    if any(row.get("export") for row in record["peers"]):
        lines.append("")
    for row in (row for row in record["peers"] if row.get("export")):
        export = row["export"]
        widths = sorted(set(export["layer_weight_bits"].values()))
        lines.append(
            f"- {row['row']}: {row['quantization']['algorithm']}; integers kept by the export "
            f"{export['weights_equal_fake_quantised']}, compact file = dense QDQ {export['compact_equals_dense']}, "
            f"converted layers at {widths} bits"
        )
    return lines


if __name__ == "__main__":
    main()
