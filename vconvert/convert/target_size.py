"""``--target-size``: choose per conv how it is stored — dense or versatile with 2 or 4 secondaries (masks per
filter or shared by all primaries), its primaries at 2, 3, 4 or 8 bits — so that the int8 file is the asked
fraction of the fp32 file, preferring the choices that change the network's output least on unlabeled calibration
images (docs/ALGEBRA.md §13).

Each choice of each conv is tried alone in the original network: the conv replaced by its data-free fit,
fake-quantised min-max at its width, and the output distribution compared with the original's (mean KL
divergence of the softmax, the usual proxy of the loss change; no labels). The choices then add up: a
multiple-choice knapsack over the layers (exact on bits rounded to a thousandth of the budget) picks the set
with the least total divergence that fits. Convs compress would not convert (the stem, ``--skip`` matches,
1x1 downsampling when skipped) may still be stored dense at fewer bits; grouped and depthwise convs and
Linear layers stay int8.

When the layers will be reconstructed on the images afterwards (``compress --reconstruct``), each choice is
measured as reconstruction leaves it instead: the fit refitted to the conv's outputs on the calibration images
and its primaries rounded against them (GPTQ, docs/FIT.md §18) rather than min-max. The two rank choices
differently: min-max rounding costs a dense 3-bit conv far more than GPTQ does, so a plan measured data-free
spends its bits where reconstruction would not have needed them (docs/ALGEBRA.md §13).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vconvert.convert.plan import DENSE, detached, storage_of
from vconvert.convert.reconstruct import (
    Moments,
    ReconstructSettings,
    fit_widths,
    layer_inputs,
    moments_of_inputs,
    write_fit,
)
from vconvert.convert.replay import LayerReplay, values_bytes
from vconvert.errors import BadInputError
from vconvert.fit.initialise import initialise_from_weight
from vconvert.nn.quantize import fake_quantize, minmax_step
from vconvert.nn.versatile import VersatileConv2d

SECONDARY_CHOICES = (1, 2, 4)
BIT_CHOICES = (2, 3, 4, 8)
# Shared masks below 8 bits only: on the shared ResNet-20 every conv had a per-filter or dense choice of no more
# bits and no more divergence than its 8-bit shared ones
SHARED_SECONDARY, SHARED_BIT_CHOICES = (2, 4), (2, 3, 4)
INT8 = 8  # the width of a plain int8 conv, and of primaries left float until the int8 export quantizes them
FLOAT_BITS = 32
PER_OUTPUT_BITS = FLOAT_BITS  # the int8 file's weight scale (or folded BN and bias) per output channel
RESOLUTION = 1000  # the knapsack rounds bits to budget / RESOLUTION
RECORDED_BYTES = 1 << 30  # activations kept per batch while measuring (a batch of ResNet-20 at 32x32: ~2.5 MB an image)
# What a file holds besides its weights (nodes, names, metadata, Q/DQ scales and zero points, int32 biases, the
# primary index at a whole int8): a constant per file and one per conv, fitted by least squares on exported files
# (docs/NOTES.md session 20): fp32 resnet8 and ResNet-20 (5,029 and 10,772 B above their weights); int8 25 files
# of resnet8 and ResNet-20 plans at 0.06-0.20x and fixed s=2/s=4 rows, the sizes within 1,150 B (at most 1.4 % of
# a file) of the fit. A plain int8 conv costs the least, a packed dense one unpacks its integers, a versatile one
# also expands its masks, shared masks in a graph of their own. Since session 21 the files no longer carry
# torch.export's graph signature (284 B per file and 128 B per conv of those fits, docs/NOTES.md session 21).
FP32_GRAPH_BITS_PER_FILE, FP32_GRAPH_BITS_PER_CONV = 440 * 8, 350 * 8
INT8_GRAPH_BITS_PER_FILE = 2720 * 8
INT8_GRAPH_BITS = {"plain": 310 * 8, "dense": 700 * 8, "per-filter": 620 * 8, "shared": 860 * 8}


@dataclass(frozen=True)
class Choice:
    """How one conv is stored: ``secondary`` 1 is dense, ``bits`` the width of its (primary) weights, ``shared``
    one learned mask per secondary shared by all primaries (``mask_sharing="shared"``: ~no mask bits)."""

    secondary: int
    bits: int
    shared: bool = False

    @property
    def plain(self) -> bool:
        """A plain Conv2d left to the int8 export (dense at 8 bits)."""
        return self.secondary == 1 and self.bits == INT8

    @property
    def graph_bits(self) -> int:
        """What the int8 file holds for a conv stored this way besides its weights (:data:`INT8_GRAPH_BITS`)."""
        if self.plain:
            return INT8_GRAPH_BITS["plain"]
        if self.secondary == 1:
            return INT8_GRAPH_BITS["dense"]
        return INT8_GRAPH_BITS["shared" if self.shared else "per-filter"]

    @property
    def weight_bits(self) -> int | None:
        """The width fine-tuning fake-quantises the primaries at; None: float until the int8 export."""
        return None if self.bits == INT8 else self.bits

    def options(self, base: dict) -> dict:
        """VersatileConv2d options: a dense conv with a per-output scale (channel mode, one secondary), or the
        learned mode of ``base`` with this many secondaries."""
        if self.secondary == 1:
            return DENSE.layer_kwargs()
        sharing = "shared" if self.shared else "per-filter"
        return {**base, "mode": "learned", "secondary": self.secondary, "mask_sharing": sharing}

    def label(self) -> str:
        stored = "dense" if self.secondary == 1 else f"s={self.secondary}" + (" shared masks" if self.shared else "")
        return f"{stored} {self.bits}-bit"


@dataclass
class Candidate:
    """A choice for one conv, with the bits the int8 file spends on it (weights and graph) and how much it alone
    changes the network's output."""

    choice: Choice
    bits: int
    divergence: float


