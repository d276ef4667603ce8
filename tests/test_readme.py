"""Every command the README shows runs and does what the README says it does (the files it writes load and
hold what it was told, its numbers agree with the files), and its demo table is what `vconvert demo` measures."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
import torchvision
from PIL import Image

import vconvert

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def shell_commands() -> list[str]:
    commands = []
    for block in code_blocks("bash"):
        for line in block.splitlines():
            command = line.split("  #")[0].strip()
            if command.startswith(("vconvert ", "torchrun ")):
                commands.append(command)
    return commands


def _image_folder(root: Path, side: int, classes: int = 10, per_class: int = 4) -> None:
    """Textured images (flat colours give BatchNorm no variance to work with), a colour per class."""
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for label in range(classes):
            folder = root / split / f"class{label:02d}"
            folder.mkdir(parents=True)
            for index in range(per_class):
                noise = torch.randint(0, 96, (side, side, 3), generator=generator, dtype=torch.uint8)
                pixels = (noise + torch.tensor([label * 15, 60, 150 - label * 10], dtype=torch.uint8)).numpy()
                Image.fromarray(pixels).save(folder / f"{index}.png")


def _readme_input_side() -> int:
    shape = re.search(r"vconvert compress resnet18\.pt .*--input-shape (\d+),(\d+),(\d+),(\d+)", README)
    assert shape, "the README's compress example names the input shape of its data"
    return int(shape.group(3))


def _option(args: list[str], *names: str) -> str | None:
    """The value given to the first of ``names`` in ``args`` (None when absent)."""
    for name in names:
        if name in args:
            return args[args.index(name) + 1]
    return None


def _floats(text: str) -> list[float]:
    return [float(item) for item in text.split(",")]


def _flat(text: str) -> str:
    return " ".join(text.split())  # rich may wrap lines


def _val_images(root: Path) -> int:
    return sum(1 for path in (root / "val").rglob("*") if path.is_file())


def _check_compress(args: list[str], cwd: Path, stdout: str) -> None:
    """The .vc.pt loads with the arch, input shape and normalisation typed, keeps the original weights as its
    teacher, and stores fewer bits than the original; the summary printed is that checkpoint's."""
    output = cwd / _option(args, "-o", "--output")
    checkpoint = vconvert.load_checkpoint(output)
    shape = [int(size) for size in _option(args, "--input-shape").split(",")]
    assert checkpoint.base.arch == _option(args, "--arch")
    assert checkpoint.base.arch_kwargs == json.loads(_option(args, "--arch-kwargs"))
    assert checkpoint.metadata.input_shape == shape
    preprocessing = checkpoint.metadata.preprocessing
    assert preprocessing == {"mean": _floats(_option(args, "--mean")), "std": _floats(_option(args, "--std")),
                             "input_size": shape[2:]}  # fmt: skip
    assert not checkpoint.finetuned
    plan = checkpoint.plan
    assert plan.input_shape == shape and plan.converted
    assert 0 < plan.model_stored_bits < plan.model_dense_bits, "the compressed model stores fewer bits"
    assert sum(layer.stored_bits for layer in plan.converted) < sum(layer.dense_bits for layer in plan.converted)
    original = torch.load(cwd / args[2], weights_only=True)
    teacher = checkpoint.teacher.state_dict()
    assert teacher.keys() == original.keys()
    assert all(torch.equal(teacher[key], original[key]) for key in original), "the teacher is the original"
    with torch.no_grad():
        logits = checkpoint.model(torch.randn(2, *shape[1:]))
    assert logits.shape == (2, checkpoint.base.arch_kwargs["num_classes"]) and bool(torch.isfinite(logits).all())
    said = _flat(stdout)
    assert f"converted {len(plan.converted)} of {len(plan.layers)} convs" in said, said
    assert f"({plan.ratio:.2f}x)" in said and f"wrote {output.name}" in said, said


def _check_inspect(args: list[str], cwd: Path, stdout: str) -> None:
    """The table's summary is the checkpoint's plan, and it names every converted layer."""
    checkpoint = vconvert.load_checkpoint(cwd / args[2])
    plan = checkpoint.plan
    said = _flat(stdout)
    assert f"converted {len(plan.converted)} of {len(plan.layers)} convs" in said, said
    assert f"{plan.model_dense_bits / 8192:,.1f} KiB → {plan.model_stored_bits / 8192:,.1f} KiB" in said, said
    assert f"({plan.ratio:.2f}x)" in said, said
    assert all(layer.name in said for layer in plan.converted), said


