"""Grouping output filters (docs/FIT.md §4): pair costs (the best rank-1 fit of two filters, refined by
their best masked fit), the greedy grouping and the swap search that improves it. A grouping is a (P, S)
table of the output in each (primary, slot) cell, -1 where the cell does not exist."""

from __future__ import annotations

import math

import torch
from torch import Tensor

_PAIR_COST_BUDGET = 1 << 22  # outputs² x elements up to which every pair gets the exact masked cost
_EXACT_PAIRING_OUTPUTS = 512  # outputs up to which groups of two come from the matching (else greedy)


def pair_cost(first: Tensor, second: Tensor) -> Tensor:
    """Residual of the best rank-1 fit of every pair of rows: λ_min of [[‖a‖², a·b], [a·b, ‖b‖²]].

    ``first`` (n, K), ``second`` (m, K); returns (n, m). It is 0 for parallel rows (whatever their
    signs and lengths) and min(‖a‖², ‖b‖²) for orthogonal ones.
    """
    a = first.pow(2).sum(1).unsqueeze(1)
    b = second.pow(2).sum(1).unsqueeze(0)
    cross = first @ second.T
    half_gap = (a - b) / 2
    return ((a + b) / 2 - torch.sqrt(half_gap.pow(2) + cross.pow(2))).clamp_min(0.0)


def masked_pair_cost(first: Tensor, second: Tensor, angles: int = 16) -> Tensor:
    """Error of the best two-member group with per-filter masks, for rows ``first`` (n, K) against
    candidates ``second`` (n, k, K); returns (n, k).

    With scales in direction (cos θ, sin θ), every element is either kept by both members (residual
    (a sin θ − b cos θ)²), by one (the other's value is lost) or by none; the best θ of a grid over
    [0, π) is taken. It never exceeds :func:`pair_cost` by more than the grid's resolution.
    """
    a, b = first.unsqueeze(1), second
    single = torch.minimum(a.pow(2), b.pow(2))
    best = None
    for step in range(angles):
        theta = math.pi * step / angles
        both = (a * math.sin(theta) - b * math.cos(theta)).pow(2)
        cost = torch.minimum(both, single).sum(-1)
        best = cost if best is None else torch.minimum(best, cost)
    return best


