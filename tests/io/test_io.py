"""vconvert.io: safe model loading, arch allowlist, atomic writes and the .vc.pt checkpoint format."""

from __future__ import annotations

import functools
import os
import pickle
import sys
import textwrap
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torchvision
from torch import nn

from sample_models.resnet_cifar import resnet8
from vconvert.errors import BadInputError, UntrustedCodeError
from vconvert.io.architectures import resolve_arch
from vconvert.io.files import atomic_save, atomic_write_bytes, check_writable
from vconvert.io.format import CHECKPOINT_FORMAT, read_checkpoint, write_checkpoint
from vconvert.io.untrusted import BaseSpec, build_base, load_model


def _assert_one_sentence(error: BaseException) -> None:
    """Errors are one clear sentence: a single line that ends with a full stop."""
    message = str(error)
    assert "\n" not in message and message.endswith("."), message
    assert "Traceback" not in message


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[key], sb[key]) for key in sa)


# --------------------------------------------------------------------------- state_dict + --arch
@dataclass(frozen=True)
class ArchCase:
    id: str
    arch: str
    build: Callable[[], nn.Module]


ARCH_CASES = [
    ArchCase("sample-resnet8", "sample_models.resnet_cifar:resnet8", resnet8),
    ArchCase("torchvision-resnet18", "torchvision.models:resnet18", torchvision.models.resnet18),
]
WRAPPERS: dict[str, Callable[[dict], object]] = {
    "bare": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 3},
    "model": lambda sd: {"model": sd},
    "model_state_dict": lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {}},
    "module-prefix": lambda sd: {f"module.{key}": value for key, value in sd.items()},
    "state_dict+module-prefix": lambda sd: {"state_dict": {f"module.{key}": value for key, value in sd.items()}},
    "compiled-prefix": lambda sd: {f"_orig_mod.{key}": value for key, value in sd.items()},
}


@pytest.fixture(scope="module", params=ARCH_CASES, ids=lambda case: case.id)
def arch_source(request: pytest.FixtureRequest) -> tuple[ArchCase, nn.Module]:
    torch.manual_seed(0)
    return request.param, request.param.build()


@pytest.mark.parametrize("wrapper", list(WRAPPERS), ids=list(WRAPPERS))
def test_state_dict_with_arch_loads_strictly(arch_source, wrapper: str, tmp_path: Path) -> None:
    case, source = arch_source
    path = tmp_path / "weights.pt"
    torch.save(WRAPPERS[wrapper](source.state_dict()), path)
    model, spec = load_model(path, arch=case.arch)
    assert type(model) is type(source) and not model.training
    assert _same_weights(model, source)
    assert spec == BaseSpec(arch=case.arch, arch_kwargs={}, pickled=None, source=str(path))


def test_arch_dotted_form_and_kwargs_are_normalised(tmp_path: Path) -> None:
    path = tmp_path / "r8.pt"
    torch.save(resnet8(num_classes=4).state_dict(), path)
    model, spec = load_model(path, arch="sample_models.resnet_cifar.resnet8", arch_kwargs={"num_classes": 4})
    assert model.fc.out_features == 4
    assert spec.arch == "sample_models.resnet_cifar:resnet8" and spec.arch_kwargs == {"num_classes": 4}
    rebuilt = build_base(spec)
    assert type(rebuilt) is type(model) and rebuilt.fc.out_features == 4 and not rebuilt.training


# --------------------------------------------------------------------------- pickled modules, allowlisted
def _sequential_with_partial() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model.norm_factory = functools.partial(nn.BatchNorm2d, eps=1e-3)  # as torchvision's norm_layer arguments
    return model


PICKLED_CASES = {
    "torchvision-resnet18": torchvision.models.resnet18,
    "torchvision-mobilenet_v3_small": torchvision.models.mobilenet_v3_small,  # uses torchvision.ops classes
    "sample-resnet8": resnet8,
    "nn-sequential": lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)),
    "nn-sequential-with-partial": _sequential_with_partial,
}


