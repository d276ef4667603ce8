"""vconvert: turn the convolutions of a pretrained CNN into versatile convolutions."""

from importlib.metadata import PackageNotFoundError, version

from vconvert.api import Checkpoint, load, load_checkpoint, save
from vconvert.convert import ConversionPlan, compress
from vconvert.layers import (
    VersatileConv2d,
    clip_mask_proxies_,
    fold_model,
    orthogonality_loss,
    versatile_layers,
)

try:
    __version__ = version("vconvert")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "Checkpoint",
    "ConversionPlan",
    "VersatileConv2d",
    "__version__",
    "clip_mask_proxies_",
    "compress",
    "fold_model",
    "load",
    "load_checkpoint",
    "orthogonality_loss",
    "save",
    "versatile_layers",
]
