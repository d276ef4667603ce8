"""Wall time and peak resident memory of `vconvert compress` on torchvision resnet50 (random weights).

Runs the real CLI in a child process (so its peak RSS is its own), end to end: load the state_dict,
trace, decide, fit every layer, write the .vc.pt.

    python benchmarks/compress_speed.py [--arch torchvision.models:resnet50]

Writes benchmarks/results/compress_speed.json. Targets (issue 3): ≤ 15 s, ≤ 1.5 GB on 2 cores, where
torch itself was taken as ~0.3 GB; `import torch` of the CUDA build installed here alone holds ~0.9 GB,
so the import baseline is measured in the same run and the peak above it is reported too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `benchmarks` importable
from benchmarks import common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="torchvision.models:resnet50")
    parser.add_argument("--input-shape", default="1,3,224,224")
    args = parser.parse_args()

    builder = common.import_object(args.arch)
    with tempfile.TemporaryDirectory() as folder:
        weights, output = Path(folder) / "model.pt", Path(folder) / "model.vc.pt"
        torch.manual_seed(0)
        torch.save(builder().state_dict(), weights)
        command = common.vconvert_command("compress", str(weights), "--arch", args.arch, "--input-shape",
                                          args.input_shape, "-o", str(output), "--json")  # fmt: skip
        baseline_gb = common.import_baseline_gb("torchvision, vconvert.cli", Path(folder))
        peak_gb, wall, stdout = common.run_measured(command, Path(folder))
        report = json.loads(stdout)
        result = {
            "benchmark": "compress_speed",
            "command": common.command_line(__file__, ["--arch", args.arch, "--input-shape", args.input_shape]),
            "cli": common.shown(command),
            "arch": args.arch,
            "wall_s": wall,
            "peak_rss_gb": peak_gb,
            "import_baseline_rss_gb": baseline_gb,
            "peak_above_import_gb": peak_gb - baseline_gb,
            "target_wall_s": 15.0,
            "target_peak_rss_gb": 1.5,
            "input_file_mb": weights.stat().st_size / 1e6,
            "checkpoint_mb": output.stat().st_size / 1e6,
            "converted_layers": sum(1 for layer in report["plan"]["layers"] if layer["decision"] == "converted"),
            "summary": report["summary"],
            **common.host(),
            **common.versions("torch"),
        }
    common.write_json(common.RESULTS / "compress_speed.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
