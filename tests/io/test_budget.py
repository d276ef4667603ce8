"""The memory budget: what a file asks vconvert to allocate (plan fields, input shapes, batches) is sized
first and refused above the budget with one sentence (exit 2), fast, before anything large is allocated;
and the damaged metadata values that used to pass (deep nesting, a std of 0 in float32, a mean that
overflows, NaN) are refused at load.

The bounded-memory tests run the command line in a child process under ``RLIMIT_AS``: the limit is the
child's own virtual memory after importing vconvert (torch here is a CUDA build: ~3.4 GB of address space
before any work) plus a margin that the legitimate command fits in and the bomb did not.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import assert_one_sentence_error, converted_checkpoint, invoke
from onnx import TensorProto, helper

from vconvert.errors import BadInputError
from vconvert.io import budget
from vconvert.io.checkpoint import load_checkpoint
from vconvert.io.format import read_checkpoint

REPO = Path(__file__).resolve().parents[2]
GB = 1024**3


@pytest.fixture(autouse=True)
def _default_budget(monkeypatch: pytest.MonkeyPatch):
    """Each test starts from the default budget (the CLI option sets a process-wide value)."""
    monkeypatch.delenv(budget.ENVIRONMENT_VARIABLE, raising=False)
    budget.set_memory_budget(None)
    yield
    budget.set_memory_budget(None)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet8 (1 channel, 32x32, random weights) compressed with the defaults."""
    return converted_checkpoint(tmp_path_factory.mktemp("good") / "good.vc.pt")


def edited(good: Path, target: Path, edit) -> Path:
    """A copy of ``good`` whose payload ``edit`` changed, written as torch.save writes it (no checks)."""
    payload = read_checkpoint(good)
    edit(payload)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)  # pickling a hostile 2000-deep value recurses as deep
    try:
        torch.save(payload, target)
    finally:
        sys.setrecursionlimit(limit)
    return target


def converted_layer(payload: dict) -> dict:
    return next(layer for layer in payload["plan"]["layers"] if layer["decision"] == "converted")


def refused(*args: object, fragments: tuple[str, ...] = (), seconds: float = 20.0) -> None:
    """The CLI refuses with one sentence and exit 2 within ``seconds``."""
    start = time.perf_counter()
    result = invoke(*args)
    elapsed = time.perf_counter() - start
    assert_one_sentence_error(result, 2, *fragments)
    assert elapsed < seconds, elapsed


# --------------------------------------------------------------------------- the budget itself
def test_budget_from_the_option_the_environment_or_half_the_ram(monkeypatch: pytest.MonkeyPatch) -> None:
    assert budget.memory_budget_bytes() == int(budget.machine_ram_bytes() * budget.DEFAULT_RAM_FRACTION)
    monkeypatch.setenv(budget.ENVIRONMENT_VARIABLE, "2")
    assert budget.memory_budget_bytes() == 2 * GB
    budget.set_memory_budget(0.5)
    assert budget.memory_budget_bytes() == GB // 2
    with pytest.raises(BadInputError, match="`memory_budget` must be a positive number of GB"):
        budget.set_memory_budget(-1)
    monkeypatch.setenv(budget.ENVIRONMENT_VARIABLE, "lots")
    budget.set_memory_budget(None)
    with pytest.raises(BadInputError, match="VCONVERT_MEMORY_BUDGET must be a number of GB"):
        budget.memory_budget_bytes()


def test_check_allocation_is_one_sentence_naming_the_option() -> None:
    budget.set_memory_budget(1)
    budget.check_allocation(GB, "A batch")
    with pytest.raises(BadInputError) as caught:
        budget.check_allocation(3 * GB, "A batch")
    message = str(caught.value)
    assert message.startswith("A batch needs 3.0 GB of memory, more than the memory budget of 1.0 GB")
    assert "`memory_budget`" in message and "\n" not in message


def test_forward_peak_counts_what_is_live_not_every_intermediate() -> None:
    from sample_models.resnet_cifar import resnet8

    model = resnet8(in_channels=1).eval()
    one = budget.forward_peak_bytes(model, [1, 1, 32, 32])
    assert budget.tensor_bytes([1, 1, 32, 32]) < one < 2 * 1024**2  # a few 16x32x32 activations
    assert budget.forward_peak_bytes(model, [8, 1, 32, 32]) == pytest.approx(8 * one, rel=0.01)
    assert budget.forward_peak_bytes(model, [4, 1, 4096, 4096]) > 10 * GB  # worked out, never allocated


