"""Fuzzing what vconvert reads (security issue 16).

From one small good ``.vc.pt`` (ResNet-8, 1 channel, 16x16) a few hundred damaged ones are built and
each goes through ``inspect``, ``finetune`` (one step), ``export`` and ``evaluate`` in-process; damaged
``.onnx`` files go through ``evaluate``, damaged image folders through ``finetune --data`` and
``compress --calib-data``. Whatever the damage, a command ends with exit 2 (1 for a failed check)
and one sentence on stderr, or succeeds when the file is still valid; it writes no output file
unless it succeeds (files already there stay as they were) and runs no code from the file (a marker
any payload would create never appears). Image files that can be converted (1x1, CMYK, 16-bit,
grayscale for an RGB model) are converted to the model's channels and size; files that cannot be
decoded (corrupt, truncated, empty) are skipped with a one-line warning naming the first of them.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import random
import resource
import struct
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import typer
import typer.testing
from conftest import error_message, finetune_cut
from onnx import TensorProto, helper
from PIL import Image
from typer.testing import CliRunner

from sample_models.resnet_cifar import resnet8
from vconvert import compress, save
from vconvert.cli.app import app
from vconvert.data.datasets import open_split
from vconvert.io.metadata import CheckpointMetadata
from vconvert.io.untrusted import BaseSpec
from vconvert.train.config import FinetuneConfig

ARCH = "sample_models.resnet_cifar:resnet8"
SHAPE = [1, 1, 16, 16]
PREPROCESSING = {"mean": [0.3], "std": [0.4], "input_size": [16, 16]}
QUICK = (
    "--data digits --epochs 1 --batch-size 4 --train-limit 4 --eval-limit 4 --workers 0 --recalibrate-images 0 "
    "--masks frozen"
).split()
RESUME = [*QUICK[:2], "--epochs", "2", *QUICK[4:]]
RESUME_CONFIG = FinetuneConfig(
    data="digits", epochs=2, batch_size=4, train_limit=4, eval_limit=4, workers=0, recalibrate_images=0, masks="frozen"
)
CHECKPOINT_COMMANDS = ("inspect", "finetune", "export", "evaluate")
OK, BAD, ANY = frozenset({0}), frozenset({2}), frozenset({0, 1, 2})


# --------------------------------------------------------------------------- running a command
@pytest.fixture(scope="module", autouse=True)
def quick_commands() -> Iterator[None]:
    """One thread (the models are tiny: a thread pool only adds waiting on 2 busy cores) and the click
    command built once instead of on every invoke."""
    built, threads = typer.main.get_command(app), torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            typer.testing, "_get_command", lambda target: built if target is app else typer.main.get_command(target)
        )
        yield
    torch.set_num_threads(threads)


def _outputs(folder: Path) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def _command(name: str, file: Path, out: Path) -> list[str]:
    return {
        "inspect": ["inspect", file],
        "finetune": ["finetune", file, "-o", out / "ft.vc.pt", *QUICK],
        "resume": ["finetune", file, "-o", file, "--resume", *RESUME],
        "export": ["export", file, "-o", out / "model.onnx", "--no-compare"],
        "evaluate": ["evaluate", file, "--limit", "4", "--data", "digits"],
    }[name]


def run_checked(args: list, codes: frozenset[int], watched: Iterable[Path], marker: Path, says: str = "") -> object:
    """Run the CLI in-process and check the contract: an allowed exit code, one sentence on errors,
    no file written or changed in ``watched`` folders unless it succeeded, and no marker."""
    before = {folder: _outputs(folder) for folder in watched}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with warnings.catch_warnings(record=True) as caught:  # what Python would print to a user's stderr
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=category)
        result = CliRunner().invoke(app, [str(arg) for arg in args])
    shown = f"{' '.join(str(a) for a in args[:2])}: exit {result.exit_code}\n{result.output}{result.stderr}"
    leaked = [f"{warning.category.__name__}: {warning.message}" for warning in caught]
    crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
    assert not crashed, f"{shown}\ncrashed with {result.exception!r}"
    assert result.exit_code in codes, shown
    assert "Traceback" not in result.output + result.stderr, shown
    if result.exit_code:
        message = error_message(result)
        assert message.startswith("error:") and "\n" not in message and len(message) < 700, shown
        assert says in message, shown
        assert not leaked, f"{shown}\nPython warnings besides the error: {leaked}"
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
        assert grown < 2**20, f"{shown}\nthe peak memory grew by {grown >> 10} MiB before the refusal"
        for folder, files in before.items():
            assert _outputs(folder) == files, f"{shown}\nfiles changed in {folder}"
    assert not marker.exists(), f"{shown}\ncode from the file ran"
    return result


# --------------------------------------------------------------------------- the good files
class Touch:
    """Unpickling this runs ``os.system("touch MARKER")``: the payload of every code-execution case."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Exec:
    """Unpickling this runs ``exec`` on code that creates MARKER."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def saved_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@dataclass
class Good:
    folder: Path
    checkpoint: Path
    payload: dict
    data: bytes
    resumable: Path
    resumable_payload: dict
    onnx: bytes


@pytest.fixture(scope="session")
def good(tmp_path_factory: pytest.TempPathFactory) -> Good:
    folder = tmp_path_factory.mktemp("fuzz-good")
    torch.manual_seed(0)
    teacher = resnet8(in_channels=1).eval()
    model, plan = compress(teacher, torch.randn(*SHAPE), init="naive")
    path = folder / "good.vc.pt"
    save(
        path,
        model,
        plan,
        BaseSpec(ARCH, {"in_channels": 1}, None, "resnet8.pt"),
        teacher,
        CheckpointMetadata(input_shape=SHAPE, preprocessing=PREPROCESSING),
    )
    resumable = folder / "resumable.vc.pt"
    finetune_cut(path, resumable, RESUME_CONFIG)
    onnx_path = folder / "good.onnx"
    result = CliRunner().invoke(app, ["export", str(path), "-o", str(onnx_path), "--no-compare"])
    assert result.exit_code == 0, result.output + result.stderr
    return Good(
        folder,
        path,
        torch.load(path, weights_only=True),
        path.read_bytes(),
        resumable,
        torch.load(resumable, weights_only=True),
        onnx_path.read_bytes(),
    )


@dataclass
class Where:
    """What a case may use: the test's folder (also the working directory) and the marker path."""

    folder: Path
    marker: Path


# --------------------------------------------------------------------------- damaged checkpoints
Maker = Callable[[Good, Where], bytes]


@dataclass(frozen=True)
class Case:
    id: str
    make: Maker
    codes: frozenset[int] = BAD
    says: str = ""
    commands: tuple[str, ...] = CHECKPOINT_COMMANDS


def raw(change: Callable[[bytes], bytes]) -> Maker:
    return lambda g, w: change(g.data)


def edit(change: Callable[[dict, Where], None], resumable: bool = False) -> Maker:
    """A copy of the good payload changed in place by ``change``, saved with torch.save."""

    def make(g: Good, w: Where) -> bytes:
        payload = copy.deepcopy(g.resumable_payload if resumable else g.payload)
        change(payload, w)
        return saved_bytes(payload)

    return make


def setting(*keys: object, value: object) -> Callable[[dict, Where], None]:
    """Set payload[k1][k2]... = value (a callable value is called with (payload, where))."""

    def change(payload: dict, w: Where) -> None:
        target = payload
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value(payload, w) if callable(value) else value

    return change


def removing(*keys: object) -> Callable[[dict, Where], None]:
    def change(payload: dict, w: Where) -> None:
        target = payload
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]

    return change


def changing_tensor(key: str, change: Callable[[torch.Tensor], object], field_name: str = "state_dict"):
    return setting(field_name, key, value=lambda payload, w: change(payload[field_name][key]))


