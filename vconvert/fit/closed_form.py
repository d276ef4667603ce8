"""The closed-form steps of the fit, each exact given the rest (docs/FIT.md §5, §6): least-squares
scales and primaries, masks by the keep rule or exactly over the 2^S member subsets, the rank-1 start,
and the best scale direction among candidates. Pure functions on (P, S, K) views of each group's members."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def fit_scale(views: Tensor, approx: Tensor) -> Tensor:
    """Least-squares α per row: argmin_α ‖views − α·approx‖² over the last axis (0 where approx = 0)."""
    energy = approx.pow(2).sum(-1)
    inner = (views * approx).sum(-1)
    return torch.where(energy > 0, inner / energy.clamp_min(torch.finfo(energy.dtype).tiny), 0.0)


def fit_primary(views: Tensor, masks: Tensor, scale: Tensor, fallback: Tensor | None = None) -> Tensor:
    """Least-squares primary filter per group: argmin_f Σ_j ‖X_j − α_j M_j ∘ f‖², elementwise.

    ``views`` (P, S, K), ``masks`` broadcastable to it, ``scale`` (P, S). Elements no member keeps
    take ``fallback`` (default 0).
    """
    weighted = scale.unsqueeze(-1) * masks
    numerator = (weighted * views).sum(1)
    denominator = (weighted * scale.unsqueeze(-1)).sum(1)
    solved = numerator / denominator.clamp_min(torch.finfo(views.dtype).tiny)
    return torch.where(denominator > 0, solved, 0.0 if fallback is None else fallback)


def fit_masks(views: Tensor, approx: Tensor, shared: bool = False) -> Tensor:
    """Keep an element where the secondary filter lowers its error: (X − A)² < X² (0/1 floats).

    ``views`` and ``approx`` are (P, S, K); with ``shared`` the errors are summed over groups and
    one mask per slot (S, K) is returned.
    """
    kept, dropped = (views - approx).pow(2), views.pow(2)
    if shared:
        kept, dropped = kept.sum(0), dropped.sum(0)
    return (kept < dropped).to(views.dtype)


def member_subsets(count: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """All 2^count subsets of ``count`` members as 0/1 rows, shape (2^count, count); row b = bits of b."""
    bits = torch.arange(2**count).unsqueeze(1) >> torch.arange(count).unsqueeze(0)
    return (bits & 1).to(dtype)


def first_argmax(values: Tensor, dim: int) -> Tensor:
    """``values.argmax(dim)`` (the first index of the maximum) for a short ``dim``, as one max and one
    comparison per index: PyTorch's CPU argmax over a short axis is several times slower."""
    top = values.amax(dim)
    count = values.shape[dim]
    best = torch.full(top.shape, count - 1, dtype=torch.uint8 if count <= 256 else torch.long, device=values.device)
    for index in reversed(range(count - 1)):
        best = torch.where(values.select(dim, index) == top, index, best)
    return best.long()


