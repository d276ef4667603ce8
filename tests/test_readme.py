"""Every command the README shows runs, and its demo table is what `vconvert demo` measures."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

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
    torch.save(torchvision.models.resnet18(num_classes=num_classes).state_dict(), tmp_path / "resnet18.pt")
    side = _readme_input_side()
    _image_folder(tmp_path / "my_images", side, classes=num_classes)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    for command in shell_commands():
        completed = subprocess.run(
            shlex.split(command), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False
        )
        assert completed.returncode == 0, f"{command}\n{completed.stderr[-3000:]}"
        said = " ".join(completed.stderr.split())  # rich may wrap the line
        assert "warning:" not in said, f"{command}\n{said}"
        if "--data my_images" in command:  # the stage says what it feeds the model, at the data's own size
            assert f"data my_images (--data): {side}x{side} RGB images" in said, f"{command}\n{said}"


def test_readme_python_example_runs() -> None:
    (example,) = code_blocks("python")
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["plan"].ratio > 1.5
    assert not any(type(m).__name__ == "VersatileConv2d" for m in namespace["deployable"].modules())


def _table_numbers(text: str) -> dict[str, list[float]]:
    """The original and vconvert cells of the demo table's rows (rich box or Markdown)."""
    rows = {}
    for label in ("stored weights", "ONNX file", "MACs per image", "top-1"):
        line = next(line for line in text.splitlines() if label in line and ("│" in line or "|" in line))
        cells = [cell.strip() for cell in re.split(r"[│|]", line) if cell.strip()]
        rows[label] = [float(cell.replace(",", "").split()[0]) for cell in cells[1:3]]
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
    for label in ("stored weights", "ONNX file", "MACs per image"):
        assert measured[label] == documented[label], label
    for before, after in zip(measured["top-1"], documented["top-1"], strict=True):
        assert abs(before - after) <= 0.6, "top-1 on 360 images: one image is 0.28 points"
