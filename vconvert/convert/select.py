"""``--target-ratio``: choose per layer the secondary count (or, in spatial mode, which layers to convert)
so that the whole model's stored size shrinks by the asked factor, preferring the layers whose fit error is
lowest per bit saved.
"""

from __future__ import annotations

from dataclasses import asdict

from torch import nn

from vconvert.convert.plan import ConvOptions, dense_bits, detached, storage_of
from vconvert.errors import BadInputError
from vconvert.fit.initialise import initialise_from_weight
from vconvert.nn.versatile import VersatileConv2d

SECONDARY_CANDIDATES = (2, 3, 4, 6, 8)


def _candidate_options(base: ConvOptions, conv: nn.Conv2d) -> list[dict]:
    """Options for one layer in order of increasing compression."""
    if base.mode == "spatial":
        return [base.layer_kwargs()]
    candidates = []
    for count in SECONDARY_CANDIDATES:
        options = ConvOptions(**{**asdict(base), "secondary": count, "channel_window": None}).layer_kwargs()
        try:
            storage_of(conv, options)
        except ValueError:
            continue
        candidates.append(options)
    return candidates


def _smaller_candidates(base: ConvOptions, conv: nn.Conv2d) -> list[tuple[dict, VersatileConv2d]]:
    """(options, unfitted layer) of each candidate that stores fewer bits than ``conv``, in ladder order."""
    layers = [(options, VersatileConv2d.shaped_like(conv, **options)) for options in _candidate_options(base, conv)]
    return [(options, layer) for options, layer in layers if layer.stored_bits() < dense_bits(conv)]


def ladder_floor(dense_bits: int, step_bits: list[int]) -> int:
    """Bits of a layer at the top of its ladder: the greedy climbs while each step saves bits."""
    current = dense_bits
    for bits in step_bits:
        if bits >= current:
            break
        current = bits
    return current


def _fit_ladder(conv: nn.Conv2d, pairs: list[tuple[dict, VersatileConv2d]], init: str) -> list[tuple[dict, int, float]]:
    """(options, stored bits, relative fit error) of each candidate layer, fitted to ``conv``."""
    weight, bias = conv.weight.detach(), detached(conv.bias)
    return [
        (options, layer.stored_bits(), float(initialise_from_weight(layer, weight, bias, method=init)))
        for options, layer in pairs
    ]


def _choose_for_target(
    model: nn.Module,
    convs: dict[str, nn.Conv2d],
    base: ConvOptions,
    target_ratio: float,
    model_dense_bits: int,
    init: str,
) -> tuple[dict[str, dict], str]:
    """Greedy: repeatedly take the step (convert a layer, or raise its secondary count) with the
    lowest increase of relative fit error per bit saved, until the whole model is small enough."""
    if target_ratio <= 1.0:
        raise BadInputError(f"`target_ratio` must be greater than 1, got {target_ratio}.")
    budget = model_dense_bits / target_ratio
    shaped = {name: _smaller_candidates(base, conv) for name, conv in convs.items()}
    # how small the greedy can make the model follows from the shapes alone: refuse before fitting
    smallest = sum(
        ladder_floor(dense_bits(convs[name]), [layer.stored_bits() for _, layer in pairs])
        for name, pairs in shaped.items()
    ) + (model_dense_bits - sum(dense_bits(conv) for conv in convs.values()))
    if smallest > budget:
        raise BadInputError(
            f"`target_ratio` {target_ratio} is out of reach: converting every eligible conv as far as "
            f"secondary={SECONDARY_CANDIDATES[-1]} gives {model_dense_bits / smallest:.2f}x; ask for less or "
            "convert more layers."
        )
    ladders = {name: _fit_ladder(convs[name], pairs, init) for name, pairs in shaped.items()}
    level = dict.fromkeys(convs, -1)
    total = model_dense_bits

    def step_cost(name: str) -> float | None:
        steps, current = ladders[name], level[name]
        if current + 1 >= len(steps):
            return None
        before_bits = steps[current][1] if current >= 0 else dense_bits(convs[name])
        before_error = steps[current][2] if current >= 0 else 0.0
        saved = before_bits - steps[current + 1][1]
        return (steps[current + 1][2] - before_error) / saved if saved > 0 else None

    while total > budget:  # reachable (checked above): some step that saves bits is always left
        costs = {name: cost for name in convs if (cost := step_cost(name)) is not None}
        name = min(costs, key=costs.__getitem__)
        steps, current = ladders[name], level[name]
        before_bits = steps[current][1] if current >= 0 else dense_bits(convs[name])
        total -= before_bits - steps[current + 1][1]
        level[name] = current + 1
    chosen = {name: ladders[name][lvl][0] for name, lvl in level.items() if lvl >= 0}
    counts = sorted({options["secondary"] for options in chosen.values()}) if base.mode != "spatial" else []
    note = (
        f"--target-ratio {target_ratio}: converted {len(chosen)} of {len(convs)} eligible convs"
        + (f" with secondary counts {counts}" if counts else "")
        + ", taking first the steps with the least fit error per bit saved;"
        + f" whole model {model_dense_bits / total:.2f}x"
    )
    return chosen, note
