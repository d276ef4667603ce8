"""Slots (docs/FIT.md §2, §3, §6 e): what a layer's structure fixes per slot of a group (cells, channel
offsets, fixed rings), each output's filter as every slot sees it, and which output goes to which slot
(the fixed-structure modes' slot assignment, the best permutation of a group's members over its slots)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vconvert.nn.versatile import VersatileConv2d, slot_channel_offset, slot_ring_mask


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


def gather_members(views: Tensor, members: Tensor) -> Tensor:
    """(P, S, K) views of each cell's output as its own slot sees it; zeros for missing cells."""
    slot = torch.arange(members.shape[1], device=members.device).expand_as(members)
    gathered = views[members.clamp_min(0), slot]
    return gathered * (members >= 0).unsqueeze(-1).to(views.dtype)


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
