"""Fine-tuning with fake-quantised primaries (``finetune --weight-bits``): every mask rule, resume, EMA,
evaluation, and the width recorded in the files it writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import QUICK, assert_one_sentence_error, converted_checkpoint, finetune_cut_and_resumed, invoke

from vconvert import load_checkpoint
from vconvert.evaluate import evaluate_file
from vconvert.nn.quantize import minmax_step
from vconvert.nn.versatile import versatile_layers
from vconvert.train.config import FinetuneConfig
from vconvert.train.finetune import finetune

RULES = ["project", "frozen", "flip", "ste", "tpami"]


def _assert_quantized(path: Path, bits: int, quantizer: str) -> None:
    """The file records the width and every versatile layer computes integers in −Q..Q times its steps."""
    checkpoint = load_checkpoint(path)
    assert checkpoint.metadata.weight_quantization == {"bits": bits, "quantizer": quantizer}
    assert checkpoint.metadata.finetune["config"]["weight_bits"] == bits
    layers = list(versatile_layers(checkpoint.model))
    assert layers
    for name, layer in layers:
        values, steps = layer.primary_integers()
        assert layer.weight_bits == bits and int(values.abs().max()) <= 2 ** (bits - 1) - 1, name
        torch.testing.assert_close(layer.quantized_primary(), values.float() * steps.view(-1, 1, 1, 1), rtol=0, atol=0)


@pytest.mark.parametrize("rule", RULES)
def test_every_mask_rule_trains_with_4_bit_primaries(rule: str, tmp_path: Path) -> None:
    source = converted_checkpoint(tmp_path / "m.vc.pt")
    output = tmp_path / "w4.vc.pt"
    history = finetune(source, output, FinetuneConfig(masks=rule, weight_bits=4, **{**QUICK, "epochs": 1}))
    assert len(history) == 1
    _assert_quantized(output, 4, "lsq")
    _assert_quantized(tmp_path / "w4.best.vc.pt", 4, "lsq")
    # the learned steps moved away from their min-max start (they take gradients under every rule)
    moved = [
        not torch.allclose(layer.primary_step, minmax_step(layer.primary, 4))
        for _, layer in versatile_layers(load_checkpoint(output).model)
    ]
    assert any(moved)
    # evaluate reads the file back quantized: its accuracy is the one the run validated
    assert evaluate_file(output, data="digits", limit=96).top1 == pytest.approx(history[-1].val_top1)


@pytest.mark.parametrize("ema", [0.0, 0.9], ids=["plain", "ema"])
def test_a_4_bit_run_resumes_exactly(ema: float, tmp_path: Path) -> None:
    source = converted_checkpoint(tmp_path / "m.vc.pt")
    config = FinetuneConfig(masks="project", weight_bits=4, ema=ema, **QUICK)
    straight, cut = tmp_path / "straight.vc.pt", tmp_path / "cut.vc.pt"
    finetune(source, straight, config)
    finetune_cut_and_resumed(source, cut, config)
    expected = load_checkpoint(straight).model.state_dict()
    assert any(name.endswith("primary_step") for name in expected)
    resumed = load_checkpoint(cut).model.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_minmax_steps_follow_the_primaries_and_a_4_bit_file_stays_4_bit(tmp_path: Path) -> None:
    source = converted_checkpoint(tmp_path / "m.vc.pt")
    first = tmp_path / "first.vc.pt"
    finetune(source, first, FinetuneConfig(masks="frozen", weight_bits=4, weight_quantizer="minmax",
                                           **{**QUICK, "epochs": 1}))  # fmt: skip
    _assert_quantized(first, 4, "minmax")
    assert not any(name.endswith("primary_step") for name in load_checkpoint(first).model.state_dict())
    again = tmp_path / "again.vc.pt"  # fine-tuned again without --weight-bits: it was trained 4-bit, it stays
    finetune(first, again, FinetuneConfig(masks="frozen", **{**QUICK, "epochs": 1}))
    assert load_checkpoint(again).metadata.weight_quantization == {"bits": 4, "quantizer": "minmax"}
    shown = invoke("inspect", again)
    assert shown.exit_code == 0 and "fake-quantised to 4 bits (minmax" in " ".join(shown.output.split())


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--weight-bits", "1"], "--weight-bits must be an integer from 2 to 8; got 1"),
        (["--weight-bits", "16"], "--weight-bits must be an integer from 2 to 8; got 16"),
        (["--weight-bits", "4", "--weight-quantizer", "mse"], "--weight-quantizer must be one of lsq, minmax"),
        (["--weight-quantizer", "minmax"], "add --weight-bits (2 to 8)"),
    ],
    ids=["bits-1", "bits-16", "unknown-quantizer", "quantizer-without-bits"],
)
def test_finetune_bad_weight_quantization_exits_2(options: list, says: str, tmp_path: Path) -> None:
    source = converted_checkpoint(tmp_path / "m.vc.pt")
    result = invoke("finetune", source, "-o", tmp_path / "out.vc.pt", "--data", "digits", *options)
    assert_one_sentence_error(result, 2, says)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.vc.pt"]


def test_library_weight_bits_outside_2_to_8_name_the_parameter(tmp_path: Path) -> None:
    from vconvert.errors import BadInputError

    source = converted_checkpoint(tmp_path / "m.vc.pt")
    configs = (FinetuneConfig(weight_bits=9, **QUICK), FinetuneConfig(weight_bits=4, weight_quantizer="x", **QUICK))
    for config in configs:
        with pytest.raises(BadInputError, match="`weight_"):
            finetune(source, tmp_path / "out.vc.pt", config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.vc.pt"]
