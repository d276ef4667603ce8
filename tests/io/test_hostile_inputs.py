"""Hostile inputs of security issue 27, each as an attacker would hand them to a user, and generated variants.

Every case runs one vconvert command on files crafted for real (pickles that *call* objects of the allowlisted
packages, ``.vc.pt`` files naming builders that download by default, memory bombs, hostile image folders,
damaged values, escape sequences) and asserts the issue's contract:

- the exit code is 2 (a few cases may also succeed: then their outputs are checked) with exactly one line
  on stderr starting "error:" (the last one), under 1,000 characters, and no traceback;
- no output file is written and the files already there are unchanged (hashes of every regular file in the
  test's folder, which holds the inputs, the outputs, TORCH_HOME and HF_HOME, before and after);
- no socket is opened: ``tests/socket_guard`` wraps ``socket.connect``, ``create_connection``,
  ``getaddrinfo``, ... for the whole test run and records every non-loopback attempt (conftest's
  ``no_network`` fails a test that swallowed the error); subprocesses get it from its ``sitecustomize.py``;
- no code from the file runs: every payload would create the test's marker file, which must not exist;
- memory stays bounded: in-process, the soft RLIMIT_AS is set to the process's current address space plus
  :data:`HEADROOM` (1 GiB) for the duration of the command, so an allocation past it fails at once (and is
  reported as such) instead of taking the machine; in the subprocess cases, RLIMIT_AS is
  :data:`CHILD_ADDRESS_SPACE` (4.5 GiB: ``vconvert inspect`` of a good file needs 3.5 GiB of address space
  with the CUDA build of torch installed here, whose import alone maps ~3.4 GiB, while its peak RSS is
  ~1.1 GiB) and the child's own peak RSS (``os.wait4``) must stay within :data:`HEADROOM` of the peak of the
  same command on a good file;
- no hang: each in-process command runs under a SIGALRM deadline, each subprocess under a timeout.

Memory cases run with ``VCONVERT_MEMORY_BUDGET=1`` (GB). tests/io/test_fuzz_format.py (issue 16) covers
damaged fields one by one; this file adds the issue-27 classes and seeded random variants of them.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import io
import json
import math
import os
import pickle
import random
import resource
import signal
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import pytest
import socket_guard
import torch
from test_fuzz_format import (  # the helpers of the issue-16 fuzz suite
    PREPROCESSING,
    QUICK,
    Touch,
    _folder,
    _members,
    _png,
    _with_props,
    pooled_model,
    quick_commands,  # noqa: F401  (an autouse fixture: one thread, the click command built once)
    saved_bytes,
)
from typer.testing import CliRunner

from sample_models.resnet_cifar import resnet8
from vconvert import compress, save
from vconvert.cli.app import app
from vconvert.io.metadata import CheckpointMetadata
from vconvert.io.untrusted import BaseSpec

ARCH = "sample_models.resnet_cifar:resnet8"
SHAPE = [1, 1, 16, 16]
HEADROOM = 1 << 30
CHILD_ADDRESS_SPACE = int(4.5 * (1 << 30))
SECONDS = 60  # a command that takes longer hangs (the good files run in well under a second)
OK, BAD, EITHER, ANY = frozenset({0}), frozenset({2}), frozenset({0, 2}), frozenset({0, 1, 2})
VCONVERT = Path(sys.executable).with_name("vconvert")
MEMORY_ERRORS = ("can't allocate memory", "cannot allocate memory", "memoryerror", "bad_alloc", "out of memory")
FORGED = "FORGED"
ESCAPES = f"\x1b[2J\x1b]0;title\x07\nerror: {FORGED} line\r\x1b[1A"


# --------------------------------------------------------------------------- the harness
class Hung(BaseException):
    """The command ran past its deadline (BaseException: CliRunner does not swallow it)."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    def expire(signum, frame):
        raise Hung(f"the command was still running after {seconds:g} s (a hang)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _address_space() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmSize:"))
    return int(line.split()[1]) * 1024


@contextlib.contextmanager
def memory_ceiling(headroom: int = HEADROOM) -> Iterator[None]:
    """The soft RLIMIT_AS at the current address space + ``headroom`` while the block runs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _address_space() + headroom
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (links not followed): a regular file's hash, else its kind."""
    found = {}
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            path = os.path.join(root, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                with open(path, "rb") as file:
                    found[path] = hashlib.sha256(file.read()).hexdigest()
            elif stat.S_ISLNK(mode):
                found[path] = "link:" + os.readlink(path)
            else:
                found[path] = "dir" if stat.S_ISDIR(mode) else f"mode:{stat.S_IFMT(mode)}"
    return found


@dataclass
class Ctx:
    """What a case may use: its folder (also the working directory), where outputs go, the marker any
    payload would create, and the good files."""

    folder: Path
    good: Good
    out: Path = field(init=False)
    marker: Path = field(init=False)
    torch_home: Path = field(init=False)

    def __post_init__(self) -> None:
        self.out = self.folder / "out"
        self.marker = self.folder / "ran.marker"
        self.torch_home = self.folder / "torch-home"
        self.out.mkdir()
        self.torch_home.mkdir()
        for name in ("c.vc.pt", "model.onnx", "ft.vc.pt"):
            (self.out / name).write_bytes(b"previous " + name.encode())

    def write(self, name: str, data: bytes) -> Path:
        path = self.folder / name
        path.write_bytes(data)
        return path


def _shown(args: list, result) -> str:
    head = " ".join(repr(str(a))[:80] for a in args[:3])
    return f"{head}: exit {result.exit_code}\n--- stdout\n{result.output[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"


def check_output(text: str, shown: str) -> None:
    """What a terminal would show: no raw escape sequence or other control character, no forged line."""
    controls = {ch for ch in text if (ord(ch) < 32 and ch not in "\n\t") or 0x7F <= ord(ch) < 0xA0}
    assert not controls, f"{shown}\nraw control characters reached the terminal: {sorted(map(repr, controls))}"
    forged = [line for line in text.splitlines() if line.lstrip().startswith(("error: FORGED", "FORGED"))]
    assert not forged, f"{shown}\na line was forged from a file's content: {forged}"


def run_case(
    args: list,
    ctx: Ctx,
    codes: frozenset[int] = BAD,
    says: str = "",
    seconds: float = SECONDS,
    outputs: tuple[Path, ...] = (),
) -> object:
    """Run the CLI in-process under the deadline and the memory ceiling and check the contract; on success
    only ``outputs`` (and their siblings of the same stem) may appear or change."""
    before = snapshot(ctx.folder)
    with warnings.catch_warnings(record=True) as caught:  # what Python would print to a user's stderr
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=category)
        with deadline(seconds), memory_ceiling():
            result = CliRunner().invoke(app, [str(arg) for arg in args])
    shown = _shown(args, result)
    print(shown)  # pytest shows it with a failure (and with -s)
    attempts = socket_guard.take_attempts()
    assert not attempts, f"{shown}\nthe command tried to reach the network:\n" + "\n".join(attempts)
    assert not ctx.marker.exists(), f"{shown}\ncode from the file ran (the marker exists)"
    text = (result.output + result.stderr + str(result.exception or "")).lower()
    assert not any(sign in text for sign in MEMORY_ERRORS), f"{shown}\nit allocated past the 1 GiB memory ceiling"
    crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
    assert not crashed, f"{shown}\ncrashed with {result.exception!r}"
    assert "Traceback" not in result.output + result.stderr, shown
    after = snapshot(ctx.folder)
    changed = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
    if result.exit_code == 0:
        stems = tuple(str(path).removesuffix(".vc.pt").removesuffix(".onnx") for path in outputs)
        changed = [path for path in changed if not path.startswith(stems or ("\0",))]
    assert not changed, f"{shown}\nfiles written or changed (besides a successful command's output): {changed}"
    assert result.exit_code in codes, shown
    check_output(result.output + result.stderr, shown)
    if result.exit_code:
        lines = result.stderr.strip().splitlines()
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == 1 and lines[-1] == errors[0], f"{shown}\nnot exactly one error line, the last"
        assert len(errors[0]) < 1000, f"{shown}\nthe error is {len(errors[0])} characters long"
        leaked = [f"{w.category.__name__}: {w.message}" for w in caught]
        assert not leaked, f"{shown}\nPython warnings besides the error: {leaked}"
        assert says in errors[0], f"{shown}\nthe error does not say {says!r}"
    return result