def _members(data: bytes) -> dict[str, tuple[int, int]]:
    """Each zip member's (data offset, size) in a torch.save file."""
    archive = zipfile.ZipFile(io.BytesIO(data))
    found = {}
    for info in archive.infolist():
        name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
        found[info.filename.split("/", 1)[1]] = (info.header_offset + 30 + name_length + extra_length, info.file_size)
    return found


def flip(where: Callable[[bytes], int], mask: int = 0xFF) -> Callable[[bytes], bytes]:
    def change(data: bytes) -> bytes:
        damaged = bytearray(data)
        damaged[where(data)] ^= mask
        return bytes(damaged)

    return change


def patch(member: str, value: bytes) -> Callable[[bytes], bytes]:
    """Overwrite the start of a zip member's data (torch stores tensors uncompressed, unchecked)."""

    def change(data: bytes) -> bytes:
        offset = _members(data)[member][0]
        return data[:offset] + value + data[offset + len(value) :]

    return change


def in_pickle(fraction: float) -> Callable[[bytes], int]:
    def where(data: bytes) -> int:
        offset, size = _members(data)["data.pkl"]
        return offset + int(size * fraction)

    return where


def zipped_text() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes/readme.txt", "not a checkpoint")
    return buffer.getvalue()


def bytes_cases() -> list[Case]:
    cases = [
        Case(f"truncated-{label}", raw(lambda d, cut=cut: d[: cut(len(d))]))
        for label, cut in {
            "4-bytes": lambda n: 4,
            "1%": lambda n: n // 100,
            "10%": lambda n: n // 10,
            "25%": lambda n: n // 4,
            "50%": lambda n: n // 2,
            "75%": lambda n: 3 * n // 4,
            "99%": lambda n: 99 * n // 100,
            "minus-1-byte": lambda n: n - 1,
            "minus-22-bytes": lambda n: n - 22,
            "minus-4096-bytes": lambda n: n - 4096,
        }.items()
    ]
    for size in (1, 100, 10_000, 300_000):
        cases.append(Case(f"random-bytes-{size}", raw(lambda d, n=size: random.Random(n).randbytes(n))))
    cases += [
        Case("random-after-zip-magic", raw(lambda d: b"PK\x03\x04" + random.Random(1).randbytes(5000))),
        Case("zip-of-a-text-file", raw(lambda d: zipped_text())),
        Case("text-file", raw(lambda d: b"format: vconvert.checkpoint/1\n")),
        Case("empty-file", raw(lambda d: b"")),
        Case("doubled-file", raw(lambda d: d + d), ANY),
    ]
    for fraction in (0.0, 0.001, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 0.999):
        cases.append(Case(f"flipped-pickle-byte-at-{fraction:g}", raw(flip(in_pickle(fraction))), ANY))
    cases += [
        Case("flipped-first-local-header", raw(flip(lambda d: 8)), ANY),
        Case("flipped-central-directory", raw(flip(lambda d: len(d) - 22 - 40)), ANY),
        Case("flipped-end-of-central-directory", raw(flip(lambda d: len(d) - 12)), ANY),
        Case("flipped-storage-alignment", raw(flip(lambda d: _members(d)[".storage_alignment"][0])), ANY),
        Case("flipped-byteorder", raw(flip(lambda d: _members(d)["byteorder"][0])), ANY),
        Case("first-weight-bytes-set-to-nan", raw(patch("data/0", struct.pack("<f", math.nan)))),
        Case("first-weight-bytes-set-to-inf", raw(patch("data/0", struct.pack("<f", -math.inf)))),
    ]
    return cases


WRONG_TYPES: dict[str, object] = {
    "none": None,
    "int": 7,
    "str": "x",
    "list": [1, 2],
    "tensor": torch.zeros(3),
    "nested-dict": {"a": {"b": 1}},
}
TOP_LEVEL = ("base", "plan", "state_dict", "teacher_state_dict", "metadata", "format", "versions")


def top_level_cases() -> list[Case]:
    cases = [
        Case(f"top-{key}-is-{kind}", edit(setting(key, value=value)))
        for key in TOP_LEVEL
        for kind, value in WRONG_TYPES.items()
        if (key, kind) != ("metadata", "nested-dict")
    ]
    cases.append(
        Case(
            "top-metadata-is-an-unknown-nested-dict",
            edit(setting("metadata", value={"a": {"b": 1}})),
            OK,
            commands=("inspect",),
        )
    )
    cases += [Case(f"top-missing-{key}", edit(removing(key))) for key in TOP_LEVEL]
    cases += [
        Case("top-is-a-list", raw(lambda d: saved_bytes([1, 2, 3]))),
        Case("top-is-a-tensor", raw(lambda d: saved_bytes(torch.zeros(2)))),
        Case("top-holds-os-system-payload", lambda g, w: saved_bytes({**g.payload, "extra": Touch(w.marker)})),
        Case("top-holds-exec-payload", lambda g, w: saved_bytes({**g.payload, "metadata": Exec(w.marker)})),
        Case("top-unknown-extra-key", edit(setting("extra", value={"anything": 1})), OK, commands=("inspect",)),
        Case("top-int-key", edit(setting(3, value="x"))),
    ]
    return cases


# --------------------------------------------------------------------------- the base spec
def _marked(value: object, w: Where) -> object:
    """``value`` with every "MARKER" in its strings replaced by the marker's path."""
    if isinstance(value, str):
        return value.replace("MARKER", str(w.marker))
    if isinstance(value, dict):
        return {key: _marked(item, w) for key, item in value.items()}
    if isinstance(value, list):
        return [_marked(item, w) for item in value]
    return value


def base(arch: object, kwargs: object = None, **extra) -> Maker:
    def change(payload: dict, w: Where) -> None:
        payload["base"].update({"arch": arch, "arch_kwargs": _marked({} if kwargs is None else kwargs, w), **extra})

    return edit(change)


