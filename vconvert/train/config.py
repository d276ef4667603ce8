"""The settings of a fine-tuning run and what each epoch measured (plain data, stored in every checkpoint the
run writes; a resumed run must be given the same settings).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vconvert.errors import BadInputError
from vconvert.nn.quantize import QUANTIZERS

BN_MODES = ("train", "frozen")
LOADERS = ("auto", "workers", "device")


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run (plain data; stored in the checkpoint)."""

    data: str | None = None  # "digits", an image folder, or None: the data the checkpoint records
    epochs: int = 5
    batch_size: int = 128  # global batch, split across DDP ranks
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5
    grad_clip: float = 10.0  # scale the gradients down to this L2 norm where above (0: off; no_bn_divergence.md)
    masks: str = "project"
    mask_lr: float = 0.05
    flip_rate: float = 0.01
    mask_anneal: float = 0.6
    project_ramp: float = 0.0
    project_every: int = 128  # project: training images (global) between projections, at least one step
    ortho_weight: float = 0.05
    distill: bool = True
    temperature: float = 4.0
    distill_weight: float = 0.7
    label_smoothing: float = 0.0
    recalibrate_images: int = 2000
    bn_mode: str = "train"  # train | frozen (BatchNorm statistics fixed after recalibration)
    augment: bool = True
    train_limit: int | None = None  # use only this many training images (quick runs)
    eval_limit: int | None = None
    seed: int = 0
    workers: int = 2
    loader: str = "auto"  # auto | workers | device (whole split on the device, augmented there)
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 (autocast)
    feature_weight: float = 0.0  # weight of the layer-wise term (converted convs vs the teacher's); 0: off
    ema: float = 0.0  # decay of an EMA of the weights, evaluated and written instead of them (0: off)
    weight_bits: int | None = None  # fake-quantise the primary filters to this many bits (None: float)
    weight_quantizer: str = "lsq"  # lsq (learned step per primary filter) | minmax
    mean: list[float] | None = None
    std: list[float] | None = None

    def validate(self, world: int = 1) -> None:
        """Raise :class:`BadInputError` naming the first setting that a run on ``world`` processes cannot use
        (the mask rule and precision are checked where they are built)."""
        if self.bn_mode not in BN_MODES:
            raise BadInputError(f"`bn_mode` must be 'train' or 'frozen'; got {self.bn_mode!r}.")
        if self.loader not in LOADERS:
            raise BadInputError(f"`loader` must be auto, workers or device; got {self.loader!r}.")
        if self.feature_weight < 0:
            raise BadInputError(f"`feature_weight` must be ≥ 0; got {self.feature_weight}.")
        if not 0.0 <= self.project_ramp <= 1.0:
            raise BadInputError(f"`project_ramp` must be a fraction of the run in [0, 1]; got {self.project_ramp}.")
        if self.project_every < 1:
            raise BadInputError(f"`project_every` must be at least 1 image; got {self.project_every}.")
        if not self.grad_clip >= 0:  # also NaN
            raise BadInputError(f"`grad_clip` must be a gradient norm ≥ 0 (0: off); got {self.grad_clip}.")
        if not 0.0 <= self.ema < 1.0:
            raise BadInputError(f"`ema` must be 0 (off) or a decay below 1 such as 0.999; got {self.ema}.")
        bits = self.weight_bits
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8):
            raise BadInputError(f"`weight_bits` must be an integer from 2 to 8; got {self.weight_bits!r}.")
        if self.weight_quantizer not in QUANTIZERS:
            raise BadInputError(
                f"`weight_quantizer` must be one of {', '.join(QUANTIZERS)}; got {self.weight_quantizer!r}."
            )
        if self.epochs < 1 or self.batch_size < world or self.batch_size % world:
            raise BadInputError(
                f"`epochs` must be ≥ 1 and `batch_size` a multiple of the {world} process(es); "
                f"got {self.epochs} and {self.batch_size}."
            )


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    train_top1: float
    val_top1: float
    val_top5: float
    mask_flips: int
    images_per_s: float
    lr: float
    seconds: float
    extra: dict = field(default_factory=dict)


def projection_interval(images: int, batch_size: int) -> int:
    """Steps between two projections of the ``project`` rule: about ``images`` training images apart, at
    least one step (so a batch of 128 or more projects after every step)."""
    return max(1, round(images / batch_size))