# --------------------------------------------------------------------------- the good files
@dataclass
class Good:
    folder: Path
    model: bytes  # torch.save(resnet8(in_channels=1)): a pickled model that loads under the allowlist
    weights: bytes  # its state_dict
    checkpoint: bytes  # a .vc.pt whose base is an arch string
    payload: dict
    pickled_checkpoint: bytes  # a .vc.pt whose base is the pickled model
    pickled_payload: dict
    rgb_weights: Path  # a 3-channel, 2-class resnet8 at 16x16 for the image folders
    rgb_checkpoint: Path


def _checkpoint(path: Path, teacher: torch.nn.Module, shape: list[int], spec: BaseSpec, **metadata) -> bytes:
    torch.manual_seed(0)
    model, plan = compress(teacher, torch.randn(*shape), init="naive")
    save(path, model, plan, spec, teacher, CheckpointMetadata(input_shape=shape, **metadata))
    return path.read_bytes()


@pytest.fixture(scope="session")
def good(tmp_path_factory: pytest.TempPathFactory) -> Good:
    folder = tmp_path_factory.mktemp("hostile-good")
    torch.manual_seed(0)
    teacher = resnet8(in_channels=1).eval()
    model = saved_bytes(teacher)
    checkpoint = _checkpoint(
        folder / "arch.vc.pt",
        teacher,
        SHAPE,
        BaseSpec(ARCH, {"in_channels": 1}, None, "m.pt"),
        preprocessing=PREPROCESSING,
    )
    pickled = _checkpoint(
        folder / "pickled.vc.pt", teacher, SHAPE, BaseSpec(None, {}, model, "m.pt"), preprocessing=PREPROCESSING
    )
    rgb = resnet8(num_classes=2).eval()
    rgb_weights = folder / "rgb.pt"
    torch.save(rgb.state_dict(), rgb_weights)
    _checkpoint(folder / "rgb.vc.pt", rgb, [1, 3, 16, 16], BaseSpec(ARCH, {"num_classes": 2}, None, str(rgb_weights)))
    return Good(
        folder,
        model,
        saved_bytes(teacher.state_dict()),
        checkpoint,
        torch.load(io.BytesIO(checkpoint), weights_only=True),
        pickled,
        torch.load(io.BytesIO(pickled), weights_only=True),
        rgb_weights,
        folder / "rgb.vc.pt",
    )