UNTRUSTED = "--trust"
FILE_ARCHES = {
    # registered builders that do not match the stored weights
    "torchvision-resnet18": ("torchvision.models:resnet18", {}, BAD, ""),
    "torchvision-resnet18-dotted": ("torchvision.models.resnet.resnet18", {}, BAD, ""),
    "torchvision-get-model": ("torchvision.models:get_model", {"name": "resnet18"}, BAD, ""),
    "torchvision-huge-vit": ("torchvision.models:vit_h_14", {}, BAD, ""),
    "timm-create-model": ("timm:create_model", {"model_name": "resnet18"}, BAD, ""),
    "timm-resnet18": ("timm.models:resnet18", {}, BAD, ""),
    "sample-resnet20": ("sample_models.resnet_cifar:resnet20", {"in_channels": 1}, BAD, ""),
    "sample-vgg-small": ("sample_models.vgg_small:vgg_small", {}, BAD, ""),
    # not model builders: refused as code the file chose
    "torchvision-private": ("torchvision.models:_api", {}, BAD, UNTRUSTED),
    "torchvision-partial": ("torchvision.models.resnet:partial", {}, BAD, UNTRUSTED),
    "torchvision-hub-chain": ("torchvision.models.resnet:torch.hub.load", {}, BAD, UNTRUSTED),
    "torchvision-io-read-file": ("torchvision.io:read_file", {"path": "/etc/hostname"}, BAD, UNTRUSTED),
    "torchvision-block-class": ("torchvision.models.resnet:BasicBlock", {"inplanes": 1, "planes": 1}, BAD, UNTRUSTED),
    "timm-load-checkpoint": ("timm.models:load_checkpoint", {"checkpoint_path": "payload.pt"}, BAD, UNTRUSTED),
    "timm-get-pretrained-cfg": ("timm.models:get_pretrained_cfg", {"model_name": "resnet18"}, BAD, UNTRUSTED),
    "sample-train-main": ("sample_models.train:main", {}, BAD, UNTRUSTED),
    "sample-class": ("sample_models.resnet_cifar:CifarResNet", {"blocks_per_stage": 1}, BAD, UNTRUSTED),
    "torch-nn-conv2d": ("torch.nn:Conv2d", {"in_channels": 1, "out_channels": 1, "kernel_size": 1}, BAD, UNTRUSTED),
    "torch-nn-sequential": ("torch.nn:Sequential", {}, BAD, UNTRUSTED),
    "torch-load": ("torch:load", {"f": "payload.pt", "weights_only": False}, BAD, UNTRUSTED),
    "torch-hub-load": ("torch.hub:load", {"repo_or_dir": "x/y", "model": "m"}, BAD, UNTRUSTED),
    "os-system": ("os:system", {"command": "touch MARKER"}, BAD, UNTRUSTED),
    "posix-system": ("posix:system", {"command": "touch MARKER"}, BAD, UNTRUSTED),
    "builtins-eval": ("builtins:eval", {"source": "open('MARKER', 'w')"}, BAD, UNTRUSTED),
    "builtins-exec": ("builtins:exec", {"source": "open('MARKER', 'w')"}, BAD, UNTRUSTED),
    "subprocess-run": ("subprocess:run", {"args": ["touch", "MARKER"]}, BAD, UNTRUSTED),
    "subprocess-popen": ("subprocess:Popen", {"args": ["touch", "MARKER"]}, BAD, UNTRUSTED),
    "importlib-import-module": ("importlib:import_module", {"name": "antigravity"}, BAD, UNTRUSTED),
    "pathlib-touch": ("pathlib:Path.touch", {"self": "MARKER"}, BAD, UNTRUSTED),
    "unknown-package": ("no_such_package.models:net", {}, BAD, UNTRUSTED),
    "malformed-empty": ("", {}, BAD, ""),
    "malformed-spaces": ("os system", {}, BAD, ""),
    "malformed-colons": ("a::b", {}, BAD, ""),
    "malformed-dotted-os-system": ("os.system", {"command": "touch MARKER"}, BAD, UNTRUSTED),
}
FILE_ARCH_KWARGS = {
    "weights": {"in_channels": 1, "weights": "IMAGENET1K_V1"},
    "weights-backbone": {"in_channels": 1, "weights_backbone": "x"},
    "pretrained": {"in_channels": 1, "pretrained": True},
    "pretrained-cfg": {"in_channels": 1, "pretrained_cfg": {"file": "payload.pt"}},
    "pretrained-cfg-overlay": {"in_channels": 1, "pretrained_cfg_overlay": {"url": "http://example.invalid/x"}},
    "checkpoint-path": {"in_channels": 1, "checkpoint_path": "payload.pt"},
    "cache-dir": {"in_channels": 1, "cache_dir": "/tmp"},
    "path-value": {"in_channels": 1, "num_classes": "/etc/passwd"},
    "url-value": {"in_channels": 1, "num_classes": "https://example.invalid/weights.pt"},
    "nested-path-value": {"in_channels": 1, "num_classes": [{"x": "./payload.pt"}]},
}
FILE_ARCH_BAD_KWARGS = {
    "huge-num-classes": {"in_channels": 1, "num_classes": 10**12},
    "huge-in-channels": {"in_channels": 10**9},
    "negative-num-classes": {"in_channels": 1, "num_classes": -1},
    "float-num-classes": {"in_channels": 1, "num_classes": 1.5},
    "none-in-channels": {"in_channels": None},
    "unknown-kwarg": {"in_channels": 1, "depth": 3},
    "int-key": {1: 2},
}


def base_cases() -> list[Case]:
    cases = []
    for name, (arch, kwargs, codes, says) in FILE_ARCHES.items():
        cases.append(Case(f"arch-{name}", base(arch, kwargs), codes, says))
    cases += [
        Case(f"arch-kwargs-{name}", base(ARCH, kwargs), BAD, UNTRUSTED) for name, kwargs in FILE_ARCH_KWARGS.items()
    ]
    cases += [Case(f"arch-kwargs-{name}", base(ARCH, kwargs)) for name, kwargs in FILE_ARCH_BAD_KWARGS.items()]

    def timm_payload(g: Good, w: Where) -> bytes:
        (w.folder / "payload.pt").write_bytes(saved_bytes(Touch(w.marker)))
        return base("timm.models:load_state_dict", {"checkpoint_path": "payload.pt", "weights_only": False})(g, w)

    def pickled(obj: Callable[[Where], object]) -> Maker:
        return lambda g, w: base(None, {}, pickled=saved_bytes(obj(w)))(g, w)

    cases += [
        Case("arch-timm-load-state-dict-payload", timm_payload, BAD, UNTRUSTED),
        Case("pickled-base-os-system", pickled(lambda w: Touch(w.marker)), BAD, UNTRUSTED),
        Case("pickled-base-exec", pickled(lambda w: Exec(w.marker)), BAD, UNTRUSTED),
        Case("pickled-base-in-a-dict", pickled(lambda w: {"model": Touch(w.marker)}), BAD, UNTRUSTED),
        Case("pickled-base-not-a-module", pickled(lambda w: torch.zeros(3))),
        Case("pickled-base-other-model", pickled(lambda w: resnet8(in_channels=3))),
        Case("pickled-base-random-bytes", base(None, {}, pickled=random.Random(0).randbytes(500))),
        Case("pickled-base-truncated", lambda g, w: base(None, {}, pickled=saved_bytes(resnet8())[:3000])(g, w)),
        Case("base-arch-and-pickled", base(ARCH, {"in_channels": 1}, pickled=b"x")),
        Case("base-neither", base(None, {})),
        Case("base-arch-int", base(7, {})),
        Case("base-arch-bytes", base(ARCH.encode(), {})),
        Case("base-kwargs-list", base(ARCH, [1])),
        Case("base-kwargs-tensor", base(ARCH, torch.zeros(1))),
        Case("base-pickled-str", base(None, {}, pickled="bytes")),
        Case("base-source-int", edit(setting("base", "source", value=3))),
        Case("base-kwargs-tensor-value", base(ARCH, {"in_channels": torch.tensor(1)})),
    ]
    return cases


# --------------------------------------------------------------------------- the plan
def converted(payload: dict) -> dict:
    return next(layer for layer in payload["plan"]["layers"] if layer["decision"] == "converted")


def plan_layer(key: str, value: object) -> Callable[[dict, Where], None]:
    return lambda payload, w: converted(payload).__setitem__(key, value)


def plan_option(key: str, value: object) -> Callable[[dict, Where], None]:
    return lambda payload, w: converted(payload)["options"].__setitem__(key, value)


PLAN_FIELDS = {
    "layers": ("str", "x"),
    "traced_with": ("int", 3),
    "trace_note": ("list", [1]),
    "input_shape": ("str", "1,1,16,16"),
    "init": ("none", None),
    "target_ratio": ("str", "2"),
    "model_dense_bits": ("str", "8"),
    "model_stored_bits": ("float", 1.5),
    "choice_note": ("dict", {}),
}
LAYER_FIELDS = {
    "name": ("int", 3),
    "decision": ("none", None),
    "in_channels": ("str", "16"),
    "out_channels": ("float", 16.0),
    "kernel_size": ("int", 3),
    "groups": ("zero", 0),
    "call_sites": ("str", "1"),
    "input_shape": ("str", "x"),
    "output_shape": ("dict", {}),
    "users": ("str", "relu"),
    "macs": ("none", None),
    "dense_bits": ("list", []),
    "stored_bits": ("str", "1"),
    "options": ("list", []),
    "fit_error": ("str", "0.1"),
    "mask_density": ("list", [1]),
}


