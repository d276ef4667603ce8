"""A post-training peer from an established library: brevitas GPTQ 4-bit and 3-bit weights, no labels (issue 31).

``vconvert compress --reconstruct`` makes a network smaller from unlabeled images without training. The fair peer
is an established tool's best post-training weight rounding of the *dense* network on the same images: here
brevitas's GPTQ (``brevitas.graph.gptq.gptq_mode``, the loop of brevitas's own ImageNet PTQ example
``apply_gptq``) with ``act_order=True``, run on the convs vconvert converts
(:func:`benchmarks.pareto.quantizable_convs`: all but the stem and the 1x1 downsampling convs). Layer by layer,
in execution order, GPTQ collects the Hessian X̃ᵀX̃ of the conv's im2col inputs *as the already quantized layers
before it produce them* on the calibration images, then rounds the weights one input column at a time (largest
Hessian diagonal first: ``act_order``), pushing each column's rounding error onto the columns not yet rounded
(Cholesky of the damped inverse Hessian, brevitas's defaults: 1% damping, 100 blocks). The images are unlabeled:
the loop only calls the model on image batches.

Quantizer: the one of the QAT peer (:mod:`benchmarks.brevitas_peer`), ``Int8WeightPerChannelFloatMSE`` at
``weight_bit_width=bits``: signed narrow-range integers (±7 at 4 bits, ±3 at 3 bits: vconvert's symmetric range,
so the hand-over loses nothing), one floating-point scale per output channel, set once by brevitas's MSE grid
search over the pretrained weights (a parameter, not recomputed from the weights: GPTQ's running updates cannot
move it, and the final weights re-quantize to exactly the integers GPTQ chose). Activations stay float; BatchNorm
is left as it is (GPTQ needs no recalibration). The integers and scales are then handed to vconvert's int8
exporter exactly as the QAT peer's are (:func:`benchmarks.brevitas_peer.to_vconvert_quantized`, checked equal
with float tolerance 0), which quantizes the activations to uint8 with its own calibration and stores the weights
at their true width.

Why GPTQ (with act_order): brevitas's post-training weight-rounding methods on this ResNet-20, the same quantizer
and scales, 1,024 calibration images, top-1 in torch on 2,000 test images (dense 88.05), seconds of the rounding
on 1 thread of the 2 shared cores (load 3-5); measured once with a throw-away script (issue 31, helper 12):

=======================================  ==============  ==============
method                                   4-bit           3-bit
=======================================  ==============  ==============
round to nearest (MSE scales)            87.15           72.90
GPTQ                                     88.05 (43 s)    86.60 (55 s)
GPTQ, act_order                          88.10 (46 s)    87.20 (49 s)
GPFQ                                     88.15 (93 s)    86.80 (98 s)
Qronos, act_order                        88.05 (82 s)    87.10 (102 s)
learned rounding, 1,000 iterations                       86.95 (178 s)
learned rounding, 3,000 iterations                       87.30 (648 s)
=======================================  ==============  ==============

Learned rounding is brevitas's AdaRound (``brevitas_examples`` ``apply_learned_round``: hard-sigmoid rounding
variables, regularised MSE with the annealing over all iterations, layerwise, Adam 1e-3, batch 32); it needs
``accelerate`` (no dependency of this project; its offloading hooks also had to be bypassed for brevitas 0.13.4),
3,000 iterations a layer already exceed 10 minutes here and the published schedule is 20,000. At 4 bits every
method is within noise of the dense model; at 3 bits GPTQ with act_order is within 0.1 (two images) of the best
and 13x faster than it, so it is the peer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from benchmarks.brevitas_peer import as_brevitas_qat, brevitas_integers, to_vconvert_quantized

ALGORITHM = "brevitas.graph.gptq.gptq_mode (act_order=True, use_quant_activations=False)"  # for the row's record
ACT_ORDER = True


@torch.no_grad()
def gptq_quantize(model: nn.Module, convs: list[str], bits: int, batches: Iterable[torch.Tensor],
                  act_order: bool = ACT_ORDER) -> nn.Module:  # fmt: skip
    """``model`` (modified in place and returned, in eval mode) with each nn.Conv2d named in ``convs`` a brevitas
    QuantConv2d whose ``bits``-bit weights GPTQ rounded on ``batches`` (image tensors only: no labels), each conv
    seeing the inputs the already quantized convs before it produce. Activations stay float."""
    from brevitas.graph.gptq import gptq_mode

    batches = list(batches)
    if not batches:
        raise ValueError("GPTQ needs at least one batch of calibration images.")
    quantized = as_brevitas_qat(model, convs, bits).eval()
    with gptq_mode(quantized, act_order=act_order, use_quant_activations=False, create_weight_orig=False) as gptq:
        for _ in range(gptq.num_layers):
            for images in batches:
                gptq.model(images)  # stops at the layer being rounded (brevitas's StopFwdException)
            gptq.update()
    return quantized


def brevitas_gptq_peer(model: nn.Module, convs: list[str], bits: int, batches: Iterable[torch.Tensor],
                       act_order: bool = ACT_ORDER) -> tuple[nn.Module, dict[str, torch.Tensor]]:  # fmt: skip
    """GPTQ (:func:`gptq_quantize`) then the hand-over: (the model with versatile convs holding brevitas's integers
    and scales, ready for vconvert's int8 exporter; brevitas's integers of each conv, for checks)."""
    quantized = gptq_quantize(model, convs, bits, batches, act_order)
    integers = {name: brevitas_integers(quantized.get_submodule(name))[0] for name in convs}
    return to_vconvert_quantized(quantized, convs, bits, keep_latent=False).eval(), integers
