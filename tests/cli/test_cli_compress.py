"""`vconvert compress` and `vconvert inspect` end to end, including every bad input they handle."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import error_message, write_user_package
from typer.testing import CliRunner

import vconvert
from sample_models.resnet_cifar import resnet8
from vconvert.cli.app import app
from vconvert.io.checkpoint import load_checkpoint

ARCH = "sample_models.resnet_cifar:resnet8"
SHAPE = "2,3,32,32"


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def state_dict_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "resnet8.pt"
    torch.save(resnet8().state_dict(), path)
    return path


@pytest.fixture
def pickled_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "resnet8_module.pt"
    torch.save(resnet8().eval(), path)
    return path


def assert_one_sentence_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    message = error_message(result)
    assert message.startswith("error:") and "Traceback" not in result.output + result.stderr
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_compress_state_dict_with_arch_writes_a_checkpoint_that_reloads(state_dict_file: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.vc.pt"
    result = invoke("compress", state_dict_file, "--arch", ARCH, "--input-shape", SHAPE, "-o", output)
    assert result.exit_code == 0, result.output + result.stderr
    assert "converted 8 of 9 convs" in " ".join(result.output.split()) and output.exists()

    checkpoint = load_checkpoint(output)
    original = resnet8()
    original.load_state_dict(torch.load(state_dict_file, weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(checkpoint.teacher(x), original.eval()(x))
        assert torch.equal(vconvert.load(output)(x), checkpoint.model(x))
    assert torch.load(output, weights_only=True)["plan"]["layers"][0]["name"] == "conv1"


def test_compress_pickled_module_without_arch(pickled_file: Path, tmp_path: Path) -> None:
    result = invoke("compress", pickled_file, "--input-shape", SHAPE, "--mode", "spatial", "--json")
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.stdout)
    assert report["output"].endswith("resnet8_module.vc.pt") and Path(report["output"]).exists()
    assert {layer["options"]["mode"] for layer in report["plan"]["layers"] if layer["options"]} == {"spatial"}


def test_compress_init_fit_plain_trades_accuracy_prior_for_weight_error(state_dict_file: Path, tmp_path: Path) -> None:
    errors = {}
    for init in ("fit", "fit-plain"):
        output = tmp_path / f"{init}.vc.pt"
        result = invoke("compress", state_dict_file, "--arch", ARCH, "--input-shape", SHAPE, "--init", init,
                        "-o", output, "--json")  # fmt: skip
        assert result.exit_code == 0, result.output + result.stderr
        layers = [layer for layer in json.loads(result.stdout)["plan"]["layers"] if layer.get("fit_error") is not None]
        errors[init] = sum(layer["fit_error"] for layer in layers) / len(layers)
    assert errors["fit-plain"] < errors["fit"], errors


def test_inspect_checkpoint_and_plain_model(state_dict_file: Path, tmp_path: Path) -> None:
    output = tmp_path / "m.vc.pt"
    assert invoke("compress", state_dict_file, "--arch", ARCH, "--input-shape", SHAPE, "-o", output).exit_code == 0
    table = invoke("inspect", output)
    assert table.exit_code == 0 and "versatile checkpoint" in table.output and "converted" in table.output
    report = json.loads(invoke("inspect", output, "--json").output)
    densities = [layer["mask_density"] for layer in report["plan"]["layers"] if layer["decision"] == "converted"]
    assert densities and all(0.0 < d <= 1.0 for d in densities)

    plain = invoke("inspect", state_dict_file, "--arch", ARCH, "--input-shape", SHAPE, "--json")
    assert plain.exit_code == 0, plain.output + plain.stderr
    decisions = [layer["decision"] for layer in json.loads(plain.stdout)["plan"]["layers"]]
    assert decisions[0].startswith("skipped: stem") and decisions.count("converted") == 8


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("missing-file", ["does not exist"]),
        ("empty-file", ["empty"]),
        ("truncated-file", []),
        ("not-a-model", []),
        ("bad-arch", ["no_such_package"]),
        ("mismatched-state-dict", []),
        ("missing-output-folder", ["folder"]),
        ("rejected-input-shape", ["--input-shape"]),
        ("bad-input-shape-text", ["--input-shape"]),
        ("one-pixel-input-shape", ["--input-shape", "height and width"]),
        ("huge-input-shape", ["--input-shape", "4096"]),
        ("bad-arch-kwargs", ["--arch-kwargs"]),
        ("skip-matches-nothing", ["--skip"]),
        ("overwrite-input", ["overwrite"]),
        ("bad-init", ["--init"]),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_compress_bad_input(case: str, fragments: list[str], state_dict_file: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.vc.pt"
    args: list = [state_dict_file, "--arch", ARCH, "--input-shape", SHAPE, "-o", output]
    if case == "missing-file":
        args[0] = tmp_path / "nope.pt"
    elif case == "empty-file":
        args[0] = _write(tmp_path / "empty.pt", b"")
    elif case == "truncated-file":
        args[0] = _write(tmp_path / "cut.pt", state_dict_file.read_bytes()[:3000])
    elif case == "not-a-model":
        args[0] = _write(tmp_path / "notes.pt", b"these are not weights\n" * 20)
    elif case == "bad-arch":
        args[2] = "no_such_package.models:net"
    elif case == "mismatched-state-dict":
        args[2] = "sample_models.resnet_cifar:resnet20"
    elif case == "missing-output-folder":
        args[-1] = output = tmp_path / "no" / "such" / "dir" / "out.vc.pt"
    elif case == "rejected-input-shape":
        args[4] = "1,1,32,32"
    elif case == "bad-input-shape-text":
        args[4] = "1x3x32x32"
    elif case == "one-pixel-input-shape":
        args[4] = "1,3,1,1"
    elif case == "huge-input-shape":
        args[4] = "1,3,100000,100000"
    elif case == "bad-arch-kwargs":
        args += ["--arch-kwargs", "{num_classes: 10}"]
    elif case == "bad-init":
        args += ["--init", "random"]
    elif case == "skip-matches-nothing":
        args += ["--skip", "no_such_layer"]
    elif case == "overwrite-input":
        args[-1] = state_dict_file
    before = state_dict_file.read_bytes()
    result = invoke("compress", *args)
    assert_one_sentence_error(result, *fragments)
    if case != "overwrite-input":
        assert not output.exists(), "nothing may be written on bad input"
    assert state_dict_file.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name], "no temporary files left behind"


def test_pickled_module_of_unknown_class_needs_trust(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_net = write_user_package(tmp_path, monkeypatch, "userpkg", "return self.b(self.a(x))")

    model_file = tmp_path / "tiny.pt"
    torch.save(tiny_net(), model_file)
    output = tmp_path / "tiny.vc.pt"
    refused = invoke("compress", model_file, "--input-shape", "1,3,8,8", "-o", output)
    assert_one_sentence_error(refused, "userpkg.nets.TinyNet", "--trust", "--arch")
    assert not output.exists()

    trusted = invoke("compress", model_file, "--input-shape", "1,3,8,8", "-o", output, "--trust")
    assert trusted.exit_code == 0, trusted.output + trusted.stderr
    # the checkpoint keeps the pickled base: reloading it needs the same trust
    reload_refused = invoke("inspect", output)
    assert_one_sentence_error(reload_refused, "--trust")
    assert invoke("inspect", output, "--trust").exit_code == 0


def test_user_module_in_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--arch mynet:tinynet` typed in the folder that holds mynet.py works like `python -m`; a later stage
    reads that arch back from the .vc.pt, so it asks for --trust and names that file (not the weights)."""
    (tmp_path / "cwd_mynet.py").write_text(
        "from torch import nn\n"
        "def tinynet(width=8):\n"
        "    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 16, 3, padding=1))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", str(tmp_path))])
    from torch import nn

    weights = tmp_path / "tinynet_sd.pt"
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1)).state_dict(),
               weights)  # fmt: skip
    output = tmp_path / "tiny.vc.pt"
    result = invoke("compress", weights, "--arch", "cwd_mynet:tinynet", "--input-shape", "1,3,8,8",
                    "--convert-first", "--min-params", "0", "-o", output)  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    assert str(tmp_path) not in sys.path, "the working directory is looked at for the import only"

    refused = invoke("inspect", output)
    assert_one_sentence_error(refused, "cwd_mynet:tinynet", str(output), "--trust")
    assert "tinynet_sd.pt" not in refused.stderr
    assert invoke("inspect", output, "--trust").exit_code == 0