def three_channels(payload: dict, w: Where) -> None:
    """Every recorded shape says 3 input channels (consistently), but the model takes 1."""
    payload["plan"]["input_shape"] = payload["metadata"]["input_shape"] = [1, 3, 16, 16]
    payload["metadata"]["preprocessing"] = {"mean": [0.3] * 3, "std": [0.4] * 3, "input_size": [16, 16]}


def plan_cases() -> list[Case]:
    cases = [
        Case(f"plan-{key}-is-{kind}", edit(setting("plan", key, value=v))) for key, (kind, v) in PLAN_FIELDS.items()
    ]
    cases += [Case(f"plan-missing-{key}", edit(removing("plan", key))) for key in PLAN_FIELDS]
    cases += [Case(f"plan-layer-{k}-is-{kind}", edit(plan_layer(k, v))) for k, (kind, v) in LAYER_FIELDS.items()]
    cases += [
        Case(f"plan-layer-missing-{key}", edit(lambda p, w, key=key: converted(p).pop(key)))
        for key in ("name", "decision", "in_channels", "kernel_size", "options")
    ]
    cases += [
        Case("plan-unknown-field", edit(setting("plan", "surprise", value=1))),
        Case("plan-layer-unknown-field", edit(plan_layer("surprise", 1))),
        Case("plan-layers-hold-an-int", edit(setting("plan", "layers", value=[1]))),
        Case("plan-layers-empty", edit(setting("plan", "layers", value=[]))),
        Case("plan-layer-names-missing-module", edit(plan_layer("name", "layer9.0.conv1"))),
        Case("plan-layer-names-batchnorm", edit(plan_layer("name", "bn1"))),
        Case("plan-layer-names-linear", edit(plan_layer("name", "fc"))),
        Case("plan-layer-names-root", edit(plan_layer("name", ""))),
        Case("plan-layer-names-dunder", edit(plan_layer("name", "__class__"))),
        Case("plan-layer-names-a-path", edit(plan_layer("name", "../../etc/passwd"))),
        Case("plan-layer-converted-twice", edit(lambda p, w: p["plan"]["layers"].append(copy.deepcopy(converted(p))))),
        Case("plan-layer-options-none", edit(plan_layer("options", None))),
        Case("plan-option-unknown", edit(plan_option("surprise", 1))),
        Case("plan-option-device", edit(plan_option("device", "meta"))),
        Case("plan-option-mode-bogus", edit(plan_option("mode", "bogus"))),
        Case("plan-option-mode-spatial", edit(plan_option("mode", "spatial"))),
        Case("plan-option-secondary-zero", edit(plan_option("secondary", 0))),
        Case("plan-option-secondary-negative", edit(plan_option("secondary", -1))),
        Case("plan-option-secondary-huge", edit(plan_option("secondary", 10**12))),
        Case("plan-option-secondary-str", edit(plan_option("secondary", "2"))),
        Case("plan-option-secondary-float", edit(plan_option("secondary", 2.5))),
        Case("plan-option-secondary-bool", edit(plan_option("secondary", True))),
        Case("plan-option-secondary-4", edit(plan_option("secondary", 4))),
        Case(
            "plan-option-channel-window-huge",
            edit(lambda p, w: converted(p)["options"].update(mode="channel", channel_window=10**9)),
        ),
        Case(
            "plan-option-channel-stride-huge",
            edit(lambda p, w: converted(p)["options"].update(mode="channel", channel_stride=10**9)),
        ),
        Case("plan-option-scale-str", edit(plan_option("scale", "yes"))),
        Case("plan-option-mask-sharing-bogus", edit(plan_option("mask_sharing", "all"))),
        Case("plan-input-shape-huge", edit(setting("plan", "input_shape", value=[1, 3, 100000, 100000]))),
        Case("plan-input-shape-three-numbers", edit(setting("plan", "input_shape", value=[1, 16, 16]))),
        Case("plan-input-shape-negative", edit(setting("plan", "input_shape", value=[1, 1, -16, 16]))),
        Case("plan-input-shape-strings", edit(setting("plan", "input_shape", value=["1", "1", "16", "16"]))),
        Case("plan-dense-bits-huge", edit(setting("plan", "model_dense_bits", value=10**40))),
        Case("plan-and-metadata-agree-on-3-channels", edit(three_channels)),
        Case("plan-fit-error-nan", edit(plan_layer("fit_error", math.nan)), OK, commands=("inspect",)),
    ]
    return cases


# --------------------------------------------------------------------------- state_dict, teacher and metadata
PRIMARY, PROXY = "layer1.0.conv2.primary", "layer1.0.conv2.mask_proxy"
DTYPES = {
    "float64": torch.float64,
    "float16": torch.float16,
    "int32": torch.int32,
    "bool": torch.bool,
    "complex64": torch.complex64,
    "uint8": torch.uint8,
}


