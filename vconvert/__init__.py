"""vconvert: turn the convolutions of a pretrained CNN into versatile convolutions."""

from importlib.metadata import PackageNotFoundError, version

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
    "VersatileConv2d",
    "__version__",
    "clip_mask_proxies_",
    "fold_model",
    "orthogonality_loss",
    "versatile_layers",
]
