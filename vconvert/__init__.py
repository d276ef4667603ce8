"""vconvert: turn the convolutions of a pretrained CNN into versatile convolutions.

The flat API, one name per stage: :func:`compress` (a model in, a converted model and its plan out),
:func:`finetune` (a ``.vc.pt`` in, fine-tuned ``.vc.pt`` files out), :func:`export_checkpoint` (a ``.vc.pt``
in, a verified ONNX file out), :func:`evaluate_file`; :func:`load_model` reads a model file safely and
:func:`save` / :func:`load_checkpoint` write and read ``.vc.pt`` files. The stages live in the subpackages
``nn`` (the layer), ``fit``, ``convert``, ``train``, ``data``, ``export``, ``io`` and ``cli``
(docs/LAYOUT.md).
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

# The flat API, each name imported from its stage's module on first use (PEP 562), so that `import vconvert`
# (and so `vconvert --help` or `--version`) does not import torch, onnx or onnxruntime.
_WHERE = {
    "compress": "vconvert.convert.compress",
    "ConversionPlan": "vconvert.convert.plan",
    "BadInputError": "vconvert.errors",
    "CheckFailedError": "vconvert.errors",
    "UntrustedCodeError": "vconvert.errors",
    "VConvertError": "vconvert.errors",
    "VConvertWarning": "vconvert.errors",
    "evaluate_file": "vconvert.evaluate",
    "export_checkpoint": "vconvert.export.checkpoint",
    "from_conv": "vconvert.fit.initialise",
    "Checkpoint": "vconvert.io.checkpoint",
    "load": "vconvert.io.checkpoint",
    "load_checkpoint": "vconvert.io.checkpoint",
    "save": "vconvert.io.checkpoint",
    "CheckpointMetadata": "vconvert.io.metadata",
    "BaseSpec": "vconvert.io.untrusted",
    "load_model": "vconvert.io.untrusted",
    "VersatileConv2d": "vconvert.nn.versatile",
    "clip_mask_proxies_": "vconvert.nn.versatile",
    "fold_model": "vconvert.nn.versatile",
    "orthogonality_loss": "vconvert.nn.versatile",
    "set_weight_bits_": "vconvert.nn.versatile",
    "versatile_layers": "vconvert.nn.versatile",
    "weight_quantization": "vconvert.nn.versatile",
    "FinetuneConfig": "vconvert.train.config",
    "finetune": "vconvert.train.finetune",
}

if TYPE_CHECKING:  # what type checkers and IDEs see
    from vconvert.convert.compress import compress
    from vconvert.convert.plan import ConversionPlan
    from vconvert.errors import BadInputError, CheckFailedError, UntrustedCodeError, VConvertError, VConvertWarning
    from vconvert.evaluate import evaluate_file
    from vconvert.export.checkpoint import export_checkpoint
    from vconvert.fit.initialise import from_conv
    from vconvert.io.checkpoint import Checkpoint, load, load_checkpoint, save
    from vconvert.io.metadata import CheckpointMetadata
    from vconvert.io.untrusted import BaseSpec, load_model
    from vconvert.nn.versatile import (
        VersatileConv2d,
        clip_mask_proxies_,
        fold_model,
        orthogonality_loss,
        set_weight_bits_,
        versatile_layers,
        weight_quantization,
    )
    from vconvert.train.config import FinetuneConfig
    from vconvert.train.finetune import finetune


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'vconvert' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


try:
    __version__ = version("vconvert")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "BadInputError",
    "BaseSpec",
    "CheckFailedError",
    "Checkpoint",
    "CheckpointMetadata",
    "ConversionPlan",
    "FinetuneConfig",
    "UntrustedCodeError",
    "VConvertError",
    "VConvertWarning",
    "VersatileConv2d",
    "__version__",
    "clip_mask_proxies_",
    "compress",
    "evaluate_file",
    "export_checkpoint",
    "finetune",
    "fold_model",
    "from_conv",
    "load",
    "load_checkpoint",
    "load_model",
    "orthogonality_loss",
    "save",
    "set_weight_bits_",
    "versatile_layers",
    "weight_quantization",
]