# --------------------------------------------------------------------------- sizes
def plain_int8_bits(conv: nn.Conv2d) -> int:
    """Bits of a conv the int8 export quantizes as it is: 8 per weight and a scale per output channel."""
    return conv.weight.numel() * INT8 + conv.out_channels * PER_OUTPUT_BITS


def choice_bits(conv: nn.Conv2d, choice: Choice, base: dict) -> int:
    """Bits the int8 file stores for ``conv`` stored as ``choice`` (:meth:`VersatileConv2d.stored_bits` at the
    choice's width: primaries at their width, 1 bit per learned mask element, the output → primary index, a
    float scale per output), sized on the meta device."""
    if choice.plain:
        return plain_int8_bits(conv)
    bias = conv.out_channels * FLOAT_BITS if conv.bias is not None else 0
    return storage_of(conv, choice.options(base), choice.bits)[1] - bias


def fp32_file_bits(model: nn.Module) -> int:
    """Bits of the fp32 ONNX file: every conv and Linear weight and bias in float32, a conv without a bias getting
    one per output channel (BatchNorm folds into it), and the graph (:data:`FP32_GRAPH_BITS_PER_CONV` per conv and
    :data:`FP32_GRAPH_BITS_PER_FILE`)."""
    total = FP32_GRAPH_BITS_PER_FILE
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            total += (module.weight.numel() + module.out_channels) * FLOAT_BITS + FP32_GRAPH_BITS_PER_CONV
        elif isinstance(module, nn.Linear):
            total += (module.weight.numel() + (module.out_features if module.bias is not None else 0)) * FLOAT_BITS
    return total