@pytest.mark.parametrize("columns", [80, 120])
def test_inspect_table_fits_ordinary_terminals(state_dict_file: Path, columns: int, monkeypatch) -> None:
    """Every layer name, shape and number is printed whole (no '…') at 80 and 120 columns, and the caption
    defines the columns."""
    monkeypatch.setenv("COLUMNS", str(columns))
    from vconvert.cli import common as cli_common

    monkeypatch.setattr(cli_common.console, "_width", columns)
    result = invoke("inspect", state_dict_file, "--arch", ARCH, "--input-shape", SHAPE)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= columns
    assert "…" not in result.output
    for name in ("layer1.0.conv1", "layer3.0.downsample.0", "16x16x3x3"):
        assert name in result.output
    assert "fit err: relative weight error" in " ".join(result.output.split())


def test_inspect_says_whether_and_how_a_checkpoint_was_fine_tuned(tmp_path: Path) -> None:
    from vconvert.cli.inspect import checkpoint_notes
    from vconvert.io.checkpoint import load_checkpoint, save

    source = tmp_path / "m.vc.pt"
    torch.manual_seed(0)
    torch.save(resnet8().state_dict(), tmp_path / "r8.pt")
    assert invoke("compress", tmp_path / "r8.pt", "--arch", ARCH, "--input-shape", "1,3,32,32", "-o", source,
                  "--init", "naive").exit_code == 0  # fmt: skip
    fresh = " ".join(invoke("inspect", source).output.split())
    assert "input: N,C,H,W = 1,3,32,32, normalised with mean 0.485,0.456,0.406" in fresh
    assert "not fine-tuned" in fresh
    checkpoint = load_checkpoint(source)
    data = {"source": "my_images", "input_size": [32, 32], "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3,
            "classes": [f"c{i}" for i in range(10)]}  # fmt: skip
    record = {"config": {"epochs": 3, "masks": "project"}, "epochs_done": 3, "val_top1": 91.25}
    metadata = replace(checkpoint.metadata, data=data, finetune=record)
    save(source, checkpoint.model, checkpoint.plan, checkpoint.base, checkpoint.teacher, metadata)  # fmt: skip
    tuned = " ".join(invoke("inspect", source).output.split())
    assert "fine-tuned: 3 of 3 epochs on my_images, masks project, validation top-1 91.25%" in tuned
    for damaged in ({"val_top1": "high"}, {"config": 3}, {}):  # a record read from a file, malformed
        notes = checkpoint_notes(replace(checkpoint.metadata, finetune=damaged))
        assert notes[-1] == "not fine-tuned: its accuracy is the data-free fit's (vconvert finetune trains it)."