def _with_value(value: float, index: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    def change(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        tensor.view(-1)[index] = value
        return tensor

    return change


def _sparse(size: tuple[int, ...]) -> torch.Tensor:
    """An empty sparse tensor that declares a huge size."""
    return torch.sparse_coo_tensor(
        torch.zeros(len(size), 0, dtype=torch.long), torch.zeros(0), size, check_invariants=True
    )


def state_cases() -> list[Case]:
    cases = []
    for key in (PRIMARY, PROXY):
        short = key.rsplit(".", 1)[1]
        cases += [
            Case(f"state-{short}-as-{name}", edit(changing_tensor(key, lambda t, d=dtype: t.to(d))))
            for name, dtype in DTYPES.items()
        ]
        cases += [
            Case(f"state-{short}-wrong-shape", edit(changing_tensor(key, lambda t: t[:-1].clone()))),
            Case(f"state-{short}-flattened", edit(changing_tensor(key, lambda t: t.flatten().clone()))),
            Case(f"state-{short}-scalar", edit(changing_tensor(key, lambda t: torch.tensor(0.5)))),
            Case(f"state-{short}-missing", edit(removing("state_dict", key))),
            Case(f"state-{short}-is-an-int", edit(changing_tensor(key, lambda t: 1))),
            Case(f"state-{short}-is-a-list", edit(changing_tensor(key, lambda t: t.tolist()))),
            Case(f"state-{short}-huge-stride-0", edit(changing_tensor(key, lambda t: torch.zeros(1).expand(10**12)))),
            Case(f"state-{short}-sparse-huge", edit(changing_tensor(key, lambda t: _sparse((10**6, 10**6))))),
            Case(f"state-{short}-nan", edit(changing_tensor(key, _with_value(math.nan)))),
        ]
    cases += [
        Case("state-scale-inf", edit(changing_tensor("layer1.0.conv2.scale", _with_value(math.inf)))),
        Case("state-fc-weight-nan", edit(changing_tensor("fc.weight", _with_value(math.nan)))),
        Case("state-bn-running-var-neg-inf", edit(changing_tensor("bn1.running_var", _with_value(-math.inf)))),
        Case(
            "state-primary-index-out-of-range", edit(changing_tensor("layer1.0.conv2.primary_index", _with_value(999)))
        ),
        Case("state-primary-index-negative", edit(changing_tensor("layer1.0.conv2.primary_index", _with_value(-1)))),
        Case(
            "state-secondary-index-out-of-range",
            edit(changing_tensor("layer1.0.conv2.secondary_index", _with_value(7))),
        ),
        Case(
            "state-channel-offset-out-of-range",
            edit(changing_tensor("layer1.0.conv2.channel_offset", _with_value(10**6))),
        ),
        Case("state-index-as-float", edit(changing_tensor("layer1.0.conv2.primary_index", lambda t: t.float()))),
        Case("state-num-batches-tracked-float", edit(changing_tensor("bn1.num_batches_tracked", lambda t: t.float()))),
        Case("state-extra-key", edit(setting("state_dict", "head.weight", value=torch.zeros(2)))),
        Case("state-int-key", edit(setting("state_dict", 5, value=torch.zeros(2)))),
        Case(
            "state-dense-weight-instead",
            edit(lambda p, w: p["state_dict"].update({"layer1.0.conv2.weight": torch.zeros(16, 16, 3, 3)})),
        ),
        Case("state-empty", edit(setting("state_dict", value={}))),
        Case("state-is-teachers", edit(lambda p, w: p.update(state_dict=p["teacher_state_dict"]))),
        Case("teacher-is-students", edit(lambda p, w: p.update(teacher_state_dict=p["state_dict"]))),
        Case(
            "teacher-conv-nan",
            edit(changing_tensor("layer1.0.conv2.weight", _with_value(math.nan), "teacher_state_dict")),
        ),
        Case(
            "teacher-conv-float64",
            edit(changing_tensor("layer1.0.conv2.weight", lambda t: t.double(), "teacher_state_dict")),
        ),
        Case(
            "teacher-conv-wrong-shape",
            edit(changing_tensor("layer1.0.conv2.weight", lambda t: t[:, :-1].clone(), "teacher_state_dict")),
        ),
        Case("teacher-missing-key", edit(removing("teacher_state_dict", "fc.bias"))),
        Case(
            "teacher-huge-stride-0",
            edit(changing_tensor("fc.weight", lambda t: torch.zeros(1).expand(10**6, 10**6), "teacher_state_dict")),
        ),
    ]
    return cases


RECONSTRUCTION = {  # what compress --reconstruct records (vconvert.io.metadata.check_reconstruction)
    "data": "/data/images",
    "images": 8,
    "settings": {
        "rounds": 3,
        "mask_sweeps": 2,
        "positions": 256,
        "damping": 1e-4,
        "weight_bits": None,
        "normalise": True,
    },
    "layers": 2,
    "error_before": 0.1,
    "error_after": 0.05,
    "seconds": 1.0,
}
REFINEMENT = {  # the block refinement's part of it (vconvert.io.metadata.check_refinement)
    "steps": 300,
    "batch_size": 64,
    "lr": 1e-4,
    "mask_lr": 2e-3,
    "drop": 0.5,
    "seed": 0,
    "held_out": 0.125,
    "blocks": 9,
    "kept": 8,
    "error_before": 0.04,
    "error_after": 0.035,
    "seconds": 90.0,
}
REFINED = {**RECONSTRUCTION, "refinement": REFINEMENT}
META_VALUES = {
    "input-shape-huge": ("input_shape", [1, 1, 100000, 100000]),
    "input-shape-huge-batch": ("input_shape", [10**9, 1, 16, 16]),
    "input-shape-three-numbers": ("input_shape", [1, 16, 16]),
    "input-shape-strings": ("input_shape", ["1", "1", "16", "16"]),
    "input-shape-zero": ("input_shape", [1, 1, 0, 16]),
    "input-shape-floats": ("input_shape", [1.0, 1.0, 16.0, 16.0]),
    "input-shape-bools": ("input_shape", [True, True, True, True]),
    "input-shape-tensor": ("input_shape", torch.tensor(SHAPE)),
    "input-shape-dict": ("input_shape", {"h": 16}),
    "input-shape-wrong-channels": ("input_shape", [1, 3, 16, 16]),
    "preprocessing-list": ("preprocessing", [0.5, 0.5]),
    "preprocessing-str": ("preprocessing", "imagenet"),
    "preprocessing-mean-too-long": ("preprocessing", {**PREPROCESSING, "mean": [0.1, 0.2, 0.3]}),
    "preprocessing-mean-empty": ("preprocessing", {**PREPROCESSING, "mean": []}),
    "preprocessing-mean-str": ("preprocessing", {**PREPROCESSING, "mean": "0.3"}),
    "preprocessing-mean-strings": ("preprocessing", {**PREPROCESSING, "mean": ["0.3"]}),
    "preprocessing-mean-nan": ("preprocessing", {**PREPROCESSING, "mean": [math.nan]}),
    "preprocessing-std-zero": ("preprocessing", {**PREPROCESSING, "std": [0.0]}),
    "preprocessing-std-negative": ("preprocessing", {**PREPROCESSING, "std": [-1.0]}),
    "preprocessing-std-inf": ("preprocessing", {**PREPROCESSING, "std": [math.inf]}),
    "preprocessing-std-missing": ("preprocessing", {"mean": [0.3], "input_size": [16, 16]}),
    "preprocessing-input-size-huge": ("preprocessing", {**PREPROCESSING, "input_size": [100000, 100000]}),
    "preprocessing-input-size-one-number": ("preprocessing", {**PREPROCESSING, "input_size": [16]}),
    "preprocessing-input-size-str": ("preprocessing", {**PREPROCESSING, "input_size": "16x16"}),
    "preprocessing-tensor-mean": ("preprocessing", {**PREPROCESSING, "mean": torch.tensor([0.3])}),
    "data-list": ("data", [1]),
    "data-source-int": (
        "data",
        {"source": 5, "input_size": [16, 16], "channels": 1, "mean": [0.3], "std": [0.4], "classes": ["0"]},
    ),
    "data-classes-str": (
        "data",
        {"source": "digits", "input_size": [16, 16], "channels": 1, "mean": [0.3], "std": [0.4], "classes": "0123"},
    ),
    "bn-recalibration-list": ("bn_recalibration", [1]),
    "bn-recalibration-data-int": ("bn_recalibration", {"data": 3, "images": 4}),
    "bn-recalibration-images-str": ("bn_recalibration", {"data": "x", "images": "4"}),
    "bn-recalibration-seed-str": ("bn_recalibration", {"data": "x", "images": 4, "seed": "1"}),
    "weight-quantization-list": ("weight_quantization", [4]),
    "weight-quantization-bits-9": ("weight_quantization", {"bits": 9, "quantizer": "minmax"}),
    "weight-quantization-bits-str": ("weight_quantization", {"bits": "4", "quantizer": "minmax"}),
    "weight-quantization-unknown-quantizer": ("weight_quantization", {"bits": 4, "quantizer": "os.system"}),
    "weight-quantization-extra-key": ("weight_quantization", {"bits": 4, "quantizer": "minmax", "eval": "x"}),
    # a float file that claims learned steps: its weights lack them
    "weight-quantization-lsq-without-steps": ("weight_quantization", {"bits": 4, "quantizer": "lsq"}),
    "reconstruction-list": ("reconstruction", [1]),
    "reconstruction-images-zero": ("reconstruction", {**RECONSTRUCTION, "images": 0}),
    "reconstruction-error-nan": ("reconstruction", {**RECONSTRUCTION, "error_after": math.nan}),
    "reconstruction-settings-str": ("reconstruction", {**RECONSTRUCTION, "settings": "fast"}),
    "reconstruction-bits-9": (
        "reconstruction",
        {**RECONSTRUCTION, "settings": {**RECONSTRUCTION["settings"], "weight_bits": 9}},
    ),
    "reconstruction-extra-key": ("reconstruction", {**RECONSTRUCTION, "eval": "x"}),
    "reconstruction-seed-negative": ("reconstruction", {**RECONSTRUCTION, "seed": -1}),
    "refinement-list": ("reconstruction", {**RECONSTRUCTION, "refinement": [1]}),
    "refinement-kept-beyond-blocks": ("reconstruction", {**RECONSTRUCTION, "refinement": {**REFINEMENT, "kept": 10}}),
    "refinement-drop-2": ("reconstruction", {**RECONSTRUCTION, "refinement": {**REFINEMENT, "drop": 2.0}}),
    "refinement-held-out-1": ("reconstruction", {**RECONSTRUCTION, "refinement": {**REFINEMENT, "held_out": 1.0}}),
    "refinement-lr-zero": ("reconstruction", {**RECONSTRUCTION, "refinement": {**REFINEMENT, "lr": 0.0}}),
    "refinement-steps-str": ("reconstruction", {**RECONSTRUCTION, "refinement": {**REFINEMENT, "steps": "300"}}),
    "refinement-extra-key": ("reconstruction", {**RECONSTRUCTION, "refinement": {**REFINEMENT, "eval": "x"}}),
}


def metadata_cases() -> list[Case]:
    cases = [
        Case(f"metadata-{name}", edit(setting("metadata", key, value=v))) for name, (key, v) in META_VALUES.items()
    ]
    cases += [
        Case("metadata-int-key", edit(setting("metadata", 1, value=2))),
        Case(
            "metadata-unknown-key", edit(setting("metadata", "surprise", value={"a": [1]})), OK, commands=("inspect",)
        ),
        Case("metadata-no-input-shape", edit(removing("metadata", "input_shape")), OK, commands=("inspect",)),
        Case(
            "metadata-finetune-state-garbage",
            edit(setting("metadata", "finetune_state", value="garbage")),
            OK,
            commands=("inspect",),
        ),
        Case(
            "metadata-reconstruction-good",
            edit(setting("metadata", "reconstruction", value=RECONSTRUCTION)),
            OK,
            commands=("inspect",),
        ),
        Case(
            "metadata-refinement-good",
            edit(setting("metadata", "reconstruction", value=REFINED)),
            OK,
            commands=("inspect",),
        ),
        Case("versions-hold-an-int", edit(setting("versions", "torch", value=2))),
        Case("format-future", edit(setting("format", value="vconvert.checkpoint/2"))),
        Case("format-bytes", edit(setting("format", value=b"vconvert.checkpoint/1"))),
    ]
    return cases


CHECKPOINT_CASES = [
    Case("control-good-file", lambda g, w: g.data, OK),
    *bytes_cases(),
    *top_level_cases(),
    *base_cases(),
    *plan_cases(),
    *state_cases(),
    *metadata_cases(),
]


def _materialise(case: Case, good: Good, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Where]:
    monkeypatch.chdir(tmp_path)
    where = Where(tmp_path, tmp_path / "ran.marker")
    path = tmp_path / "damaged.vc.pt"
    path.write_bytes(case.make(good, where))
    return path, where


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=[case.id for case in CHECKPOINT_CASES])
def test_damaged_checkpoint(case: Case, good: Good, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, where = _materialise(case, good, tmp_path, monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    (out / "ft.vc.pt").write_bytes(b"previous fine-tuned checkpoint")
    (out / "model.onnx").write_bytes(b"previous onnx file")
    for command in case.commands:
        result = run_checked(_command(command, path, out), case.codes, [out, tmp_path], where.marker, case.says)
        if case.codes == ANY and result.exit_code == 0:
            break  # the damage left a valid checkpoint: the control runs those through every command


# --------------------------------------------------------------------------- resume state
def state_of(payload: dict) -> dict:
    return payload["metadata"]["finetune_state"]


def resume_edit(change: Callable[[dict], None]) -> Maker:
    return edit(lambda payload, w: change(state_of(payload)), resumable=True)


def _set(key: str, value: object) -> Callable[[dict], None]:
    return lambda state: state.__setitem__(key, value)


def _momentum(state: dict) -> torch.Tensor:
    return next(entry["momentum_buffer"] for entry in state["optimiser"]["state"].values())


RESUME_KEYS = (
    "config",
    "optimiser",
    "scheduler",
    "masks",
    "mask_proxies",
    "rng",
    "epoch",
    "history",
    "best_top1",
    "base_metadata",
)


def resume_cases() -> list[Case]:
    cases = [Case("resume-control", lambda g, w: g.resumable.read_bytes(), OK)]
    cases += [Case(f"resume-missing-{key}", resume_edit(lambda s, key=key: s.pop(key))) for key in RESUME_KEYS]
    cases += [Case(f"resume-{key}-is-str", resume_edit(_set(key, "garbage"))) for key in RESUME_KEYS]
    cases += [
        Case("resume-state-is-str", edit(setting("metadata", "finetune_state", value="garbage"), resumable=True)),
        Case("resume-state-is-none", edit(setting("metadata", "finetune_state", value=None), resumable=True)),
        Case("resume-epoch-negative", resume_edit(_set("epoch", -1))),
        Case("resume-epoch-huge", resume_edit(_set("epoch", 10**9))),
        Case("resume-epoch-float", resume_edit(_set("epoch", 1.5))),
        Case("resume-best-top1-nan", resume_edit(_set("best_top1", math.nan))),
        Case(
            "resume-rng-garbage-tensor", resume_edit(lambda s: s["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)))
        ),
        Case("resume-rng-float-tensor", resume_edit(lambda s: s["rng"].update(torch=s["rng"]["torch"].float()))),
        Case(
            "resume-momentum-wrong-shape",
            resume_edit(lambda s: next(iter(s["optimiser"]["state"].values())).update(momentum_buffer=torch.zeros(2))),
        ),
        Case("resume-momentum-nan", resume_edit(lambda s: _momentum(s).view(-1).__setitem__(0, math.nan))),
        Case("resume-optimiser-groups-dropped", resume_edit(lambda s: s["optimiser"]["param_groups"].pop())),
        Case("resume-optimiser-lr-str", resume_edit(lambda s: s["optimiser"]["param_groups"][0].update(lr="x"))),
        Case("resume-scheduler-garbage", resume_edit(_set("scheduler", {"last_epoch": "x", "_step_count": None}))),
        Case("resume-masks-step-str", resume_edit(lambda s: s["masks"].update(step="x"))),
        Case(
            "resume-masks-evidence-unknown-layer",
            resume_edit(lambda s: s["masks"].update(evidence={"nope": torch.zeros(1)})),
        ),
        Case("resume-mask-proxies-unknown-layer", resume_edit(_set("mask_proxies", {"nope": torch.zeros(1)}))),
        Case(
            "resume-mask-proxies-wrong-shape",
            resume_edit(lambda s: s["mask_proxies"].update({next(iter(s["mask_proxies"])): torch.zeros(1)})),
        ),
        Case("resume-mask-proxies-non-linear-layer", resume_edit(_set("mask_proxies", {"fc": torch.zeros(1)}))),
        Case("resume-history-garbage", resume_edit(_set("history", [{"epoch": "x"}]))),
        Case("resume-history-ints", resume_edit(_set("history", [1, 2]))),
        Case(
            "resume-base-metadata-input-shape-huge",
            resume_edit(lambda s: s["base_metadata"].update(input_shape=[1, 1, 100000, 100000])),
        ),
        Case("resume-live-weights-garbage", resume_edit(_set("live_weights", {"x": 1}))),
        Case("resume-ema-garbage", resume_edit(_set("ema", [1]))),
        # a typed option (--batch-size 4) that differs from the recorded one; untyped ones are taken from the file
        Case("resume-config-differs", resume_edit(lambda s: s["config"].update(batch_size=8)), BAD, "other options"),
    ]
    return cases


RESUME_CASES = resume_cases()


@pytest.mark.parametrize("case", RESUME_CASES, ids=[case.id for case in RESUME_CASES])
def test_damaged_resume_state(case: Case, good: Good, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, where = _materialise(case, good, tmp_path, monkeypatch)
    run_checked(_command("resume", path, tmp_path), case.codes, [tmp_path], where.marker, case.says)


# --------------------------------------------------------------------------- damaged ONNX files
def _with_props(model: onnx.ModelProto, props: dict[str, str]) -> bytes:
    model = copy.deepcopy(model)
    existing = {prop.key: prop for prop in model.metadata_props}
    for key, value in props.items():
        (existing.get(key) or model.metadata_props.add(key=key)).value = value
    return model.SerializeToString()


def _graph(inputs: list, nodes: list, initializers: list = (), output_shape=("N", 10)) -> bytes:
    output = helper.make_tensor_value_info("output", TensorProto.FLOAT, list(output_shape))
    graph = helper.make_graph(nodes, "fuzz", inputs, [output], list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return model.SerializeToString()


def flat_input_model() -> bytes:
    weight = helper.make_tensor("w", TensorProto.FLOAT, [256, 10], np.zeros(2560, dtype=np.float32))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 256])
    return _graph([x], [helper.make_node("MatMul", ["x", "w"], ["output"])], [weight])


def pooled_model(dtype: int = TensorProto.FLOAT, shape=("N", 1, 16, 16), fill: float = 0.0, inputs: int = 1) -> bytes:
    """Global average pool → flatten → MatMul to 10 classes, over an input of ``shape``."""
    channels = shape[1] if isinstance(shape[1], int) else 1
    weight = helper.make_tensor("w", TensorProto.FLOAT, [channels, 10], np.full(channels * 10, fill, dtype=np.float32))
    names = [f"x{i}" for i in range(inputs)]
    declared = [helper.make_tensor_value_info(name, dtype, list(shape)) for name in names]
    source = names[0]
    nodes = []
    if dtype != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [source], ["xf"], to=TensorProto.FLOAT))
        source = "xf"
    if inputs > 1:
        nodes.append(helper.make_node("Add", [source, names[1]], ["xs"]))
        source = "xs"
    nodes += [
        helper.make_node("GlobalAveragePool", [source], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["output"]),
    ]
    return _graph(declared, nodes, [weight])


@dataclass(frozen=True)
class OnnxCase:
    id: str
    make: Callable[[bytes], bytes]
    codes: frozenset[int] = BAD
    data: str = "digits"


def props(**values: object) -> Callable[[bytes], bytes]:
    """The good ONNX file with metadata_props set (JSON for anything not a str)."""

    def change(data: bytes) -> bytes:
        text = {f"vconvert.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}
        return _with_props(onnx.load_from_string(data), text)

    return change


ONNX_CASES = [
    OnnxCase("control-good-onnx", lambda d: d, OK),
    *(OnnxCase(f"onnx-truncated-{f:g}", lambda d, f=f: d[: int(len(d) * f)]) for f in (0.001, 0.1, 0.5, 0.9, 0.999)),
    *(OnnxCase(f"onnx-random-bytes-{n}", lambda d, n=n: random.Random(n).randbytes(n)) for n in (1, 64, 100_000)),
    OnnxCase("onnx-empty", lambda d: b""),
    OnnxCase("onnx-a-checkpoint", lambda d: saved_bytes({"format": "vconvert.checkpoint/1"})),
    OnnxCase("onnx-flat-input", lambda d: flat_input_model()),
    OnnxCase("onnx-int64-input", lambda d: pooled_model(TensorProto.INT64)),
    OnnxCase("onnx-string-input", lambda d: pooled_model(TensorProto.STRING)),
    OnnxCase("onnx-two-inputs", lambda d: pooled_model(inputs=2)),
    OnnxCase("onnx-huge-fixed-input", lambda d: pooled_model(shape=(1, 1, 100000, 100000))),
    OnnxCase("onnx-rank-5-input", lambda d: pooled_model(shape=("N", 1, 4, 16, 16))),
    OnnxCase("onnx-three-channels-on-digits", lambda d: pooled_model(shape=("N", 3, 16, 16)), OK),
    OnnxCase("onnx-dynamic-sizes", lambda d: pooled_model(shape=("N", "C", "H", "W")), OK),
    OnnxCase("onnx-fixed-batch-1", lambda d: pooled_model(shape=(1, 1, 16, 16)), OK),
    OnnxCase("onnx-fixed-batch-3", lambda d: pooled_model(shape=(3, 1, 16, 16)), OK),
    OnnxCase(
        "onnx-rank-1-output",
        lambda d: _graph(
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
            [helper.make_node("ReduceMean", ["x"], ["output"], keepdims=0)],
            output_shape=(),
        ),
    ),
    OnnxCase("onnx-nan-weights", lambda d: pooled_model(fill=math.nan), frozenset({1})),
    OnnxCase("onnx-preprocessing-not-json", props(preprocessing="{mean: 0.3")),
    OnnxCase("onnx-preprocessing-list", props(preprocessing=[0.3, 0.4])),
    OnnxCase("onnx-preprocessing-number", props(preprocessing=3)),
    OnnxCase("onnx-preprocessing-null", props(preprocessing=None), OK),
    OnnxCase("onnx-preprocessing-mean-too-long", props(preprocessing={**PREPROCESSING, "mean": [0.1, 0.2, 0.3]})),
    OnnxCase("onnx-preprocessing-mean-strings", props(preprocessing={**PREPROCESSING, "mean": ["a"]})),
    OnnxCase("onnx-preprocessing-std-zero", props(preprocessing={**PREPROCESSING, "std": [0]})),
    OnnxCase(
        "onnx-preprocessing-mean-nan",
        lambda d: _with_props(
            onnx.load_from_string(d),
            {"vconvert.preprocessing": '{"mean": [NaN], "std": [0.4], "input_size": [16, 16]}'},
        ),
    ),
    OnnxCase(
        "onnx-preprocessing-input-size-huge", props(preprocessing={**PREPROCESSING, "input_size": [10**5, 10**5]})
    ),
    OnnxCase("onnx-preprocessing-input-size-str", props(preprocessing={**PREPROCESSING, "input_size": "16"})),
    OnnxCase("onnx-preprocessing-deeply-nested", props(preprocessing="[" * 100_000 + "]" * 100_000)),
    OnnxCase("onnx-input-shape-not-json", props(input_shape="[None, 1, 16")),
    OnnxCase("onnx-input-shape-three-numbers", props(input_shape=[1, 16, 16])),
    OnnxCase("onnx-input-shape-huge", props(input_shape=[None, 1, 100000, 100000])),
    OnnxCase("onnx-input-shape-strings", props(input_shape=["N", "1", "16", "16"])),
    OnnxCase("onnx-input-shape-disagrees", props(input_shape=[None, 3, 32, 32])),
]


@pytest.mark.parametrize("case", ONNX_CASES, ids=[case.id for case in ONNX_CASES])
def test_damaged_onnx(case: OnnxCase, good: Good, tmp_path: Path) -> None:
    path = tmp_path / "damaged.onnx"
    path.write_bytes(case.make(good.onnx))
    run_checked(["evaluate", path, "--data", case.data, "--limit", "4"], case.codes, [tmp_path], tmp_path / "m")


# --------------------------------------------------------------------------- damaged image folders
def _png(path: Path, mode: str = "RGB", size: tuple[int, int] = (20, 20), value: int = 90) -> None:
    if mode == "I;16":
        Image.fromarray(np.full(size[::-1], value * 256, dtype=np.uint16)).save(path)
    else:
        Image.new(mode, size, value if mode in ("L", "I") else (value,) * len(mode)).save(path)


def _folder(root: Path, add: Callable[[Path], None] | None = None) -> Path:
    """train/ and val/ with 2 classes of 3 RGB images each; ``add(train/class0)`` adds the damage."""
    for split in ("train", "val"):
        for label in range(2):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for index in range(3):
                _png(folder / f"{index}.png", value=40 + 100 * label + index)
    if add is not None:
        add(root / "train" / "class0")
    return root


def _truncated_png(path: Path) -> None:
    _png(path, size=(64, 64))
    path.write_bytes(path.read_bytes()[:80])


def _unreadable(path: Path) -> None:
    _png(path)
    path.chmod(0)


@dataclass(frozen=True)
class FolderCase:
    id: str
    add: Callable[[Path], None] | None
    codes: frozenset[int] = OK
    warns: bool = False  # a skipped-file warning naming the file
    layout: Callable[[Path], None] | None = None  # builds the whole folder instead


FOLDER_CASES = [
    FolderCase("control-good-folder", None),
    FolderCase("corrupt-file", lambda f: (f / "corrupt.png").write_bytes(random.Random(0).randbytes(300)), warns=True),
    FolderCase("truncated-png", lambda f: _truncated_png(f / "truncated.png"), warns=True),
    FolderCase("zero-byte-file", lambda f: (f / "empty.jpg").write_bytes(b""), warns=True),
    FolderCase("unreadable-file", lambda f: _unreadable(f / "locked.png"), warns=os.geteuid() != 0),
    FolderCase("one-pixel-image", lambda f: _png(f / "tiny.png", size=(1, 1))),
    FolderCase("cmyk-jpeg", lambda f: Image.new("CMYK", (20, 20), (10, 200, 30, 5)).save(f / "cmyk.jpg")),
    FolderCase("sixteen-bit-png", lambda f: _png(f / "deep.png", mode="I;16")),
    FolderCase("grayscale-image", lambda f: _png(f / "gray.png", mode="L")),
    FolderCase("rgba-image", lambda f: _png(f / "alpha.png", mode="RGBA")),
    FolderCase("palette-image", lambda f: Image.new("P", (20, 20), 3).save(f / "palette.png")),
    FolderCase("wide-image", lambda f: _png(f / "wide.png", size=(300, 2))),
    FolderCase("text-file-named-png", lambda f: (f / "notes.png").write_text("hello"), warns=True),
    FolderCase("empty-class-folder", lambda f: (f.parent / "class2").mkdir(), BAD),
    FolderCase("no-class-folders", None, BAD, layout=lambda r: [(r / s).mkdir(parents=True) for s in ("train", "val")]),
    FolderCase(
        "only-loose-images",
        None,
        BAD,
        layout=lambda r: [((r / s).mkdir(parents=True), _png(r / s / "a.png")) for s in ("train", "val")],
    ),
    FolderCase(
        "every-image-corrupt",
        None,
        BAD,
        layout=lambda r: [
            ((r / s / "c").mkdir(parents=True), (r / s / "c" / "a.png").write_bytes(b"x")) for s in ("train", "val")
        ],
    ),
]


@pytest.fixture(scope="session")
def rgb(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 3-channel, 2-class ResNet-8 at 16x16: its state_dict and its .vc.pt."""
    folder = tmp_path_factory.mktemp("fuzz-rgb")
    torch.manual_seed(0)
    teacher = resnet8(num_classes=2).eval()
    weights = folder / "rgb.pt"
    torch.save(teacher.state_dict(), weights)
    model, plan = compress(teacher, torch.randn(1, 3, 16, 16), init="naive")
    checkpoint = folder / "rgb.vc.pt"
    save(
        checkpoint,
        model,
        plan,
        BaseSpec(ARCH, {"num_classes": 2}, None, str(weights)),
        teacher,
        CheckpointMetadata(input_shape=[1, 3, 16, 16]),
    )
    return weights, checkpoint


@pytest.mark.parametrize("command", ["finetune", "compress"])
@pytest.mark.parametrize("case", FOLDER_CASES, ids=[case.id for case in FOLDER_CASES])
def test_damaged_image_folder(case: FolderCase, command: str, rgb: tuple[Path, Path], tmp_path: Path) -> None:
    """finetune --data and compress --calib-data on the folder."""
    data = tmp_path / "images"
    case.layout(data) if case.layout else _folder(data, case.add)
    out = tmp_path / "out"
    out.mkdir()
    if command == "finetune":
        args = [
            "finetune",
            rgb[1],
            "-o",
            out / "ft.vc.pt",
            "--data",
            data,
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--workers",
            "0",
            "--recalibrate-images",
            "4",
            "--masks",
            "frozen",
        ]
    else:
        args = [
            "compress",
            rgb[0],
            "--arch",
            ARCH,
            "--arch-kwargs",
            '{"num_classes": 2}',
            "--input-shape",
            "1,3,16,16",
            "--init",
            "naive",
            "--calib-data",
            data,
            "-o",
            out / "c.vc.pt",
        ]
    result = run_checked(args, case.codes, [out], tmp_path / "m")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    if result.exit_code == 0 and case.warns:
        assert len(warnings) == 1 and str(data / "train" / "class0") in warnings[0], result.stderr
    else:
        assert not warnings, result.stderr


@pytest.mark.parametrize("channels", [1, 3])
def test_convertible_images_arrive_as_the_models_channels_and_size(channels: int, tmp_path: Path) -> None:
    folder = tmp_path / "images" / "val" / "odd"
    folder.mkdir(parents=True)
    _png(folder / "a-deep.png", mode="I;16", value=117)  # 16-bit grey 117·256: 117 once scaled to 8 bits
    _png(folder / "b-tiny.png", size=(1, 1), value=117)
    Image.new("CMYK", (20, 20), (0, 0, 0, 0)).save(folder / "c-cmyk.jpg")  # no ink: white
    _png(folder / "d-gray.png", mode="L", value=117)
    _png(folder / "e-palette.png", mode="RGBA", value=117)
    dataset, spec, skipped = open_split(
        str(tmp_path / "images"),
        False,
        input_size=[16, 12],
        channels=channels,
        mean=[0.0] * channels,
        std=[1.0] * channels,
        augment=False,
    )
    assert skipped == 0 and spec.channels == channels
    images = [dataset[index][0] for index in range(len(dataset))]
    assert all(image.shape == (channels, 16, 12) for image in images)
    for name, image in zip(("deep", "tiny", "cmyk", "gray", "rgba"), images, strict=True):
        expected = 1.0 if name == "cmyk" else 117 / 255
        assert image.mean().item() == pytest.approx(expected, abs=0.01), name


def test_grayscale_folder_feeds_a_one_channel_model(good: Good, tmp_path: Path) -> None:
    """compress --calib-data on a 1-channel model: RGB images are converted to its one channel."""
    weights = tmp_path / "gray.pt"
    torch.save(resnet8(in_channels=1).state_dict(), weights)
    args = [
        "compress",
        weights,
        "--arch",
        ARCH,
        "--arch-kwargs",
        '{"in_channels": 1}',
        "--input-shape",
        "1,1,16,16",
        "--init",
        "naive",
        "--calib-data",
        _folder(tmp_path / "images"),
        "--mean",
        "0.5",
        "--std",
        "0.25",
        "-o",
        tmp_path / "c.vc.pt",
    ]
    run_checked(args, OK, [], tmp_path / "m")


def test_case_count() -> None:
    """The fuzz covers a few hundred inputs (the count the issue reports)."""
    commands = sum(len(case.commands) for case in CHECKPOINT_CASES) + len(RESUME_CASES) + len(ONNX_CASES)
    cases = len(CHECKPOINT_CASES) + len(RESUME_CASES) + len(ONNX_CASES) + 2 * len(FOLDER_CASES)
    assert cases >= 300 and commands >= 900, (cases, commands)