def fixed_int8_bits(model: nn.Module, planned: Sequence[str]) -> int:
    """Bits of what the plan does not choose: Linear weights at 8 bits with float biases, a float bias per conv
    output, convs outside ``planned`` as plain int8 with their graph (a planned conv's graph is its choice's,
    :attr:`Choice.graph_bits`), and :data:`INT8_GRAPH_BITS_PER_FILE`."""
    total = INT8_GRAPH_BITS_PER_FILE
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            total += module.weight.numel() * INT8 + (module.out_features * FLOAT_BITS if module.bias is not None else 0)
        elif isinstance(module, nn.Conv2d):
            total += module.out_channels * FLOAT_BITS
            if name not in planned:
                total += plain_int8_bits(module) + INT8_GRAPH_BITS["plain"]
    return total


# --------------------------------------------------------------------------- sensitivity
def divergence(reference: Tensor, outputs: Tensor) -> float:
    """Mean KL(reference ‖ outputs) of the softmax over dim 1 (a plain MSE for outputs with one column)."""
    if reference.ndim < 2 or reference.shape[1] < 2:
        return float((reference - outputs).square().mean())
    flat = lambda t: t.movedim(1, -1).reshape(-1, t.shape[1]).double()  # noqa: E731
    log_p, log_q = F.log_softmax(flat(reference), 1), F.log_softmax(flat(outputs), 1)
    return float((log_p.exp() * (log_p - log_q)).sum(1).mean())


def _quantized_conv(conv: nn.Conv2d, bits: int) -> nn.Conv2d:
    """A copy of ``conv`` with its weight fake-quantised min-max per output channel at ``bits``."""
    copy_ = copy.deepcopy(conv).eval()
    with torch.no_grad():
        weight = conv.weight.detach()
        copy_.weight.copy_(fake_quantize(weight, minmax_step(weight, bits), bits))
    return copy_


def _fitted(conv: nn.Conv2d, choice: Choice, base: dict, init: str, cache: dict) -> VersatileConv2d:
    """The data-free fit of ``conv`` for ``choice`` (one fit per secondary count and mask sharing), quantized
    min-max at its width (8 bits: as the int8 export quantizes float primaries)."""
    key = (choice.secondary, choice.shared)
    if key not in cache:
        layer = VersatileConv2d.shaped_like(conv, **choice.options(base))
        initialise_from_weight(layer, conv.weight.detach(), detached(conv.bias), method=init)
        cache[key] = layer.eval()
    layer = cache[key]
    layer.set_weight_bits(choice.bits, "minmax")
    return layer


def _reconstructed(
    conv: nn.Conv2d, choice: Choice, base: dict, init: str, cache: dict, moments: Callable[[], Moments]
) -> VersatileConv2d:
    """``conv`` as reconstruction leaves ``choice``: the data-free fit refitted to ``conv``'s outputs described by
    ``moments`` (computed on first use) once in float, then rounded against them at each width its structure
    takes (8 bits: left float, quantized min-max as the int8 export does). ``cache`` keeps every width's layer."""
    key = (choice.secondary, choice.shared, choice.bits)
    if key not in cache:
        layer = VersatileConv2d.shaped_like(conv, **choice.options(base))
        initialise_from_weight(layer, conv.weight.detach(), detached(conv.bias), method=init)
        widths = SHARED_BIT_CHOICES if choice.shared else BIT_CHOICES
        fits = fit_widths(layer, conv, moments(), [None if bits == INT8 else bits for bits in widths],
                          ReconstructSettings())  # fmt: skip
        for bits, fit in fits.items():
            form = copy.deepcopy(layer)
            write_fit(form, fit, bits)
            if bits is None:
                form.set_weight_bits(INT8, "minmax")
            cache[(choice.secondary, choice.shared, bits or INT8)] = form.eval()
    return cache[key]


