"""Every width at its true size (issue 30 item 1): b-bit integers stored at exactly b bits, unpacked by ONNX ops in
onnxruntime, and int8 exports at 2, 3 and 5 bits that keep the export's exact checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import assert_one_sentence_error, converted_checkpoint, invoke
from onnx import TensorProto, helper

from vconvert.export.compact import encode_layer
from vconvert.export.int8_packing import PackedPool, int8_layer_subgraph
from vconvert.export.int8_weights import (
    decode_int8_layer,
    encode_int8_layer,
    pack_codes,
    pack_integers,
    packed_size,
    unpack_integers,
)
from vconvert.export.pipeline import export
from vconvert.fit.initialise import from_conv
from vconvert.nn.versatile import VersatileConv2d, set_weight_bits_


def _run(nodes: list, inits: list, outputs: dict[str, tuple[int, list]]) -> list[np.ndarray]:
    """Run a graph of initializers only in onnxruntime; ``outputs`` maps names to (type, shape)."""
    infos = [helper.make_tensor_value_info(name, kind, shape) for name, (kind, shape) in outputs.items()]
    graph = helper.make_graph(nodes, "unpack", [], infos, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})


# --------------------------------------------------------------------------- pure packing
@pytest.mark.parametrize("bits", range(2, 9))
def test_integers_round_trip_at_exactly_their_width(bits: int) -> None:
    rng = np.random.default_rng(bits)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for count in (1, 2, 7, 8, 9, 1001):
        values = rng.integers(low, high + 1, count).astype(np.int8)
        values[0], values[-1] = low, high
        packed = pack_integers(values, bits)
        assert packed.dtype == np.uint8 and packed.size == packed_size(count, bits) == -(-count * bits // 8)
        assert np.array_equal(unpack_integers(packed, bits, count), values)


def test_codes_are_offset_binary_in_little_endian_bit_order() -> None:
    # 3 bits: −4, 3, 0 are the codes 0, 7, 4 = bits 000 111 001 (least significant first) from bit 0 of byte 0
    assert pack_integers(np.array([-4, 3, 0]), 3).tolist() == [0b00111000, 0b00000001]
    assert pack_codes(np.array([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1).tolist() == [0b00001101, 0b00000001]


def test_values_outside_the_width_are_refused() -> None:
    with pytest.raises(ValueError, match=r"0\.\.7"):
        pack_integers(np.array([0, 4]), 3)
    with pytest.raises(ValueError, match="from 2 to 8"):
        pack_integers(np.array([0]), 9)


# --------------------------------------------------------------------------- the unpacking in onnxruntime
@pytest.mark.parametrize("bits", range(1, 9))
def test_a_pool_unpacks_every_width_in_onnxruntime(bits: int) -> None:
    rng = np.random.default_rng(bits)
    pool = PackedPool("pool", bits, offset=2 ** (bits - 1) if bits > 1 else 0)
    chunks = [rng.integers(0, 2**bits, count) for count in (1, 13, 64, 5)]
    chunks[1][:2] = 0, 2**bits - 1  # the extremes
    outputs = [pool.add(chunk) for chunk in chunks]
    nodes, inits = pool.nodes()
    stored = onnx.numpy_helper.to_array(next(init for init in inits if init.name == "pool.bytes"))
    assert stored.shape == (-(-83 // 8), bits)  # 83 values: whole groups of 8 values in ``bits`` bytes
    got = _run(nodes, inits, {name: (TensorProto.INT32, [None]) for name in outputs})
    for chunk, values in zip(chunks, got, strict=True):
        assert values.dtype == np.int32 and np.array_equal(values, chunk - pool.offset)


def _layer(bits: int) -> tuple[VersatileConv2d, torch.Tensor]:
    """A 12→24 3x3 learned s=2 layer fine-tuned (LSQ step, clipping) at ``bits``, with a BN factor."""
    torch.manual_seed(bits)
    layer = from_conv(torch.nn.Conv2d(12, 24, 3, padding=1), init="naive", mode="learned", secondary=2).eval()
    with torch.no_grad():
        layer.mask_proxy.uniform_()
        layer.scale.mul_(torch.where(torch.rand(24) < 0.3, -1.0, 1.0))
    layer.set_weight_bits(bits, "lsq")
    with torch.no_grad():
        layer.primary_step.mul_(0.7)
    return layer, torch.rand(24) + 0.5


@pytest.mark.parametrize("bits", [2, 3, 5, 7])
def test_the_layer_rebuild_widens_packed_primaries_to_the_int8_weight(bits: int) -> None:
    layer, bn_scale = _layer(bits)
    own = tuple(tensor.numpy() for tensor in layer.primary_integers())
    encoded = encode_int8_layer(encode_layer(layer, bn_scale), bits, own)
    primary = encoded.structure.primary
    assert int(np.abs(primary).max()) == 2 ** (bits - 1) - 1  # the clipping step reaches ±Q
    nodes, inits = int8_layer_subgraph(encoded, "weight", "vq0")
    stored = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in inits}
    assert "vq0.primary" not in stored and stored[f"vq0.p{bits}.bytes"].size == bits * -(-primary.size // 8)
    assert encoded.nbytes() == encode_int8_layer(encode_layer(layer, bn_scale)).nbytes() - primary.size + (
        packed_size(primary.size, bits)
    )
    expected = decode_int8_layer(encoded)
    (got,) = _run(nodes, inits, {"weight": (TensorProto.INT8, list(expected.shape))})
    assert got.dtype == np.int8 and np.array_equal(got, expected)


# --------------------------------------------------------------------------- exports at 2, 3 and 5 bits
def _tiny_model(dense: bool) -> tuple[torch.nn.Module, int]:
    """resnet8 with its convs but the stem as learned s=2 versatile convs, or (``dense``) as one-secondary
    channel convs: the dense network with a per-output scale, as benchmarks/pareto.py's QAT peers."""
    from sample_models.resnet_cifar import resnet8

    torch.manual_seed(0)
    model = resnet8().eval()
    names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)][1:]
    options = {"mode": "channel", "secondary": 1} if dense else {"mode": "learned", "secondary": 2}
    for name in names:
        model.set_submodule(name, from_conv(model.get_submodule(name), init="naive", **options))
    return model.eval(), len(names)


