"""onnxruntime session start of ONNX files, side by side: the time ``InferenceSession(path)`` takes (load,
graph optimisation, constant folding of a compact file's weights, kernel set-up), median of rounds that
visit every file in turn.

    python benchmarks/session_start.py BASE.onnx OTHER.onnx [...] [--rounds 7] [--output NAME] [--quick]

Writes benchmarks/results/<NAME>.json with each file's median and its difference to the first file.
Target (issue 17): a compact int8 file starts ≤ 100 ms later than the dense int8 file of the same model.
``--quick`` takes 3 rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `benchmarks` importable
from benchmarks import common


def session_start_ms(path: Path, threads: int) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    started = time.perf_counter()
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return 1000 * (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", type=Path, nargs="+", help="the first one is the reference")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--output", default="session_start")
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    times: dict[Path, list[float]] = {path: [] for path in args.files}
    for path in args.files:  # a first, untimed start warms the file cache and onnxruntime itself
        session_start_ms(path, args.threads)
    for _ in range(rounds):
        for path in args.files:
            times[path].append(session_start_ms(path, args.threads))
    reference = statistics.median(times[args.files[0]])
    rows = [
        {"file": path.name, "bytes": path.stat().st_size, "median_ms": round(statistics.median(ms), 1),
         "min_ms": round(min(ms), 1), "max_ms": round(max(ms), 1),
         "minus_reference_ms": round(statistics.median(ms) - reference, 1)}
        for path, ms in times.items()
    ]  # fmt: skip
    result = {
        "benchmark": "session_start",
        "mode": "quick" if args.quick else "full",
        "command": common.command_line(__file__),
        "rounds": rounds,
        "threads": args.threads,
        "rows": rows,
        **common.versions("onnxruntime"),
        **common.host(),
    }
    common.write_json(common.RESULTS / f"{args.output}.json", result)
    for row in rows:
        print(f"{row['file']:45s} {row['median_ms']:8.1f} ms  ({row['minus_reference_ms']:+.1f} ms)")


if __name__ == "__main__":
    main()