def _stored_form(
    conv: nn.Conv2d, choice: Choice, base: dict, init: str, cache: dict, moments: Callable[[], Moments] | None
) -> nn.Module:
    """``conv`` as ``choice`` stores it: a plain int8 conv; dense below 8 bits and fake-quantised, or fitted
    (``cache``: the fits of this conv); reconstructed on the images where ``moments`` are given."""
    if choice.plain:
        return _quantized_conv(conv, choice.bits)
    if moments is not None:
        return _reconstructed(conv, choice, base, init, cache, moments)
    return _quantized_conv(conv, choice.bits) if choice.secondary == 1 else _fitted(conv, choice, base, init, cache)


def _input_moments(model: nn.Module, name: str, conv: nn.Conv2d, images: Sequence[Tensor]) -> Moments:
    """Moments of the input patches of ``model``'s conv ``name`` on ``images`` (the original network's own
    inputs on both sides: each conv is measured alone in the original network)."""
    shape = VersatileConv2d.shaped_like(conv, **DENSE.layer_kwargs())
    inputs = list(layer_inputs(model, name, images))
    return moments_of_inputs(zip(inputs, inputs, strict=True), shape, conv)


def _sized_choices(conv: nn.Conv2d, secondaries: Sequence[int], base: dict) -> list[tuple[Choice, int]]:
    """Every choice ``conv``'s shape takes with the bits the int8 file spends on it (weights and graph)."""
    sized = []
    for secondary in secondaries:
        shared = [Choice(secondary, bits, shared=True) for bits in SHARED_BIT_CHOICES if secondary in SHARED_SECONDARY]
        for choice in [*(Choice(secondary, bits) for bits in BIT_CHOICES), *shared]:
            try:
                sized.append((choice, choice_bits(conv, choice, base) + choice.graph_bits))
            except ValueError:  # the shape cannot take that many secondaries
                continue
    return sized


