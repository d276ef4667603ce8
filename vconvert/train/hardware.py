"""Choices that depend on the machine: bf16 autocast, channels-last memory format, and whether a split is
kept whole on the device (augmented there) instead of read by DataLoader workers.
"""

from __future__ import annotations

import math

import torch

from vconvert.data.datasets import DataSpec
from vconvert.data.device import AUTO_HOST_BYTES, MAX_SIDE
from vconvert.errors import BadInputError
from vconvert.train.config import FinetuneConfig


def uses_device_loader(config: FinetuneConfig, spec: DataSpec, device: torch.device, images: int) -> bool:
    """``--loader auto`` decodes a small-image split (``images`` of them, train + eval) once onto the
    training device: always on CUDA, and on CPU while it takes ≤ 1 GiB of memory (on 2 cores it is
    1.6x faster than decoding each epoch in worker processes); ``device``/``workers`` force a choice."""
    if config.loader == "auto":
        if max(spec.input_size) > MAX_SIDE:
            return False
        return device.type == "cuda" or images * spec.channels * math.prod(spec.input_size) <= AUTO_HOST_BYTES
    return config.loader == "device"


PRECISIONS = ("auto", "fp32", "bf16")
CHANNELS_LAST_MIN_SIDE = 16


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN computes bfloat16 natively on this CPU (AVX512-BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether the forward passes run under bfloat16 autocast: ``auto`` on CUDA; ``bf16`` anywhere the
    device computes it natively (CUDA, or a CPU with AVX512-BF16/AMX: CIFAR-10 ResNet-20 s=2 fine-tunes at
    733 vs 426 images/s in fp32 on 2 Zen 4 cores); ``fp32`` never."""
    if precision not in PRECISIONS:
        raise BadInputError(f"`precision` must be one of {', '.join(PRECISIONS)}; got {precision!r}.")
    if precision == "auto":
        return device.type == "cuda"
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        raise BadInputError(
            "`precision` bf16 needs a CUDA device or a CPU with native bfloat16 (AVX512-BF16 or AMX); "
            "this CPU has neither: use `precision` fp32."
        )
    return precision == "bf16"


def uses_channels_last(device: torch.device, spec: DataSpec) -> bool:
    """NHWC activations: on CUDA, and on CPU for images of 16 px and more (oneDNN's NHWC convolutions:
    CIFAR-10 ResNet-20 s=2 fine-tunes at 426 vs 397 images/s in fp32 on 2 cores)."""
    return device.type == "cuda" or min(spec.input_size) >= CHANNELS_LAST_MIN_SIDE
