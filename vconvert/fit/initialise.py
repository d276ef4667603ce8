"""Data-free initialisation of a VersatileConv2d from a pretrained dense weight (docs/FIT.md).

The fit approximates every output filter W_o by the layer's representation

    W[o, off_o : off_o + ĉ] ≈ α_o · M_o ∘ f[p_o]

in three stages, all vectorised over the P groups of a layer:

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

Everything here is a pure function on tensors except :func:`initialise_from_weight`, which writes
the result into a layer.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vconvert.nn.versatile import PROXY_OFF, PROXY_ON, VersatileConv2d, slot_channel_offset, slot_ring_mask

METHODS = ("fit", "fit-plain", "naive")  # fit-plain: fit with spatial_correlation 0
DEFAULT_ITERATIONS = 6
_MAX_SUBSET_MEMBERS = 8  # 2^s subsets per element; beyond this, masks and primary alternate instead
_MAX_PERMUTED_SLOTS = 6  # s! slot assignments per group; beyond this, slots stay as grouped
_DIRECTION_GRID_BUDGET = 1 << 18  # groups x elements up to which pairs also try a grid of directions
_PAIR_COST_BUDGET = 1 << 22  # outputs² x elements up to which every pair gets the exact masked cost
_PAIR_COST_ANGLES = 32  # directions tried per pair for the exact pair costs and the pair's final fit
_EXACT_DP_NODES = 12  # nodes up to which the pairing is solved exactly (2^n states)
_EXACT_PAIRING_OUTPUTS = 512  # outputs up to which groups of two come from the matching (else greedy)
_METRIC_BUDGET = 1 << 21  # groups x channels x taps² up to which the metric gets METRIC_ROUNDS rounds, not 1
_MANY_MEMBER_ITERATIONS = 40  # alternation rounds for groups of more than two (slow to converge) ...
_MANY_MEMBER_BUDGET = 1 << 21  # ... where groups x elements x 2^s is at most this (else DEFAULT_ITERATIONS)
DEFAULT_SPATIAL_CORRELATION = 0.5  # prior correlation of neighbouring input pixels (see spatial_metric)
_METRIC_CHUNK = 1 << 21  # T×T system entries solved at once by metric_primary (8 MiB in float32)
METRIC_ROUNDS = 2  # rounds of masks, primary and scale under the spatial metric (small layers)


@dataclass(frozen=True)
class SlotLayout:
    """What a layer's structure fixes, per slot j of a group (pure data, read from a layer).

    ``cells`` (P, S) marks which (primary, slot) cells exist (the last group may be partial);
    ``offsets`` (S,) is each slot's channel offset; ``rings`` (S, ĉ·kh·kw) each slot's fixed mask
    (all ones without fixed masks); ``learned`` is None, "per-filter" or "shared".
    """

    cells: Tensor
    offsets: Tensor
    rings: Tensor
    window: int
    kernel_size: tuple[int, int]
    learned: str | None

    @property
    def slots_matter(self) -> bool:
        """Whether moving an output to another slot of its group changes what it can represent."""
        return self.learned != "per-filter" and self.cells.shape[1] > 1


@dataclass(frozen=True)
class FitResult:
    """A fitted representation: flattened primaries (P, K), the output → (primary, slot) map,
    learned masks ((N or S), K) as 0/1 floats or None, and scales (N,)."""

    primary: Tensor
    primary_index: Tensor
    secondary_index: Tensor
    mask: Tensor | None
    scale: Tensor


# --------------------------------------------------------------------------- small algebra
def relative_error(approx: Tensor, weight: Tensor) -> float:
    """‖approx − weight‖_F / ‖weight‖_F (0 for an all-zero weight approximated exactly)."""
    reference = weight.norm().item()
    difference = (approx - weight).norm().item()
    if reference == 0.0:
        return 0.0 if difference == 0.0 else math.inf
    return difference / reference


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


# --------------------------------------------------------------------------- structure
def slot_layout(layer: VersatileConv2d) -> SlotLayout:
    """Read the per-slot structure of ``layer`` (cells, channel offsets, fixed masks)."""
    slots = layer.group_size
    device = layer.primary.device
    cells = torch.zeros(layer.num_primary, slots, dtype=torch.bool, device=device)
    cells[layer.primary_index, layer.secondary_index] = True
    slot = torch.arange(slots, device=device)
    offsets = slot_channel_offset(slot, layer.spatial_masks, layer.channel_positions, layer.channel_stride)
    kh, kw = layer.kernel_size
    if layer.mode.startswith("spatial"):
        rings = slot_ring_mask(slot, layer.kernel_size, layer.spatial_masks)
        rings = rings.unsqueeze(1).expand(-1, layer.channel_window, -1, -1).reshape(slots, -1)
    else:
        rings = torch.ones(slots, layer.channel_window * kh * kw, device=device)
    learned = layer.mask_sharing if layer.mode == "learned" else None
    return SlotLayout(cells, offsets, rings, layer.channel_window, layer.kernel_size, learned)


def slot_views(weight: Tensor, layout: SlotLayout) -> Tensor:
    """(N, S, K): every output's filter as slot j sees it (its channel window, times the slot's ring)."""
    slots = layout.cells.shape[1]
    if layout.learned is not None:
        return weight.flatten(1).unsqueeze(1).expand(-1, slots, -1)
    channels = layout.offsets.view(-1, 1) + torch.arange(layout.window, device=weight.device).view(1, -1)
    windows = weight[:, channels]  # (N, S, ĉ, kh, kw)
    return windows.flatten(2) * layout.rings.to(weight.dtype)


def assign_slots(loss: Tensor, quota: Tensor) -> Tensor:
    """Slot per output, with exactly quota[j] outputs in slot j, greedily keeping ``loss`` (N, S) low.

    Slots are filled from the costliest on average; each takes the outputs that lose least by
    going there rather than to their best remaining slot (exact for two slots).
    """
    outputs, slots = loss.shape
    slot_of = torch.full((outputs,), -1, dtype=torch.long, device=loss.device)
    remaining = list(range(slots))
    for slot in sorted(remaining, key=lambda j: -loss[:, j].mean().item()):
        remaining.remove(slot)
        free = slot_of < 0
        if remaining:
            regret = loss[:, slot] - loss[:, remaining].min(1).values
        else:
            regret = torch.zeros_like(loss[:, slot])
        regret = torch.where(free, regret, math.inf)
        chosen = torch.topk(regret, int(quota[slot]), largest=False).indices
        slot_of[chosen] = slot
    return slot_of


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


def assignment_cycles(successor: list[int]) -> list[list[int]]:
    """The cycles of a permutation given as ``successor[i]``, each starting at its smallest node."""
    seen = [False] * len(successor)
    cycles = []
    for start in range(len(successor)):
        if seen[start]:
            continue
        cycle, node = [], start
        while not seen[node]:
            seen[node] = True
            cycle.append(node)
            node = successor[node]
        cycles.append(cycle)
    return cycles


def split_cycle(cycle: list[int], cost: Tensor) -> tuple[list[tuple[int, int]], list[int]]:
    """Cheapest pairs of neighbours along a cycle of the assignment relaxation, and the node left
    over when the cycle is odd (every rotation of the alternating pairing is tried)."""
    length = len(cycle)
    if length == 1:
        return [], cycle
    best_cost, best_pairs, best_left = math.inf, [], []
    for start in range(length if length > 2 else 1):
        pairs = [(cycle[(start + 2 * k) % length], cycle[(start + 2 * k + 1) % length]) for k in range(length // 2)]
        total = sum(float(cost[a, b]) for a, b in pairs)
        if total < best_cost:
            left = [cycle[(start - 1) % length]] if length % 2 else []
            best_cost, best_pairs, best_left = total, pairs, left
    return best_pairs, best_left


def relaxed_pairing(cost: Tensor) -> list[tuple[int, int]]:
    """A perfect matching of an even number of nodes from the assignment relaxation.

    The cheapest permutation without fixed points (``scipy.optimize.linear_sum_assignment``) is a
    lower bound on twice the best matching; its cycles are split into neighbouring pairs and the
    nodes left over by odd cycles are paired greedily. Raises ImportError without scipy.
    """
    from scipy.optimize import linear_sum_assignment

    nodes = cost.shape[0]
    finite = cost.double().cpu().clone()
    finite.fill_diagonal_(float(finite.abs().max()) * nodes + 1.0)
    rows, columns = linear_sum_assignment(finite.numpy())
    successor = [0] * nodes
    for row, column in zip(rows.tolist(), columns.tolist(), strict=True):
        successor[row] = column
    pairs, left = [], []
    for cycle in assignment_cycles(successor):
        cycle_pairs, cycle_left = split_cycle(cycle, finite)
        pairs += cycle_pairs
        left += cycle_left
    while left:
        first = left.pop(0)
        second = min(left, key=lambda node: float(finite[first, node]))
        left.remove(second)
        pairs.append((first, second))
    return pairs


def exact_pairing(cost: Tensor) -> list[tuple[int, int]]:
    """The cheapest perfect matching of an even number of nodes, by dynamic programming over subsets
    (the lowest unmatched node picks its partner): O(2^n·n), for small n only."""
    nodes = cost.shape[0]
    values = cost.double().cpu().tolist()
    full = (1 << nodes) - 1
    best: dict[int, tuple[float, int]] = {full: (0.0, -1)}
    for matched in range(full - 1, -1, -1):
        free = [n for n in range(nodes) if not matched >> n & 1]
        if len(free) % 2:
            continue
        first = free[0]
        options = ((values[first][other] + best[matched | 1 << first | 1 << other][0], other) for other in free[1:])
        best[matched] = min(options)
    pairs, matched = [], 0
    while matched != full:
        first = next(n for n in range(nodes) if not matched >> n & 1)
        other = best[matched][1]
        pairs.append((first, other))
        matched |= 1 << first | 1 << other
    return pairs


def two_opt_pairs(cost: Tensor, pairs: Tensor, rounds: int = 100) -> Tensor:
    """2-opt on a perfect matching ``pairs`` (Q, 2): re-pair two pairs {a,b},{c,d} as {a,c},{b,d} or
    {a,d},{b,c} whenever that is cheaper; each round applies the best non-overlapping moves."""
    pairs = pairs.clone()
    count = pairs.shape[0]
    if count < 2:
        return pairs
    total = float(cost[pairs[:, 0], pairs[:, 1]].abs().sum())
    for _ in range(rounds):
        a, b = pairs[:, 0], pairs[:, 1]
        current = cost[a, b]
        before = current.unsqueeze(1) + current.unsqueeze(0)
        gain_ac = before - cost[a.unsqueeze(1), a.unsqueeze(0)] - cost[b.unsqueeze(1), b.unsqueeze(0)]
        gain_ad = before - cost[a.unsqueeze(1), b.unsqueeze(0)] - cost[b.unsqueeze(1), a.unsqueeze(0)]
        gain = torch.maximum(gain_ac, gain_ad).fill_diagonal_(0.0)
        threshold = 1e-12 * total
        if float(gain.max()) <= threshold:
            break
        order = torch.argsort(gain.flatten(), descending=True).tolist()
        gains, cross = gain.flatten().tolist(), (gain_ac >= gain_ad).flatten().tolist()
        old, touched = pairs.tolist(), set()
        for flat in order:
            if gains[flat] <= threshold:
                break
            first, second = divmod(flat, count)
            if first in touched or second in touched:
                continue
            touched.update((first, second))
            (p, q), (r, t) = old[first], old[second]
            new = ((p, r), (q, t)) if cross[flat] else ((p, t), (q, r))
            pairs[first], pairs[second] = torch.tensor(new[0]), torch.tensor(new[1])
    return pairs


def pair_outputs(cost: Tensor, cells: Tensor) -> Tensor:
    """Groups of two for interchangeable slots: a cheap perfect matching on ``cost`` (N, N).

    Returns the (P, 2) table of :func:`group_outputs`; with N odd, a dummy node that costs 0 with
    everyone marks the output left alone, which goes to the last (partial) group. Up to
    ``_EXACT_DP_NODES`` nodes the matching is optimal (:func:`exact_pairing`); beyond, it comes from
    :func:`relaxed_pairing` improved by :func:`two_opt_pairs` (within 0.02% of the optimum on
    ResNet-20's layers); without scipy, the greedy grouping and :func:`improve_groups` are used.
    """
    outputs = cost.shape[0]
    padded = torch.zeros(outputs + outputs % 2, outputs + outputs % 2, dtype=torch.float64)
    padded[:outputs, :outputs] = cost.detach().double().cpu()  # small and sequential: on the CPU
    if padded.shape[0] <= _EXACT_DP_NODES:
        pairs = torch.tensor(exact_pairing(padded), dtype=torch.long).view(-1, 2)
    else:
        try:
            pairs = torch.tensor(relaxed_pairing(padded), dtype=torch.long).view(-1, 2)
        except ImportError:  # pragma: no cover - scipy comes with scikit-learn
            return improve_groups(cost, group_outputs([cost], cost.new_ones(outputs), cells))
        pairs = two_opt_pairs(padded, pairs)
    pairs = torch.where(pairs >= outputs, -1, pairs)
    pairs = torch.sort(pairs, dim=1, descending=True).values  # a lone output sits in slot 0
    alone = (pairs < 0).any(1)
    pairs = torch.cat([pairs[~alone], pairs[alone]])
    members = torch.full(tuple(cells.shape), -1, dtype=torch.long)
    members[: pairs.shape[0]] = pairs
    return members.to(cost.device)


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


def gather_members(views: Tensor, members: Tensor) -> Tensor:
    """(P, S, K) views of each cell's output as its own slot sees it; zeros for missing cells."""
    slot = torch.arange(members.shape[1], device=members.device).expand_as(members)
    gathered = views[members.clamp_min(0), slot]
    return gathered * (members >= 0).unsqueeze(-1).to(views.dtype)


def slot_permutation_costs(
    views: Tensor, members: Tensor, slot_masks: Tensor, primary: Tensor, outside: Tensor, use_scale: bool
) -> Tensor:
    """(P, S, S) error of putting the output of cell m into slot j of its group, given the primary.

    ``slot_masks`` (S, K) is each slot's mask (fixed ring or shared learned mask), ``outside``
    (N, S) the energy each output loses outside slot j's channel window. Missing outputs cost 0
    anywhere; a real output in a missing cell costs ∞.
    """
    valid = members >= 0
    candidate = views[members.clamp_min(0)]  # (P, S_member, S_slot, K)
    approx = slot_masks.unsqueeze(0) * primary.unsqueeze(1)  # (P, S_slot, K)
    if use_scale:
        inner = torch.einsum("pmjk,pjk->pmj", candidate, approx)
        energy = approx.pow(2).sum(-1).unsqueeze(1)
        explained = torch.where(energy > 0, inner.pow(2) / energy.clamp_min(torch.finfo(views.dtype).tiny), 0.0)
        cost = candidate.pow(2).sum(-1) - explained
    else:
        cost = (candidate - approx.unsqueeze(1)).pow(2).sum(-1)
    cost = cost + outside[members.clamp_min(0)]
    cost = torch.where(valid.unsqueeze(-1), cost, 0.0)
    # every existing cell holds an output, so a group's missing cells are exactly its empty ones
    return torch.where(valid.unsqueeze(-1) & ~valid.unsqueeze(1), math.inf, cost)


def best_slot_permutation(cost: Tensor) -> Tensor:
    """Apply the cheapest slot assignment per group: cost (P, S, S) → new position of each member (P, S).

    Keeps the current assignment unless another is strictly cheaper.
    """
    slots = cost.shape[1]
    perms = torch.tensor(list(itertools.permutations(range(slots))), device=cost.device)  # (Q, S)
    member = torch.arange(slots, device=cost.device)
    total = cost[:, member.unsqueeze(0).expand_as(perms), perms].sum(-1)  # (P, Q); perms[0] is identity
    best = total.argmin(1)
    keep = total.gather(1, best.unsqueeze(1)).squeeze(1) >= total[:, 0] * (1 - 1e-9)
    best = torch.where(keep, 0, best)
    return perms[best]


def permute_members(members: Tensor, position: Tensor) -> Tensor:
    """Move member m of each group to slot position[p, m]."""
    moved = torch.empty_like(members)
    moved.scatter_(1, position, members)
    return moved


# --------------------------------------------------------------------------- the spatial metric
def spatial_metric(
    kernel_size: tuple[int, int],
    correlation: float,
    dilation: tuple[int, int] = (1, 1),
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(T, T) prior covariance of the T = kh·kw taps of one input channel: ρ^(|Δy|·dy + |Δx|·dx).

    Feature maps are spatially smooth, so an error pattern that is smooth across a kernel changes
    the output far more than the same energy alternating in sign: the output error of a filter
    error δ is about δᵀ Σ δ with Σ the input patch covariance. Measured on the CIFAR ResNet-20,
    neighbouring taps correlate 0.4-0.75 and Σ ≈ I_C ⊗ (this metric with ρ = 0.5) carries most of
    the gain of the true Σ; ρ = 0 gives the identity (the plain Frobenius error).
    """
    kh, kw = kernel_size
    row = torch.arange(kh).repeat_interleave(kw)
    column = torch.arange(kw).repeat(kh)
    distance = (row.unsqueeze(1) - row).abs() * dilation[0] + (column.unsqueeze(1) - column).abs() * dilation[1]
    return torch.tensor(float(correlation), dtype=torch.float64).pow(distance.double()).to(dtype)


def metric_primary(views: Tensor, masks: Tensor, scale: Tensor, metric: Tensor) -> Tensor:
    """argmin_f Σ_j (X_j − α_j M_j∘f)ᵀ (I_C ⊗ Σ) (X_j − α_j M_j∘f) per group, for fixed masks and scales.

    ``views`` and ``masks`` (P, S, C·T), ``scale`` (P, S), ``metric`` Σ (T, T). The problem splits
    into one T×T system per (group, channel); elements no scaled member keeps get 0. Groups are
    solved in chunks of at most ``_METRIC_CHUNK`` system entries, which bounds the memory.
    """
    groups, _, size = views.shape
    chunk = max(1, _METRIC_CHUNK // (size * metric.shape[0]))
    parts = [
        _metric_primary_chunk(
            views[start : start + chunk], masks[start : start + chunk], scale[start : start + chunk], metric
        )
        for start in range(0, groups, chunk)
    ]
    return torch.cat(parts) if parts else views.new_zeros(0, size)


def _metric_primary_chunk(views: Tensor, masks: Tensor, scale: Tensor, metric: Tensor) -> Tensor:
    groups, slots, size = views.shape
    taps = metric.shape[0]
    x = views.reshape(groups, slots, -1, taps)
    m = masks.reshape(groups, slots, -1, taps)
    a = scale.view(groups, slots, 1, 1)
    weighted = a * m
    system = torch.einsum("psct,psce->pcte", weighted * a, m).mul_(metric)  # (P, C, T, T), masks are 0/1
    right = (weighted * (x @ metric)).sum(1)  # (P, C, T)
    diagonal = system.diagonal(dim1=-2, dim2=-1)  # a view: edits land in the system
    free = (weighted == 0).all(1).to(views.dtype)  # elements no scaled member keeps: f = 0
    diagonal.add_(free + 1e-9 * diagonal.mean(-1, keepdim=True))
    factor, info = torch.linalg.cholesky_ex(system)  # symmetric positive definite unless degenerate
    if bool((info == 0).all()):
        return torch.cholesky_solve(right.unsqueeze(-1), factor).squeeze(-1).reshape(groups, size)
    return torch.linalg.solve(system, right.unsqueeze(-1)).squeeze(-1).reshape(groups, size)


def metric_scale(views: Tensor, approx: Tensor, metric: Tensor) -> Tensor:
    """Least-squares α per row under I_C ⊗ Σ: ⟨X, A⟩_Σ / ⟨A, A⟩_Σ (0 where A = 0)."""
    taps = metric.shape[0]
    shape = (*views.shape[:-1], -1, taps)
    weighted = approx.reshape(shape) @ metric
    inner = (weighted * views.reshape(shape)).sum((-2, -1))
    energy = (weighted * approx.reshape(shape)).sum((-2, -1))
    return torch.where(energy > 0, inner / energy.clamp_min(torch.finfo(energy.dtype).tiny), 0.0)


def metric_masks(views: Tensor, masks: Tensor, scaled: Tensor, metric: Tensor, sweeps: int = 2) -> Tensor:
    """Per-filter masks improved under I_C ⊗ Σ by coordinate descent (iterated conditional modes).

    ``scaled`` (P, S, C·T) is α_j·f; each sweep visits the T taps in turn and flips an element of
    every (group, member, channel) at once where that lowers its error. The error never increases.
    """
    taps = metric.shape[0]
    shape = (*views.shape[:-1], -1, taps)
    x, u = views.reshape(shape), scaled.reshape(shape)
    m = masks.reshape(shape).clone()
    gradient = (x - m * u) @ metric  # Σ r, kept up to date as elements flip
    for _ in range(sweeps):
        for tap in range(taps):
            step = (1 - 2 * m[..., tap]) * u[..., tap]  # change of m·u if the element flips
            change = step * (step * metric[tap, tap] - 2 * gradient[..., tap])
            flip = change < 0
            m[..., tap] = torch.where(flip, 1 - m[..., tap], m[..., tap])
            gradient -= torch.where(flip, step, 0.0).unsqueeze(-1) * metric[tap]
    return m.reshape(masks.shape)


def refine_under_metric(
    views: Tensor, masks: Tensor, scale: Tensor, primary: Tensor, valid: Tensor, metric: Tensor, rounds: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Alternate per-filter masks (:func:`metric_masks`), primaries (:func:`metric_primary`) and scales
    (:func:`metric_scale`) under I_C ⊗ Σ; each step is a descent step, so the metric error never
    increases. Returns masks, scale, primary."""
    for _ in range(rounds):
        masks = metric_masks(views, masks, scale.unsqueeze(-1) * primary.unsqueeze(1), metric)
        primary = metric_primary(views, masks, scale, metric)
        scale = metric_scale(views, masks * primary.unsqueeze(1), metric) * valid
    return masks, scale, primary


# --------------------------------------------------------------------------- the fit
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


# --------------------------------------------------------------------------- entry point
@torch.no_grad()
def initialise_from_weight(
    layer: VersatileConv2d,
    weight: Tensor,
    bias: Tensor | None,
    method: str = "fit",
    *,
    iterations: int | None = None,
    spatial_correlation: float = DEFAULT_SPATIAL_CORRELATION,
) -> float:
    """Initialise ``layer`` in place from a dense conv weight (N, c, kh, kw) and bias; no data needed.

    ``method`` "fit" groups similar filters and alternates masks, primaries, scales and slot
    assignment (docs/FIT.md §4-§7); "fit-plain" is "fit" with ``spatial_correlation`` 0; "naive" is the
    baseline (consecutive groups, first filter as primary, masks on). With learned per-filter masks
    and scales, "fit" ends by minimising the error under a prior of spatially smooth inputs
    (``spatial_correlation`` ρ of neighbouring pixels, scaled by the layer's dilation; 0 keeps the
    plain Frobenius error). Writes primary, primary_index/secondary_index (and the derived fixed
    structure), mask_proxy (0.75 on, 0.25 off), scale and bias. Returns the plain ‖W_layer − W‖_F / ‖W‖_F.
    """
    if not 0.0 <= spatial_correlation < 1.0:
        raise ValueError(f"spatial_correlation must be in [0, 1); got {spatial_correlation!r}.")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}.")
    if method == "fit-plain":
        method, spatial_correlation = "fit", 0.0
    expected = (layer.out_channels, layer.in_channels, *layer.kernel_size)
    if tuple(weight.shape) != expected:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, but the layer needs {expected}.")
    if (bias is None) != (layer.bias is None):
        raise ValueError("bias must be given exactly when the layer has a bias.")
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    target = weight.detach().to(device=layer.primary.device, dtype=dtype)
    layout = slot_layout(layer)
    layout = SlotLayout(
        layout.cells, layout.offsets, layout.rings.to(dtype), layout.window, layout.kernel_size, layout.learned
    )
    use_scale = layer.scale is not None
    if method == "fit":
        result = fit_weight(
            target,
            layout,
            use_scale=use_scale,
            iterations=iterations,
            spatial_correlation=spatial_correlation,
            dilation=tuple(layer.dilation),
        )
    else:
        result = naive_fit(target, layout, use_scale=use_scale)
    layer.primary.copy_(result.primary.view_as(layer.primary))
    layer.primary_index.copy_(result.primary_index)
    layer.secondary_index.copy_(result.secondary_index)
    layer.derive_fixed_structure()
    if layer.mask_proxy is not None:
        on = result.mask.view_as(layer.mask_proxy) > 0.5
        layer.mask_proxy.copy_(torch.where(on, PROXY_ON, PROXY_OFF))
    if layer.scale is not None:
        layer.scale.copy_(result.scale)
    if bias is not None:
        layer.bias.copy_(bias)
    return relative_error(layer.dense_weight().to(dtype), target)


def from_conv(conv: nn.Conv2d, *, init: str = "fit", **options) -> VersatileConv2d:
    """A versatile layer with ``conv``'s geometry, dtype and device, initialised from its weights.

    ``init="fit"`` groups similar filters and fits masks, primaries and scales to the dense weight
    (:func:`initialise_from_weight`); ``init="naive"`` is the baseline (each primary filter is the first
    filter of its consecutive group, masks on, least-squares scales). ``options`` are the layer's
    (mode, secondary, channel_window, channel_stride, mask_sharing, scale).
    """
    layer = VersatileConv2d.shaped_like(conv, **options)
    initialise_from_weight(layer, conv.weight, conv.bias, init)
    return layer
