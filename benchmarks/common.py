"""What every benchmark shares: where results go, the environment fields they record, writing results, and
running the vconvert CLI (or any child process, with its own peak memory).

Import convention. A benchmark is a script, run from the repository root as ``python benchmarks/<name>.py``
(``python -m benchmarks.<name>`` works too, and so does any working directory). Each starts with the same
path set-up, so that the package ``benchmarks`` is importable however it was started, then imports this
module as ``common`` (``common.RESULTS``, ``common.write_json(...)``) and other benchmarks only as
``from benchmarks.<name> import ...``::

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `benchmarks` importable
    from benchmarks import common

torch and onnxruntime are imported inside the functions that need them: ``session_start.py`` times
onnxruntime without torch loaded.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# ---------------------------------------------------------------- the shared CIFAR-10 model and data
# The shared folder beside the repository (../shared), or where VCONVERT_SHARED says: a clone elsewhere runs too.
SHARED = Path(os.environ.get("VCONVERT_SHARED", Path(__file__).resolve().parents[2] / "shared"))
MODELS = SHARED / "models"  # the pretrained CIFAR-10 ResNet-20 (88.57%)
RESNET20_FILE = "resnet20_cifar10.pt"  # its state_dict in MODELS (sample_models.resnet_cifar:resnet20)
SHARED_CIFAR = SHARED / "data" / "cifar10"  # cifar10-{train,test}.tar.gz
CIFAR_CACHE = Path.home() / ".cache" / "vconvert" / "cifar10"  # those archives unpacked (train/, test/)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR_MEAN_ARG = ",".join(f"{value:.4f}" for value in CIFAR_MEAN)  # as vconvert's --mean takes it
CIFAR_STD_ARG = ",".join(f"{value:.4f}" for value in CIFAR_STD)  # as vconvert's --std takes it


def unpack(data: Path, cache: Path) -> None:
    """Unpack the CIFAR-10 train/test archives in ``data`` into ``cache`` unless that was done before."""
    for split in ("train", "test"):
        marker = cache / f".{split}-unpacked"
        if marker.exists():
            continue
        with tarfile.open(data / f"cifar10-{split}.tar.gz") as archive:
            archive.extractall(cache, filter="data")
        marker.touch()


def ensure_cifar(cifar: Path, shared: Path) -> None:
    """Unpack the archives in ``shared`` into ``cifar`` unless it already holds a train/ folder."""
    if not (cifar / "train").is_dir():
        cifar.mkdir(parents=True, exist_ok=True)
        unpack(shared, cifar)


def pretrained_resnet20(models: Path) -> nn.Module:
    """The pretrained CIFAR-10 ResNet-20 of ``models`` (``RESNET20_FILE``), in eval mode."""
    import torch

    from sample_models.resnet_cifar import resnet20

    model = resnet20()
    model.load_state_dict(torch.load(models / RESNET20_FILE, weights_only=True))
    return model.eval()


def import_object(spec: str) -> Any:
    """The object that a ``module:attribute`` spec names (e.g. ``torchvision.models:resnet50``)."""
    module_name, attribute = spec.split(":")
    return getattr(importlib.import_module(module_name), attribute)


def slug(name: str) -> str:
    """``name`` as a file-name stem: every character but letters and digits becomes ``_``."""
    return "".join(c if c.isalnum() else "_" for c in name)


# ---------------------------------------------------------------- the environment fields of a result
def command_line(script: str, args: Sequence[str] | None = None, quote: bool = False) -> str:
    """How a benchmark ran, as results record it: ``python benchmarks/<script's file name> ARGS``.

    ``args`` defaults to this process's own (``sys.argv[1:]``); ``quote`` shell-quotes them."""
    args = sys.argv[1:] if args is None else args
    return f"python benchmarks/{Path(script).name} " + (shlex.join(args) if quote else " ".join(args))


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name where ``device`` is CUDA, else ``cpu (N threads)``; ``None``: CUDA where available."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def versions(*names: str) -> dict[str, str]:
    """``{name: version}`` of each named package in that order; ``python`` is the interpreter."""
    return {
        name: platform.python_version() if name == "python" else importlib.import_module(name).__version__
        for name in names
    }


def host() -> dict[str, Any]:
    """``cpus`` (logical CPU count) and ``machine`` (``platform.platform()``)."""
    return {"cpus": os.cpu_count(), "machine": platform.platform()}


def device_fields(device: torch.device | str | None = None) -> dict[str, str]:
    """``device`` (:func:`device_name`), ``machine`` (``platform.platform()``) and the ``torch`` version."""
    return {"device": device_name(device), "machine": platform.platform(), **versions("torch")}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``unknown`` where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