def _check_finetune(args: list[str], cwd: Path, stdout: str) -> None:
    """OUT (complete, with the data and the compress-time normalisation recorded), OUT.best.vc.pt and
    OUT.metrics.jsonl (one line per epoch, whose numbers the checkpoints repeat)."""
    source = vconvert.load_checkpoint(cwd / args[args.index("finetune") + 1])
    output = cwd / _option(args, "-o", "--output")
    stem = output.name.removesuffix(".vc.pt")
    epochs = int(_option(args, "--epochs"))
    data = cwd / _option(args, "--data")
    lines = [json.loads(line) for line in (output.with_name(f"{stem}.metrics.jsonl")).read_text().splitlines()]
    assert [line["epoch"] for line in lines] == list(range(1, epochs + 1))
    val_images = _val_images(data)
    for line in lines:
        assert {"train_loss", "train_top1", "val_top1", "val_top5", "lr", "seconds"} <= set(line), line
        assert 0 <= line["val_top1"] <= line["val_top5"] <= 100, line
        count = line["val_top1"] * val_images / 100
        assert abs(count - round(count)) < 1e-6, f"top-1 is a share of the {val_images} val images: {line}"
    last = vconvert.load_checkpoint(output)
    assert last.finetuned
    run = last.metadata.finetune
    assert (run["epochs_done"], run["complete"]) == (epochs, True)
    assert (run["val_top1"], run["val_top5"]) == (lines[-1]["val_top1"], lines[-1]["val_top5"])
    recorded = last.metadata.data
    assert Path(recorded["source"]).name == data.name
    assert recorded["classes"] == sorted(path.name for path in (data / "train").iterdir())
    assert last.metadata.preprocessing == source.metadata.preprocessing, "compress's normalisation is kept"
    assert [(layer.name, layer.decision) for layer in last.plan.layers] == [
        (layer.name, layer.decision) for layer in source.plan.layers
    ]
    best = vconvert.load_checkpoint(output.with_name(f"{stem}.best.vc.pt"))
    assert best.metadata.finetune["val_top1"] == max(line["val_top1"] for line in lines)