def grouping_costs(filters: Tensor, masked: bool, budget: int = 1 << 20) -> Tensor:
    """(N, N) symmetric pair costs with a zero diagonal: :func:`pair_cost`, refined by
    :func:`masked_pair_cost` for every pair when N²·K ≤ ``_PAIR_COST_BUDGET`` (then the cost is the
    pair's best error up to the angle grid), else for each row's nearest candidates (as many as
    ``budget`` elements allow)."""
    outputs, size = filters.shape
    cost = pair_cost(filters, filters)
    if masked and 1 < outputs <= _EXACT_PAIRING_OUTPUTS // 4 and outputs * outputs * size <= _PAIR_COST_BUDGET:
        rows = max(1, (1 << 20) // (outputs * size))  # rows per chunk: bounded temporaries
        exact = [
            masked_pair_cost(
                filters[start : start + rows], filters.unsqueeze(0).expand(min(rows, outputs - start), -1, -1)
            )
            for start in range(0, outputs, rows)
        ]
        cost = torch.minimum(cost, torch.cat(exact))
        return torch.minimum(cost, cost.T).fill_diagonal_(0.0)
    shortlist = 0
    if masked and outputs > 1:
        shortlist = min(outputs - 1, budget // max(outputs * size, 1))
    if masked and shortlist >= 2:
        nearest = torch.topk(cost.fill_diagonal_(math.inf), shortlist, dim=1, largest=False).indices
        refined = masked_pair_cost(filters, filters[nearest])
        cost.scatter_(1, nearest, torch.minimum(cost.gather(1, nearest), refined))
        cost = torch.minimum(cost, cost.T)
    return cost.fill_diagonal_(0.0)


def group_outputs(costs: list[Tensor], energy: Tensor, cells: Tensor, slot_of: Tensor | None = None) -> Tensor:
    """Greedy grouping: (P, S) table of the output in each cell, -1 for cells that do not exist.

    Groups are filled in order; the largest unassigned filter seeds a group and each further cell
    takes the unassigned output with the lowest cost against the seed. Without ``slot_of`` (slots
    interchangeable) ``costs`` is one (N, N) matrix; with it, cell j takes an output of slot j and
    ``costs[j]`` compares the seed with outputs as slot j sees them.
    """
    rows = cells.tolist()
    outputs, slots = energy.shape[0], cells.shape[1]
    members = torch.full((len(rows), slots), -1, dtype=torch.long)
    free = torch.ones(outputs, dtype=torch.bool, device=energy.device)
    ranking = torch.argsort(energy, descending=True, stable=True).tolist()
    slot_list = slot_of.tolist() if slot_of is not None else None
    taken = [False] * outputs
    for group, row in enumerate(rows):
        present = [j for j in range(slots) if row[j]]
        if not present:
            continue
        seed = next(
            o for o in ranking if not taken[o] and (slot_list is None or slot_list[o] == present[0])
        )  # the largest free output (of the seed's slot)
        members[group, present[0]] = seed
        free[seed] = False
        taken[seed] = True
        if slot_of is None:
            if len(present) > 1:
                cost = torch.where(free, costs[0][seed], math.inf)
                chosen = torch.topk(cost, len(present) - 1, largest=False).indices
                members[group, present[1:]] = chosen.cpu()
                free[chosen] = False
                for o in chosen.tolist():
                    taken[o] = True
            continue
        for j in present[1:]:
            cost = torch.where(free & (slot_of == j), costs[j][seed], math.inf)
            partner = int(cost.argmin())
            members[group, j] = partner
            free[partner] = False
            taken[partner] = True
    return members.to(energy.device)


def group_cost(cost: Tensor, members: Tensor) -> Tensor:
    """Σ over groups of the pair costs of their members (the grouping surrogate), as a 0-dim tensor."""
    valid = members >= 0
    index = members.clamp_min(0)
    within = cost[index.unsqueeze(2), index.unsqueeze(1)] * (valid.unsqueeze(2) & valid.unsqueeze(1))
    return within.sum() / 2


def _cost_to_group(cost: Tensor, index: Tensor, valid: Tensor, x: Tensor, g: Tensor) -> Tensor:
    """Σ_{z ∈ group g} C[x, z], elementwise over matching shapes of ``x`` and ``g``."""
    return (cost[x.unsqueeze(-1), index[g]] * valid[g]).sum(-1)


def improve_groups(cost: Tensor, members: Tensor, rounds: int = 10, neighbours: int = 8) -> Tensor:
    """Local search on a grouping with interchangeable slots: swap two outputs of different groups
    whenever that lowers :func:`group_cost`; each round applies the best non-overlapping swaps.

    ``cost`` (N, N) symmetric with a zero diagonal. Output x is only tried against the members of
    the groups of its ``neighbours`` cheapest partners, so a round costs O(N·neighbours·s²). For
    groups of two this is 2-opt on a matching.
    """
    members = members.clone()
    outputs = cost.shape[0]
    valid = members >= 0
    groups, slots = members.shape
    if outputs < 3 or groups < 2:
        return members
    nearest = torch.topk(
        cost + torch.diag(cost.new_full((outputs,), math.inf)), min(neighbours, outputs - 1), dim=1, largest=False
    ).indices  # (N, k)
    cell_group = torch.arange(groups, device=members.device).unsqueeze(1).expand(-1, slots)[valid]
    rows = torch.arange(outputs, device=cost.device)
    for _ in range(rounds):
        order = members[valid]
        group_of = torch.empty(outputs, dtype=torch.long, device=cost.device)
        group_of[order] = cell_group
        index = members.clamp_min(0)

        def to_group(x: Tensor, g: Tensor, index: Tensor = index) -> Tensor:
            return _cost_to_group(cost, index, valid, x, g)

        own = to_group(rows, group_of)
        x = rows.view(-1, 1, 1).expand(-1, nearest.shape[1], slots)
        y_valid = valid[group_of[nearest]]  # (N, k, S)
        y = index[group_of[nearest]]
        delta = to_group(y, group_of[x]) + to_group(x, group_of[y]) - own[x] - own[y] - 2 * cost[x, y]
        delta = torch.where(y_valid & (group_of[y] != group_of[x]), delta, math.inf).flatten(1)
        best, pick = delta.min(1)
        partner = y.flatten(1).gather(1, pick.unsqueeze(1)).squeeze(1)
        threshold = -1e-9 * float(own.abs().sum()) / outputs
        candidates = torch.nonzero(best < threshold).squeeze(1)
        if candidates.numel() == 0:
            break
        candidates = candidates[best[candidates].argsort()].tolist()
        partner_of, groups_of = partner.tolist(), group_of.tolist()
        position = {o: (g, j) for (g, j), o in zip(valid.nonzero().tolist(), order.tolist(), strict=True)}
        touched: set[int] = set()
        for first in candidates:
            second = partner_of[first]
            if groups_of[first] in touched or groups_of[second] in touched:
                continue
            touched.update((groups_of[first], groups_of[second]))
            (g1, j1), (g2, j2) = position[first], position[second]
            members[g1, j1], members[g2, j2] = second, first
    return members