@pytest.mark.parametrize("build", list(PICKLED_CASES.values()), ids=list(PICKLED_CASES))
def test_pickled_known_module_loads_without_trust(build: Callable[[], nn.Module], tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build().eval()
    path = tmp_path / "model.pt"
    torch.save(source, path)
    model, spec = load_model(path)
    assert type(model) is type(source) and not model.training
    assert _same_weights(model, source)
    assert spec.arch is None and spec.pickled == path.read_bytes() and spec.source == str(path)
    rebuilt = build_base(spec)
    assert type(rebuilt) is type(source) and not rebuilt.training
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_pickled_module_wrapped_in_dict_loads(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"model": resnet8(), "epoch": 7}, path)
    model, _ = load_model(path)
    assert type(model).__name__ == "CifarResNet"


def test_pickled_module_with_arch_uses_its_weights(tmp_path: Path) -> None:
    source = resnet8()
    path = tmp_path / "model.pt"
    torch.save(source, path)
    model, spec = load_model(path, arch="sample_models.resnet_cifar:resnet8")
    assert _same_weights(model, source) and spec.pickled is None


# --------------------------------------------------------------------------- untrusted pickles
HELPER_SOURCE = textwrap.dedent(
    """
    import os
    from pathlib import Path

    import torch
    from torch import nn

    MARKERS = Path(__file__).parent
    (MARKERS / "imported.marker").touch()


    def touch(name):
        (MARKERS / name).touch()
        return name


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x)

        def __setstate__(self, state):
            touch("setstate.marker")
            super().__setstate__(state)


    class Payload:
        def __reduce__(self):
            return (touch, ("reduce.marker",))


    def make_net():
        return Net()
    """
)


@dataclass
class Helper:
    """A model module that is not a known library; importing it or unpickling its classes leaves markers."""

    name: str
    folder: Path
    module: ModuleType

    def markers(self) -> set[str]:
        return {path.name for path in self.folder.glob("*.marker")}

    def forget(self) -> None:
        """Undo the import done to write the pickles, so that a later import would show."""
        sys.modules.pop(self.name, None)
        for marker in self.folder.glob("*.marker"):
            marker.unlink()


@pytest.fixture
def helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Helper:
    folder = tmp_path / "helpers"
    folder.mkdir()
    name = f"vc_untrusted_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text(HELPER_SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    module = __import__(name)
    yield Helper(name, folder, module)
    sys.modules.pop(name, None)


def test_unknown_class_is_refused_without_running_code(helper: Helper, tmp_path: Path) -> None:
    path = tmp_path / "net.pt"
    torch.save(helper.module.Net(), path)
    helper.forget()
    with pytest.raises(UntrustedCodeError) as caught:
        load_model(path)
    message = str(caught.value)
    _assert_one_sentence(caught.value)
    assert f"{helper.name}.Net" in message and "`trust=True`" in message and "`arch`" in message
    assert "run code" in message
    assert helper.markers() == set() and helper.name not in sys.modules

    model, spec = load_model(path, trust=True)  # the same file, trusted: the module is imported and runs
    assert type(model).__name__ == "Net" and not model.training
    assert helper.markers() == {"imported.marker", "setstate.marker"}
    assert spec.pickled == path.read_bytes()


def test_unknown_class_is_refused_with_arch_too(helper: Helper, tmp_path: Path) -> None:
    path = tmp_path / "net.pt"
    torch.save(helper.module.Net(), path)
    helper.forget()
    with pytest.raises(UntrustedCodeError):
        load_model(path, arch="sample_models.resnet_cifar:resnet8")
    assert helper.markers() == set()


@pytest.mark.parametrize("payload", ["helper-function", "os.system"])
def test_reduce_payload_is_refused_and_does_not_run(payload: str, helper: Helper, tmp_path: Path) -> None:
    marker = helper.folder / "reduce.marker"
    path = tmp_path / "payload.pt"
    if payload == "helper-function":
        torch.save(helper.module.Payload(), path)
    else:

        class SystemPayload:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        torch.save(SystemPayload(), path)
    helper.forget()
    with pytest.raises(UntrustedCodeError) as caught:
        load_model(path)
    _assert_one_sentence(caught.value)
    assert ("touch" if payload == "helper-function" else "system") in str(caught.value)
    assert helper.markers() == set()


def test_pickled_base_in_spec_obeys_the_same_policy(helper: Helper, tmp_path: Path) -> None:
    path = tmp_path / "net.pt"
    torch.save(helper.module.Net(), path)
    helper.forget()
    spec = BaseSpec(arch=None, arch_kwargs={}, pickled=path.read_bytes(), source=str(path))
    with pytest.raises(UntrustedCodeError):
        build_base(spec)
    assert helper.markers() == set()
    assert type(build_base(spec, trust=True)).__name__ == "Net"