def _payload(path: Path, bits: int) -> int:
    """Bytes of the file's packed primaries: the 2-D uint8 initializer of ``bits`` bytes per group."""
    shapes = [tuple(t.dims) for t in onnx.load(str(path)).graph.initializer if t.data_type == TensorProto.UINT8]
    (groups,) = {shape[0] for shape in shapes if len(shape) == 2 and shape[1] == bits and shape[0] > 8}
    return groups * bits


def _export(model: torch.nn.Module, output: Path, bits: int) -> dict:
    generator = torch.Generator().manual_seed(1)
    calibration = [torch.randn(16, 3, 32, 32, generator=generator) for _ in range(2)]
    report = export(model, output, input_shape=[1, 3, 32, 32], compact=True, quantize="int8", calibration=calibration,
                    measure=False, min_agreement=0.0, weight_bits=bits)  # fmt: skip
    return report.quantization | {"metadata": report.metadata["vconvert.quantization"]}


def _qlinear_convs(path: Path, folder: Path) -> list[str]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(folder / f"{path.stem}.optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]


@pytest.mark.parametrize("dense", [False, True], ids=["versatile-s2", "dense-s1"])
def test_exports_at_2_3_and_5_bits_store_each_width_exactly_and_keep_the_checks(dense: bool, tmp_path: Path) -> None:
    sizes = {}
    for bits in (2, 3, 5) if not dense else (3,):
        model, converted = _tiny_model(dense)
        set_weight_bits_(model, bits, "minmax")  # fake-quantised at that width: the export keeps its integers
        output = tmp_path / f"w{bits}.onnx"
        info = _export(model, output, bits)
        assert info["weight_bits"] == bits and info["weights_equal_fake_quantised"] and info["compact_equals_dense"]
        assert info["converted_as_qlinear"] == info["converted_convs"] == converted and info["float_conv"] == 0
        assert info["metadata"]["primary_storage"] == f"{bits}-bit, packed (value + {2 ** (bits - 1)}, little-endian)"
        # from the file on disk: the payload is the primaries at ``bits`` bits, and every conv runs as QLinearConv
        values = sum(layer.primary.numel() for layer in model.modules() if isinstance(layer, VersatileConv2d))
        assert _payload(output, bits) == bits * -(-values // 8)
        ops = _qlinear_convs(output, tmp_path)
        assert ops.count("QLinearConv") == converted + 1 and "Conv" not in ops
        session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
        (logits,) = session.run(None, {"input": np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype("f4")})
        assert logits.shape == (3, 10) and np.isfinite(logits).all()
        sizes[bits] = output.stat().st_size
    assert list(sizes.values()) == sorted(sizes.values())  # 2 < 3 < 5 bits


# --------------------------------------------------------------------------- the CLI's --weight-bits
def test_cli_accepts_3_bit_primaries_and_refuses_1_and_9(tmp_path: Path) -> None:
    checkpoint = converted_checkpoint(tmp_path / "m.vc.pt")
    output = tmp_path / "w3.onnx"
    result = invoke("export", checkpoint, "-o", output, "--quantize", "int8", "--compact", "--calib-data", "digits",
                    "--calib-images", "32", "--weight-bits", "3", "--min-agreement", "0", "--json",
                    "--no-compare")  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    info = json.loads(result.stdout)["quantization"]
    assert info["weight_bits"] == 3 and info["compact_equals_dense"]
    for command in ("export", "finetune"):
        for bits in ("1", "9"):
            extra = ["--quantize", "int8"] if command == "export" else ["--data", "digits"]
            result = invoke(command, checkpoint, "-o", tmp_path / f"x{bits}.out", *extra, "--weight-bits", bits)
            assert_one_sentence_error(result, 2, f"--weight-bits must be an integer from 2 to 8; got {bits}.")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.vc.pt", "w3.onnx"]
