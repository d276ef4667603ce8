"""The brevitas QAT peer of benchmarks/pareto.py: brevitas trains the 4-bit weights, vconvert's exporter stores
exactly those integers and scales, packed at 4 bits."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import brevitas.nn
import numpy as np
import onnx
import pytest
import torch
from conftest import noise_image_folder
from onnx import numpy_helper

from benchmarks import pareto
from benchmarks.brevitas_peer import as_brevitas_qat, to_vconvert_quantized
from sample_models.resnet_cifar import resnet8
from vconvert.export.verify import ort_session
from vconvert.nn.versatile import VersatileConv2d, versatile_layers


def _brevitas_resnet8(num_classes: int = 10) -> tuple[torch.nn.Module, torch.nn.Module, list[str]]:
    """(float base, its copy with brevitas 4-bit convs moved by a few SGD steps, the quantized conv names)."""
    torch.manual_seed(0)
    base = resnet8(num_classes=num_classes).eval()
    names = pareto.quantizable_convs(base)
    model = as_brevitas_qat(copy.deepcopy(base), names, bits=4).train()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, num_classes, (8,))
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return base, model.eval(), names


def test_brevitas_convs_start_from_the_pretrained_weights_with_narrow_4_bit_per_channel_scales() -> None:
    torch.manual_seed(0)
    base = resnet8().eval()
    names = pareto.quantizable_convs(base)
    model = as_brevitas_qat(copy.deepcopy(base), names, bits=4).eval()
    clipping = []
    for name in names:
        conv = model.get_submodule(name)
        assert isinstance(conv, brevitas.nn.QuantConv2d), name
        torch.testing.assert_close(conv.weight, base.get_submodule(name).weight, rtol=0, atol=0)
        quantized = conv.quant_weight()
        assert int(quantized.bit_width) == 4 and quantized.scale.numel() == conv.out_channels
        assert quantized.int().min() >= -7 and quantized.int().max() <= 7  # narrow range: vconvert's ±7
        widest = conv.weight.detach().flatten(1).abs().amax(1) / 7  # the max|w| start
        assert (quantized.scale.flatten() <= widest * (1 + 1e-6)).all(), name
        clipping.append(bool((quantized.scale.flatten() < widest * 0.99).any()))
    assert any(clipping)  # the MSE search started some scales below max|w|/7
    assert all(type(model.get_submodule(name)) is torch.nn.Conv2d for name in ("conv1", "layer2.0.downsample.0"))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        relative = (model(images) - base(images)).abs().max() / base(images).abs().max()
    assert 0 < relative < 0.5  # quantized, yet the same network
    model.train()(images).square().mean().backward()
    scale = model.get_submodule(names[0]).weight_quant.tensor_quant.scaling_impl.value
    assert scale.grad is not None and scale.grad.abs().sum() > 0  # a learned scale


def test_conversion_keeps_brevitas_integers_and_scales_and_computes_the_same_function() -> None:
    _, trained, names = _brevitas_resnet8()
    converted = to_vconvert_quantized(copy.deepcopy(trained), names, bits=4).eval()
    assert [name for name, _ in versatile_layers(converted)] == names
    for name in names:
        quantized = trained.get_submodule(name).quant_weight()
        layer = converted.get_submodule(name)
        assert isinstance(layer, VersatileConv2d) and layer.weight_bits == 4
        integers, steps = layer.primary_integers()
        assert torch.equal(integers.float(), quantized.int().float())
        assert torch.equal(steps, quantized.scale.flatten())
        assert torch.equal(layer.dense_weight(), quantized.value)
    images = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted(images), trained(images), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="trained at 4 bits, not 3"):
        to_vconvert_quantized(copy.deepcopy(trained), names, bits=3)


def test_brevitas_peer_trains_in_vconverts_loop_and_exports_its_integers_packed_at_4_bits(tmp_path: Path) -> None:
    """The row as benchmarks/pareto.py builds it: vconvert's loop (same budget and distillation) fine-tunes the
    brevitas model, which is converted, saved and exported like the in-house QAT peers."""
    base, _, names = _brevitas_resnet8(num_classes=2)  # the image folder has two classes
    budget = pareto.Budget(epochs=1, train_limit=None, batch_size=4, lr=0.01, precision="fp32", seed=0)
    args = argparse.Namespace(cifar=noise_image_folder(tmp_path / "images"))
    student = as_brevitas_qat(copy.deepcopy(base), names, bits=4)
    tuned, history = pareto._finetune_module(student, base, budget, args, weight_bits=None)
    assert len(history) == 1
    assert isinstance(tuned.get_submodule(names[0]), brevitas.nn.QuantConv2d)
    trained = tmp_path / "peer.qat.pt"
    torch.save(to_vconvert_quantized(copy.deepcopy(tuned), names, bits=4), trained)

    output = tmp_path / "peer.onnx"
    info = pareto.export_quantization_aware(trained, output, torch.randn(8, 3, 32, 32), 4, 0.0)
    assert info["weight_bits"] == 4 and info["weights_equal_fake_quantised"] and info["compact_equals_dense"]
    assert info["converted_as_qlinear"] == len(names)
    assert set(info["layer_weight_bits"].values()) == {4}
    # one pool holds every converted conv's integers at 4 bits: half a byte each (padded to a group of 4 bytes)
    weights = sum(tuned.get_submodule(name).weight.numel() for name in names)
    pools = [
        numpy_helper.to_array(t)
        for t in onnx.load(str(output)).graph.initializer
        if t.data_type == onnx.TensorProto.UINT8 and len(t.dims) == 2 and t.dims[1] == 4
    ]
    assert [pool.size for pool in pools] == [-(-weights // 8) * 4]

    images = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        expected = tuned.eval()(images).argmax(1).numpy()
    for optimised in (False, True):
        got = ort_session(str(output), optimised=optimised).run(None, {"input": images.numpy()})[0].argmax(1)
        assert np.mean(got == expected) >= 0.9, optimised  # uint8 activations move only a few near-ties
