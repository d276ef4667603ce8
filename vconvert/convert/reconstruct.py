"""Output reconstruction: refit each versatile layer so its outputs match the original conv's on unlabeled images.

The data-free fit (docs/FIT.md §1-§9) matches *weights*; what matters is the layer's *output*. For a conv,
the output error over calibration images is a quadratic form in the weight (docs/FIT.md §18):

    E_o = w_oᵀ A w_o − 2 w_oᵀ g_o + c_o,      A = E[x_s x_sᵀ],  g_o = E[x_s x_tᵀ] t_o,  c_o = t_oᵀ E[x_t x_tᵀ] t_o

per output o, with x_s the student's and x_t the teacher's im2col patches of the same image and position
(the student's input comes from the already reconstructed layers before it, the target from the original
network, so errors do not accumulate: BRECQ's choice), w_o the versatile row and t_o the dense one. Layers
are visited in execution order in one node-by-node run of both networks (falling back to partial forwards per
layer where FX cannot trace them); at each, A, E[x_s x_tᵀ] and E[x_t x_tᵀ] are collected (K x K, K = c·kh·kw),
after which the fit needs no image: rounds of exact sub-problem solves, the alternation of docs/FIT.md §6 under
the data metric A instead of the identity (or §7's prior):

- masks (learned per-filter): coordinate descent per row, a bit flips where E_o drops (rows are independent
  given primaries and scales);
- primaries: one K x K positive-definite system per primary filter (its members' masks, scales and rows);
- scales: least squares per row;
- biases (layers that have one): the mean output error set to zero.

Each step solves its sub-problem exactly, so the error never rises. With ``weight_bits`` the primaries are
then rounded to integers with error feedback under their own quadratic form (GPTQ/OBQ's sequential rounding,
an exact-objective alternative to AdaRound's learned rounding), with the step per primary chosen from a few
clipping ratios; masks and float scales are refitted around the integers, and the layer is left
fake-quantised (``set_weight_bits(bits, "lsq")`` with the chosen steps), so ``export --quantize int8`` writes
those integers. Per-row errors are weighted by 1/var(teacher output) (what the following BatchNorm does).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from vconvert.convert.replay import GraphStepper, LayerReplay
from vconvert.fit.output_fit import (
    improve_masks,
    quantize_primaries,
    relative_error,
    row_weights,
    solve_primaries,
    solve_scales,
)
from vconvert.nn.modes import eval_mode
from vconvert.nn.quantize import check_bits
from vconvert.nn.versatile import PROXY_OFF, PROXY_ON, VersatileConv2d, versatile_layers

DEFAULT_IMAGES = 1024


@dataclass
class ReconstructSettings:
    """How :func:`reconstruct` fits: ``rounds`` of (masks, primaries, scales), ``mask_sweeps`` coordinate-descent
    sweeps per mask step, ``damping`` (relative ridge of each primary's system, towards its previous value),
    ``weight_bits`` (None: each layer's own width, e.g. a ``--target-size`` plan's, or float), ``normalise``
    (weight each output by 1/var of the teacher's) and ``positions`` (output positions sampled per image for the
    statistics)."""

    rounds: int = 3
    mask_sweeps: int = 2
    positions: int = 256
    damping: float = 1e-4
    weight_bits: int | None = None
    normalise: bool = True

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.mask_sweeps < 0 or self.positions < 1 or not self.damping > 0:
            raise ValueError("rounds and positions must be ≥ 1, mask_sweeps ≥ 0 and damping > 0.")
        if self.weight_bits is not None:
            check_bits(self.weight_bits)


@dataclass
class LayerResult:
    """One layer's reconstruction: its relative output error on the calibration images before and after
    (Σ_o d_o E_o / Σ_o d_o Var_o), the mask bits that changed, and why it was left alone (``skipped``)."""

    name: str
    error_before: float = 0.0
    error_after: float = 0.0
    mask_flips: int = 0
    seconds: float = 0.0
    skipped: str | None = None


@dataclass
class Reconstruction:
    """What :func:`reconstruct` did: settings, image count and the per-layer results."""

    settings: ReconstructSettings
    images: int
    layers: list[LayerResult] = field(default_factory=list)
    seconds: float = 0.0

    def mean_errors(self) -> tuple[float, float]:
        """Mean relative output error of the reconstructed layers before and after."""
        done = [layer for layer in self.layers if layer.skipped is None]
        if not done:
            return 0.0, 0.0
        return (
            sum(layer.error_before for layer in done) / len(done),
            sum(layer.error_after for layer in done) / len(done),
        )

    def record(self, data: str) -> dict:
        """The metadata record a ``.vc.pt`` keeps (docs/FORMAT.md §6, ``reconstruction``)."""
        before, after = self.mean_errors()
        return {
            "data": data,
            "images": self.images,
            "settings": asdict(self.settings),
            "layers": sum(layer.skipped is None for layer in self.layers),
            "error_before": round(before, 6),
            "error_after": round(after, 6),
            "seconds": round(self.seconds, 1),
        }


# --------------------------------------------------------------------------- statistics
@dataclass
class Moments:
    """Sums over calibration patches: ``ss`` = Σ x_s x_sᵀ, ``st`` = Σ x_s x_tᵀ (K x K), ``s``/``t`` the patch sums
    (K,), ``yy``/``y`` the sums of the teacher's outputs (without bias) and of their squares (N,), ``count``
    patches; float64 (each batch multiplied in float32)."""

    ss: Tensor
    st: Tensor
    s: Tensor
    t: Tensor
    yy: Tensor
    y: Tensor
    count: int = 0

    @classmethod
    def zeros(cls, size: int, outputs: int) -> Moments:
        square, vector = (size, size), (size,)
        return cls(*(torch.zeros(shape, dtype=torch.float64) for shape in (square, square, vector, vector)),
                   torch.zeros(outputs, dtype=torch.float64), torch.zeros(outputs, dtype=torch.float64))  # fmt: skip

    def add(self, student: Tensor, teacher: Tensor, target: Tensor) -> None:
        """Add (patches, K) rows of the student's and teacher's patches of the same positions; ``target`` (N, K)
        is the teacher's weight."""
        self.ss += (student.T @ student).double()
        self.st += (student.T @ teacher).double()
        self.s += student.sum(0).double()
        self.t += teacher.sum(0).double()
        outputs = teacher @ target.T
        self.yy += outputs.square().sum(0).double()
        self.y += outputs.sum(0).double()
        self.count += student.shape[0]

    def second_moments(self, centred: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(A, B, c): E[x_s x_sᵀ], E[x_s x_tᵀ] and the teacher's output energies E[y_o²], or the covariances and
        variances with ``centred``."""
        n = max(self.count, 1)
        a, b, c = self.ss / n, self.st / n, self.yy / n
        if centred:
            ms, mt = self.s / n, self.t / n
            a, b, c = a - torch.outer(ms, ms), b - torch.outer(ms, mt), c - (self.y / n).square()
        return a, b, c.clamp_min(0)


def conv_padding(layer: VersatileConv2d) -> tuple[int, int]:
    """The layer's padding as two integers (``"valid"`` is 0; ``"same"`` for stride 1)."""
    if layer.padding == "valid":
        return (0, 0)
    if layer.padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(layer.dilation, layer.kernel_size, strict=True))  # type: ignore[return-value]
    return layer.padding  # type: ignore[return-value]


def patches(x: Tensor, layer: VersatileConv2d, positions: Tensor | None = None) -> Tensor:
    """(B·L, c·kh·kw) im2col rows of ``x`` as ``layer`` sees it, columns in the weight's (c, kh, kw) order; only
    the output ``positions`` (indices into L) when given."""
    cols = F.unfold(x.float(), layer.kernel_size, layer.dilation, conv_padding(layer), layer.stride)
    if positions is not None:
        cols = cols.index_select(2, positions)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def sampled_positions(count: int, keep: int, generator: torch.Generator) -> Tensor | None:
    """``keep`` random output positions of ``count`` (sorted), or None when all are kept."""
    if count <= keep:
        return None
    return torch.randperm(count, generator=generator)[:keep].sort().values


class _Stop(Exception):
    """Raised by a hook once the layer of interest has seen its input: the rest of the forward is not needed."""


def layer_inputs(model: nn.Module, name: str, batches: Sequence[Tensor]) -> Iterator[Tensor]:
    """The (first) input of ``model``'s module ``name`` for each batch (forward stopped right before it runs)."""
    module = model.get_submodule(name)
    seen: list[Tensor] = []

    def hook(_module: nn.Module, args: tuple) -> None:
        seen.append(args[0].detach() if isinstance(args[0], Tensor) else args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        for batch in batches:
            seen.clear()
            try:
                with torch.no_grad():
                    model(batch)
            except _Stop:
                pass
            if not seen:
                raise ValueError(f"layer {name!r} is not called in the model's forward.")
            yield seen[0]
    finally:
        handle.remove()


def layer_moments(
    student: nn.Module, teacher: nn.Module, name: str, layer: VersatileConv2d, batches: Sequence[Tensor],
    positions: int = 256,
) -> Moments:  # fmt: skip
    """Moments of the student's and teacher's patches at layer ``name`` over ``batches``, at up to ``positions``
    random output positions per batch image (the same for both; a fixed seed)."""
    return moments_of_inputs(
        _prefix_pairs(student, teacher, name, batches), layer, teacher.get_submodule(name), positions
    )


def _prefix_pairs(
    student: nn.Module, teacher: nn.Module, name: str, batches: Sequence[Tensor]
) -> Iterator[tuple[Tensor, Tensor]]:
    """Layer ``name``'s (student, teacher) input per batch, each network run from the start up to it."""
    return zip(layer_inputs(student, name, batches), layer_inputs(teacher, name, batches), strict=True)


def moments_of_inputs(
    inputs: Iterable[tuple[Tensor, Tensor]], layer: VersatileConv2d, original: nn.Conv2d, positions: int = 256
) -> Moments:
    """:func:`layer_moments` from the (student, teacher) inputs of ``layer`` for each batch, in batch order;
    ``original`` is the teacher's conv."""
    size = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    moments = Moments.zeros(size, layer.out_channels)
    target = original.weight.detach().float().flatten(1)
    generator = torch.Generator().manual_seed(0)
    for x_s, x_t in inputs:
        count = _output_positions(x_s.shape[2:], layer)
        keep = sampled_positions(count, positions, generator)
        moments.add(patches(x_s, layer, keep), patches(x_t, layer, keep), target)
    return moments


def _output_positions(size: torch.Size, layer: VersatileConv2d) -> int:
    """H_out · W_out of ``layer`` on an input of spatial ``size``."""
    padding = conv_padding(layer)
    sides = [
        (side + 2 * pad - dil * (kernel - 1) - 1) // stride + 1
        for side, pad, dil, kernel, stride in zip(
            size, padding, layer.dilation, layer.kernel_size, layer.stride, strict=True
        )
    ]
    return sides[0] * sides[1]


def execution_order(model: nn.Module, batch: Tensor) -> list[str]:
    """Names of ``model``'s versatile layers in the order its forward calls them (uncalled ones last)."""
    layers = dict(versatile_layers(model))
    order: list[str] = []
    handles = [
        layer.register_forward_pre_hook(lambda _m, _a, name=name: order.append(name) if name not in order else None)
        for name, layer in layers.items()
    ]
    try:
        with torch.no_grad():
            model(batch[:1])
    finally:
        for handle in handles:
            handle.remove()
    return order + [name for name in layers if name not in order]


# --------------------------------------------------------------------------- one layer
def reconstructable(layer: VersatileConv2d) -> str | None:
    """Why ``layer`` cannot be reconstructed (None when it can): only layers whose primaries span all input
    channels (modes learned and spatial) are."""
    if layer.channel_window != layer.in_channels:
        return "channel windows are not reconstructed (kept at the data-free fit)"
    return None


def layer_state(layer: VersatileConv2d) -> tuple[Tensor, Tensor, Tensor]:
    """(primaries (P, K), masks (N, K), scales (N,)) of ``layer`` as float64."""
    primary = layer.quantized_primary().detach().double().flatten(1)
    mask = layer.output_mask()
    shape = (layer.out_channels, *layer.primary.shape[1:])
    masks = torch.ones(shape, dtype=torch.float64) if mask is None else mask.detach().double().expand(shape)
    scale = (
        layer.scale.detach().double()
        if layer.scale is not None
        else torch.ones(layer.out_channels, dtype=torch.float64)
    )
    return primary, masks.reshape(layer.out_channels, -1).clone(), scale


@torch.no_grad()
def write_layer(layer: VersatileConv2d, primary: Tensor, masks: Tensor, scale: Tensor, bias: Tensor | None) -> None:
    """Copy fitted primaries, masks (learned per-filter layers only), scales and bias into ``layer``."""
    layer.primary.copy_(primary.view_as(layer.primary))
    if layer.mask_proxy is not None and layer.mask_sharing == "per-filter":
        on = masks.view_as(layer.mask_proxy) > 0.5
        layer.mask_proxy.copy_(torch.where(on, PROXY_ON, PROXY_OFF).to(layer.mask_proxy))
    if layer.scale is not None:
        layer.scale.copy_(scale)
    if bias is not None and layer.bias is not None:
        layer.bias.copy_(bias)


@dataclass
class LayerFit:
    """A fitted layer state (float64): primaries (P, K), masks (N, K), scales (N,), the primaries' quantization
    steps (P,) when they are integers times a step, the bias when the layer has one."""

    primary: Tensor
    masks: Tensor
    scale: Tensor
    steps: Tensor | None = None
    bias: Tensor | None = None


@dataclass
class LayerProblem:
    """One layer's output error as a quadratic form (docs/FIT.md §18): E_o = w_oᵀ A w_o − 2 w_o·g_o + c_o, the
    output weights ``d``, which primary each output uses, and what the layer lets move."""

    a: Tensor
    g: Tensor
    c: Tensor
    d: Tensor
    index: Tensor
    learns_masks: bool
    has_scale: bool

    def rows(self, fit: LayerFit) -> Tensor:
        """The dense (N, K) weight of ``fit``."""
        return fit.scale.unsqueeze(1) * fit.masks * fit.primary[self.index]

    def error(self, fit: LayerFit) -> float:
        """Relative output error of ``fit``."""
        return relative_error(self.rows(fit), self.a, self.g, self.c, self.d)


def layer_problem(
    layer: VersatileConv2d, teacher: nn.Conv2d, moments: Moments, settings: ReconstructSettings
) -> LayerProblem:
    """The quadratic ``layer`` is fitted on against ``teacher`` (its original conv), from ``moments``."""
    centred = layer.bias is not None
    a, b, c = moments.second_moments(centred)
    g = teacher.weight.detach().double().flatten(1) @ b.T
    n = max(moments.count, 1)
    d = row_weights(c if centred else c - (moments.y / n).square(), settings.normalise)
    learns_masks = layer.mask_proxy is not None and layer.mask_sharing == "per-filter"
    return LayerProblem(a, g, c, d, layer.primary_index, learns_masks, layer.scale is not None)


def solve_float(problem: LayerProblem, fit: LayerFit, settings: ReconstructSettings) -> LayerFit:
    """``settings.rounds`` of masks, primaries and scales from ``fit`` (none of them can raise the error)."""
    primary, masks, scale = fit.primary, fit.masks, fit.scale
    for _ in range(settings.rounds):
        if problem.learns_masks:
            masks = improve_masks(problem.a, problem.g, scale.unsqueeze(1) * primary[problem.index], masks,
                                  settings.mask_sweeps)  # fmt: skip
        primary = solve_primaries(problem.a, problem.g, masks, scale, problem.d, problem.index, primary,
                                  settings.damping)  # fmt: skip
        if problem.has_scale:
            scale = solve_scales(problem.a, problem.g, masks * primary[problem.index], scale)
    return LayerFit(primary, masks, scale)


def round_to_width(problem: LayerProblem, fit: LayerFit, bits: int, settings: ReconstructSettings) -> LayerFit:
    """``fit``'s primaries rounded to ``bits`` (GPTQ under the output error), then two rounds of masks and scales
    around the fixed integers."""
    a, g, index = problem.a, problem.g, problem.index
    codes, steps = quantize_primaries(a, g, fit.masks, fit.scale, problem.d, index, fit.primary, bits,
                                      settings.damping)  # fmt: skip
    primary, masks, scale = codes * steps.unsqueeze(1), fit.masks, fit.scale
    for _ in range(2):
        if problem.learns_masks:
            masks = improve_masks(a, g, scale.unsqueeze(1) * primary[index], masks, settings.mask_sweeps)
        if problem.has_scale:
            scale = solve_scales(a, g, masks * primary[index], scale)
    return LayerFit(primary, masks, scale, steps)


def with_bias(problem: LayerProblem, fit: LayerFit, teacher: nn.Conv2d, moments: Moments) -> LayerFit:
    """A copy of ``fit`` with the bias that zeroes the mean output error (for layers that have a bias)."""
    n = max(moments.count, 1)
    teacher_bias = teacher.bias.detach().double() if teacher.bias is not None else 0.0
    target = teacher.weight.detach().double().flatten(1)
    return replace(fit, bias=target @ (moments.t / n) + teacher_bias - problem.rows(fit) @ (moments.s / n))


@torch.no_grad()
def write_fit(layer: VersatileConv2d, fit: LayerFit, bits: int | None) -> None:
    """Copy ``fit`` into ``layer``; with ``fit.steps`` the layer is left fake-quantised at ``bits`` with them."""
    if fit.steps is not None:
        layer.set_weight_bits(bits, "lsq")
    write_layer(layer, fit.primary, fit.masks, fit.scale, fit.bias)
    if fit.steps is not None:
        layer.primary_step.data.copy_(fit.steps.to(layer.primary_step))


def fit_layer(
    layer: VersatileConv2d, teacher: nn.Conv2d, moments: Moments, settings: ReconstructSettings
) -> LayerResult:
    """Refit ``layer`` in place to the outputs of ``teacher`` (its original conv) described by ``moments``."""
    result = LayerResult(name="")
    problem = layer_problem(layer, teacher, moments, settings)
    start = LayerFit(*layer_state(layer))
    result.error_before = problem.error(start)
    fit = solve_float(problem, start, settings)
    bits = settings.weight_bits if settings.weight_bits is not None else layer.weight_bits  # a planned width too
    if bits is not None:
        fit = round_to_width(problem, fit, bits, settings)
    result.error_after = problem.error(fit)
    result.mask_flips = int((fit.masks != start.masks).sum()) if problem.learns_masks else 0
    if layer.bias is not None:
        fit = with_bias(problem, fit, teacher, moments)
    write_fit(layer, fit, bits)
    return result


def fit_widths(
    layer: VersatileConv2d,
    teacher: nn.Conv2d,
    moments: Moments,
    widths: Sequence[int | None],
    settings: ReconstructSettings,
) -> dict[int | None, LayerFit]:
    """``layer`` (not changed) fitted to ``teacher``'s outputs once in float, then rounded to each of ``widths``
    (None: left float): what :func:`fit_layer` would give at each width, for the price of one float fit."""
    problem = layer_problem(layer, teacher, moments, settings)
    fitted = solve_float(problem, LayerFit(*layer_state(layer)), settings)
    fits = {}
    for bits in widths:
        fit = fitted if bits is None else round_to_width(problem, fitted, bits, settings)
        fits[bits] = with_bias(problem, fit, teacher, moments) if layer.bias is not None else fit
    return fits


# --------------------------------------------------------------------------- the pass
LayerInputs = Callable[[], Iterable[tuple[Tensor, Tensor]]]  # a layer's (student, teacher) input per batch


def reconstruct(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[Tensor],
    settings: ReconstructSettings | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    layers: Sequence[str] | None = None,
) -> Reconstruction:
    """Refit every versatile layer of ``student`` (in place, in execution order) so that its outputs match those
    of the same-named conv of ``teacher`` (the original model) on ``batches`` of unlabeled, preprocessed images.

    Both models run in eval mode (BatchNorm statistics as they are: recalibrate afterwards). ``progress`` is
    called as (layers done, layers in all, layer name); ``layers`` limits the pass to those names. Returns the
    per-layer record. Both networks are run once, node by node (:func:`single_pass_inputs`), where FX traces
    them alike; otherwise from the start up to each layer (:func:`prefix_inputs`), with the same result.
    """
    settings = settings or ReconstructSettings()
    if not batches:
        raise ValueError("reconstruction needs at least one batch of calibration images.")
    begin = time.perf_counter()
    report = Reconstruction(settings, sum(int(batch.shape[0]) for batch in batches))
    with eval_mode(student, teacher):
        order = [name for name in execution_order(student, batches[0]) if layers is None or name in layers]
        walk = single_pass_inputs(student, teacher, batches, order)
        if walk is None:
            walk = prefix_inputs(student, teacher, batches, order)
        for done, (name, inputs) in enumerate(walk):
            if progress:
                progress(done, len(order), name)
            report.layers.append(_reconstruct_layer(student, teacher, name, inputs, settings))
        if progress:
            progress(len(order), len(order), "")
    report.seconds = time.perf_counter() - begin
    return report


def _reconstruct_layer(
    student: nn.Module, teacher: nn.Module, name: str, inputs: LayerInputs, settings: ReconstructSettings
) -> LayerResult:
    """Refit the student's layer ``name`` from its ``inputs`` (read only when it is reconstructed)."""
    layer = student.get_submodule(name)
    started = time.perf_counter()
    reason = reconstructable(layer)
    if reason is not None:
        if settings.weight_bits is not None:  # one width for the whole model: plain rounding here
            layer.set_weight_bits(settings.weight_bits, "lsq")
        return LayerResult(name=name, skipped=reason)
    original = teacher.get_submodule(name)
    moments = moments_of_inputs(inputs(), layer, original, settings.positions)
    result = fit_layer(layer, original, moments, settings)
    result.name, result.seconds = name, time.perf_counter() - started
    return result


def prefix_inputs(
    student: nn.Module, teacher: nn.Module, batches: Sequence[Tensor], order: Sequence[str]
) -> Iterator[tuple[str, LayerInputs]]:
    """Each layer of ``order`` with its inputs found by running both networks from the start up to it (cost
    quadratic in depth; works for any model)."""
    for name in order:
        yield name, lambda name=name: _prefix_pairs(student, teacher, name, batches)


def single_pass_inputs(
    student: nn.Module, teacher: nn.Module, batches: Sequence[Tensor], order: Sequence[str]
) -> Iterator[tuple[str, LayerInputs]] | None:
    """Each layer of ``order`` with its inputs, from one node-by-node run of both traced graphs over all
    ``batches`` together; the layer's call runs once the consumer asks for the next one, so it runs as refitted.
    None when FX cannot trace a network, the graphs differ, or the graph's order is not ``order``."""
    try:
        traced = LayerReplay(student), LayerReplay(teacher)
    except Exception:  # whatever FX raises on a model it cannot trace
        return None
    student_nodes, teacher_nodes = traced[0].nodes, traced[1].nodes
    if not _same_graph(student_nodes, teacher_nodes):
        return None
    wanted = set(order)
    sites: dict[str, fx.Node] = {}  # each layer's first call site
    for node in student_nodes:
        if node.op == "call_module" and node.target in wanted:
            sites.setdefault(str(node.target), node)
    if list(sites) != list(order):
        return None
    return _walk(*(GraphStepper(replay, batches) for replay in traced), {node: name for name, node in sites.items()})


def _walk(student: GraphStepper, teacher: GraphStepper, sites: dict[fx.Node, str]) -> Iterator[tuple[str, LayerInputs]]:
    remaining = len(sites)
    for student_node, teacher_node in zip(student.replay.nodes, teacher.replay.nodes, strict=True):
        if student_node in sites:
            pending = [list(zip(student.arguments(student_node), teacher.arguments(teacher_node), strict=True))]
            yield sites[student_node], pending.pop  # taken once, so the consumer holds no stale activations
            pending.clear()
            remaining -= 1
            if not remaining:  # the rest of the networks feeds no layer to reconstruct
                return
        student.step(student_node)
        teacher.step(teacher_node)


def _same_graph(first: Sequence[fx.Node], second: Sequence[fx.Node]) -> bool:
    """Whether two traced graphs run the same operations on the same operands, node for node."""
    if len(first) != len(second):
        return False
    position = {node: index for index, node in enumerate(first)}
    position.update({node: index for index, node in enumerate(second)})
    for ours, theirs in zip(first, second, strict=True):
        if ours.op != theirs.op or ours.target != theirs.target:
            return False
        if [position[n] for n in ours.all_input_nodes] != [position[n] for n in theirs.all_input_nodes]:
            return False
    return True


@torch.no_grad()
def output_errors(student: nn.Module, teacher: nn.Module, batches: Sequence[Tensor]) -> dict[str, float]:
    """Relative output error ‖y_s − y_t‖² / ‖y_t − mean‖² of every versatile layer of ``student`` against the
    same-named module of ``teacher``, each model run on its own inputs (errors accumulate, as in deployment)."""
    names = [name for name, _ in versatile_layers(student)]
    sums = {name: [0.0, 0.0] for name in names}
    outputs: dict[str, dict[str, Tensor]] = {"student": {}, "teacher": {}}
    handles = []
    for which, model in (("student", student), ("teacher", teacher)):
        for name in names:
            hook = lambda _m, _a, out, which=which, name=name: outputs[which].__setitem__(name, out.detach())  # noqa: E731
            handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        with eval_mode(student, teacher):
            for batch in batches:
                student(batch), teacher(batch)
                for name in names:
                    y_s, y_t = outputs["student"][name].double(), outputs["teacher"][name].double()
                    sums[name][0] += float((y_s - y_t).square().sum())
                    sums[name][1] += float((y_t - y_t.mean(dim=(0, 2, 3), keepdim=True)).square().sum())
    finally:
        for handle in handles:
            handle.remove()
    return {name: error / total if total > 0 else 0.0 for name, (error, total) in sums.items()}