def subset_gains(views: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per element and member subset B: the error removed by keeping the element in B's members.

    Returns gains (P, 2^S, K) = (Σ_{j∈B} α_j X_j)² / Σ_{j∈B} α_j², numerators (P, 2^S, K) and
    denominators (P, 2^S) (0 where the subset has no scaled member). The subset axis is not the last:
    reductions over it then run along contiguous elements (an argmax over a trailing axis of 4 is slow).
    """
    groups, count, size = views.shape
    weighted = scale.unsqueeze(-1) * views  # (P, S, K)
    numerator = views.new_zeros(groups, 2**count, size)  # subset b adds member j to subset b - 2^j, j its top bit
    for member in range(count):
        low = 2**member
        torch.add(numerator[:, :low], weighted[:, member : member + 1], out=numerator[:, low : 2 * low])
    subsets = member_subsets(count, views.dtype).to(views.device)  # (B, S)
    denominator = (scale * scale) @ subsets.T  # (P, B)
    inverse = torch.where(denominator > 0, 1.0 / denominator.clamp_min(torch.finfo(views.dtype).tiny), 0.0)
    return numerator.square().mul_(inverse.unsqueeze(-1)), numerator, denominator


def fit_masks_and_primary(views: Tensor, scale: Tensor, shared: bool = False) -> tuple[Tensor, Tensor]:
    """Optimal learned masks and primary filters for fixed scales, solved exactly per element.

    For element e of group p, keeping it in the members of subset B costs
    Σ_j X_je² − (Σ_{j∈B} α_j X_je)² / Σ_{j∈B} α_j², with f_e the matching least-squares value;
    the best of the 2^s subsets is chosen (summed over groups when masks are ``shared`` per slot).
    Returns masks ((P, S, K), or (S, K) when shared) and primaries (P, K).
    """
    groups, _, size = views.shape
    subsets = member_subsets(views.shape[1], views.dtype).to(views.device)
    gain, numerator, denominator = subset_gains(views, scale)
    tiny = torch.finfo(views.dtype).tiny
    everyone = torch.where(denominator[:, -1:] > 0, numerator[:, -1] / denominator[:, -1:].clamp_min(tiny), 0.0)
    if shared:
        best = first_argmax(gain.sum(0), 0)  # (K,)
        masks = subsets[best].T  # (S, K)
        chosen = best.expand(groups, size)
    else:
        best = first_argmax(gain, 1)  # (P, K)
        masks = subsets[best].permute(0, 2, 1)  # (P, S, K)
        chosen = best
    top = numerator.gather(1, chosen.unsqueeze(1)).squeeze(1)
    bottom = denominator.gather(1, chosen)
    primary = torch.where(bottom > 0, top / bottom.clamp_min(tiny), everyone)
    return masks, primary


def rank_one(views: Tensor) -> tuple[Tensor, Tensor]:
    """Best rank-1 fit per group, views (P, S, K) ≈ scale (P, S) ⊗ primary (P, K), via the S×S Gram."""
    gram = views @ views.transpose(1, 2)
    _, vectors = torch.linalg.eigh(gram)
    top = vectors[..., -1]  # unit vector of the largest eigenvalue
    primary = torch.einsum("ps,psk->pk", top, views)
    # a sign convention makes runs reproducible: the largest member gets a positive scale
    sign = torch.sign(top.gather(1, gram.diagonal(dim1=1, dim2=2).argmax(1, keepdim=True)))
    sign = torch.where(sign == 0, 1.0, sign)
    return top * sign, primary * sign


def best_direction(views: Tensor, candidates: Tensor, shared: bool = False) -> Tensor:
    """Per group, the scale direction among ``candidates`` (P, C, S) whose exact masks and primary
    (:func:`fit_masks_and_primary`) leave the smallest error; returns (P, S).

    The error is Σ X² minus the best subset gains, so only the gains are compared."""
    best_error, best = None, None
    for index in range(candidates.shape[1]):
        scale = candidates[:, index]
        gain = subset_gains(views, scale)[0]
        error = -(gain.sum(0).amax(0).sum().expand(views.shape[0]) if shared else gain.amax(1).sum(1))
        if best is None:
            best_error, best = error, scale
        else:
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best = torch.where(better.unsqueeze(1), scale, best)
    return best


def direction_candidates(rank_one_scale: Tensor, angles: int = 8) -> Tensor:
    """(P, C, S) start directions: the rank-1 fit's, every single member, and for groups of two an
    angular grid of ``angles`` directions over [0, π)."""
    groups, slots = rank_one_scale.shape
    options = [rank_one_scale.unsqueeze(1)]
    options.append(torch.eye(slots, dtype=rank_one_scale.dtype, device=rank_one_scale.device).expand(groups, -1, -1))
    if slots == 2 and angles > 0:
        theta = torch.arange(angles, dtype=rank_one_scale.dtype, device=rank_one_scale.device) * (math.pi / angles)
        options.append(torch.stack([theta.cos(), theta.sin()], 1).expand(groups, -1, -1))
    return torch.cat(options, 1)