INT8_CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def cpu_flags() -> dict[str, Any]:
    """This CPU's model, which of :data:`INT8_CPU_FLAGS` it has (/proc/cpuinfo), and how onnxruntime adds its
    u8 x s8 products: exactly in int32 (VNNI, AMX, not x86) or in saturating int16 pairs (x86 without them, where
    8-bit weights can lose accuracy: vconvert.export.saturation). Recorded in every results file."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    machine = platform.machine().lower()
    exact = machine not in ("x86_64", "amd64", "i386", "i686") or bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)
    return {
        "model": cpu_model(),
        "machine": machine,
        "flags": [flag for flag in INT8_CPU_FLAGS if flag in flags],
        "int8_kernels": "exact int32 (VNNI/AMX or not x86)" if exact else "saturating int16 pairs (x86 without VNNI)",
    }


def cpu_line() -> str:
    """One line naming the CPU and its int8-relevant flags, for Markdown results."""
    info = cpu_flags()
    return (
        f"CPU: {info['model']} ({info['machine']}; {', '.join(info['flags']) or 'no listed flags'}; int8 kernels: "
        f"{info['int8_kernels']})."
    )


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages (other jobs on the machine skew wall times)."""
    return list(os.getloadavg())


# ---------------------------------------------------------------- writing results
def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON at ``path`` (its folder made if missing); a dict gains ``cpu_flags``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, dict) and "cpu_flags" not in data:  # every results file says which CPU measured it
        data = {**data, "cpu_flags": cpu_flags()}
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_markdown(path: Path, lines: Sequence[str]) -> None:
    """``lines`` as a Markdown file at ``path`` (its folder made if missing), ending with :func:`cpu_line`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = list(lines)
    if not any(line.startswith("CPU: ") for line in lines):  # every results file says which CPU measured it
        lines += ["", cpu_line()]
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- running the CLI and other child processes
def vconvert_command(*args: str) -> list[str]:
    """The command line that runs ``vconvert ARGS`` with this interpreter."""
    return [sys.executable, "-m", "vconvert", *args]


def shown(command: Sequence[str]) -> str:
    """A :func:`vconvert_command` as a person would type it: ``vconvert ARGS``."""
    return " ".join(["vconvert", *command[3:]])


def run_captured(command: Sequence[str], cwd: Path | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``command`` with its output captured; the finished process and its wall seconds."""
    started = time.perf_counter()
    completed = subprocess.run(list(command), capture_output=True, text=True, check=False, cwd=cwd)
    return completed, time.perf_counter() - started


def vconvert(*args: str) -> tuple[str, float]:
    """Run ``vconvert ARGS``; its stdout and wall seconds. Exits with its error where it fails."""
    completed, seconds = run_captured(vconvert_command(*args))
    if completed.returncode != 0:
        sys.exit(f"vconvert {args[0]} failed: {completed.stderr.strip()[-2000:]}")
    return completed.stdout, seconds


def vconvert_json(*args: str) -> tuple[Any, float]:
    """Run ``vconvert ARGS --json``; its parsed output and wall seconds. Exits with its error where it fails."""
    stdout, seconds = vconvert(*args, "--json")
    return json.loads(stdout), seconds


class Runner:
    """Runs ``vconvert ARGS --json`` in the repository root, raising RuntimeError where it fails, and keeps
    every command line (the work folder shown as ``$WORK``) with its wall time and exit code for the record."""

    def __init__(self, work: Path, echo: bool = False) -> None:
        self.work = work
        self.echo = echo  # print each command line before running it
        self.commands: list[dict[str, Any]] = []

    def __call__(self, *args: str) -> tuple[Any, float]:
        """Run one command; its parsed output and wall seconds."""
        command = vconvert_command(*args, "--json")
        text = shown(command).replace(str(self.work), "$WORK")
        if self.echo:
            print(f"$ {text}", flush=True)
        completed, seconds = run_captured(command, cwd=ROOT)
        self.commands.append({"command": text, "seconds": round(seconds, 1), "rc": completed.returncode})
        if completed.returncode != 0:
            raise RuntimeError(f"{text} failed ({completed.returncode}): {completed.stderr.strip()[-1500:]}")
        return json.loads(completed.stdout), seconds


def run_child(command: Sequence[str], folder: Path) -> tuple[int, float, float, str, str]:
    """Run ``command`` (output to files in ``folder``, not pipes: a report can be large); return (exit code,
    its own peak RSS in GB, wall seconds, stdout, stderr)."""
    out_path, err_path = folder / "stdout.txt", folder / "stderr.txt"
    with out_path.open("w") as out, err_path.open("w") as err:
        start = time.perf_counter()
        process = subprocess.Popen(list(command), stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    return code, usage.ru_maxrss * 1024 / 1e9, wall, out_path.read_text(), err_path.read_text()


def run_measured(command: Sequence[str], folder: Path) -> tuple[float, float, str]:
    """Run ``command``; return (its own peak RSS in GB, wall seconds, stdout). Exits on failure."""
    code, peak, wall, stdout, stderr = run_child(command, folder)
    if code != 0:
        sys.exit(f"{' '.join(command[:4])} failed: {stderr.strip()}")
    return peak, wall, stdout


def import_baseline_gb(modules: str, folder: Path) -> float:
    """Peak RSS (GB) of a child process that only runs ``import MODULES``: what a measured run holds before
    doing anything."""
    return run_measured([sys.executable, "-c", f"import {modules}"], folder)[0]
