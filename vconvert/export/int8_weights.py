"""INT8 weight encoding of versatile convs: each primary filter as integers with one step, each secondary filter
exactly a sign and a mask applied to its int8 primary, and the primary width a target CPU family allows.

With its folded weight W_o = a_o · M_o ∘ P_{p(o)} (a_o = α_o · bn_o: the per-output scale times the folded BN
factor) each primary filter is quantized once, t_p = max|P_p| / Q and Pq_p = clip(round(P_p / t_p), ±Q)
(Q = 2^(bits−1) − 1: 127 at 8 bits, 63 at 7, 7 at 4, 1 at 2), and

    Wq_o = sign(a_o) · M_o ∘ Pq_{p(o)}        with the per-output weight scale  s_o = |a_o| · t_{p(o)}

Target ``any`` writes at most 7-bit primaries (|q| ≤ 63): on x86 CPUs without VNNI onnxruntime adds u8 × s8
products in saturating int16 pairs, which 8-bit weights overflow (:mod:`vconvert.export.saturation`).

Below 8 bits the file stores each integer at its true width (:func:`pack_integers`): b bits per value, the
code k + 2^(b−1), values one after another from the least significant bit of the first byte on, so 8 values
fill exactly b bytes. 8-bit primaries stay plain int8.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from vconvert.errors import CheckFailedError
from vconvert.export.compact import CompactLayer, decode_layer, smallest_index_dtype
from vconvert.nn.quantize import check_bits, integers, minmax_step

__all__ = [
    "INT8_TARGETS",
    "NO_SATURATION_BITS",
    "Int8Layer",
    "check_fake_quantised",
    "decode_int8_layer",
    "encode_int8_layer",
    "pack_codes",
    "pack_integers",
    "packed_size",
    "primary_width",
    "quantize_primaries",
    "unpack_codes",
    "unpack_integers",
    "zero_outputs",
]

#: Which CPUs an int8 file is written for: ``any`` (7-bit weights: no u8 × s8 pair can saturate on x86 without
#: VNNI) or ``vnni`` (full 8-bit weights, for x86 with VNNI/AMX and ARM with dot products).
INT8_TARGETS = ("any", "vnni")
NO_SATURATION_BITS = 7  # |q| ≤ 63: 2 · 255 · 63 = 32130 fits in int16


def primary_width(bits: int, target: str) -> int:
    """The width primaries are written at for ``target``: ``bits``, at most 7 for ``any``."""
    return min(bits, NO_SATURATION_BITS) if target == "any" else bits


def quantize_primaries(primary: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Each primary filter as ``bits``-bit integers (held in int8) with one step: (Pq (P, ...) int8, t (P,)
    float64), t_p = max|P_p| / Q (Q = 127 at 8 bits, 7 at 4), computed in float32 by the quantizer that
    fine-tuning uses (:mod:`vconvert.nn.quantize`). A primary filter of zeros gets t_p = 1."""
    weight = torch.from_numpy(np.ascontiguousarray(primary, dtype=np.float32))
    step = minmax_step(weight, bits)
    return integers(weight, step, bits).to(torch.int8).numpy(), step.double().numpy()


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` values of ``bits`` bits take packed: ceil(count · bits / 8)."""
    return (count * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes in 0..2^bits − 1 (1 ≤ bits ≤ 8) at exactly ``bits`` bits each, as uint8 bytes: bit i of
    code j is bit j · bits + i of the stream, stream bit n is bit n % 8 of byte n // 8 (little-endian
    throughout); the last byte is padded with zeros."""
    if not 1 <= bits <= 8:
        raise ValueError(f"codes must be 1 to 8 bits wide; got {bits}.")
    flat = codes.reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"codes must lie in 0..{2**bits - 1} to be packed at {bits} bits.")
    planes = (flat[:, None] >> np.arange(bits)) & 1  # (count, bits): bit i of each code
    return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: the first ``count`` codes (int32)."""
    planes = np.unpackbits(packed.reshape(-1), bitorder="little")[: count * bits].reshape(count, bits)
    return (planes.astype(np.int32) << np.arange(bits, dtype=np.int32)).sum(axis=1, dtype=np.int32)


def pack_integers(values: np.ndarray, bits: int) -> np.ndarray:
    """Signed integers in −2^(bits−1)..2^(bits−1) − 1 (2 ≤ bits ≤ 8) at exactly ``bits`` bits each: the
    codes value + 2^(bits−1) (offset binary) packed by :func:`pack_codes`."""
    check_bits(bits)
    return pack_codes(values.astype(np.int64) + 2 ** (bits - 1), bits)


def unpack_integers(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_integers`: the first ``count`` integers as int8."""
    return (unpack_codes(packed, check_bits(bits), count) - 2 ** (bits - 1)).astype(np.int8)


@dataclass
class Int8Layer:
    """What the compact int8 file stores for one converted conv.

    ``structure`` is the float encoding's structure (masks, channel offsets) with the int8 primaries Pq and
    neither scale nor BN factor. The sign of a_o lives in the primary index: with ``negated``, index p + P
    addresses −Pq_p (the rebuild gathers from [Pq; −Pq]), so a sign costs no storage of its own. An output
    whose a_o is 0 points at an all-zero primary appended to Pq."""

    structure: CompactLayer
    primary_scale: np.ndarray  # (P,) float64 t_p (folded into weight_scale; not stored in the file)
    weight_scale: np.ndarray  # (N,) float32 s_o = |a_o| · t_{p(o)}
    negated: bool  # some index addresses −Pq
    bits: int = 8  # Pq lies in −Q..Q; below 8 bits the file stores it at ``bits`` bits per value

    @property
    def out_channels(self) -> int:
        return self.structure.out_channels

    def signed_primaries(self) -> np.ndarray:
        """The table the primary index addresses: Pq, or [Pq; −Pq] when ``negated``."""
        primary = self.structure.primary
        return np.concatenate([primary, -primary]) if self.negated else primary

    @property
    def packed(self) -> bool:
        """Whether the file stores the primaries bit-packed (:func:`pack_integers`; below 8 bits)."""
        return self.bits < 8

    def nbytes(self) -> int:
        """Bytes of all arrays the file stores for this layer (primaries and masks at their packed size)."""
        primary = self.structure.primary
        stored_primary = packed_size(primary.size, self.bits) if self.packed else primary.nbytes
        return self.structure.nbytes() - primary.nbytes + stored_primary + self.weight_scale.nbytes


def _per_output(array: np.ndarray | None, count: int) -> np.ndarray:
    return np.ones(count) if array is None else array.reshape(-1).astype(np.float64)


def encode_int8_layer(
    encoded: CompactLayer, bits: int = 8, primary_integers: tuple[np.ndarray, np.ndarray] | None = None
) -> Int8Layer:
    """The int8 form of a float compact encoding (:func:`vconvert.export.compact.encode_layer`), its primaries
    as ``bits``-bit integers: ``primary_integers`` (Pq, t) when given (the integers a layer fine-tuned at
    ``bits`` was trained with), else min-max quantized from the encoded primaries."""
    count = encoded.out_channels
    factor = _per_output(encoded.scale, count) * _per_output(encoded.bn_scale, count)  # a_o
    if primary_integers is None:
        quantized, primary_scale = quantize_primaries(encoded.primary, bits)
    else:
        quantized, primary_scale = primary_integers[0].astype(np.int8), primary_integers[1].astype(np.float64)
    index = encoded.primary_index.astype(np.int64)
    weight_scale = np.where(factor != 0, np.abs(factor), 1.0) * primary_scale[index]
    if (factor == 0).any():  # that secondary filter is zero: point it at a zero primary
        index = np.where(factor == 0, len(quantized), index)
        quantized = np.concatenate([quantized, np.zeros_like(quantized[:1])])
    negated = bool((factor < 0).any())
    index = np.where(factor < 0, index + len(quantized), index)
    structure = replace(
        encoded, primary=quantized, primary_index=index.astype(smallest_index_dtype(index)), scale=None, bn_scale=None
    )
    return Int8Layer(structure, primary_scale, weight_scale.astype(np.float32), negated, bits)


def zero_outputs(layer: Int8Layer, outputs: np.ndarray, weight_scale: np.ndarray) -> Int8Layer:
    """``layer`` with the secondary filters of ``outputs`` (a boolean mask) pointing at an all-zero primary
    (appended when there is none) and weight scales ``weight_scale`` (the others' kept from it)."""
    structure = layer.structure
    primary, index = structure.primary, structure.primary_index.astype(np.int64)
    zero = next((p for p in range(len(primary)) if not primary[p].any()), None)
    if zero is None:
        zero = len(primary)
        if layer.negated:  # index p + P addresses −Pq_p: one primary more shifts those
            index = np.where(index >= zero, index + 1, index)
        primary = np.concatenate([primary, np.zeros_like(primary[:1])])
    index = np.where(outputs, zero, index)
    structure = replace(structure, primary=primary, primary_index=index.astype(smallest_index_dtype(index)))
    scale = np.where(outputs, weight_scale, layer.weight_scale).astype(np.float32)
    return replace(layer, structure=structure, weight_scale=scale)


def decode_int8_layer(layer: Int8Layer) -> np.ndarray:
    """Reference decoder: the dense int8 weight Wq (N, c, kh, kw), computed in int32 like the graph."""
    structure = replace(layer.structure, primary=layer.signed_primaries().astype(np.int32))
    return decode_layer(structure).astype(np.int8)


def check_fake_quantised(name: str, layer: Int8Layer, folded: np.ndarray) -> None:
    """The dequantized int8 weight Wq · s equals the folded fake-quantised weight of the fp32 file (up to float
    rounding: the integers are the very ones the layer was fine-tuned with); else CheckFailedError."""
    dequantized = decode_int8_layer(layer).astype(np.float64) * layer.weight_scale.astype(np.float64).reshape(
        (-1,) + (1,) * (folded.ndim - 1)
    )
    error = float(np.abs(dequantized - folded.astype(np.float64)).max()) if folded.size else 0.0
    allowed = 1e-5 * float(np.abs(folded).max()) if folded.size else 0.0
    if error > allowed:
        raise CheckFailedError(
            f"The int8 weights of {name!r} differ from its fake-quantised weights by {error:.3g} (allowed "
            f"{allowed:.3g}); nothing was written."
        )
