"""The fit of a dense weight as pure tensors (docs/FIT.md §1-§8, §10): :func:`fit_weight`, the
:func:`naive_fit` baseline and :func:`project_onto_groups` (the nearest versatile weight for a fixed
grouping). They return the representation; :mod:`vconvert.fit.initialise` writes it into a layer.

The fit approximates every output filter W_o by the layer's representation

    W[o, off_o : off_o + ĉ] ≈ α_o · M_o ∘ f[p_o]

in four stages, all vectorised over the P groups of a layer:

1. *Slots* (fixed-structure modes only): in the spatial and channel modes a slot fixes the
   output's ring mask and channel window, so outputs first get the slot whose view loses the least
   of their energy, under the layer's slot counts.
2. *Grouping*: greedily, the largest unassigned filter seeds a group and takes its most similar
   unassigned filters (pair cost = residual of the best rank-1 fit of the two views), then local
   search. Groups of two with learned per-filter masks are instead a (near-)optimal matching on
   the exact pair errors (the best masked fit of the pair over a grid of scale directions), which
   for s=2 makes the plain error the optimum up to the grid and the matching. The result is a new
   (primary index, secondary index) per output, so no channel permutation is needed.
3. *Alternation* from the per-group rank-1 fit, a fixed number of times: masks and primary
   filter jointly (learned modes: for every element, the best subset of group members that keeps
   it, solved exactly by enumerating subsets), per-output scale α (least squares), and where slots
   carry structure (fixed masks, channel windows, shared masks) the best assignment of the group's
   members to its slots (all permutations are tried). Each step solves its sub-problem exactly,
   so the error never increases.
4. *Spatial metric* (learned per-filter masks with scales, kernels larger than 1x1): a few rounds
   of masks (coordinate descent), primaries and scales under the error δᵀ(I ⊗ Σ_ρ)δ, where Σ_ρ is
   a prior correlation of the kernel's taps (neighbouring input pixels correlate: ρ = 0.5). This
   raises the plain weight error (ResNet-20 s=2: 0.279 → 0.330) but lowers the output error:
   85.1% → 87.0% after BN recalibration (s=4: 77.8% → 84.1%). ``spatial_correlation=0`` skips it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vconvert.fit.closed_form import (
    best_direction,
    direction_candidates,
    fit_masks,
    fit_masks_and_primary,
    fit_primary,
    fit_scale,
    rank_one,
)
from vconvert.fit.grouping import _EXACT_PAIRING_OUTPUTS, group_outputs, grouping_costs, improve_groups, pair_cost
from vconvert.fit.metric import DEFAULT_SPATIAL_CORRELATION, refine_under_metric, spatial_metric
from vconvert.fit.pairing import pair_outputs
from vconvert.fit.slots import (
    SlotLayout,
    assign_slots,
    best_slot_permutation,
    gather_members,
    permute_members,
    slot_permutation_costs,
    slot_views,
)

DEFAULT_ITERATIONS = 6
_MAX_SUBSET_MEMBERS = 8  # 2^s subsets per element; beyond this, masks and primary alternate instead
_MAX_PERMUTED_SLOTS = 6  # s! slot assignments per group; beyond this, slots stay as grouped
_DIRECTION_GRID_BUDGET = 1 << 18  # groups x elements up to which pairs also try a grid of directions
_PAIR_COST_ANGLES = 32  # directions tried per pair for the exact pair costs and the pair's final fit
_METRIC_BUDGET = 1 << 21  # groups x channels x taps² up to which the metric gets METRIC_ROUNDS rounds, not 1
_MANY_MEMBER_ITERATIONS = 40  # alternation rounds for groups of more than two (slow to converge) ...
_MANY_MEMBER_BUDGET = 1 << 21  # ... where groups x elements x 2^s is at most this (else DEFAULT_ITERATIONS)
METRIC_ROUNDS = 2  # rounds of masks, primary and scale under the spatial metric (small layers)


@dataclass(frozen=True)
class FitResult:
    """A fitted representation: flattened primaries (P, K), the output → (primary, slot) map,
    learned masks ((N or S), K) as 0/1 floats or None, and scales (N,)."""

    primary: Tensor
    primary_index: Tensor
    secondary_index: Tensor
    mask: Tensor | None
    scale: Tensor


def _broadcast(masks: Tensor) -> Tensor:
    """Per-slot masks (S, K) as (1, S, K); per-filter masks (P, S, K) unchanged."""
    return masks.unsqueeze(0) if masks.dim() == 2 else masks


def _approximation(primary: Tensor, masks: Tensor, scale: Tensor) -> Tensor:
    return scale.unsqueeze(-1) * _broadcast(masks) * primary.unsqueeze(1)


def fit_weight(
    weight: Tensor,
    layout: SlotLayout,
    *,
    use_scale: bool = True,
    iterations: int | None = None,
    spatial_correlation: float = DEFAULT_SPATIAL_CORRELATION,
    dilation: tuple[int, int] = (1, 1),
) -> FitResult:
    """Group, then alternate masks/primary, scales and slot assignment (see the module docstring).

    Every filter counts by its absolute error (Frobenius norm of the whole weight); weighting
    filters by their relative error, or by input/output channel importances read from the
    neighbouring BatchNorms, gave lower accuracy after BN recalibration on ResNet-20. Groups of two
    (learned per-filter masks) are a near-optimal matching (:func:`pair_outputs`). ``iterations``
    defaults to 6, or 40 for groups of more than two in small layers (P·K·2^s ≤ 2^21). With
    per-filter masks, scales and ``spatial_correlation`` ρ > 0, the fit finishes under the spatial
    metric (:func:`spatial_metric`, :func:`refine_under_metric`), which trades plain error for a
    much smaller output error.
    """
    outputs = weight.shape[0]
    views = slot_views(weight, layout)
    energy = weight.flatten(1).pow(2).sum(1)
    outside = energy.unsqueeze(1) - views.pow(2).sum(-1)
    slots = layout.cells.shape[1]
    fixed = layout.learned is None and slots > 1
    rings = layout.rings.to(weight.dtype)
    if fixed:
        slot_of = assign_slots(outside, layout.cells.sum(0))
        costs = [pair_cost(views[:, 0] * rings[j], views[:, j]) for j in range(slots)]
        members = group_outputs(costs, energy, layout.cells, slot_of)
    else:
        cost = grouping_costs(weight.flatten(1), masked=layout.learned == "per-filter")
        if layout.learned == "per-filter" and slots == 2 and outputs <= _EXACT_PAIRING_OUTPUTS:
            members = pair_outputs(cost, layout.cells)
        else:
            members = improve_groups(cost, group_outputs([cost], energy, layout.cells))
    if iterations is None:
        work = layout.cells.shape[0] * weight[0].numel() * 2**slots
        many = slots > 2 and work <= _MANY_MEMBER_BUDGET
        iterations = _MANY_MEMBER_ITERATIONS if many else DEFAULT_ITERATIONS
    valid = (members >= 0).to(weight.dtype)
    permute = layout.slots_matter and slots <= _MAX_PERMUTED_SLOTS
    exact_masks = layout.learned is not None and slots <= _MAX_SUBSET_MEMBERS

    grouped = gather_members(views, members)
    scale, primary = rank_one(grouped)
    # masks: (P, S, K) per filter, else one (S, K) per slot (fixed rings, shared learned masks)
    masks = rings.unsqueeze(0).expand_as(grouped).clone() if layout.learned == "per-filter" else rings
    if not use_scale:
        scale = valid
        primary = fit_primary(grouped, _broadcast(masks), scale)
    elif layout.learned == "per-filter" and exact_masks:
        work = grouped.shape[0] * grouped.shape[2]
        angles = (
            _PAIR_COST_ANGLES if work <= _DIRECTION_GRID_BUDGET // 4 else 8 if work <= _DIRECTION_GRID_BUDGET else 0
        )
        scale = best_direction(grouped, direction_candidates(scale, angles) * valid.unsqueeze(1))
    for _ in range(iterations):
        if layout.learned is None:
            primary = fit_primary(grouped, _broadcast(masks), scale, fallback=primary)
        elif exact_masks:
            masks, primary = fit_masks_and_primary(grouped, scale, shared=layout.learned == "shared")
        else:
            masks = fit_masks(grouped, _approximation(primary, rings, scale), shared=layout.learned == "shared")
            primary = fit_primary(grouped, _broadcast(masks), scale, fallback=primary)
        if use_scale:
            scale = fit_scale(grouped, _broadcast(masks) * primary.unsqueeze(1)) * valid
        if permute:
            cost = slot_permutation_costs(views, members, masks, primary, outside, use_scale)
            position = best_slot_permutation(cost)
            members = permute_members(members, position)
            grouped = gather_members(views, members)
            valid = (members >= 0).to(weight.dtype)
            scale = permute_members(scale, position)
            if use_scale:
                scale = fit_scale(grouped, _broadcast(masks) * primary.unsqueeze(1)) * valid
    taps = layout.kernel_size[0] * layout.kernel_size[1]
    if layout.learned == "per-filter" and use_scale and spatial_correlation > 0 and taps > 1:
        metric = spatial_metric(layout.kernel_size, spatial_correlation, dilation, weight.dtype).to(weight.device)
        small = members.shape[0] * weight.shape[1] * taps * taps <= _METRIC_BUDGET
        rounds = METRIC_ROUNDS if small else 1  # one round carries nearly all of the gain
        masks, scale, primary = refine_under_metric(grouped, masks, scale, primary, valid, metric, rounds)
    return _result(members, primary, masks, scale, layout, outputs)


def _result(
    members: Tensor, primary: Tensor, masks: Tensor, scale: Tensor, layout: SlotLayout, outputs: int
) -> FitResult:
    valid = members >= 0
    groups, slots = members.shape
    cell_group = torch.arange(groups, device=members.device).unsqueeze(1).expand(-1, slots)
    cell_slot = torch.arange(slots, device=members.device).unsqueeze(0).expand(groups, -1)
    order = members[valid]
    primary_index = torch.empty(outputs, dtype=torch.long, device=members.device)
    secondary_index = torch.empty_like(primary_index)
    primary_index[order] = cell_group[valid]
    secondary_index[order] = cell_slot[valid]
    out_scale = torch.empty(outputs, dtype=scale.dtype, device=scale.device)
    out_scale[order] = scale[valid]
    mask = None
    if layout.learned == "shared":
        mask = masks
    elif layout.learned == "per-filter":
        mask = torch.empty(outputs, masks.shape[-1], dtype=masks.dtype, device=masks.device)
        mask[order] = masks[valid]
    return FitResult(primary, primary_index, secondary_index, mask, out_scale)


def naive_fit(weight: Tensor, layout: SlotLayout, *, use_scale: bool = True) -> FitResult:
    """The baseline: consecutive groups, primary = first filter of its group, masks on, LS scales."""
    outputs = weight.shape[0]
    groups, slots = layout.cells.shape
    index = torch.arange(groups * slots, device=weight.device).view(groups, slots)
    members = torch.where(index < outputs, index, -1)
    views = slot_views(weight, layout)
    first = members[:, 0].clamp_min(0)
    primary = weight[first, layout.offsets[0] : layout.offsets[0] + layout.window].flatten(1)
    grouped = gather_members(views, members)
    valid = (members >= 0).to(weight.dtype)
    rings = layout.rings.to(weight.dtype)
    scale = valid
    if use_scale:
        scale = fit_scale(grouped, rings.unsqueeze(0) * primary.unsqueeze(1)) * valid
    masks = rings if layout.learned != "per-filter" else rings.unsqueeze(0).expand_as(grouped)
    return _result(members, primary, masks, scale, layout, outputs)


def project_onto_groups(
    views: Tensor, members: Tensor, scale: Tensor, masks: Tensor | None = None, search: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest versatile weight (plain Frobenius error) to dense ``views`` (N, K) for a fixed grouping.

    ``members`` (P, S) lists the outputs of each primary (-1: empty), ``scale`` (P, S) the current
    scales. With ``search`` the scale direction is the best of the current one, every single member
    and, for pairs, an angular grid; without it the current direction is kept (a descent step from
    the current fit, continuous in ``views`` except at per-element ties). Returns masks (P, S, K),
    primaries (P, K) and least-squares scales (P, S); masks and primaries are exact per element for
    the direction (:func:`fit_masks_and_primary`). Given ``masks`` (P, S, K), they are kept and one
    least-squares step of primaries, then scales, is taken instead.
    """
    valid = (members >= 0).to(views.dtype)
    grouped = views[members.clamp_min(0)] * valid.unsqueeze(-1)
    if masks is not None:
        primary = fit_primary(grouped, masks, scale)
        return masks, primary, fit_scale(grouped, masks * primary.unsqueeze(1)) * valid
    direction = scale
    if search:
        angles = _PAIR_COST_ANGLES if members.shape[1] == 2 else 0
        direction = best_direction(grouped, direction_candidates(scale, angles) * valid.unsqueeze(1))
    masks, primary = fit_masks_and_primary(grouped, direction)
    scale = fit_scale(grouped, masks * primary.unsqueeze(1)) * valid
    return masks, primary, scale