def _chunks(replay: LayerReplay, images: Sequence[Tensor]) -> list[Tensor]:
    """``images`` in batches whose recorded activations stay within :data:`RECORDED_BYTES`."""
    every = torch.cat(list(images))
    per_image = values_bytes(replay.record(every[:1]))
    return list(every.split(max(1, RECORDED_BYTES // max(per_image, 1))))


class _FullRuns:
    """The network run whole for each swap: the fallback for a model torch.fx cannot trace."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def record(self, images: Tensor) -> Tensor:
        return images

    def output(self, images: Tensor) -> Tensor:
        return self.model(images)

    def run_with(self, images: Tensor, name: str, replacement: nn.Module) -> Tensor:
        original = self.model.get_submodule(name)
        self.model.set_submodule(name, replacement)
        try:
            return self.model(images)
        finally:
            self.model.set_submodule(name, original)


def measure_candidates(
    model: nn.Module,
    convs: dict[str, nn.Conv2d],
    allowed: dict[str, tuple[int, ...]],
    base: dict,
    images: Sequence[Tensor],
    init: str = "fit",
    progress: Callable[[int, int, str], None] | None = None,
    reconstructed: bool = False,
) -> dict[str, list[Candidate]]:
    """Every choice of every conv in ``convs`` (secondary counts ``allowed[name]``, each at every width of
    :data:`BIT_CHOICES`) with its bits and the mean divergence of the network's outputs on ``images`` when that
    conv alone takes it; ``reconstructed``: each choice as reconstruction on ``images`` would leave it. Each batch
    runs through the network once; each swap then re-runs only what follows the conv
    (:class:`~vconvert.convert.replay.LayerReplay`; the whole network where FX cannot trace it). ``model`` is left
    as it was."""
    model.eval()
    sized = {name: _sized_choices(conv, allowed[name], base) for name, conv in convs.items()}
    summed = {name: [0.0] * len(choices) for name, choices in sized.items()}
    fits: dict[str, dict[tuple, VersatileConv2d]] = {name: {} for name in convs}
    moments = (  # computed once per conv, when its first choice is built, and released once all are
        {
            name: functools.cache(functools.partial(_input_moments, model, name, conv, images))
            for name, conv in convs.items()
        }
        if reconstructed
        else dict.fromkeys(convs)
    )
    with torch.no_grad():
        try:
            runner: LayerReplay | _FullRuns = LayerReplay(model)
            batches = _chunks(runner, images)
        except Exception:  # FX raises many types for untraceable Python: run the whole network instead
            runner, batches = _FullRuns(model), list(images)
        for batch_index, batch in enumerate(batches):
            values = runner.record(batch)
            reference = runner.output(values)
            for index, (name, conv) in enumerate(convs.items()):
                if progress:
                    progress(batch_index * len(convs) + index, len(batches) * len(convs), name)
                for position, (choice, _) in enumerate(sized[name]):
                    form = _stored_form(conv, choice, base, init, fits[name], moments[name])
                    outputs = runner.run_with(values, name, form)
                    summed[name][position] += divergence(reference, outputs) * len(batch)
                if moments[name] is not None:
                    moments[name].cache_clear()  # every choice of this conv is built and cached in `fits`
            del values
    if progress:
        progress(len(batches) * len(convs), len(batches) * len(convs), "")
    count = sum(len(batch) for batch in batches)
    return {
        name: [
            Candidate(choice, size, total / count)
            for (choice, size), total in zip(sized[name], summed[name], strict=True)
        ]
        for name in convs
    }


# --------------------------------------------------------------------------- choosing
def knapsack(candidates: dict[str, list[Candidate]], budget: int) -> dict[str, Candidate] | None:
    """The candidate per layer with the least total divergence whose bits fit ``budget`` (bits rounded up to
    ``budget / RESOLUTION``, so what is picked always fits), or None when nothing fits."""
    unit = max(1, math.ceil(budget / RESOLUTION))
    capacity = budget // unit
    best = torch.full((capacity + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    picks: list[tuple[str, torch.Tensor]] = []
    for name, options in candidates.items():
        layer_best = torch.full_like(best, math.inf)
        pick = torch.full((capacity + 1,), -1, dtype=torch.long)
        for index, candidate in enumerate(options):
            units = math.ceil(candidate.bits / unit)
            if units > capacity:
                continue
            shifted = torch.full_like(best, math.inf)
            shifted[units:] = best[: capacity + 1 - units] + candidate.divergence
            better = shifted < layer_best
            layer_best = torch.where(better, shifted, layer_best)
            pick = torch.where(better, torch.tensor(index), pick)
        best = layer_best
        picks.append((name, pick))
    if not math.isfinite(float(best.min())):
        return None
    used = int(best.argmin())
    chosen: dict[str, Candidate] = {}
    for name, pick in reversed(picks):
        candidate = candidates[name][int(pick[used])]
        chosen[name] = candidate
        used -= math.ceil(candidate.bits / unit)
    return dict(reversed(list(chosen.items())))


def greedy(candidates: dict[str, list[Candidate]], budget: int) -> dict[str, Candidate] | None:
    """From each layer's largest candidate, repeatedly take the step (any smaller candidate of one layer)
    with the least divergence added per bit saved, until the total fits ``budget``; None when it cannot."""
    chosen = {name: max(options, key=lambda c: (c.bits, -c.divergence)) for name, options in candidates.items()}
    total = sum(candidate.bits for candidate in chosen.values())
    while total > budget:
        steps = [
            ((option.divergence - current.divergence) / (current.bits - option.bits), name, option)
            for name, current in chosen.items()
            for option in candidates[name]
            if option.bits < current.bits
        ]
        if not steps:
            return None
        _, name, option = min(steps, key=lambda step: step[0])
        total -= chosen[name].bits - option.bits
        chosen[name] = option
    return chosen


SEARCHES = {"knapsack": knapsack, "greedy": greedy}


@dataclass
class SizePlan:
    """What the planner chose per conv, and the sizes it worked from."""

    chosen: dict[str, Candidate]
    fp32_bits: int
    fixed_bits: int
    target_size: float
    search: str
    reconstructed: bool = False

    @property
    def int8_bits(self) -> int:
        return self.fixed_bits + sum(candidate.bits for candidate in self.chosen.values())

    @property
    def size_ratio(self) -> float:
        """The int8 file's size over the fp32 file's, as planned (weights and graph)."""
        return self.int8_bits / self.fp32_bits

    def note(self) -> str:
        counts: dict[str, int] = {}
        for candidate in self.chosen.values():
            counts[candidate.choice.label()] = counts.get(candidate.choice.label(), 0) + 1
        mix = ", ".join(f"{count}x {label}" for label, count in sorted(counts.items()))
        measured = ", each choice as reconstruction leaves it" if self.reconstructed else ""
        return (
            f"--target-size {self.target_size:g}: {mix}; planned int8 file {self.size_ratio:.3f}x of the fp32 "
            f"file (the {self.search} of the least output divergence on the calibration images{measured})"
        )


def plan_for_size(
    model: nn.Module,
    convs: dict[str, nn.Conv2d],
    allowed: dict[str, tuple[int, ...]],
    base: dict,
    images: Sequence[Tensor],
    target_size: float,
    init: str = "fit",
    search: str = "knapsack",
    progress: Callable[[int, int, str], None] | None = None,
    candidates: dict[str, list[Candidate]] | None = None,
    reconstructed: bool = False,
) -> SizePlan:
    """Choose a :class:`Choice` for each conv of ``convs`` so that the int8 file's weights are at most
    ``target_size`` of the fp32 file's (convs left out of ``convs`` stay plain int8). ``candidates`` keeps the
    measured choices (:func:`measure_candidates`): an empty dict is filled, a filled one is reused (several sizes
    planned from one measurement). ``reconstructed``: measure each choice as reconstruction on ``images`` leaves
    it (the layers will be reconstructed after planning)."""
    if not 0 < target_size < 1:
        raise BadInputError(f"`target_size` must lie between 0 and 1 (a fraction of the fp32 file); got {target_size}.")
    if search not in SEARCHES:
        raise BadInputError(f"The search must be one of {', '.join(SEARCHES)}; got {search!r}.")
    if not images and not candidates:
        raise BadInputError("`target_size` needs calibration images (a list of batches) to measure each layer on.")
    fp32 = fp32_file_bits(model)
    fixed = fixed_int8_bits(model, list(convs))
    budget = math.floor(target_size * fp32) - fixed
    smallest = fixed + sum(_fewest_bits(conv, allowed[name], base) for name, conv in convs.items())
    if smallest > target_size * fp32:
        raise BadInputError(
            f"`target_size` {target_size:g} is out of reach: the smallest plan (every conv at its fewest bits) is "
            f"{smallest / fp32:.3f}x of the fp32 file; ask for more."
        )
    plain = fixed + sum(plain_int8_bits(conv) + INT8_GRAPH_BITS["plain"] for conv in convs.values())
    if plain <= target_size * fp32:
        raise BadInputError(
            f"`target_size` {target_size:g} is no smaller than the plain int8 file ({plain / fp32:.3f}x): export with "
            "--quantize int8 instead, or ask for less."
        )
    if not candidates:
        measured = measure_candidates(model, convs, allowed, base, images, init, progress, reconstructed)
        if candidates is not None:
            candidates.update(measured)
        candidates = measured
    chosen = SEARCHES[search](candidates, budget)
    if chosen is None:  # unreachable after the size check above, kept as a guard against rounding
        raise BadInputError(f"`target_size` {target_size:g} is out of reach; ask for more.")
    return SizePlan(chosen, fp32, fixed, target_size, search, reconstructed)


def _fewest_bits(conv: nn.Conv2d, secondaries: Sequence[int], base: dict) -> int:
    """Bits of ``conv`` at its smallest choice (any that its shape takes)."""
    return min(size for _, size in _sized_choices(conv, secondaries, base))