@pytest.fixture
def ctx(good: Good, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Ctx:
    monkeypatch.chdir(tmp_path)
    context = Ctx(tmp_path, good)
    monkeypatch.setenv("TORCH_HOME", str(context.torch_home))
    monkeypatch.setenv("HF_HOME", str(context.torch_home / "hf"))
    monkeypatch.delenv("VCONVERT_MEMORY_BUDGET", raising=False)
    return context


# --------------------------------------------------------------------------- crafting pickles
class Ref:
    """``module.name`` written into a pickle as a GLOBAL without importing it (the unpickler resolves it)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args, **kwargs):  # pickle wants the function of a reduce tuple to be callable
        raise AssertionError("never called while crafting")


class Call:
    """Unpickling this calls ``func(*args)`` (REDUCE), then ``__setstate__(state)`` when a state is given."""

    def __init__(self, func: object, args: tuple = (), state: object = None) -> None:
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)

    def __call__(self, *args, **kwargs):  # it may itself be the function of another reduce tuple
        raise AssertionError("never called while crafting")


def partial(target: Ref, **kwargs) -> Call:
    """``functools.partial(target, **kwargs)`` as its own pickle writes it (``functools.partial`` is allowed)."""
    return Call(Ref("functools", "partial"), (target,), (target, (), kwargs, None))


def call(module: str, name: str, *args, **kwargs) -> Call:
    target = Ref(module, name)
    return Call(partial(target, **kwargs) if kwargs else target, args)


class _HostilePickler(pickle._Pickler):
    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, Ref):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        super().save(obj, save_persistent_id)


class _HostilePickle:
    Pickler = _HostilePickler


def hostile_bytes(obj: object) -> bytes:
    """``torch.save(obj)`` bytes (the zip format) where each :class:`Ref` becomes a bare global."""
    buffer = io.BytesIO()
    torch.save(obj, buffer, pickle_module=_HostilePickle)
    return buffer.getvalue()


def _victim_folder(ctx: Ctx) -> Path:
    victim = ctx.folder / "victim"
    victim.mkdir(exist_ok=True)
    with tarfile.open(victim / "shard.tar", "w") as archive:
        data = b"x" * 10
        info = tarfile.TarInfo("a/0.png")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return victim


def _payload_file(ctx: Ctx) -> Path:
    """A pickle that runs ``touch MARKER`` when loaded unsafely."""
    return ctx.write("payload.pth", saved_bytes(Touch(ctx.marker)))


def _with_hidden_payload(ctx: Ctx) -> torch.nn.Module:
    model = resnet8(in_channels=1)
    model.__dict__["extra_state"] = call("os", "system", f"touch {ctx.marker}")
    return model


PICKLES: dict[str, Callable[[Ctx], object]] = {
    "timm-reader-image-in-tar": lambda c: call(
        "timm.data.readers.reader_image_in_tar", "ReaderImageInTar", str(_victim_folder(c)), "", True, True
    ),
    "timm-reader-wds-pipe": lambda c: call("timm.data.readers.reader_wds", "ReaderWds", f"pipe:touch {c.marker} #"),
    "timm-distillation-teacher": lambda c: call(
        "timm.task.distillation", "DistillationTeacher", "resnet18", 10, 3, f"file://{_payload_file(c)}"
    ),
    "torch-nn-linear-30000": lambda c: call("torch.nn.modules.linear", "Linear", 30000, 30000),
    "torch-nn-conv2d-constructor": lambda c: call("torch.nn.modules.conv", "Conv2d", 1, 8, 3),
    "torchvision-resnet18-weights": lambda c: call("torchvision.models.resnet", "resnet18", weights="IMAGENET1K_V1"),
    "torchvision-resnet-class-called": lambda c: call(
        "torchvision.models.resnet", "ResNet", Ref("torchvision.models.resnet", "BasicBlock"), [1, 1, 1, 1]
    ),
    "torchvision-weights-get-state-dict": lambda c: Call(
        call("builtins", "getattr", Ref("torchvision.models.resnet", "ResNet18_Weights"), "IMAGENET1K_V1"), ()
    ),
    "torchvision-datasets-mnist-download": lambda c: call(
        "torchvision.datasets.mnist", "MNIST", root=str(c.folder / "mnist"), download=True
    ),
    "torchvision-datasets-image-folder": lambda c: call(
        "torchvision.datasets.folder", "ImageFolder", str(_victim_folder(c))
    ),
    "torch-hub-load": lambda c: call("torch.hub", "load", "pytorch/vision", "resnet18"),
    "torch-hub-download-url": lambda c: call(
        "torch.hub", "download_url_to_file", "https://example.com/x.pth", str(c.marker)
    ),
    "torch-load-weights-only-false": lambda c: call(
        "torch.serialization", "load", str(_payload_file(c)), weights_only=False
    ),
    "timm-create-model-pretrained": lambda c: call("timm.models._factory", "create_model", "resnet18", pretrained=True),
    "builtins-eval": lambda c: call("builtins", "eval", f"open({str(c.marker)!r}, 'w').close()"),
    "builtins-exec": lambda c: call("builtins", "exec", f"open({str(c.marker)!r}, 'w').close()"),
    "os-system": lambda c: call("os", "system", f"touch {c.marker}"),
    "builtins-getattr-import-os-system": lambda c: Call(
        call("builtins", "getattr", call("builtins", "__import__", "os"), "system"), (f"touch {c.marker}",)
    ),
    "payload-inside-a-good-model": _with_hidden_payload,
}
MEMORY_PICKLES = {"torch-nn-linear-30000"}
MODEL_COMMANDS = ("inspect", "compress", "evaluate")
BASE_COMMANDS = ("inspect", "export", "evaluate")


def command(name: str, file: Path, ctx: Ctx) -> tuple[list, tuple[Path, ...]]:
    """A command line on ``file`` and the outputs it may write when it succeeds."""
    plain = not file.name.endswith(".vc.pt")
    shape = ["--input-shape", "1,1,16,16"] if plain else []
    return {
        "inspect": (["inspect", file, *shape], ()),
        "compress": (["compress", file, "-o", ctx.out / "c.vc.pt", *shape, "--init", "naive"], (ctx.out / "c.vc.pt",)),
        "evaluate": (["evaluate", file, "--data", "digits", "--limit", "4", *shape], ()),
        "export": (["export", file, "-o", ctx.out / "model.onnx", "--no-compare"], (ctx.out / "model.onnx",)),
        "finetune": (["finetune", file, "-o", ctx.out / "ft.vc.pt", *QUICK], (ctx.out / "ft.vc.pt",)),
    }[name]


def with_base(ctx: Ctx, pickled: bytes) -> bytes:
    payload = copy.deepcopy(ctx.good.pickled_payload)
    payload["base"]["pickled"] = pickled
    return saved_bytes(payload)


PICKLE_CASES = [
    *((f"model-{name}-{cmd}", name, cmd, False) for name in PICKLES for cmd in MODEL_COMMANDS),
    *((f"vc-base-{name}-{cmd}", name, cmd, True) for name in PICKLES for cmd in BASE_COMMANDS),
]


@pytest.mark.parametrize(("name", "cmd", "as_base"), [c[1:] for c in PICKLE_CASES], ids=[c[0] for c in PICKLE_CASES])
def test_pickle_calls_nothing(name: str, cmd: str, as_base: bool, ctx: Ctx, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pickle that would call an object (allowlisted package or not) is refused naming --trust."""
    if name in MEMORY_PICKLES:
        monkeypatch.setenv("VCONVERT_MEMORY_BUDGET", "1")
    data = hostile_bytes(PICKLES[name](ctx))
    file = ctx.write("base.vc.pt", with_base(ctx, data)) if as_base else ctx.write("model.pt", data)
    args, _ = command(cmd, file, ctx)
    run_case(args, ctx, BAD, "--trust")


@pytest.mark.parametrize("cmd", ["inspect", "compress", "evaluate"])
def test_control_good_pickled_model(cmd: str, ctx: Ctx) -> None:
    args, outputs = command(cmd, ctx.write("model.pt", ctx.good.model), ctx)
    run_case(args, ctx, OK, outputs=outputs)


@pytest.mark.parametrize("cmd", ["inspect", "export", "evaluate"])
def test_control_good_pickled_base(cmd: str, ctx: Ctx) -> None:
    args, outputs = command(cmd, ctx.write("base.vc.pt", ctx.good.pickled_checkpoint), ctx)
    run_case(args, ctx, OK, outputs=outputs)


# --------------------------------------------------------------------------- builders that download by default
def with_arch(ctx: Ctx, arch: str, kwargs: dict) -> bytes:
    payload = copy.deepcopy(ctx.good.payload)
    payload["base"].update(arch=arch, arch_kwargs=kwargs, pickled=None)
    return saved_bytes(payload)


def _plant_hub_file(ctx: Ctx) -> None:
    """A pickle that runs ``touch MARKER`` where torch's hub cache expects MobileNetV3's ImageNet weights."""
    checkpoints = ctx.torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "mobilenet_v3_large-8738ca79.pth").write_bytes(saved_bytes(Touch(ctx.marker)))


DOWNLOADING_BUILDERS = [
    ("lraspp-mobilenet-v3", "torchvision.models.segmentation:lraspp_mobilenet_v3_large", {}, BASE_COMMANDS),
    ("fasterrcnn-resnet50-fpn", "torchvision.models.detection:fasterrcnn_resnet50_fpn", {}, ("inspect",)),
    ("ssdlite320-mobilenet-v3", "torchvision.models.detection:ssdlite320_mobilenet_v3_large", {}, ("inspect",)),
    ("deeplabv3-mobilenet-v3", "torchvision.models.segmentation:deeplabv3_mobilenet_v3_large", {}, ("inspect",)),
    (
        "get-model-lraspp",
        "torchvision.models:get_model",
        {"name": "lraspp_mobilenet_v3_large"},
        ("inspect", "evaluate"),
    ),
    (
        "get-model-fasterrcnn-mobilenet",
        "torchvision.models:get_model",
        {"name": "fasterrcnn_mobilenet_v3_large_320_fpn"},
        ("inspect",),
    ),
    ("timm-create-model", "timm:create_model", {"model_name": "mobilenetv3_small_050"}, ("inspect",)),
]
BUILDER_CASES = [
    (f"{name}-{cmd}", arch, kwargs, cmd) for name, arch, kwargs, commands in DOWNLOADING_BUILDERS for cmd in commands
]


@pytest.mark.parametrize(("arch", "kwargs", "cmd"), [c[1:] for c in BUILDER_CASES], ids=[c[0] for c in BUILDER_CASES])
def test_builder_reaches_no_network(arch: str, kwargs: dict, cmd: str, ctx: Ctx) -> None:
    """Refused, or built with no download: no socket, nothing written under TORCH_HOME, one line if refused."""
    args, outputs = command(cmd, ctx.write("arch.vc.pt", with_arch(ctx, arch, kwargs)), ctx)
    run_case(args, ctx, EITHER, outputs=outputs)


@pytest.mark.parametrize("cmd", BASE_COMMANDS)
def test_builder_ignores_a_planted_hub_file(cmd: str, ctx: Ctx) -> None:
    """A pickle planted in the hub cache where the default backbone weights would go is never loaded."""
    _plant_hub_file(ctx)
    file = ctx.write("arch.vc.pt", with_arch(ctx, "torchvision.models.segmentation:lraspp_mobilenet_v3_large", {}))
    args, outputs = command(cmd, file, ctx)
    run_case(args, ctx, EITHER, outputs=outputs)


