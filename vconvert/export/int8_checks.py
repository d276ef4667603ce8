"""Checks of an int8 file against its fp32 file: top-1 agreement in onnxruntime on this CPU and, for the CPUs the
file is written for, under the exact int8 arithmetic of x86 without VNNI (:mod:`vconvert.export.saturation`), so
that the verdict does not depend on the CPU that exported the file.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import onnx
from torch import Tensor

from vconvert.errors import BadInputError, CheckFailedError
from vconvert.export.saturation import saturating_model, saturation_report
from vconvert.export.verify import ort_session, run_session

__all__ = [
    "INT8_CPU_FLAGS",
    "AgreementCheck",
    "check_agreement",
    "cpu_int8_flags",
    "exact_int8_kernels",
    "top1_agreement",
]

#: The CPU features that decide how onnxruntime runs u8 × s8 products on x86 (``/proc/cpuinfo`` names).
INT8_CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")
MAX_REFERENCE_LOSS = 0.005  # agreement a file may lose between exact int32 sums and the non-VNNI saturation


def top1_agreement(reference: Any, candidate: Any, batches: Sequence[Tensor]) -> tuple[float, int]:
    """Fraction of images (of positions, for outputs with more axes) on which the two sessions' first
    outputs pick the same class along axis 1, and how many images were compared."""
    same = total = images = 0
    for batch in batches:
        expected, got = run_session(reference, batch)[0], run_session(candidate, batch)[0]
        if expected.ndim < 2:
            raise BadInputError("The model's output has no class axis, so top-1 agreement cannot be measured.")
        agree = expected.argmax(axis=1) == got.argmax(axis=1)
        same, total, images = same + int(agree.sum()), total + agree.size, images + len(batch)
    return same / max(1, total), images


@cache
def cpu_int8_flags() -> dict[str, Any]:
    """This CPU's architecture and which of :data:`INT8_CPU_FLAGS` it has (Linux ``/proc/cpuinfo``; an empty list
    where that cannot be read)."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"machine": platform.machine(), "flags": [flag for flag in INT8_CPU_FLAGS if flag in flags]}


def exact_int8_kernels() -> bool:
    """Whether onnxruntime's u8 × s8 kernels add every product in int32 here: x86 with AVX-512 VNNI, AVX-VNNI or
    AMX, or not x86 at all (ARM dot products; NEON widens to int16 products). False on x86 without them."""
    info = cpu_int8_flags()
    if info["machine"].lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return True
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(info["flags"]))


@dataclass
class AgreementCheck:
    """Top-1 agreement of an int8 file with its fp32 file on the calibration images, per arithmetic."""

    runtime: float  # onnxruntime on this CPU (its own int8 kernels)
    images: int
    exact: float  # exact int32 sums (VNNI, AMX, ARM): this CPU when its kernels are exact, else the QDQ reference
    saturating: float  # x86 without VNNI: u8 × s8 pairs saturated to int16 (the saturating reference)
    saturating_pairs: int  # weight pairs that can saturate there (0: every CPU computes the same integers)
    max_abs_weight: int
    checked: str  # which arithmetic the threshold was applied to
    agreement: float  # the value checked
    not_modelled: list[str]
    cpu: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _reference_agreement(fp32: Any, model: onnx.ModelProto, batches: Sequence[Tensor]) -> float:
    """Agreement of ``model`` run as written (optimisations off) with the fp32 session."""
    return top1_agreement(fp32, ort_session(model.SerializeToString(), optimised=False), batches)[0]


def check_agreement(
    fp32_session: Any,
    int8_session: Any,
    dense_int8: bytes,
    batches: Sequence[Tensor],
    *,
    min_agreement: float,
    target: str,
) -> AgreementCheck:
    """Measure the int8 file's top-1 agreement with the fp32 file under every arithmetic it may meet and refuse
    (:class:`CheckFailedError`) when the CPUs ``target`` covers see less than ``min_agreement``.

    ``dense_int8`` is the dense QDQ file (the compact file computes the same). With no weight pair that can
    saturate, every CPU computes the integers of this one; otherwise the QDQ graph runs as written (float convs
    on the dequantised values) with and without the non-VNNI saturation added (:func:`saturating_model`).
    Target ``any`` is checked under the saturating arithmetic and on this CPU; ``vnni`` under exact sums."""
    runtime, images = top1_agreement(fp32_session, int8_session, batches)
    model = onnx.load_from_string(dense_int8)
    report = saturation_report(model)
    exact_here = exact_int8_kernels()
    if report["saturating_pairs"] == 0:
        exact = saturating = runtime
    else:
        exact = runtime if exact_here else _reference_agreement(fp32_session, model, batches)
        saturated = saturating_model(model)
        saturating = runtime if saturated is None else _reference_agreement(fp32_session, saturated, batches)
    del model
    if target == "any":
        checked, value = ("x86 without VNNI (saturating reference)", saturating) if saturating < runtime else (
            "onnxruntime on this CPU", runtime)  # fmt: skip
    else:
        checked, value = ("onnxruntime on this CPU", runtime) if exact_here else ("exact int32 reference", exact)
    check = AgreementCheck(runtime, images, exact, saturating, int(report["saturating_pairs"]),
                           int(report["max_abs_weight"]), checked, value, list(report["not_modelled"]),
                           cpu_int8_flags())  # fmt: skip
    if value < min_agreement:
        raise CheckFailedError(
            f"The int8 model picks the fp32 model's top-1 class on only {100 * value:.1f}% of {images} calibration "
            f"images ({checked}; at least {100 * min_agreement:g}% required), so nothing was written: try "
            + ("`int8_target` any (7-bit weights, exact on every CPU), " if target != "any" else "")
            + "more calibration images (`calib_images`), a model fine-tuned at 4 bits (`weight_bits` 4) or a lower "
            "`min_agreement`."
        )
    return check
