"""Output-matching algebra for a versatile layer: the exact sub-problem solves behind output reconstruction.

A conv's output error over calibration images is a quadratic form in its weight (docs/FIT.md §18): per output o,
E_o = w_oᵀ A w_o − 2 w_o·g_o + c_o. These pure tensor functions minimise Σ d_o E_o over one of masks (coordinate
descent), primaries (one K x K system per primary, or conjugate gradients for large K), scales (least squares),
and round primaries to integers under their quadratic form (GPTQ's error feedback). Each never raises the error.
Used by :mod:`vconvert.convert.reconstruct`, which gathers A, g and c from the images.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor

from vconvert.nn.quantize import largest_level

# step = ratio · max|P_p| / Q, the best one kept. Down to 0.15: at 2-3 bits a primary with one large element
# otherwise rounds all its others to zero (docs/NOTES.md session 20: the 0.06x plan's start 28 % -> 70 %)
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15)
_SYSTEM_BYTES = 1 << 27  # float64 K x K systems built at once (chunked over primaries)
EXACT_LIMIT = 1152  # K = c·kh·kw above which primaries are solved by conjugate gradients, not factorisations
CG_ITERATIONS = 30


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """torch on one thread inside (the element-by-element loops run thousands of tiny ops: more threads only
    add synchronisation, which costs most when the cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def row_weights(variance: Tensor, normalise: bool) -> Tensor:
    """d_o = 1/``variance``_o of teacher output o (floored at 1e-3 of the mean), or ones."""
    if not normalise:
        return torch.ones_like(variance)
    floor = 1e-3 * variance.mean().clamp_min(1e-30)
    return 1.0 / variance.clamp_min(floor)


def row_errors(weight: Tensor, a: Tensor, g: Tensor, c: Tensor) -> Tensor:
    """E_o = w_oᵀ A w_o − 2 w_o·g_o + c_o for every row of ``weight`` (N, K)."""
    return ((weight @ a) * weight).sum(1) - 2 * (weight * g).sum(1) + c


def relative_error(weight: Tensor, a: Tensor, g: Tensor, c: Tensor, d: Tensor) -> float:
    """Σ d_o E_o / Σ d_o c_o (0 when the teacher's outputs are all zero)."""
    total = float((d * c).sum())
    return float((d * row_errors(weight, a, g, c).clamp_min(0)).sum()) / total if total > 0 else 0.0


def improve_masks(a: Tensor, g: Tensor, values: Tensor, masks: Tensor, sweeps: int) -> Tensor:
    """Binary masks (N, K) lowering Σ_o E_o for rows w_o = m_o ⊙ v_o (``values`` (N, K) = α_o f_p(o)) by
    coordinate descent: element by element, every row flips its bit where that lowers its error."""
    masks_t, values_t, g_t = masks.T.contiguous(), values.T.contiguous(), g.T.contiguous()  # (K, N): rows per element
    response_t = a @ (masks_t * values_t)  # A (m ⊙ v), one column per output
    diagonal = a.diagonal().tolist()
    with single_thread():
        _descend(a, g_t, values_t, masks_t, response_t, diagonal, sweeps)
    return masks_t.T.contiguous()


def _descend(
    a: Tensor, g_t: Tensor, values_t: Tensor, masks_t: Tensor, response_t: Tensor, diagonal: list[float], sweeps: int
) -> None:
    """The sweeps of :func:`improve_masks` (in place on ``masks_t`` and ``response_t``)."""
    for _ in range(sweeps):
        flipped = torch.zeros((), dtype=torch.long)
        for e, curvature in enumerate(diagonal):
            sign = 1 - 2 * masks_t[e]
            delta = sign * values_t[e]
            gain = delta * (2 * (response_t[e] - g_t[e]) + delta * curvature)
            flip = gain < -1e-12 * curvature * delta.square()
            masks_t[e] += flip * sign
            response_t.addr_(a[e], delta * flip)
            flipped += flip.sum()
        if not int(flipped):
            break


def primary_systems(
    a: Tensor, g: Tensor, masks: Tensor, scale: Tensor, d: Tensor, index: Tensor, count: int
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(first primary, Q, h) per chunk of primaries: E as a function of primary f_p is f_pᵀ Q_p f_p − 2 h_pᵀ f_p
    + const, Q_p = Σ_{o→p} d_o α_o² (m_o m_oᵀ) ⊙ A, h_p = Σ_{o→p} d_o α_o m_o ⊙ g_o."""
    size = a.shape[0]
    h = torch.zeros(count, size, dtype=a.dtype).index_add_(0, index, (d * scale).unsqueeze(1) * masks * g)
    coefficient = d * scale.square()
    rows_at_once = max(1, _SYSTEM_BYTES // (8 * size * size))
    for start in range(0, count, rows_at_once):
        stop = min(start + rows_at_once, count)
        systems = torch.zeros(stop - start, size, size, dtype=a.dtype)
        rows = torch.nonzero((index >= start) & (index < stop)).flatten()
        for chunk in rows.split(rows_at_once):
            m = masks[chunk]
            terms = (coefficient[chunk].view(-1, 1, 1) * m.unsqueeze(2) * m.unsqueeze(1)) * a
            systems.index_add_(0, index[chunk] - start, terms)
        yield start, systems, h[start:stop]


def damped(systems: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """(Q + λ_p I, λ_p): λ_p = ``damping`` · mean diag(Q_p) (1e-12 at least), so every system is definite."""
    ridge = (damping * systems.diagonal(dim1=1, dim2=2).mean(1)).clamp_min(1e-12)
    eye = torch.eye(systems.shape[1], dtype=systems.dtype)
    return systems + ridge.view(-1, 1, 1) * eye, ridge


def solve_primaries(
    a: Tensor, g: Tensor, masks: Tensor, scale: Tensor, d: Tensor, index: Tensor, previous: Tensor, damping: float
) -> Tensor:
    """Primaries (P, K) minimising Σ d_o E_o + λ_p ‖f_p − previous_p‖² (elements no member keeps stay)."""
    if a.shape[0] > EXACT_LIMIT:
        return solve_primaries_cg(a, g, masks, scale, d, index, previous, damping)
    result = previous.clone()
    for start, systems, h in primary_systems(a, g, masks, scale, d, index, previous.shape[0]):
        system, ridge = damped(systems, damping)
        rhs = h + ridge.unsqueeze(1) * previous[start : start + len(h)]
        result[start : start + len(h)] = torch.cholesky_solve(rhs.unsqueeze(2), torch.linalg.cholesky(system)).squeeze(
            2
        )
    return result


def solve_primaries_cg(
    a: Tensor, g: Tensor, masks: Tensor, scale: Tensor, d: Tensor, index: Tensor, previous: Tensor, damping: float,
    iterations: int = CG_ITERATIONS,
) -> Tensor:  # fmt: skip
    """:func:`solve_primaries` without forming the K x K systems: Jacobi-preconditioned conjugate gradients on all
    primaries at once, from ``previous`` (so the error cannot rise), with Q_p v = Σ_{o→p} d_o α_o² m_o ⊙ A(m_o ⊙ v)
    (N·K² per step instead of P·K³/3 for the factorisations: what large layers need)."""
    coefficient = (d * scale.square()).unsqueeze(1) * masks
    h = torch.zeros_like(previous).index_add_(0, index, (d * scale).unsqueeze(1) * masks * g)
    diagonal = torch.zeros_like(previous).index_add_(0, index, coefficient * a.diagonal())
    ridge = (damping * diagonal.mean(1)).clamp_min(1e-12).unsqueeze(1)

    def apply(value: Tensor) -> Tensor:
        products = ((masks * value[index]) @ a) * coefficient
        return torch.zeros_like(value).index_add_(0, index, products) + ridge * value

    solution = previous.clone()
    residual = h + ridge * previous - apply(solution)
    preconditioned = residual / (diagonal + ridge)
    direction = preconditioned.clone()
    product = (residual * preconditioned).sum(1)
    for _ in range(iterations):
        image = apply(direction)
        curvature = (direction * image).sum(1)
        step = torch.where(curvature > 0, product / curvature.clamp_min(1e-300), 0.0).unsqueeze(1)
        solution += step * direction
        residual -= step * image
        preconditioned = residual / (diagonal + ridge)
        following = (residual * preconditioned).sum(1)
        direction = (
            preconditioned
            + torch.where(product > 0, following / product.clamp_min(1e-300), 0.0).unsqueeze(1) * direction
        )
        product = following
    return solution


def solve_scales(a: Tensor, g: Tensor, rows: Tensor, previous: Tensor) -> Tensor:
    """α_o = (u_o·g_o) / (u_oᵀ A u_o) for u_o = m_o ⊙ f_p(o) (``rows``); the previous value where u_o = 0."""
    energy = ((rows @ a) * rows).sum(1)
    return torch.where(energy > 0, (rows * g).sum(1) / energy.clamp_min(1e-300), previous)


def quantization_steps(primary: Tensor, systems: Tensor, bits: int) -> Tensor:
    """Step per primary: the clipping ratio of :data:`CLIP_RATIOS` whose plain rounding costs least under Q_p
    (``systems`` (P, K, K), or (P, K): their diagonals)."""
    level = largest_level(bits)
    top = primary.abs().amax(1).clamp_min(1e-30) / level
    best, best_cost = top.clone(), torch.full_like(top, math.inf)
    for ratio in CLIP_RATIOS:
        step = top * ratio
        error = (torch.clamp(torch.round(primary / step.unsqueeze(1)), -level, level) * step.unsqueeze(1)) - primary
        if systems.dim() == 2:  # the diagonals of the systems only
            cost = (error.square() * systems).sum(1)
        else:
            cost = torch.einsum("pk,pkl,pl->p", error, systems, error)
        better = cost < best_cost
        best, best_cost = torch.where(better, step, best), torch.where(better, cost, best_cost)
    return best


def round_with_feedback(primary: Tensor, systems: Tensor, step: Tensor, bits: int, act_order: bool = True) -> Tensor:
    """Integers (P, K) for ``primary`` at ``step``: element by element, round, then spread the rounding error over
    the elements not yet rounded through the inverse of Q_p (GPTQ's update; Frantar et al. 2023). With
    ``act_order`` the elements of each primary go in decreasing order of Q_p's diagonal (GPTQ's act order: those
    the output is most sensitive to are rounded while the most elements remain to absorb their error)."""
    if act_order:
        order = systems.diagonal(dim1=1, dim2=2).argsort(dim=1, descending=True, stable=True)
        rows = order.unsqueeze(2).expand_as(systems)
        permuted = systems.gather(1, rows).gather(2, order.unsqueeze(1).expand_as(systems))
        codes = round_with_feedback(primary.gather(1, order), permuted, step, bits, act_order=False)
        return codes.gather(1, order.argsort(dim=1))
    level = largest_level(bits)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(systems))
    upper = torch.linalg.cholesky(inverse, upper=True)
    weight = primary.clone()
    codes = torch.zeros_like(primary)
    with single_thread():
        for e in range(primary.shape[1]):
            code = torch.clamp(torch.round(weight[:, e] / step), -level, level)
            codes[:, e] = code
            error = (weight[:, e] - code * step) / upper[:, e, e]
            weight[:, e + 1 :] -= error.unsqueeze(1) * upper[:, e, e + 1 :]
    return codes


def quantize_primaries(
    a: Tensor, g: Tensor, masks: Tensor, scale: Tensor, d: Tensor, index: Tensor, primary: Tensor, bits: int,
    damping: float,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(integers (P, K), steps (P,)) of the primaries, rounded under each primary's quadratic form (above
    :data:`EXACT_LIMIT` elements: to the nearest integer at the step :func:`quantization_steps` picks under the
    diagonal of Q_p, since the factorisations would dominate)."""
    codes, steps = torch.zeros_like(primary), torch.zeros(primary.shape[0], dtype=primary.dtype)
    if a.shape[0] > EXACT_LIMIT:
        coefficient = (d * scale.square()).unsqueeze(1) * masks
        diagonal = torch.zeros_like(primary).index_add_(0, index, coefficient * a.diagonal())
        steps = quantization_steps(primary, diagonal, bits)
        level = largest_level(bits)
        return torch.clamp(torch.round(primary / steps.unsqueeze(1)), -level, level), steps
    for start, systems, _ in primary_systems(a, g, masks, scale, d, index, primary.shape[0]):
        stop = start + systems.shape[0]
        system, _ = damped(systems, max(damping, 1e-2))
        steps[start:stop] = quantization_steps(primary[start:stop], system, bits)
        codes[start:stop] = round_with_feedback(primary[start:stop], system, steps[start:stop], bits)
    return codes, steps