# --------------------------------------------------------------------------- memory bombs
def converted_layer(payload: dict) -> dict:
    return next(layer for layer in payload["plan"]["layers"] if layer["decision"] == "converted")


def edited(change: Callable[[dict], None], pickled: bool = False) -> Callable[[Ctx], bytes]:
    def make(ctx: Ctx) -> bytes:
        payload = copy.deepcopy(ctx.good.pickled_payload if pickled else ctx.good.payload)
        change(payload)
        return saved_bytes(payload)

    return make


def _options(**values) -> Callable[[dict], None]:
    return lambda p: converted_layer(p)["options"].update(values)


def _shape_everywhere(shape: list[int]) -> Callable[[dict], None]:
    def change(payload: dict) -> None:
        payload["plan"]["input_shape"] = payload["metadata"]["input_shape"] = shape
        payload["metadata"]["preprocessing"] = {
            "mean": [0.3] * shape[1],
            "std": [0.4] * shape[1],
            "input_size": shape[2:],
        }

    return change


def _inflating(ctx: Ctx, size: int = 64 << 20) -> bytes:
    """The good .vc.pt plus a tensor of ``size`` zero bytes, re-zipped with deflate: ~1000:1 (built once)."""
    key = (id(ctx.good), size)
    if key not in _INFLATING:
        _INFLATING[key] = _deflated(ctx, size)
    return _INFLATING[key]


_INFLATING: dict[tuple[int, int], bytes] = {}