# --------------------------------------------------------------------------- arch strings read from a file
def test_file_arch_from_unknown_module_is_not_imported(helper: Helper) -> None:
    helper.forget()
    spec = BaseSpec(arch=f"{helper.name}:make_net", arch_kwargs={}, pickled=None, source="x.vc.pt")
    with pytest.raises(UntrustedCodeError):
        build_base(spec)
    assert helper.markers() == set() and helper.name not in sys.modules
    assert type(build_base(spec, trust=True)).__name__ == "Net"
    assert "imported.marker" in helper.markers()


REGISTERED_FILE_ARCHS = {
    "torchvision-package": ("torchvision.models:resnet18", {"num_classes": 3}),
    "torchvision-submodule": ("torchvision.models.resnet:resnet18", {}),
    "torchvision-dotted": ("torchvision.models.resnet18", {}),
    "torchvision-quantization": ("torchvision.models.quantization:resnet18", {}),
    "torchvision-get_model": ("torchvision.models:get_model", {"name": "resnet18", "num_classes": 3}),
    "timm-submodule": ("timm.models.resnet:resnet18", {"num_classes": 3}),
    "timm-create_model": ("timm:create_model", {"model_name": "resnet18", "num_classes": 3}),
    "sample-resnet8": ("sample_models.resnet_cifar:resnet8", {"num_classes": 4, "in_channels": 1}),
    "sample-vgg": ("sample_models.vgg_small:vgg_small", {}),
}


@pytest.mark.parametrize("arch, kwargs", REGISTERED_FILE_ARCHS.values(), ids=REGISTERED_FILE_ARCHS.keys())
def test_file_arch_registered_builder_builds(arch: str, kwargs: dict) -> None:
    model = build_base(BaseSpec(arch=arch, arch_kwargs=kwargs, pickled=None, source="x.vc.pt"))
    assert isinstance(model, nn.Module) and not model.training


# Every package prefix a file might name: loaders, downloaders, file readers and non-builders inside the
# model libraries are refused exactly like code outside them.
UNREGISTERED_FILE_ARCHS = {
    "timm-load_state_dict": ("timm.models:load_state_dict", {"checkpoint_path": "payload.pt", "weights_only": False}),
    "timm-load_checkpoint": ("timm.models:load_checkpoint", {"model": 1, "checkpoint_path": "payload.pt"}),
    "timm-hub-download": ("timm.models:load_model_config_from_hf", {"model_id": "x"}),
    "timm-layer-class": ("timm.layers:Mlp", {"in_features": 4}),
    "torchvision-load_state_dict_from_url": ("torchvision.models.resnet:load_state_dict_from_url", {"url": "x"}),
    "torchvision-weights-enum": ("torchvision.models:ResNet18_Weights", {}),
    "torchvision-class": ("torchvision.models:ResNet", {}),
    "torchvision-private": ("torchvision.models:_api", {}),
    "torchvision-attribute-chain": ("torchvision.models.resnet:torch.hub.load", {}),
    "torchvision-get_model-unregistered": ("torchvision.models:get_model", {"name": "list_models"}),
    "torchvision-datasets": ("torchvision.datasets:ImageFolder", {"root": "."}),
    "torchvision-io": ("torchvision.io:read_file", {"path": "payload.pt"}),
    "torch-nn-class": ("torch.nn:Conv2d", {"in_channels": 1, "out_channels": 1, "kernel_size": 1}),
    "torch-nn-functional": ("torch.nn:functional", {}),
    "torch-load": ("torch:load", {"f": "payload.pt", "weights_only": False}),
    "torch-hub": ("torch.hub:load", {"repo_or_dir": "x", "model": "y"}),
    "sample-train": ("sample_models.train:main", {}),
    "sample-class": ("sample_models.resnet_cifar:CifarResNet", {}),
    "os-system": ("os:system", {}),
    "builtins-eval": ("builtins:eval", {}),
    "subprocess-run": ("subprocess:run", {}),
    "pickle-loads": ("pickle:loads", {}),
}