def _check_export(args: list[str], cwd: Path, stdout: str) -> None:
    """A valid ONNX file carrying only vconvert's metadata (the checkpoint's normalisation and input shape),
    smaller than the original's dense weights when compact, computing what the checkpoint computes."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    source = cwd / args[2]
    checkpoint = vconvert.load_checkpoint(source)
    output = cwd / _option(args, "-o", "--output")
    proto = onnx.load(str(output))
    onnx.checker.check_model(proto, full_check=True)
    props = {prop.key: prop.value for prop in proto.metadata_props}
    assert all(key.startswith("vconvert.") for key in props), props.keys()
    assert not any(node.metadata_props for node in proto.graph.node), "per-node debugging metadata is stripped"
    assert not proto.graph.value_info, "intermediate value_info is stripped"
    shape = checkpoint.metadata.input_shape
    assert json.loads(props["vconvert.preprocessing"]) == checkpoint.metadata.preprocessing
    assert json.loads(props["vconvert.input_shape"]) == [None, *shape[1:]]
    assert props["vconvert.source"] == source.name
    assert props["vconvert.format"] == ("compact" if "--compact" in args else "dense")
    if "--compact" in args:
        assert output.stat().st_size < checkpoint.plan.model_dense_bits / 8, "the compact file is itself smaller"
    images = torch.randn(4, *shape[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = checkpoint.model(images).numpy()
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    assert np.abs(logits - expected).max() <= 1e-4 * max(1.0, float(np.abs(expected).max()))
    assert (logits.argmax(1) == expected.argmax(1)).all()


def _check_evaluate(args: list[str], cwd: Path, stdout: str) -> None:
    """The line printed gives the ONNX file's top-1/top-5 on the val images, the same as the fine-tuned
    checkpoint it was exported from measures in PyTorch on them."""
    import onnx

    from vconvert.evaluate import evaluate_file

    file, data = cwd / args[2], cwd / _option(args, "--data")
    said = _flat(stdout)
    shown = re.search(r"\((\S+)\) on (\S+): top-1 ([\d.]+)%, top-5 ([\d.]+)% \((\d+) images\)", said)
    assert shown and shown.group(1) == "onnx" and shown.group(2) == _option(args, "--data"), said
    top1, top5, images = float(shown.group(3)), float(shown.group(4)), int(shown.group(5))
    assert images == _val_images(data) and top1 <= top5
    props = {prop.key: prop.value for prop in onnx.load(str(file)).metadata_props}
    in_pytorch = evaluate_file(cwd / props["vconvert.source"], str(data))  # the checkpoint it was exported from
    assert (f"{in_pytorch.top1:.2f}", f"{in_pytorch.top5:.2f}", in_pytorch.images) == (
        f"{top1:.2f}",
        f"{top5:.2f}",
        images,
    )


EFFECTS = {
    "compress": _check_compress,
    "inspect": _check_inspect,
    "finetune": _check_finetune,
    "export": _check_export,
    "evaluate": _check_evaluate,
}


def test_readme_shows_the_two_commands_and_the_stages() -> None:
    assert "make demo" in README and "make test" in README
    commands = shell_commands()
    for stage in ("compress", "inspect", "finetune", "export", "evaluate"):
        assert any(command.startswith(f"vconvert {stage} ") for command in commands), stage
    assert "DEMO_TABLE" not in README, "the demo table must come from a real run"


@pytest.mark.slow
def test_every_readme_shell_command_runs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    arch_kwargs = re.search(r"--arch torchvision\.models:resnet18 --arch-kwargs '(\{.*?\})'", README)
    num_classes = int(re.search(r'"num_classes": (\d+)', arch_kwargs.group(1)).group(1)) if arch_kwargs else 1000
    # Residual branches start at zero (torchvision's zero_init_residual), as a trained network's are tame: with
    # plain random weights, `--bn-mode frozen` at lr 0.01 (the torchrun command) diverges (loss ~1e20) and the
    # written .vc.pt holds infinite scales that load_checkpoint refuses.
    model = torchvision.models.resnet18(num_classes=num_classes, zero_init_residual=True)
    torch.save(model.state_dict(), tmp_path / "resnet18.pt")
    side = _readme_input_side()
    _image_folder(tmp_path / "my_images", side, classes=num_classes)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    checked = []
    for command in shell_commands():
        args = shlex.split(command)
        completed = subprocess.run(
            args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False
        )
        assert completed.returncode == 0, f"{command}\n{completed.stderr[-3000:]}"
        said = " ".join(completed.stderr.split())  # rich may wrap the line
        assert "warning:" not in said, f"{command}\n{said}"
        if "--data my_images" in command:  # the stage says what it feeds the model, at the data's own size
            assert f"data my_images (--data): {side}x{side} RGB images" in said, f"{command}\n{said}"
        stage = args[args.index("vconvert") + 1]
        assert stage in EFFECTS, f"no check of what `{command}` does: add one to EFFECTS"
        EFFECTS[stage](args, tmp_path, completed.stdout)
        checked.append(stage)
    assert set(checked) == set(EFFECTS) and checked.count("finetune") == 2, checked  # incl. the torchrun one


def test_readme_python_example_runs() -> None:
    (example,) = code_blocks("python")
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(example, "README.md", "exec"), namespace)
    plan, student, deployable = namespace["plan"], namespace["student"], namespace["deployable"]
    assert plan.ratio > 1.5
    assert printed.getvalue().split() == [str(plan.ratio), "Conv2d"]
    assert not any(type(m).__name__ == "VersatileConv2d" for m in deployable.modules())
    assert any(type(m).__name__ == "VersatileConv2d" for m in student.modules()), "the student itself still learns"
    assert not deployable.training, "fold_model gives an eval-mode model"
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(deployable(images), student.eval()(images), rtol=1e-4, atol=1e-4)


DEMO_ROWS = ("original (fp32)", "INT8 PTQ (onnxruntime)", "vconvert (s=2 + int8)")


def _table_numbers(text: str) -> dict[str, list[float]]:
    """Each model row of the demo table (rich box or Markdown): ONNX file KB, top-1 %, latency ms, MACs (M)."""
    rows = {}
    for label in DEMO_ROWS:
        line = next(line for line in text.splitlines() if label in line and ("│" in line or "|" in line))
        cells = [cell.strip() for cell in re.split(r"[│|]", line) if cell.strip()]
        rows[label] = [float(cell.replace(",", "").split()[0]) for cell in cells[1:5]]
    return rows


@pytest.mark.slow
def test_readme_demo_table_matches_a_fresh_demo_run(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "vconvert", "demo", "--workdir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=1200, check=False,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    shown = README.split("<!-- demo-table:start -->")[1].split("<!-- demo-table:end -->")[0]
    measured, documented = _table_numbers(completed.stdout), _table_numbers(shown)
    for label in DEMO_ROWS:
        file_kb, top1, _, macs = measured[label]
        assert [file_kb, macs] == [documented[label][0], documented[label][3]], label
        assert abs(top1 - documented[label][1]) <= 0.6, f"{label}: top-1 on 360 images, one image is 0.28 points"
    # the rows are the files the demo wrote: the product artifact is the versatile int8 compact file
    files = dict(zip(("original.onnx", "original.int8.onnx", "resnet20.onnx"), DEMO_ROWS, strict=True))
    written = {name: onnx.load(str(tmp_path / "demo" / name)) for name in files}
    for name, label in files.items():
        assert round((tmp_path / "demo" / name).stat().st_size / 1e3, 1) == measured[label][0], name
    ops = {name: {node.op_type for node in model.graph.node} for name, model in written.items()}
    assert "QuantizeLinear" not in ops["original.onnx"]
    assert "QuantizeLinear" in ops["original.int8.onnx"] and "BitShift" not in ops["original.int8.onnx"]
    props = {p.key: p.value for p in written["resnet20.onnx"].metadata_props}
    assert props["vconvert.format"] == "compact" and json.loads(props["vconvert.quantization"])["type"] == "int8"
    assert {"QuantizeLinear", "BitShift"} <= ops["resnet20.onnx"], "int8 primaries and bit-packed masks"


def test_layout_doc_lists_every_module_as_the_code_says() -> None:
    """docs/LAYOUT.md is what docs/make_layout.py writes from the modules' docstrings today."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_layout", ROOT / "docs" / "make_layout.py")
    make_layout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_layout)
    assert (ROOT / "docs" / "LAYOUT.md").read_text() == make_layout.layout(), "run python docs/make_layout.py"
    assert len(make_layout.modules()) >= 50
