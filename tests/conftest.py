"""Shared test helpers."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import socket_guard
from torch import nn

from vconvert.io.metadata import CheckpointMetadata

socket_guard.install()  # no stage may reach another machine (issue 27); loopback (torchrun, gloo) still works


@pytest.fixture(autouse=True)
def no_network() -> Iterator[None]:
    """Fail the test if anything tried to reach a non-loopback address, even if the code swallowed the
    SocketGuardError it got (subprocesses: ``socket_guard.child_environment``)."""
    socket_guard.take_attempts()
    yield
    attempts = socket_guard.take_attempts()
    assert not attempts, "the test tried to reach the network:\n" + "\n".join(attempts)


def error_message(result) -> str:
    """The one-sentence error of a refused command: the last line of its stderr and the only one starting
    with "error:" (the stage's info lines about its input may come before it)."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


def write_user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, forward: str) -> type:
    """A user package ``name`` (not an allowlisted model library) holding TinyNet, whose forward body
    is ``forward``; returns the class. Give each test its own name: Python caches imported modules."""
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class TinyNet(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a = nn.Conv2d(3, 8, 3, padding=1)\n"
        "        self.b = nn.Conv2d(8, 16, 3, padding=1)\n"
        "    def forward(self, x):\n"
        f"        {forward}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module(f"{name}.nets").TinyNet


def finetune_cut(source: Path, output: Path, config) -> None:
    """Fine-tune ``source`` into ``output`` with ``config``, stopped by an exception after the first
    epoch's checkpoint (which holds the state to resume from)."""
    from vconvert.train.finetune import finetune

    class Stop(Exception):
        pass

    def stop_after_first_epoch(metrics) -> None:
        raise Stop

    with pytest.raises(Stop):
        finetune(source, output, config, on_epoch=stop_after_first_epoch)


def finetune_cut_and_resumed(source: Path, output: Path, config) -> None:
    """:func:`finetune_cut`, then the run finished with ``resume=True``."""
    from vconvert.train.finetune import finetune

    finetune_cut(source, output, config)
    finetune(source, output, config, resume=True)


def invoke(*args):
    """Run the vconvert CLI in-process with string arguments."""
    from typer.testing import CliRunner

    from vconvert.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


RESNET8_ARCH = "sample_models.resnet_cifar:resnet8"


QUICK = {
    "data": "digits",
    "epochs": 2,
    "batch_size": 64,
    "train_limit": 256,
    "eval_limit": 96,
    "workers": 0,
    "recalibrate_images": 128,
}


def converted_checkpoint(path: Path, in_channels: int = 1, num_classes: int = 10) -> Path:
    """resnet8 (random weights) compressed with the defaults and saved as a .vc.pt at ``path``."""
    import torch

    from sample_models.resnet_cifar import resnet8
    from vconvert import compress, save
    from vconvert.io.untrusted import BaseSpec

    torch.manual_seed(0)
    teacher = resnet8(num_classes=num_classes, in_channels=in_channels).eval()
    model, plan = compress(teacher, torch.randn(2, in_channels, 32, 32))
    base = BaseSpec(
        arch="sample_models.resnet_cifar:resnet8",
        arch_kwargs={"in_channels": in_channels, "num_classes": num_classes},
        pickled=None,
        source="test",
    )
    save(path, model, plan, base, teacher, CheckpointMetadata(input_shape=[1, in_channels, 32, 32]))
    return path


def assert_one_sentence_error(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, result.output + result.stderr
    message = error_message(result)
    assert message.startswith("error:") and "Traceback" not in result.output + result.stderr
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def compress_resnet8(folder: Path, *options: str) -> Path:
    """resnet8 (random weights) saved and compressed by the CLI at 2x3x32x32, naive init."""
    import torch

    from sample_models.resnet_cifar import resnet8

    torch.manual_seed(0)
    weights = folder / "resnet8.pt"
    torch.save(resnet8().state_dict(), weights)
    output = folder / "resnet8.vc.pt"
    result = invoke(
        "compress",
        weights,
        "--arch",
        RESNET8_ARCH,
        "--input-shape",
        "2,3,32,32",
        "-o",
        output,
        "--init",
        "naive",
        *options,
    )
    assert result.exit_code == 0, result.output + result.stderr
    return output


def noise_image_folder(root: Path, size: tuple[int, int] = (32, 32)) -> Path:
    """``root`` with train/ and val/, each two classes (a, b) of three random RGB images of ``size`` (W, H)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(3):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def perturb_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with random BatchNorm statistics and biases (global RNG), so folded biases are not zero, as in a
    trained network."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.bias.data.normal_(0, 0.1)
    return model


DIGITS_WEIGHTS = Path(__file__).resolve().parents[1] / "sample_models" / "weights" / "resnet20_digits.pt"
DIGITS_MEAN, DIGITS_STD = 0.3049, 0.3234  # the shipped digits model's input normalisation


@pytest.fixture(scope="module")
def digits_model():
    """(the shipped digits ResNet-20, its data-free s=2 conversion, 128 normalised training digits in 2 batches,
    128 held-out digits in 2 batches)."""
    import torch

    from sample_models.resnet_cifar import resnet20
    from vconvert.convert.compress import compress
    from vconvert.data.digits import digits_tensors

    torch.manual_seed(0)
    teacher = resnet20(num_classes=10, in_channels=1)
    teacher.load_state_dict(torch.load(DIGITS_WEIGHTS, weights_only=True))
    images, _ = digits_tensors("train")
    held_out, _ = digits_tensors("test")
    images, held_out = (images - DIGITS_MEAN) / DIGITS_STD, (held_out - DIGITS_MEAN) / DIGITS_STD
    student, _ = compress(teacher.eval(), images[:1])
    return teacher.eval(), student, list(images[:128].split(64)), list(held_out[:128].split(64))