@pytest.mark.parametrize("arch, kwargs", UNREGISTERED_FILE_ARCHS.values(), ids=UNREGISTERED_FILE_ARCHS.keys())
def test_file_arch_not_a_registered_builder_is_refused(arch: str, kwargs: dict, tmp_path: Path) -> None:
    marker = tmp_path / "ran.marker"
    spec = BaseSpec(arch=arch, arch_kwargs={**kwargs, "command": f"touch {marker}"}, pickled=None, source="evil.vc.pt")
    with pytest.raises(UntrustedCodeError) as caught:
        build_base(spec)
    _assert_one_sentence(caught.value)
    assert "`trust=True`" in str(caught.value) and "evil.vc.pt" in str(caught.value)
    assert not marker.exists()


REFUSED_FILE_KWARGS = {
    "weights": {"weights": "DEFAULT"},
    "weights-none": {"weights": None},
    "weights_backbone": {"weights_backbone": "x"},
    "pretrained": {"pretrained": True},
    "pretrained_cfg": {"pretrained_cfg": {"hf_hub_id": "x"}},
    "pretrained_cfg_overlay": {"pretrained_cfg_overlay": {"file": "x"}},
    "checkpoint_path": {"checkpoint_path": "payload.pt"},
    "cache_dir": {"cache_dir": "cache"},
    "path-value": {"num_classes": 10, "block_args": "../payload.pt"},
    "url-value": {"norm": "https://example.com/x"},
    "home-value": {"norm": "~/x"},
    "nested-path": {"options": {"inner": ["ok", "/etc/passwd"]}},
    "existing-file-name": {"norm": "pyproject.toml"},
    "not-json": {"num_classes": b"10"},
}