class _ReadsValues(torch.nn.Module):
    """A forward the meta device cannot run (it reads a value back in Python)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = self.conv(x)
        return y * 2 if float(y.mean()) > -1e9 else y


def test_a_forward_the_meta_device_cannot_run_runs_for_real_each_op_sized_first() -> None:
    model = _ReadsValues().eval()
    budget.check_forward(model, [2, 1, 64, 64], "A small forward")
    assert model.calls == 2  # on the meta device (it stops at the read), then for real
    budget.set_memory_budget(0.01)  # 10 MB: the input (2 MB) fits, the conv's output (31 MB) does not
    with pytest.raises(BadInputError, match=r"^A large forward needs \d+\.\d MB of memory"):
        budget.check_forward(model, [2, 1, 512, 512], "A large forward")
    with pytest.raises(budget.ForwardRejected):  # 3 channels into a 1-channel conv: refused on meta first
        budget.check_forward(model, [1, 3, 64, 64], "A forward")


# --------------------------------------------------------------------------- plan fields
@pytest.mark.parametrize("secondary", [5_000_000, 2_000_000_000])
def test_plan_secondary_beyond_the_convs_outputs_is_refused_before_allocating(
    secondary: int, good: Path, tmp_path: Path
) -> None:
    def edit(payload: dict) -> None:
        converted_layer(payload)["options"].update(secondary=secondary, mask_sharing="shared")

    path = edited(good, tmp_path / "bomb.vc.pt", edit)
    refused("inspect", path, fragments=(f"secondary {secondary}, more than its", "output channels"), seconds=10)


def test_plan_channel_window_beyond_the_convs_inputs_is_refused(good: Path, tmp_path: Path) -> None:
    def edit(payload: dict) -> None:
        converted_layer(payload)["options"].update(mode="channel", channel_window=100_000, secondary=2)

    refused("inspect", edited(good, tmp_path / "w.vc.pt", edit), fragments=("channel_window 100000, more than its",))


def test_the_option_sets_the_budget_of_the_command(good: Path) -> None:
    # the file itself (791 KB) is over 10 KB; the plan's layers are sized too (tests/convert/test_convert.py)
    refused("inspect", good, "--memory-budget", "0.00001", fragments=("more than the memory budget", "--memory-budget"))
    assert invoke("inspect", good, "--memory-budget", "1").exit_code == 0
    result = invoke("inspect", good, "--memory-budget", "-3")
    assert result.exit_code == 2 and "'--memory-budget': --memory-budget must be a positive" in result.output


# --------------------------------------------------------------------------- recorded input shapes
def test_export_of_a_recorded_4096_input_is_refused_before_any_work(good: Path, tmp_path: Path) -> None:
    path = edited(good, tmp_path / "big.vc.pt", lambda p: p["metadata"].update(input_shape=[1, 1, 4096, 4096]))
    output = tmp_path / "big.onnx"
    refused("export", path, "-o", output, "--memory-budget", "2", fragments=("Exporting at input shape",), seconds=15)
    assert not output.exists()


def test_a_plan_input_shape_beyond_the_budget_is_refused_at_load(good: Path, tmp_path: Path) -> None:
    def edit(payload: dict) -> None:
        payload["plan"]["input_shape"] = payload["metadata"]["input_shape"] = [1, 1, 4096, 4096]

    path = edited(good, tmp_path / "big.vc.pt", edit)
    refused("inspect", path, "--memory-budget", "1", fragments=("recorded input shape [1, 1, 4096, 4096]",))


def test_a_channel_mismatch_is_refused_without_a_real_forward(
    good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def edit(payload: dict) -> None:
        payload["plan"]["input_shape"] = payload["metadata"]["input_shape"] = [1, 64, 4096, 4096]

    path = edited(good, tmp_path / "channels.vc.pt", edit)
    zeros = torch.zeros

    def small_zeros(*size, **options) -> torch.Tensor:
        assert math.prod(size[0] if len(size) == 1 and not isinstance(size[0], int) else size) < 10**8, size
        return zeros(*size, **options)

    monkeypatch.setattr(torch, "zeros", small_zeros)  # the real input of 64x4096x4096 is never made
    budget.set_memory_budget(8)  # the 4.3 GB input fits: only the model's refusal stops it
    with pytest.raises(BadInputError, match="rejects an input of its own recorded shape"):
        load_checkpoint(path)


# --------------------------------------------------------------------------- evaluate batches
def onnx_file(path: Path, shape: list, metadata: dict[str, object]) -> Path:
    """A real ONNX classifier (conv 8 channels, global pool, 10 scores) taking ``shape`` (strings: dynamic)
    with vconvert metadata."""
    rng = np.random.default_rng(0)
    weights = [
        helper.make_tensor("w", TensorProto.FLOAT, [8, 1, 3, 3], rng.normal(size=72).astype(np.float32).tolist()),
        helper.make_tensor("fc", TensorProto.FLOAT, [8, 10], rng.normal(size=80).astype(np.float32).tolist()),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [shape[0], 10])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value if isinstance(value, str) else json.dumps(value))
    onnx.save(model, path)
    return path


PREPROCESSING = {"mean": [0.3], "std": [0.4]}


def test_onnx_peak_follows_the_graphs_values(tmp_path: Path) -> None:
    from vconvert.evaluate import onnx_peak_bytes

    model = onnx.load(onnx_file(tmp_path / "m.onnx", ["N", 1, "H", "W"], {}))
    small = onnx_peak_bytes(model, [1, 1, 32, 32])
    assert 9 * budget.tensor_bytes([1, 1, 32, 32]) <= small <= 18 * budget.tensor_bytes([1, 1, 32, 32])
    assert onnx_peak_bytes(model, [256, 1, 4096, 4096]) > 100 * GB


def test_evaluate_onnx_recording_4096_is_refused_not_allocated(tmp_path: Path) -> None:
    metadata = {"vconvert.input_shape": [None, 1, 4096, 4096], "vconvert.preprocessing": PREPROCESSING}
    path = onnx_file(tmp_path / "big.onnx", ["N", 1, "H", "W"], metadata)
    refused("evaluate", path, "--data", "digits", "--memory-budget", "0.25", fragments=("batches of 1 images",))


def test_evaluate_onnx_streams_a_large_size_in_batches_that_fit(tmp_path: Path) -> None:
    metadata = {"vconvert.input_shape": [None, 1, 512, 512], "vconvert.preprocessing": PREPROCESSING}
    path = onnx_file(tmp_path / "m.onnx", ["N", 1, "H", "W"], metadata)
    result = invoke("evaluate", path, "--data", "digits", "--limit", "12", "--memory-budget", "0.25", "--json")
    assert result.exit_code == 0, result.output + result.stderr
    assert json.loads(result.stdout)["images"] == 12


def test_evaluate_onnx_with_a_fixed_batch_of_65536_is_refused(tmp_path: Path) -> None:
    path = onnx_file(tmp_path / "fixed.onnx", [65536, 1, 32, 32], {"vconvert.preprocessing": PREPROCESSING})
    refused("evaluate", path, "--data", "digits", "--memory-budget", "1", fragments=("the graph's fixed batch",))


def test_resized_digits_equal_the_whole_split_resized_at_once() -> None:
    from vconvert.data.datasets import open_split
    from vconvert.evaluate import _split

    lazy, spec = _split("digits", {}, [1, 1, 48, 40], None, "test")
    whole, whole_spec, _ = open_split("digits", False, input_size=[48, 40], augment=False)
    assert spec == whole_spec and len(lazy) == len(whole)
    for index in (0, 7, len(whole) - 1):
        assert torch.equal(lazy[index][0], whole[index][0]) and lazy[index][1] == whole[index][1]


# --------------------------------------------------------------------------- damaged metadata values
def deep(levels: int) -> object:
    value: object = 1
    for _ in range(levels):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    ("case", "edit", "fragment"),
    [
        ("deep-unknown-key", lambda m: m.update(later=deep(2000)), "'later' nests deeper than 32 levels"),
        ("std-underflows", lambda m: m.update(preprocessing={"mean": [0.3], "std": [1e-320]}), "std must hold"),
        ("mean-overflows", lambda m: m.update(preprocessing={"mean": [1e308], "std": [0.4]}), "mean must hold"),
        ("nan-in-unknown-key", lambda m: m.update(later={"x": [1.0, math.nan]}), "'later' holds a nan value"),
        ("nan-in-finetune", lambda m: m.update(finetune={"val_top1": math.nan}), "'finetune' holds a nan"),
    ],
    ids=lambda value: value if isinstance(value, str) and " " not in value and "'" not in value else "",
)
def test_damaged_metadata_values_are_refused_at_load(
    case: str, edit, fragment: str, good: Path, tmp_path: Path
) -> None:
    path = edited(good, tmp_path / f"{case}.vc.pt", lambda p: edit(p["metadata"]))
    refused("inspect", path, fragments=(fragment,))


def test_finetune_of_deep_metadata_is_refused_before_training(good: Path, tmp_path: Path) -> None:
    path = edited(good, tmp_path / "deep.vc.pt", lambda p: p["metadata"].update(later=deep(2000)))
    output = tmp_path / "out.vc.pt"
    refused("finetune", path, "-o", output, "--data", "digits", "--epochs", "1", "--train-limit", "64",
            fragments=("nests deeper",), seconds=15)  # fmt: skip
    assert not list(tmp_path.glob("out*"))


@pytest.mark.parametrize(
    ("case", "preprocessing"),
    [
        ("std-underflows", '{"mean": [0.3], "std": [1e-320]}'),
        ("mean-overflows", '{"mean": [1e308], "std": [0.4]}'),
        ("nan", '{"mean": [NaN], "std": [0.4]}'),
    ],
)
def test_damaged_onnx_normalisation_is_exit_2(case: str, preprocessing: str, tmp_path: Path) -> None:
    path = onnx_file(tmp_path / f"{case}.onnx", ["N", 1, 32, 32], {"vconvert.preprocessing": preprocessing})
    refused("evaluate", path, "--data", "digits", fragments=("vconvert.preprocessing",))


def test_deep_onnx_metadata_is_exit_2(tmp_path: Path) -> None:
    path = onnx_file(tmp_path / "deep.onnx", ["N", 1, 32, 32], {"vconvert.input_shape": deep(100)})
    refused("evaluate", path, "--data", "digits", fragments=("nests deeper than 32",))


# --------------------------------------------------------------------------- bounded memory (RLIMIT_AS)
def _vm_after_import() -> int:
    """Virtual memory (bytes) of a child that imported the CLI and onnxruntime: the baseline of the limit."""
    code = (
        "import vconvert.cli, onnxruntime, torch\n"
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmPeak')) * 1024)"
    )
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def run_limited(args: list[object], limit: int) -> subprocess.CompletedProcess:
    """``python -m vconvert ARGS`` under RLIMIT_AS = ``limit`` bytes (one OpenMP thread: each thread reserves
    address space of its own)."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop(budget.ENVIRONMENT_VARIABLE, None)
    return subprocess.run(
        [sys.executable, "-m", "vconvert", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        preexec_fn=cap,
        timeout=120,
    )


@pytest.fixture(scope="module")
def limit() -> int:
    """The import baseline plus 1.5 GB: the legitimate commands below fit, each bomb asked for 4-24 GB."""
    return _vm_after_import() + 3 * GB // 2


def _one_sentence(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "MemoryError" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.slow  # three children, each importing torch (~5-15 s on a shared machine)
def test_bounded_memory_plan_channel_mismatch_and_4096_recorded_shape(good: Path, tmp_path: Path, limit: int) -> None:
    assert run_limited(["inspect", good], limit).returncode == 0  # the legitimate file fits the limit

    def channels(payload: dict) -> None:
        payload["plan"]["input_shape"] = payload["metadata"]["input_shape"] = [1, 64, 4096, 4096]

    bomb = edited(good, tmp_path / "channels.vc.pt", channels)
    assert "rejects an input" in _one_sentence(run_limited(["inspect", bomb, "--memory-budget", "8"], limit))
    plan = edited(good, tmp_path / "plan.vc.pt", lambda p: converted_layer(p)["options"].update(
        secondary=5_000_000, mask_sharing="shared"))  # fmt: skip
    assert "more than its" in _one_sentence(run_limited(["inspect", plan], limit))
    big = edited(good, tmp_path / "big.vc.pt", lambda p: p["metadata"].update(input_shape=[1, 1, 4096, 4096]))
    output = tmp_path / "big.onnx"
    assert "Exporting at input shape" in _one_sentence(run_limited(["export", big, "-o", output], limit))
    assert not output.exists()


@pytest.mark.slow
def test_bounded_memory_onnx_evaluate_at_4096_and_a_fixed_batch_of_65536(tmp_path: Path, limit: int) -> None:
    small = {"vconvert.input_shape": [None, 1, 32, 32], "vconvert.preprocessing": PREPROCESSING}
    legit = onnx_file(tmp_path / "m.onnx", ["N", 1, "H", "W"], small)
    assert run_limited(["evaluate", legit, "--data", "digits"], limit).returncode == 0
    large = {"vconvert.input_shape": [None, 1, 4096, 4096], "vconvert.preprocessing": PREPROCESSING}
    bomb = onnx_file(tmp_path / "big.onnx", ["N", 1, "H", "W"], large)
    message = _one_sentence(run_limited(["evaluate", bomb, "--data", "digits", "--memory-budget", "1"], limit))
    assert "batches of 1 images" in message
    fixed = onnx_file(tmp_path / "fixed.onnx", [65536, 1, 32, 32], {"vconvert.preprocessing": PREPROCESSING})
    message = _one_sentence(run_limited(["evaluate", fixed, "--data", "digits", "--memory-budget", "1"], limit))
    assert "the graph's fixed batch" in message
