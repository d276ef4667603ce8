"""The brevitas GPTQ peer of benchmarks/reconstruct.py: brevitas rounds the 3- or 4-bit weights on unlabeled images,
vconvert's exporter stores exactly those integers and scales, packed at their width."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import noise_image_folder
from onnx import numpy_helper

from benchmarks import pareto, reconstruct
from benchmarks.brevitas_peer import as_brevitas_qat
from benchmarks.brevitas_ptq import brevitas_gptq_peer, gptq_quantize
from sample_models.resnet_cifar import resnet8, resnet20
from vconvert.data import image_folders
from vconvert.export.int8_weights import unpack_integers
from vconvert.nn.versatile import VersatileConv2d, versatile_layers

BITS = [pytest.param(3, id="3-bit"), pytest.param(4, id="4-bit")]


def _base() -> tuple[torch.nn.Module, list[str], list[torch.Tensor]]:
    """(float resnet8, its quantizable convs, two batches of calibration images)."""
    torch.manual_seed(0)
    base = resnet8().eval()
    return base, pareto.quantizable_convs(base), list(torch.randn(32, 3, 32, 32).split(16))


def _relative_error(model: torch.nn.Module, base: torch.nn.Module, images: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(images) - base(images)).square().mean() / base(images).square().mean())


@pytest.mark.parametrize("bits", BITS)
def test_gptq_rounds_on_the_images_and_the_hand_over_keeps_brevitas_integers_and_scales(bits: int) -> None:
    base, names, batches = _base()
    nearest = as_brevitas_qat(copy.deepcopy(base), names, bits).eval()  # round to nearest at the same MSE scales
    gptq = gptq_quantize(copy.deepcopy(base), names, bits, batches)
    converted, integers = brevitas_gptq_peer(copy.deepcopy(base), names, bits, batches)
    assert [name for name, _ in versatile_layers(converted)] == names
    largest = 2 ** (bits - 1) - 1
    changed = 0
    for name in names:
        rounded = gptq.get_submodule(name).quant_weight()
        assert torch.equal(integers[name], rounded.int().float())  # the same run twice: deterministic
        assert int(rounded.int().abs().max()) <= largest  # narrow range: vconvert's ±(2^(b−1)−1)
        reference = nearest.get_submodule(name).quant_weight()
        assert torch.equal(rounded.scale, reference.scale), name  # GPTQ kept the MSE scales fixed
        changed += int((rounded.int() != reference.int()).sum())
        layer = converted.get_submodule(name)
        assert isinstance(layer, VersatileConv2d) and layer.weight_bits == bits
        vconvert_integers, steps = layer.primary_integers()
        assert torch.equal(vconvert_integers.float(), integers[name])
        assert torch.equal(steps, rounded.scale.flatten())
        assert torch.equal(layer.dense_weight(), rounded.value)
    assert changed > 0  # GPTQ chose integers that rounding to nearest does not
    images = torch.cat(batches)
    with torch.no_grad():
        torch.testing.assert_close(converted(images), gptq(images), rtol=1e-5, atol=1e-5)
    assert _relative_error(gptq, base, images) < 0.8 * _relative_error(nearest, base, images)


@pytest.mark.parametrize("bits", BITS)
def test_the_int8_file_stores_the_gptq_integers_at_their_width(bits: int, tmp_path: Path) -> None:
    base, names, batches = _base()
    converted, integers = brevitas_gptq_peer(copy.deepcopy(base), names, bits, batches)
    trained = tmp_path / "peer.qat.pt"
    torch.save(converted, trained)
    output = tmp_path / "peer.onnx"
    info = pareto.export_quantization_aware(trained, output, torch.cat(batches), bits, 0.0)
    assert info["weight_bits"] == bits and info["weights_equal_fake_quantised"] and info["compact_equals_dense"]
    assert info["converted_as_qlinear"] == len(names)
    assert set(info["layer_weight_bits"].values()) == {bits}
    # one pool of every converted conv's integers, at exactly `bits` bits each (8 values in `bits` bytes), in the
    # convs' order: brevitas's integers, unchanged
    expected = torch.cat([integers[name].flatten() for name in names]).numpy().astype(np.int8)
    pools = [
        numpy_helper.to_array(t)
        for t in onnx.load(str(output)).graph.initializer
        if t.data_type == onnx.TensorProto.UINT8 and len(t.dims) == 2 and t.dims[1] == bits
    ]
    assert [pool.size for pool in pools] == [-(-expected.size // 8) * bits]
    assert np.array_equal(unpack_integers(pools[0], bits, expected.size), expected)


class _Unreadable:
    """A label that raises wherever it is used: the peer's data path must never look at one."""

    def _refuse(self, *args: object) -> None:
        raise AssertionError("a label was read")

    __int__ = __index__ = __bool__ = __hash__ = __eq__ = __lt__ = __float__ = __repr__ = _refuse


def test_the_measured_peer_step_reads_images_but_never_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """reconstruct.py's child process of the brevitas row (``--make-peer``), run in this process on a folder whose
    labels raise when used; its module exports at 4 bits."""
    folder = noise_image_folder(tmp_path / "images")
    read = image_folders.ImageFolderData.__getitem__

    def image_only(self: image_folders.ImageFolderData, index: int) -> tuple:
        return read(self, index)[0], _Unreadable()

    monkeypatch.setattr(image_folders.ImageFolderData, "__getitem__", image_only)
    models = tmp_path / "models"
    models.mkdir()
    torch.manual_seed(0)
    torch.save(resnet20().state_dict(), models / "resnet20_cifar10.pt")
    module = tmp_path / "peer.qat.pt"
    args = argparse.Namespace(make_peer="brevitas-gptq,4", peer_file=module, fp32=None, models=models, cifar=folder,
                              calib_images=6)  # fmt: skip
    info = reconstruct.make_peer(args)
    assert info["images"] == 6 and "gptq" in info["algorithm"]
    model = torch.load(module, weights_only=False)  # the module this test's own child step just wrote
    assert {layer.weight_bits for _, layer in versatile_layers(model)} == {4}
    assert [name for name, _ in versatile_layers(model)] == pareto.quantizable_convs(resnet20())