def _deflated(ctx: Ctx, size: int) -> bytes:
    payload = copy.deepcopy(ctx.good.payload)
    payload["metadata"]["notes"] = torch.zeros(size // 4)
    plain = saved_bytes(payload)
    del payload
    source, buffer = zipfile.ZipFile(io.BytesIO(plain)), io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for info in source.infolist():
            archive.writestr(info.filename, source.read(info.filename))
    return buffer.getvalue()


def _declaring(ctx: Ctx, declared: int = 0xFFFF0000) -> bytes:
    """A deflated .vc.pt whose largest member says, in its local header and its central directory entry,
    that it inflates to ``declared`` bytes (~4 GiB) while its compressed data is a few KB."""
    data = bytearray(_inflating(ctx, 4 << 20))
    info = max(zipfile.ZipFile(io.BytesIO(bytes(data))).infolist(), key=lambda i: i.file_size)
    struct.pack_into("<I", data, info.header_offset + 22, declared)
    central = bytes(data).find(b"PK\x01\x02")
    while central >= 0:
        name_length = struct.unpack_from("<H", data, central + 28)[0]
        if bytes(data[central + 46 : central + 46 + name_length]) == info.filename.encode():
            struct.pack_into("<I", data, central + 24, declared)
        central = bytes(data).find(b"PK\x01\x02", central + 4)
    return bytes(data)


def _onnx(shape=("N", 1, 16, 16), **props) -> Callable[[Ctx], bytes]:
    def make(ctx: Ctx) -> bytes:
        text = {f"vconvert.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in props.items()}
        return _with_props(onnx.load_from_string(pooled_model(shape=shape)), text)

    return make


@dataclass(frozen=True)
class FileCase:
    id: str
    make: Callable[[Ctx], bytes]
    commands: tuple[str, ...]
    codes: frozenset[int] = BAD
    name: str = "damaged.vc.pt"
    extra: tuple[str, ...] = ()  # appended to the command line
    budget: str | None = None  # VCONVERT_MEMORY_BUDGET
    says: str = ""


def _weights(ctx: Ctx) -> bytes:
    return ctx.good.weights


ARCH_ONE = ["--arch", ARCH, "--arch-kwargs", '{"in_channels": 1}']
MEMORY_CASES = [
    FileCase("secondary-5000000-shared", edited(_options(secondary=5_000_000, mask_sharing="shared")), BASE_COMMANDS),
    FileCase("secondary-2e9-shared", edited(_options(secondary=2_000_000_000, mask_sharing="shared")), BASE_COMMANDS),
    FileCase("secondary-float-2e9-shared", edited(_options(secondary=2e9, mask_sharing="shared")), ("inspect",)),
    FileCase("secondary-5000000-finetune", edited(_options(secondary=5_000_000, mask_sharing="shared")), ("finetune",)),
    FileCase("secondary-5000000-pickled-base", edited(_options(secondary=5_000_000), pickled=True), ("inspect",)),
    FileCase("zip-member-inflates-64mb-from-70kb", _inflating, BASE_COMMANDS),
    FileCase("zip-member-declares-4gib", _declaring, ("inspect", "export")),
    FileCase("checkpoint-records-1x1x4096x4096", edited(_shape_everywhere([1, 1, 4096, 4096])), ("export", "inspect")),
    FileCase(
        "checkpoint-records-batch-65536", edited(_shape_everywhere([65536, 1, 16, 16])), ("inspect", "evaluate"), EITHER
    ),
    FileCase("checkpoint-records-64-channels-4096", edited(_shape_everywhere([1, 64, 4096, 4096])), BASE_COMMANDS),
    FileCase(
        "onnx-metadata-1x4096x4096",
        _onnx(input_shape=[None, 1, 4096, 4096], preprocessing={**PREPROCESSING, "input_size": [4096, 4096]}),
        ("evaluate",),
        EITHER,
        "model.onnx",
        ("--limit", "32"),
    ),
    FileCase(
        "onnx-fixed-batch-65536-224px",
        _onnx(shape=(65536, 3, 224, 224)),
        ("evaluate",),
        EITHER,
        "model.onnx",
        ("--limit", "4"),
    ),
    FileCase(
        "onnx-metadata-batch-65536",
        _onnx(input_shape=[65536, 1, 16, 16], preprocessing=PREPROCESSING),
        ("evaluate",),
        EITHER,
        "model.onnx",
        ("--limit", "4"),
    ),
    FileCase(
        "64-channels-4096-on-1-channel-model",
        _weights,
        ("inspect", "compress"),
        name="weights.pt",
        extra=(*ARCH_ONE, "--input-shape", "1,64,4096,4096"),
    ),
    FileCase(
        "batch-64-at-4096-typed",
        _weights,
        ("inspect",),
        EITHER,
        name="weights.pt",
        extra=(*ARCH_ONE, "--input-shape", "64,1,4096,4096"),
    ),
]


def _file_command(case: FileCase, cmd: str, ctx: Ctx) -> tuple[list, tuple[Path, ...]]:
    file = ctx.write(case.name, case.make(ctx))
    if file.suffix == ".onnx":
        return ["evaluate", file, "--data", "digits", *(case.extra or ("--limit", "4"))], ()
    if file.name.endswith(".vc.pt"):
        args, outputs = command(cmd, file, ctx)
        return [*args, *case.extra], outputs
    args = {
        "inspect": ["inspect", file],
        "compress": ["compress", file, "-o", ctx.out / "c.vc.pt", "--init", "naive"],
        "evaluate": ["evaluate", file, "--data", "digits", "--limit", "4"],
    }[cmd]
    return [*args, *case.extra], ((ctx.out / "c.vc.pt",) if cmd == "compress" else ())


def _file_cases(cases: list[FileCase]) -> list:
    return [pytest.param(case, cmd, id=f"{case.id}-{cmd}") for case in cases for cmd in case.commands]


@pytest.mark.parametrize(("case", "cmd"), _file_cases(MEMORY_CASES))
def test_memory_bomb(case: FileCase, cmd: str, ctx: Ctx, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a 1 GB budget, a file that asks for more is refused before the memory is allocated."""
    monkeypatch.setenv("VCONVERT_MEMORY_BUDGET", case.budget or "1")
    args, outputs = _file_command(case, cmd, ctx)
    run_case(args, ctx, case.codes, case.says, outputs=outputs)


# --------------------------------------------------------------------------- damaged values
def _nested(depth: int, leaf: object = 1) -> object:
    value = leaf
    for index in range(depth):
        value = [value] if index % 2 else {"k": value}
    return value


def deep_saved(change: Callable[[dict], None], pickled: bool = False) -> Callable[[Ctx], bytes]:
    """:func:`edited` with the recursion limit raised while saving (pickling nests as deep as the data)."""

    def make(ctx: Ctx) -> bytes:
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(60_000)
        try:
            return edited(change, pickled)(ctx)
        finally:
            sys.setrecursionlimit(limit)

    return make


def _base(**values) -> Callable[[dict], None]:
    return lambda p: p["base"].update(values)


def _metadata(**values) -> Callable[[dict], None]:
    return lambda p: p["metadata"].update(values)


def _preprocessing(**values) -> Callable[[dict], None]:
    return _metadata(preprocessing={**PREPROCESSING, **values})


def _plan(**values) -> Callable[[dict], None]:
    return lambda p: p["plan"].update(values)


LONG = "x" * 2_000_000
VALUE_CASES = [
    FileCase(
        "arch-kwargs-nested-5000-deep",
        deep_saved(_base(arch_kwargs={"in_channels": 1, "num_classes": _nested(5000)})),
        ("inspect", "evaluate", "finetune"),
    ),
    FileCase("arch-kwargs-key-nested-1200-deep", deep_saved(_base(arch_kwargs=_nested(1200))), ("inspect",)),
    FileCase(
        "metadata-unknown-key-nested-5000-deep",
        deep_saved(_metadata(surprise=_nested(5000))),
        ("inspect", "finetune"),
        EITHER,
    ),
    FileCase("plan-note-nested-5000-deep", deep_saved(_plan(trace_note=_nested(5000))), ("inspect",)),
    FileCase("std-1e-320", edited(_preprocessing(std=[1e-320])), ("evaluate", "finetune", "export")),
    FileCase("std-nan", edited(_preprocessing(std=[math.nan])), ("evaluate",)),
    FileCase("std-1e308", edited(_preprocessing(std=[1e308])), ("evaluate",)),
    FileCase("mean-1e308", edited(_preprocessing(mean=[1e308])), ("evaluate",)),
    FileCase("mean-minus-1e308", edited(_preprocessing(mean=[-1e308])), ("evaluate",)),
    FileCase("mean-inf", edited(_preprocessing(mean=[math.inf])), ("evaluate",)),
    FileCase("onnx-std-1e-320", _onnx(preprocessing={**PREPROCESSING, "std": [1e-320]}), ("evaluate",), name="m.onnx"),
    FileCase(
        "onnx-std-nan",
        _onnx(preprocessing='{"mean": [0.3], "std": [NaN], "input_size": [16, 16]}'),
        ("evaluate",),
        name="m.onnx",
    ),
    FileCase("onnx-mean-1e308", _onnx(preprocessing={**PREPROCESSING, "mean": [1e308]}), ("evaluate",), name="m.onnx"),
    FileCase(
        "onnx-mean-minus-1e308", _onnx(preprocessing={**PREPROCESSING, "mean": [-1e308]}), ("evaluate",), name="m.onnx"
    ),
    FileCase("onnx-std-1e308", _onnx(preprocessing={**PREPROCESSING, "std": [1e308]}), ("evaluate",), name="m.onnx"),
    FileCase(
        "onnx-mean-infinity",
        _onnx(preprocessing='{"mean": [Infinity], "std": [0.4], "input_size": [16, 16]}'),
        ("evaluate",),
        name="m.onnx",
    ),
    FileCase("onnx-input-shape-nan", _onnx(input_shape="[null, 1, NaN, 16]"), ("evaluate",), name="m.onnx"),
    FileCase(
        "onnx-preprocessing-nested-5000-deep",
        _onnx(preprocessing='{"mean": ' * 5000 + "1" + "}" * 5000),
        ("evaluate",),
        name="m.onnx",
    ),
    FileCase("arch-string-2mb", edited(_base(arch="sample_models.resnet_cifar:" + LONG)), ("inspect", "evaluate")),
    FileCase("arch-string-2mb-dotted", edited(_base(arch="sample_models." + LONG + ".x")), ("inspect",)),
    FileCase("arch-kwargs-value-2mb", edited(_base(arch_kwargs={"in_channels": 1, "num_classes": LONG})), ("inspect",)),
    FileCase("arch-kwargs-key-2mb", edited(_base(arch_kwargs={"in_channels": 1, LONG: 1})), ("inspect",)),
    FileCase("layer-name-2mb", edited(lambda p: converted_layer(p).update(name=LONG)), ("inspect",)),
    FileCase("source-2mb", edited(_base(source=LONG)), ("inspect",), EITHER),
]


@pytest.mark.parametrize(("case", "cmd"), _file_cases(VALUE_CASES))
def test_damaged_value(case: FileCase, cmd: str, ctx: Ctx) -> None:
    args, outputs = _file_command(case, cmd, ctx)
    run_case(args, ctx, case.codes, case.says, outputs=outputs)


def test_arch_typed_2mb_is_not_echoed(ctx: Ctx) -> None:
    run_case(["inspect", ctx.write("w.pt", ctx.good.weights), "--arch", "sample_models." + LONG], ctx)


# --------------------------------------------------------------------------- finetune -o onto its input
def _onto_itself(ctx: Ctx) -> list:
    source = ctx.write("run.vc.pt", ctx.good.checkpoint)
    return ["finetune", source, "-o", source, *QUICK]


def _onto_itself_relative(ctx: Ctx) -> list:
    ctx.write("run.vc.pt", ctx.good.checkpoint)
    (ctx.folder / "sub").mkdir()
    return ["finetune", "run.vc.pt", "-o", "sub/../run.vc.pt", *QUICK]


def _onto_its_best(ctx: Ctx) -> list:
    source = ctx.write("run.best.vc.pt", ctx.good.checkpoint)
    return ["finetune", source, "-o", ctx.folder / "run.vc.pt", *QUICK]


def _onto_its_metrics(ctx: Ctx) -> list:
    source = ctx.write("run.metrics.jsonl", ctx.good.checkpoint)
    return ["finetune", source, "-o", ctx.folder / "run.vc.pt", *QUICK]


def _onto_a_link_to_itself(ctx: Ctx) -> list:
    source = ctx.write("run.vc.pt", ctx.good.checkpoint)
    (ctx.folder / "link.vc.pt").symlink_to(source)
    return ["finetune", source, "-o", ctx.folder / "link.vc.pt", *QUICK]


def _onto_a_hard_link_to_itself(ctx: Ctx) -> list:
    source = ctx.write("run.vc.pt", ctx.good.checkpoint)
    os.link(source, ctx.folder / "hard.vc.pt")
    return ["finetune", source, "-o", ctx.folder / "hard.vc.pt", *QUICK]


OUTPUT_CASES = {
    "output-is-the-input": _onto_itself,
    "output-is-the-input-by-another-path": _onto_itself_relative,
    "output-best-is-the-input": _onto_its_best,
    "output-metrics-is-the-input": _onto_its_metrics,
    "output-is-a-symlink-to-the-input": _onto_a_link_to_itself,
    "output-is-a-hard-link-to-the-input": _onto_a_hard_link_to_itself,
}


@pytest.mark.parametrize("make", OUTPUT_CASES.values(), ids=OUTPUT_CASES.keys())
def test_finetune_never_overwrites_its_input(make: Callable[[Ctx], list], ctx: Ctx) -> None:
    run_case(make(ctx), ctx, BAD)


# --------------------------------------------------------------------------- escape sequences
def _escaped_copy(ctx: Ctx) -> list:
    return ["inspect", ctx.write(f"evil{ESCAPES}.vc.pt", ctx.good.checkpoint)]


ESCAPE_CASES = {
    "file-name-missing": (lambda c: ["inspect", c.folder / f"missing{ESCAPES}.vc.pt"], BAD),
    "file-name-good-file": (_escaped_copy, OK),
    "file-name-export-output": (
        lambda c: ["export", c.write("a.vc.pt", c.good.checkpoint), "-o", c.out / f"o{ESCAPES}/m.onnx", "--no-compare"],
        BAD,
    ),
    "arch-in-file": (lambda c: ["inspect", c.write("d.vc.pt", edited(_base(arch=f"a{ESCAPES}:b"))(c))], BAD),
    "arch-kwargs-value": (
        lambda c: ["inspect", c.write("d.vc.pt", edited(_base(arch_kwargs={"in_channels": 1, "x": ESCAPES}))(c))],
        BAD,
    ),
    "base-source": (lambda c: ["inspect", c.write("d.vc.pt", edited(_base(source=ESCAPES))(c))], EITHER),
    "layer-name": (
        lambda c: ["inspect", c.write("d.vc.pt", edited(lambda p: converted_layer(p).update(name=ESCAPES))(c))],
        BAD,
    ),
    "plan-trace-note": (lambda c: ["inspect", c.write("d.vc.pt", edited(_plan(trace_note=ESCAPES))(c))], EITHER),
    "plan-choice-note": (lambda c: ["inspect", c.write("d.vc.pt", edited(_plan(choice_note=ESCAPES))(c))], EITHER),
    "layer-users": (
        lambda c: ["inspect", c.write("d.vc.pt", edited(lambda p: converted_layer(p).update(users=[ESCAPES]))(c))],
        EITHER,
    ),
    "metadata-data-source": (
        lambda c: [
            "inspect",
            c.write("d.vc.pt", edited(_metadata(bn_recalibration={"data": ESCAPES, "images": 4}))(c)),
        ],
        EITHER,
    ),
    "pickled-base-class-name": (
        lambda c: [
            "inspect",
            c.write("d.vc.pt", with_base(c, hostile_bytes(call("os", "sys\x1b[2J\x1b]0;title\x07")))),
        ],
        BAD,
    ),
    "onnx-metadata": (
        lambda c: ["evaluate", c.write("m.onnx", _onnx(preprocessing=ESCAPES)(c)), "--data", "digits"],
        BAD,
    ),
}


@pytest.mark.parametrize(("make", "codes"), ESCAPE_CASES.values(), ids=ESCAPE_CASES.keys())
def test_escape_sequences_are_not_printed_raw(make: Callable[[Ctx], list], codes: frozenset[int], ctx: Ctx) -> None:
    run_case(make(ctx), ctx, codes, outputs=(ctx.out / "o",))


def test_escape_sequences_in_a_warning(ctx: Ctx) -> None:
    """A class folder whose name carries escapes and a corrupt image: the skipped-file warning is escaped."""
    data = _folder(ctx.folder / "images")
    evil = data / "val" / f"class{ESCAPES}"
    evil.mkdir()
    _png(evil / "0.png")
    (evil / "corrupt.png").write_bytes(b"\x89PNG broken")
    run_case(["evaluate", ctx.good.rgb_checkpoint, "--data", data], ctx, EITHER)


# --------------------------------------------------------------------------- image folders
@functools.cache
def _big_png(side: int = 12000) -> bytes:
    """A side² RGB PNG of zeros built row by row (~400 KB; decoding it takes side²·3 bytes)."""
    row = b"\x00" * (1 + 3 * side)
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


POSTSCRIPT = "%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n(MARKER) (w) file closefile\n{} loop\n"


def _damage(add: Callable[[Path, Ctx], None]) -> Callable[[Path, Ctx], None]:
    """The damage in class0 of both splits."""

    def apply(root: Path, ctx: Ctx) -> None:
        for split in ("train", "val"):
            add(root / split / "class0", ctx)

    return apply


IMAGE_CASES: dict[str, tuple[Callable[[Path, Ctx], None], frozenset[int]]] = {
    "fifo-named-png": (_damage(lambda f, c: os.mkfifo(f / "x.png")), EITHER),
    "two-symlinks-to-dot": (
        _damage(lambda f, c: ((f / "a").symlink_to("."), (f / "b").symlink_to("."))),
        EITHER,
    ),
    "symlink-loop-to-split": (_damage(lambda f, c: (f / "loop").symlink_to("..")), EITHER),
    "symlink-to-dev-zero": (_damage(lambda f, c: (f / "zero.png").symlink_to("/dev/zero")), EITHER),
    "symlink-out-of-the-folder": (
        _damage(lambda f, c: (f / "outside.png").symlink_to(c.folder / "outside.png")),
        EITHER,
    ),
    "postscript-named-png": (
        _damage(lambda f, c: (f / "ps.png").write_text(POSTSCRIPT.replace("MARKER", str(c.marker)))),
        EITHER,
    ),
    "eps-binary-header-named-jpg": (
        _damage(lambda f, c: (f / "eps.jpg").write_bytes(b"\xc5\xd0\xd3\xc6" + bytes(28) + POSTSCRIPT.encode())),
        EITHER,
    ),
    "eight-12000px-pngs": (
        _damage(lambda f, c: [(f / f"big{i}.png").write_bytes(_big_png()) for i in range(8)]),
        EITHER,
    ),
}
IMAGE_COMMANDS = ("finetune", "compress", "evaluate")


def _image_command(cmd: str, data: Path, ctx: Ctx) -> tuple[list, tuple[Path, ...]]:
    if cmd == "finetune":
        options = "--epochs 1 --batch-size 2 --workers 0 --recalibrate-images 4 --masks frozen --eval-limit 8"
        output = ctx.out / "ft.vc.pt"
        return ["finetune", ctx.good.rgb_checkpoint, "-o", output, "--data", data, *options.split()], (output,)
    if cmd == "compress":
        output = ctx.out / "c.vc.pt"
        arch = ["--arch", ARCH, "--arch-kwargs", '{"num_classes": 2}', "--input-shape", "1,3,16,16", "--init", "naive"]
        return ["compress", ctx.good.rgb_weights, *arch, "--calib-data", data, "-o", output], (output,)
    return ["evaluate", ctx.good.rgb_checkpoint, "--data", data, "--json"], ()


@pytest.mark.parametrize("cmd", IMAGE_COMMANDS)
@pytest.mark.parametrize(("add", "codes"), IMAGE_CASES.values(), ids=IMAGE_CASES.keys())
def test_hostile_image_folder(
    add: Callable[[Path, Ctx], None], codes: frozenset[int], cmd: str, ctx: Ctx, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No hang, no decoder beyond image formats, bounded memory, at most one warning line, and the samples
    counted once (a symlink loop does not multiply them)."""
    monkeypatch.setenv("VCONVERT_MEMORY_BUDGET", "1")
    _png(ctx.folder / "outside.png")
    data = _folder(ctx.folder / "images")
    add(data, ctx)
    args, outputs = _image_command(cmd, data, ctx)
    result = run_case(args, ctx, codes, seconds=30, outputs=outputs)
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warned) <= 2, result.stderr  # one line per split folder at most
    assert "DecompressionBomb" not in result.stderr and "site-packages" not in result.stderr, result.stderr
    if cmd == "evaluate" and result.exit_code == 0:
        assert json.loads(result.stdout)["images"] <= 6 + 1, f"samples multiplied:\n{result.output}"


# --------------------------------------------------------------------------- generated variants
HOSTILE_VALUES: list[object] = [
    None,
    -1,
    0,
    10**12,
    2**63,
    -(2**63),
    1e-320,
    1e308,
    math.nan,
    math.inf,
    -math.inf,
    True,
    "",
    ESCAPES,
    "x" * 100_000,
    "../../etc/passwd",
    "https://example.com/weights.pth",
    "os:system",
    [],
    [10**9] * 4,
    [1, 64, 4096, 4096],
    {"a": {"b": {"c": 1}}},
    b"\x80\x02" + b"x" * 50,
    torch.zeros(0),
    torch.zeros(1).expand(10**9),
]


def _paths(value: object, prefix: tuple = ()) -> Iterator[tuple]:
    """Every key path into a payload's dicts and lists (not into tensors or bytes)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("state_dict", "teacher_state_dict", "pickled"):
                yield (*prefix, key)
                continue
            yield (*prefix, key)
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:3]):
            yield (*prefix, index)
            yield from _paths(item, (*prefix, index))


def _mutate(payload: dict, rng: random.Random) -> str:
    """Set one to three random places of ``payload`` to hostile values; returns what changed."""
    paths = sorted(_paths(payload), key=repr)
    changes = []
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(paths)
        value = rng.choice(HOSTILE_VALUES)
        with contextlib.suppress(KeyError, IndexError, TypeError):  # an earlier change replaced a parent
            target = payload
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = copy.copy(value)
            changes.append(f"{'.'.join(map(str, path))}={type(value).__name__}")
    return ",".join(changes)


GENERATED_CHECKPOINTS = 120
GENERATED_PICKLES = 40
GENERATED_ONNX = 40
GENERATED_BASE_FLIPS = 30


@pytest.mark.parametrize("seed", range(GENERATED_CHECKPOINTS), ids=lambda s: f"vc-mutation-{s}")
def test_generated_checkpoint(seed: int, ctx: Ctx, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random fields of the good .vc.pt (arch or pickled base) set to hostile values: exit 0 or 2."""
    monkeypatch.setenv("VCONVERT_MEMORY_BUDGET", "1")
    rng = random.Random(seed)
    payload = copy.deepcopy(ctx.good.pickled_payload if seed % 4 == 3 else ctx.good.payload)
    _mutate(payload, rng)
    file = ctx.write("mutated.vc.pt", saved_bytes(payload))
    cmd = ("inspect", "inspect", "evaluate", "export")[seed % 4] if seed % 3 == 0 else "inspect"
    args, outputs = command(cmd, file, ctx)
    run_case(args, ctx, EITHER, outputs=outputs)


PICKLE_TARGETS = [
    ("torch.nn.modules.linear", "Linear"),
    ("torch.nn.modules.container", "Sequential"),
    ("torch.nn.modules.conv", "Conv2d"),
    ("torchvision.models.resnet", "ResNet"),
    ("torchvision.models.resnet", "resnet18"),
    ("torchvision.ops.misc", "Conv2dNormActivation"),
    ("timm.models.resnet", "ResNet"),
    ("timm.models", "create_model"),
    ("timm.layers", "create_conv2d"),
    ("sample_models.resnet_cifar", "CifarResNet"),
    ("sample_models.resnet_cifar", "resnet8"),
    ("torch", "load"),
    ("torch.hub", "load_state_dict_from_url"),
    ("builtins", "open"),
    ("builtins", "getattr"),
    ("io", "open"),
    ("pathlib", "Path"),
    ("shutil", "rmtree"),
    ("subprocess", "getoutput"),
    ("webbrowser", "open"),
]


@pytest.mark.parametrize("seed", range(GENERATED_PICKLES), ids=lambda s: f"pickle-call-{s}")
def test_generated_pickle(seed: int, ctx: Ctx, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pickled 'model' that calls a random target with random hostile arguments: refused naming --trust."""
    monkeypatch.setenv("VCONVERT_MEMORY_BUDGET", "1")
    rng = random.Random(1000 + seed)
    module, name = rng.choice(PICKLE_TARGETS)
    pool = [1, 3, 30000, 10**6, str(ctx.marker), str(ctx.out / "c.vc.pt"), "https://example.com/m.pth", True, None]
    args = tuple(rng.choice(pool) for _ in range(rng.randint(0, 3)))
    obj = call(module, name, *args)
    if seed % 2:  # hidden inside a good model's attributes
        model = resnet8(in_channels=1)
        model.__dict__["hidden"] = obj
        obj = model
    data = hostile_bytes(obj)
    file = ctx.write("base.vc.pt", with_base(ctx, data)) if seed % 5 == 4 else ctx.write("model.pt", data)
    run_case(command("inspect", file, ctx)[0], ctx, BAD, "--trust")


ONNX_KEYS = ("preprocessing", "input_shape")


@pytest.mark.parametrize("seed", range(GENERATED_ONNX), ids=lambda s: f"onnx-metadata-{s}")
def test_generated_onnx_metadata(seed: int, ctx: Ctx, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random hostile values in an ONNX file's vconvert metadata: evaluate exits 0 or 2."""
    monkeypatch.setenv("VCONVERT_MEMORY_BUDGET", "1")
    rng = random.Random(2000 + seed)
    meta = {"preprocessing": dict(PREPROCESSING), "input_shape": [None, 1, 16, 16]}
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(ONNX_KEYS)
        value = rng.choice([v for v in HOSTILE_VALUES if not isinstance(v, (bytes, torch.Tensor))])
        if key == "preprocessing" and isinstance(meta[key], dict) and rng.random() < 0.7:
            meta[key][rng.choice(["mean", "std", "input_size"])] = value
        elif key == "input_shape" and isinstance(meta[key], list) and len(meta[key]) == 4 and rng.random() < 0.7:
            meta[key][rng.randrange(4)] = value
        else:
            meta[key] = value
    text = {k: json.dumps(v, allow_nan=True) for k, v in meta.items()}
    file = ctx.write(
        "m.onnx", _with_props(onnx.load_from_string(pooled_model()), {f"vconvert.{k}": v for k, v in text.items()})
    )
    run_case(["evaluate", file, "--data", "digits", "--limit", "4"], ctx, EITHER)


@pytest.mark.parametrize("seed", range(GENERATED_BASE_FLIPS), ids=lambda s: f"pickled-base-byte-flip-{s}")
def test_generated_pickled_base_damage(seed: int, ctx: Ctx) -> None:
    """Bytes flipped in the pickle of a .vc.pt's pickled base: exit 0 or 2, never code or a traceback."""
    rng = random.Random(3000 + seed)
    model = bytearray(ctx.good.model)
    offset, size = _members(bytes(model))["data.pkl"]
    for _ in range(rng.randint(1, 4)):
        model[offset + rng.randrange(size)] = rng.randrange(256)
    file = ctx.write("base.vc.pt", with_base(ctx, bytes(model)))
    run_case(command("inspect", file, ctx)[0], ctx, EITHER)


# --------------------------------------------------------------------------- the CLI in a child process
@dataclass
class Child:
    """A ``vconvert`` child process: started in the background, finished by :func:`finish_child`."""

    ctx: Ctx
    args: list
    before: dict[str, str]
    process: subprocess.Popen
    code: int | None = None
    stdout: str = ""
    stderr: str = ""
    peak_rss: int = 0  # bytes


def _logs(ctx: Ctx) -> Path:
    return ctx.folder.parent / f"{ctx.folder.name}-logs"


def start_child(args: list, ctx: Ctx) -> Child:
    """``vconvert ARGS`` with RLIMIT_AS = CHILD_ADDRESS_SPACE, the socket guard and a 1 GB memory budget."""
    env = socket_guard.child_environment(ctx.folder / "socket-attempts.txt")
    env.update(TORCH_HOME=str(ctx.torch_home), OMP_NUM_THREADS="1", COLUMNS="200", VCONVERT_MEMORY_BUDGET="1")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (CHILD_ADDRESS_SPACE, CHILD_ADDRESS_SPACE))

    _logs(ctx).mkdir()
    before = snapshot(ctx.folder)
    with open(_logs(ctx) / "out", "w") as out, open(_logs(ctx) / "err", "w") as err:
        process = subprocess.Popen(
            [str(VCONVERT), *map(str, args)], stdout=out, stderr=err, env=env, cwd=ctx.folder, preexec_fn=limit
        )
    return Child(ctx, args, before, process)


def finish_child(child: Child, seconds: float = 300) -> Child:
    """Wait for the child (its own rusage gives its peak RSS), read its output, check the socket guard's file."""
    if child.code is None:
        with deadline(seconds):
            try:
                _, status, usage = os.wait4(child.process.pid, 0)
            except Hung:
                child.process.kill()
                raise
        child.code = child.process.returncode = os.waitstatus_to_exitcode(status)
        child.peak_rss = usage.ru_maxrss * 1024
        child.stdout, child.stderr = (_logs(child.ctx) / "out").read_text(), (_logs(child.ctx) / "err").read_text()
    attempts = child.ctx.folder / "socket-attempts.txt"
    assert not attempts.exists(), f"the child tried to reach the network:\n{attempts.read_text()}"
    return child


CHILD_CASES = {
    "pickled-linear-30000-inspect": lambda c: [
        "inspect",
        c.write("m.pt", hostile_bytes(PICKLES["torch-nn-linear-30000"](c))),
        "--input-shape",
        "1,1,16,16",
    ],
    "vc-base-torch-hub-load-evaluate": lambda c: [
        "evaluate",
        c.write("b.vc.pt", with_base(c, hostile_bytes(PICKLES["torch-hub-load"](c)))),
        "--data",
        "digits",
        "--limit",
        "4",
    ],
    "vc-secondary-5000000-export": lambda c: [
        "export",
        c.write("s.vc.pt", edited(_options(secondary=5_000_000, mask_sharing="shared"))(c)),
        "-o",
        c.out / "model.onnx",
        "--no-compare",
    ],
}
BASELINE = "control-good-inspect"


@pytest.fixture(scope="module", autouse=True)
def children(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Child]]:
    """The child processes, all started when this module's first test starts, if any child test is selected:
    they run beside the in-process cases (~8 s each, mostly importing torch)."""
    started: dict[str, Child] = {}
    if any(item.name.startswith("test_in_a_child_process") for item in request.session.items):
        good = request.getfixturevalue("good")
        makers = {BASELINE: lambda c: ["inspect", c.write("good.vc.pt", good.checkpoint)], **CHILD_CASES}
        for name, make in makers.items():
            ctx = Ctx(tmp_path_factory.mktemp(f"child-{name}"), good)
            started[name] = start_child(make(ctx), ctx)
    yield started
    for child in started.values():
        if child.code is None:
            child.process.kill()
            child.process.wait()


@pytest.mark.parametrize("name", CHILD_CASES)
def test_in_a_child_process(name: str, children: dict[str, Child]) -> None:
    """The real command line under RLIMIT_AS: exit 2, one line, no marker, no socket, no file changed, and a
    peak RSS within 1 GiB of the same command line's on a good file (``inspect``, ~1.1 GiB with torch)."""
    baseline = finish_child(children[BASELINE])
    assert baseline.code == 0, baseline.stderr
    child = finish_child(children[name])
    shown = (
        f"{name}: exit {child.code}, peak RSS {child.peak_rss >> 20} MiB\n{child.stdout[-2000:]}{child.stderr[-3000:]}"
    )
    print(shown)
    assert not child.ctx.marker.exists(), f"{shown}\ncode from the file ran"
    assert snapshot(child.ctx.folder) == child.before, f"{shown}\nfiles changed"
    grown = child.peak_rss - baseline.peak_rss
    assert grown < HEADROOM, f"{shown}\nthe peak RSS is {grown >> 20} MiB above a good file's {baseline.peak_rss >> 20}"
    assert "Traceback" not in child.stderr, shown
    assert child.code == 2, shown
    lines = child.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error:") and sum(line.startswith("error:") for line in lines) == 1, shown


# --------------------------------------------------------------------------- the guard itself
def test_socket_guard_refuses_other_machines_and_records_it() -> None:
    for attempt in (
        lambda: socket.create_connection(("192.0.2.1", 80), timeout=0.1),
        lambda: socket.getaddrinfo("example.com", 443),
        lambda: socket.socket().connect(("203.0.113.5", 443)),
        lambda: socket.socket(socket.AF_INET6).connect_ex(("2001:db8::1", 443, 0, 0)),
    ):
        with pytest.raises(socket_guard.SocketGuardError):
            attempt()
    assert len(socket_guard.take_attempts()) == 4


def test_socket_guard_lets_loopback_and_unix_sockets_through(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("localhost", port), timeout=5):
            pass
        with socket.socket() as client:
            client.connect(("127.0.0.1", port))
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "s"))
        server.listen()
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(tmp_path / "s"))
    assert socket.getaddrinfo("localhost", 80) and not socket_guard.take_attempts()