@pytest.mark.parametrize("kwargs", REFUSED_FILE_KWARGS.values(), ids=REFUSED_FILE_KWARGS.keys())
@pytest.mark.parametrize("arch", ["torchvision.models:resnet18", "timm:create_model"], ids=["torchvision", "timm"])
def test_file_arch_kwargs_that_read_files_are_refused(arch: str, kwargs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # where pyproject.toml exists
    if arch == "timm:create_model":
        kwargs = {"model_name": "resnet18", **kwargs}
    spec = BaseSpec(arch=arch, arch_kwargs=kwargs, pickled=None, source="evil.vc.pt")
    with pytest.raises(UntrustedCodeError) as caught:
        build_base(spec)
    _assert_one_sentence(caught.value)
    assert "`trust=True`" in str(caught.value)


def test_file_arch_with_trust_calls_anything(tmp_path: Path) -> None:
    spec = BaseSpec(arch="torch.nn:Conv2d", arch_kwargs={"in_channels": 1, "out_channels": 2, "kernel_size": 1})
    assert isinstance(build_base(spec, trust=True), nn.Conv2d)


def test_shadowing_sample_models_folder_is_not_trusted(tmp_path: Path) -> None:
    """A folder called sample_models on sys.path (here: the working directory under ``python -m``)
    is not the shipped samples: neither its builders nor its pickled classes load without --trust."""
    marker = tmp_path / "imported.marker"
    fake = tmp_path / "sample_models"
    fake.mkdir()
    touch = f"open({str(marker)!r}, 'w').close()\n"
    (fake / "__init__.py").write_text(touch + "MODEL_BUILDERS = ('resnet_cifar:resnet8',)\n")
    (fake / "resnet_cifar.py").write_text(touch + "def resnet8(): pass\n")
    torch.save(resnet8(), tmp_path / "pickled.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from vconvert.errors import UntrustedCodeError
        from vconvert.io.untrusted import BaseSpec, build_base
        try:
            build_base(BaseSpec(arch="sample_models.resnet_cifar:resnet8", source="x.vc.pt"))
        except UntrustedCodeError as error:
            print("refused:", error)
        pickled = open({str(tmp_path / "pickled.pt")!r}, "rb").read()
        try:
            build_base(BaseSpec(arch=None, pickled=pickled, source="x.vc.pt"))
        except UntrustedCodeError as error:
            print("pickle refused:", error)
        """
    )
    import subprocess

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout and "pickle refused:" in result.stdout, result.stdout
    assert "sample_models.resnet_cifar.CifarResNet" in result.stdout
    assert not marker.exists()


def test_typed_arch_is_always_allowed() -> None:
    assert resolve_arch("os:system", trust=False, typed_by_user=True) is os.system


# --------------------------------------------------------------------------- bad inputs
def _torchscript(path: Path) -> None:
    with pytest.warns(Warning):
        torch.jit.save(torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3))), path)


def _write(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def _truncated(path: Path) -> None:
    torch.save(resnet8().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_zip(path: Path) -> None:
    torch.save(resnet8().state_dict(), path)
    data = bytearray(path.read_bytes())
    data[-200:] = os.urandom(200)  # the zip central directory
    path.write_bytes(bytes(data))


@dataclass(frozen=True)
class BadCase:
    id: str
    make: Callable[[Path], None] | None  # writes the file; None: the path does not exist
    arch: str | None = None
    arch_kwargs: dict | None = None
    says: str = ""  # a word the message must contain


BAD_CASES = [
    BadCase("missing-file", None, says="does not exist"),
    BadCase("directory", lambda path: path.mkdir(), says="directory"),
    BadCase("empty-file", _write(b""), says="empty"),
    BadCase("truncated", _truncated, arch="sample_models.resnet_cifar:resnet8", says="truncated"),
    BadCase("corrupt-zip", _corrupt_zip, says="corrupt"),
    BadCase("text-file", _write(b"hello, not a model\n"), says="not a PyTorch file"),
    BadCase("plain-pickle", _write(pickle.dumps({"weights": [1, 2, 3]})), says="not a PyTorch file"),
    BadCase("torchscript", _torchscript, says="TorchScript"),
    BadCase("tensor-not-module", lambda path: torch.save(torch.zeros(3), path), says="not a PyTorch model"),
    BadCase("list-not-module", lambda path: torch.save([1, 2], path), says="not a PyTorch model"),
    BadCase("state-dict-without-arch", lambda path: torch.save(resnet8().state_dict(), path), says="`arch`"),
    BadCase(
        "tensor-with-arch",
        lambda path: torch.save(torch.zeros(3), path),
        arch="sample_models.resnet_cifar:resnet8",
        says="not a state_dict",
    ),
    BadCase(
        "arch-does-not-import",
        lambda path: torch.save(resnet8().state_dict(), path),
        arch="no_such_package.models:net",
        says="does not import",
    ),
    BadCase(
        "arch-missing-attribute",
        lambda path: torch.save(resnet8().state_dict(), path),
        arch="sample_models.resnet_cifar:resnet9",
        says="no attribute",
    ),
    BadCase(
        "arch-not-callable",
        lambda path: torch.save(resnet8().state_dict(), path),
        arch="sample_models.resnet_cifar:annotations",
        says="not a function",
    ),
    BadCase("arch-malformed", lambda path: torch.save({}, path), arch="resnet8", says="package.module:function"),
    BadCase(
        "arch-bad-kwargs",
        lambda path: torch.save(resnet8().state_dict(), path),
        arch="sample_models.resnet_cifar:resnet8",
        arch_kwargs={"depth": 3},
        says="depth",
    ),
    BadCase(
        "arch-returns-non-module",
        lambda path: torch.save({}, path),
        arch="torch:zeros",
        arch_kwargs={"size": [2]},
        says="not an nn.Module",
    ),
    BadCase(
        "state-dict-wrong-num-classes",
        lambda path: torch.save(resnet8(num_classes=10).state_dict(), path),
        arch="sample_models.resnet_cifar:resnet8",
        arch_kwargs={"num_classes": 100},
        says="fc.weight (10, 64) vs (100, 64)",
    ),
    BadCase(
        "state-dict-other-arch",
        lambda path: torch.save(resnet8().state_dict(), path),
        arch="sample_models.resnet_cifar:resnet20",
        says="missing: layer1.1.conv1.weight",
    ),
    BadCase(
        "state-dict-extra-keys",
        lambda path: torch.save({**resnet8().state_dict(), "head.weight": torch.zeros(2)}, path),
        arch="sample_models.resnet_cifar:resnet8",
        says="unexpected: head.weight",
    ),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=[case.id for case in BAD_CASES])
def test_bad_input_is_one_clear_sentence(case: BadCase, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    if case.make is not None:
        case.make(path)
    with pytest.raises(BadInputError) as caught:
        load_model(path, arch=case.arch, arch_kwargs=case.arch_kwargs)
    assert type(caught.value) is BadInputError  # not UntrustedCodeError: these are plain bad inputs
    _assert_one_sentence(caught.value)
    assert case.says in str(caught.value)


def test_legacy_format_state_dict_loads_and_pickled_module_needs_trust(tmp_path: Path) -> None:
    sd_path, module_path = tmp_path / "sd.pt", tmp_path / "module.pt"
    source = resnet8()
    torch.save(source.state_dict(), sd_path, _use_new_zipfile_serialization=False)
    torch.save(source, module_path, _use_new_zipfile_serialization=False)
    model, _ = load_model(sd_path, arch="sample_models.resnet_cifar:resnet8")
    assert _same_weights(model, source)
    with pytest.raises(UntrustedCodeError):
        load_model(module_path)
    assert _same_weights(load_model(module_path, trust=True)[0], source)


# --------------------------------------------------------------------------- atomic writes
def _unpicklable() -> object:
    return {"fine": torch.zeros(2), "bad": lambda: None}


def test_failed_save_leaves_existing_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.vc.pt"
    target.write_bytes(b"previous contents")
    with pytest.raises(Exception) as caught:
        atomic_save(_unpicklable(), target)
    assert not isinstance(caught.value, BadInputError)  # a programming error stays visible
    assert target.read_bytes() == b"previous contents"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.vc.pt"]


def test_failed_fsync_is_bad_input_and_leaves_existing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous contents")

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(BadInputError) as caught:
        atomic_write_bytes(b"new contents", target)
    _assert_one_sentence(caught.value)
    assert target.read_bytes() == b"previous contents"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx"]


def test_atomic_writes_replace_the_target(tmp_path: Path) -> None:
    target = tmp_path / "out.pt"
    target.write_bytes(b"old")
    atomic_save({"x": torch.arange(3)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.arange(3))
    atomic_write_bytes(b"new", target)
    assert target.read_bytes() == b"new"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.pt"]


@pytest.mark.parametrize("where", ["missing-folder", "directory", "unwritable-folder", "parent-is-a-file"])
def test_unwritable_output_is_bad_input(where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = {
        "missing-folder": tmp_path / "no" / "such" / "out.pt",
        "directory": tmp_path,
        "unwritable-folder": tmp_path / "out.pt",
        "parent-is-a-file": tmp_path / "file.txt" / "out.pt",
    }[where]
    (tmp_path / "file.txt").write_text("x")
    if where == "unwritable-folder":  # chmod alone does not stop root, so ask the way the code asks
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    for attempt in (check_writable, lambda path: atomic_save({"a": 1}, path)):
        with pytest.raises(BadInputError) as caught:
            attempt(target)
        _assert_one_sentence(caught.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file.txt"]


# --------------------------------------------------------------------------- checkpoint format
def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = resnet8()
    spec = BaseSpec(arch="sample_models.resnet_cifar:resnet8", arch_kwargs={"num_classes": 10}, source="r8.pt")
    payload = {
        "base": spec.to_dict(),
        "plan": {"layers": [{"name": "layer1.0.conv1", "mode": "learned", "secondary": 2}], "ratio": 0.5},
        "state_dict": model.state_dict(),
        "meta": {"dtype": torch.float32, "blob": b"\x00\x01", "none": None},
    }
    path = tmp_path / "r8.vc.pt"
    write_checkpoint(path, payload)
    data = read_checkpoint(path)
    assert data["format"] == CHECKPOINT_FORMAT
    assert set(data["versions"]) == {"vconvert", "torch", "torchvision"}
    assert data["versions"]["torch"] == torch.__version__
    assert data["plan"] == payload["plan"] and data["meta"] == payload["meta"]
    assert BaseSpec.from_dict(data["base"]) == spec
    rebuilt = build_base(BaseSpec.from_dict(data["base"]))
    rebuilt.load_state_dict(data["state_dict"], strict=True)
    assert _same_weights(rebuilt, model)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["r8.vc.pt"]


def test_checkpoint_with_pickled_base_round_trips(tmp_path: Path) -> None:
    source_path = tmp_path / "model.pt"
    torch.save(resnet8(), source_path)
    model, spec = load_model(source_path)
    path = tmp_path / "model.vc.pt"
    write_checkpoint(path, {"base": spec.to_dict(), "state_dict": model.state_dict()})
    data = read_checkpoint(path)
    assert data["base"]["pickled"] == source_path.read_bytes()
    rebuilt = build_base(BaseSpec.from_dict(data["base"]))
    rebuilt.load_state_dict(data["state_dict"], strict=True)
    assert _same_weights(rebuilt, model)


def test_write_checkpoint_refuses_live_objects(tmp_path: Path) -> None:
    path = tmp_path / "bad.vc.pt"
    with pytest.raises(TypeError, match="model"):
        write_checkpoint(path, {"model": resnet8()})
    assert not path.exists()


BAD_CHECKPOINTS: dict[str, tuple[Callable[[Path], None] | None, str]] = {
    "missing": (None, "does not exist"),
    "empty": (_write(b""), "empty"),
    "truncated": (_truncated, "truncated"),
    "text-file": (_write(b"not a checkpoint"), "not a PyTorch file"),
    "plain-state-dict": (lambda path: torch.save(resnet8().state_dict(), path), "not a vconvert checkpoint"),
    "pickled-module": (lambda path: torch.save(resnet8(), path), "not a vconvert checkpoint"),
    "other-format": (lambda path: torch.save({"format": "something/1"}, path), "not a vconvert checkpoint"),
    "future-version": (lambda path: torch.save({"format": "vconvert.checkpoint/99"}, path), "vconvert.checkpoint/99"),
}


@pytest.mark.parametrize("make, says", list(BAD_CHECKPOINTS.values()), ids=list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_one_clear_sentence(make: Callable[[Path], None] | None, says: str, tmp_path: Path) -> None:
    path = tmp_path / "x.vc.pt"
    if make is not None:
        make(path)
    with pytest.raises(BadInputError) as caught:
        read_checkpoint(path)
    _assert_one_sentence(caught.value)
    assert says in str(caught.value)


@pytest.mark.parametrize(
    "data",
    [
        {"arch": None, "pickled": None},
        {"arch": "a:b", "pickled": b"x"},
        {"arch": 3},
        {"arch": "a:b", "arch_kwargs": []},
        "not a mapping",
    ],
    ids=["neither", "both", "arch-not-str", "kwargs-not-dict", "not-a-mapping"],
)
def test_malformed_base_spec_is_bad_input(data: object) -> None:
    with pytest.raises(BadInputError):
        BaseSpec.from_dict(data)


def test_readme_states_the_file_arch_rule_as_the_code_applies_it() -> None:
    from vconvert.io.architectures import FILE_ARCH_REFUSED_KWARGS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rule = readme[readme.index("registered\n  model builder") :]
    for key in FILE_ARCH_REFUSED_KWARGS:
        assert f"`{key}`" in rule, key
    for builder in ("list_models()", "get_model", "create_model", "MODEL_BUILDERS", "--trust"):
        assert builder in rule, builder


@pytest.mark.parametrize("quantizer", ["lsq", "minmax"])
def test_quantized_checkpoint_records_its_width_and_loads_the_same_network(quantizer: str, tmp_path: Path) -> None:
    from conftest import converted_checkpoint

    from vconvert import load_checkpoint, save
    from vconvert.nn.versatile import set_weight_bits_, versatile_layers

    source = load_checkpoint(converted_checkpoint(tmp_path / "float.vc.pt"))
    set_weight_bits_(source.model, 4, quantizer)
    if quantizer == "lsq":  # learned steps that differ from min-max: loading must keep them, not re-derive them
        for _, layer in versatile_layers(source.model):
            layer.primary_step.data.mul_(0.8)
    path = tmp_path / "w4.vc.pt"
    save(path, source.model, source.plan, source.base, source.teacher, source.metadata)
    loaded = load_checkpoint(path)
    assert loaded.metadata.weight_quantization == {"bits": 4, "quantizer": quantizer}
    x = torch.randn(3, 1, 32, 32)
    assert torch.equal(loaded.model(x), source.model.eval()(x))
    for (_, mine), (_, theirs) in zip(versatile_layers(loaded.model), versatile_layers(source.model), strict=True):
        assert mine.weight_bits == 4 and torch.equal(mine.primary_integers()[0], theirs.primary_integers()[0])