def test_socket_guard_in_a_child_process(tmp_path: Path) -> None:
    marker = tmp_path / "attempts.txt"
    code = (
        "import socket\n"
        "try:\n    socket.create_connection(('192.0.2.1', 80), timeout=0.1)\n"
        "except Exception as e:\n    print(type(e).__name__)\n"
        "with socket.create_server(('127.0.0.1', 0)) as s:\n    socket.create_connection(s.getsockname()).close()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=socket_guard.child_environment(marker),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout.strip() == "SocketGuardError", done.stderr
    assert "192.0.2.1" in marker.read_text()


def test_case_count() -> None:
    """A few hundred cases (issue 27: 'a few hundred cases, under 2 minutes')."""
    cases = (
        len(PICKLE_CASES)
        + len(BUILDER_CASES)
        + len(_file_cases(MEMORY_CASES))
        + len(_file_cases(VALUE_CASES))
        + len(OUTPUT_CASES)
        + len(ESCAPE_CASES)
        + len(IMAGE_CASES) * len(IMAGE_COMMANDS)
        + GENERATED_CHECKPOINTS
        + GENERATED_PICKLES
        + GENERATED_ONNX
        + GENERATED_BASE_FLIPS
        + len(CHILD_CASES)
    )
    assert cases >= 300, cases
