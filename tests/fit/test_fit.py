"""Data-free initialisation (vconvert.fit), BatchNorm recalibration and calibration data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from vconvert import VersatileConv2d
from vconvert.convert.calibrate import recalibrate_batchnorm
from vconvert.data.datasets import calibration_batches
from vconvert.errors import BadInputError
from vconvert.fit.closed_form import (
    first_argmax,
    fit_masks,
    fit_masks_and_primary,
    fit_primary,
    fit_scale,
    rank_one,
)
from vconvert.fit.grouping import group_cost, group_outputs, grouping_costs, improve_groups, pair_cost
from vconvert.fit.initialise import from_conv, initialise_from_weight, relative_error
from vconvert.fit.metric import metric_masks, metric_primary, metric_scale, spatial_metric
from vconvert.fit.pairing import pair_outputs
from vconvert.fit.slots import best_slot_permutation, slot_layout
from vconvert.fit.weight import FitResult, fit_weight, project_onto_groups
from vconvert.nn.versatile import group_members


def _error(views: torch.Tensor, approx: torch.Tensor) -> float:
    return float((views - approx).pow(2).sum())


# --------------------------------------------------------------------------- pure functions
def test_fit_scale_is_exact_least_squares() -> None:
    approx = torch.randn(5, 3, 7, dtype=torch.float64)
    factors = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(fit_scale(factors.unsqueeze(-1) * approx, approx), factors)
    noisy = factors.unsqueeze(-1) * approx + torch.randn_like(approx)
    scale = fit_scale(noisy, approx)
    for nudge in (-1e-3, 1e-3):  # a least-squares minimum: any nudge makes the error larger
        assert _error(noisy, scale.unsqueeze(-1) * approx) < _error(noisy, (scale + nudge).unsqueeze(-1) * approx)
    assert bool((fit_scale(noisy, torch.zeros_like(approx)) == 0).all())


def test_fit_primary_recovers_masked_scaled_primary() -> None:
    generator = torch.Generator().manual_seed(1)
    primary = torch.randn(4, 9, dtype=torch.float64, generator=generator)
    scale = torch.rand(4, 3, dtype=torch.float64, generator=generator) + 0.5
    masks = (torch.rand(4, 3, 9, generator=generator) < 0.6).double()
    views = scale.unsqueeze(-1) * masks * primary.unsqueeze(1)
    fitted = fit_primary(views, masks, scale)
    kept = masks.sum(1) > 0
    torch.testing.assert_close(fitted[kept], primary[kept])
    assert bool((fitted[~kept] == 0).all())


def test_mask_step_never_increases_the_error() -> None:
    generator = torch.Generator().manual_seed(2)
    views = torch.randn(6, 2, 27, generator=generator)
    approx = torch.randn(6, 2, 27, generator=generator)
    masks = fit_masks(views, approx)
    assert 0 < float(masks.mean()) < 1
    fitted = _error(views, masks * approx)
    assert fitted <= _error(views, approx)
    for _ in range(5):
        other = (torch.rand(6, 2, 27, generator=generator) < 0.5).float()
        assert fitted <= _error(views, other * approx) + 1e-6
    shared = fit_masks(views, approx, shared=True)
    assert shared.shape == (2, 27)
    assert _error(views, shared * approx) <= _error(views, approx)


@pytest.mark.parametrize("shared", [False, True], ids=["per-filter", "shared"])
def test_joint_mask_and_primary_step_beats_alternating_steps(shared: bool) -> None:
    generator = torch.Generator().manual_seed(3)
    views = torch.randn(8, 3, 18, dtype=torch.float64, generator=generator)
    scale, primary = rank_one(views)
    masks, fitted = fit_masks_and_primary(views, scale, shared=shared)
    masks = masks.unsqueeze(0) if shared else masks
    joint = _error(views, scale.unsqueeze(-1) * masks * fitted.unsqueeze(1))
    rank_one_error = _error(views, scale.unsqueeze(-1) * primary.unsqueeze(1))
    separate_masks = fit_masks(views, scale.unsqueeze(-1) * primary.unsqueeze(1), shared=shared)
    separate_masks = separate_masks.unsqueeze(0) if shared else separate_masks
    separate = _error(views, scale.unsqueeze(-1) * separate_masks * primary.unsqueeze(1))
    assert joint <= separate + 1e-9 <= rank_one_error + 1e-9
    assert joint < rank_one_error


@pytest.mark.parametrize("members", [1, 2, 3, 4], ids=lambda s: f"s{s}")
def test_masks_and_primary_are_the_best_subset_per_element(members: int) -> None:
    generator = torch.Generator().manual_seed(members)
    views = torch.randn(5, members, 7, dtype=torch.float64, generator=generator)
    scale = torch.randn(5, members, dtype=torch.float64, generator=generator)
    scale[0, 0] = 0.0  # a member without scale keeps nothing
    masks, primary = fit_masks_and_primary(views, scale)
    error = (views - scale.unsqueeze(-1) * masks * primary.unsqueeze(1)).pow(2).sum(1)  # (P, K)
    best = torch.full_like(error, float("inf"))
    for bits in range(2**members):  # brute force: every subset with its least-squares primary value
        subset = torch.tensor([(bits >> j) & 1 for j in range(members)], dtype=views.dtype)
        weighted = scale * subset
        energy = weighted.pow(2).sum(1, keepdim=True)
        value = torch.where(energy > 0, (weighted.unsqueeze(-1) * views).sum(1) / energy.clamp_min(1e-300), 0.0)
        candidate = (views - weighted.unsqueeze(-1) * value.unsqueeze(1)).pow(2).sum(1)
        best = torch.minimum(best, candidate)
    torch.testing.assert_close(error, best)


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_first_argmax_is_argmax_with_ties_to_the_first(dim: int) -> None:
    values = torch.randint(0, 3, (6, 5, 4)).float()  # few distinct values: many ties
    assert torch.equal(first_argmax(values, dim), values.argmax(dim))


def test_rank_one_and_pair_cost_agree_on_known_cases() -> None:
    base = torch.randn(1, 10, dtype=torch.float64)
    views = torch.stack([2 * base[0], -0.5 * base[0]]).unsqueeze(0)
    scale, primary = rank_one(views)
    torch.testing.assert_close(scale.unsqueeze(-1) * primary.unsqueeze(1), views)
    assert float(scale[0, 0]) > 0  # the largest member gets the positive scale
    parallel = pair_cost(torch.cat([base, -3 * base]), torch.cat([base, -3 * base]))
    torch.testing.assert_close(parallel, torch.zeros(2, 2, dtype=torch.float64), atol=1e-9, rtol=0)
    orthogonal = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(pair_cost(orthogonal[:1], orthogonal[1:]), torch.tensor([[1.0]], dtype=torch.float64))


def test_slot_permutation_picks_the_cheapest_and_keeps_ties() -> None:
    cost = torch.tensor([[[5.0, 1.0], [1.0, 5.0]], [[1.0, 5.0], [5.0, 1.0]], [[2.0, 2.0], [2.0, 2.0]]])
    position = best_slot_permutation(cost)
    assert position.tolist() == [[1, 0], [0, 1], [0, 1]]


# --------------------------------------------------------------------------- grouping
@pytest.mark.parametrize(
    "options",
    [{"mode": "learned", "secondary": 2}, {"mode": "learned", "secondary": 3}, {"mode": "spatial"}],
    ids=["learned-s2", "learned-s3", "spatial"],
)
def test_grouping_is_a_valid_assignment(options: dict) -> None:
    torch.manual_seed(4)
    conv = nn.Conv2d(5, 13, 3)
    layer = from_conv(conv, **options)
    assert sorted(torch.arange(13).tolist()) == sorted(range(13))
    pairs = set(zip(layer.primary_index.tolist(), layer.secondary_index.tolist(), strict=True))
    assert len(pairs) == 13, "every output gets its own (primary, slot) cell"
    counts = torch.bincount(layer.primary_index, minlength=layer.num_primary)
    assert int(counts.max()) <= layer.group_size
    assert int(layer.secondary_index.max()) < layer.group_size
    canonical = {(o // layer.group_size, o % layer.group_size) for o in range(13)}
    assert pairs == canonical, "the fit permutes the layer's cells, it does not invent new ones"


def test_local_search_never_worsens_the_grouping() -> None:
    torch.manual_seed(5)
    filters = torch.randn(20, 12)
    layer = VersatileConv2d(3, 20, 2, secondary=2)
    cost = grouping_costs(filters, masked=True)
    greedy = group_outputs([cost], filters.pow(2).sum(1), slot_layout(layer).cells)
    improved = improve_groups(cost, greedy)
    assert sorted(improved.flatten().tolist()) == list(range(20))
    assert float(group_cost(cost, improved)) <= float(group_cost(cost, greedy)) + 1e-6


def _best_matching_cost(cost: torch.Tensor, nodes: list[int]) -> float:
    """Brute force: the cheapest perfect matching of ``nodes`` (even count)."""
    if not nodes:
        return 0.0
    first, rest = nodes[0], nodes[1:]
    return min(float(cost[first, other]) + _best_matching_cost(cost, [n for n in rest if n != other]) for other in rest)


@pytest.mark.parametrize("outputs", [6, 8, 9, 11])
def test_pairing_is_optimal_on_small_cases(outputs: int) -> None:
    for seed in range(5):
        generator = torch.Generator().manual_seed(seed)
        points = torch.randn(outputs, 3, generator=generator, dtype=torch.float64)
        cost = torch.cdist(points, points).pow(2)
        cells = torch.ones((outputs + 1) // 2, 2, dtype=torch.bool)
        if outputs % 2:
            cells[-1, 1] = False
        members = pair_outputs(cost, cells)
        assert sorted(members[members >= 0].tolist()) == list(range(outputs))
        assert bool((members >= 0).eq(cells).all()), "a lone output sits in slot 0 of the last group"
        padded = torch.zeros(outputs + outputs % 2, outputs + outputs % 2, dtype=torch.float64)
        padded[:outputs, :outputs] = cost  # the dummy node of an odd count costs 0 with everyone
        best = _best_matching_cost(padded, list(range(padded.shape[0])))
        assert float(group_cost(cost, members)) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_large_pairing_is_valid_and_beats_greedy_grouping() -> None:
    generator = torch.Generator().manual_seed(11)
    filters = torch.randn(41, 18, generator=generator, dtype=torch.float64)
    cost = grouping_costs(filters, masked=True)
    cells = torch.ones(21, 2, dtype=torch.bool)
    cells[-1, 1] = False
    members = pair_outputs(cost, cells)  # 42 nodes: assignment relaxation + 2-opt
    assert sorted(members[members >= 0].tolist()) == list(range(41))
    assert bool((members >= 0).eq(cells).all())
    greedy = improve_groups(cost, group_outputs([cost], filters.pow(2).sum(1), cells))
    assert float(group_cost(cost, members)) <= float(group_cost(cost, greedy)) + 1e-9


def test_spatial_metric_is_a_correlation_matrix() -> None:
    metric = spatial_metric((3, 3), 0.5, dtype=torch.float64)
    assert metric.shape == (9, 9)
    torch.testing.assert_close(metric, metric.T)
    assert bool((metric.diagonal() == 1).all())
    assert float(metric[4, 5]) == 0.5 and float(metric[0, 8]) == 0.5**4  # neighbour, opposite corners
    assert float(torch.linalg.eigvalsh(metric).min()) > 0
    assert float(spatial_metric((3, 3), 0.5, (2, 2), torch.float64)[4, 5]) == 0.25  # dilation spreads taps
    torch.testing.assert_close(spatial_metric((3, 3), 0.0, dtype=torch.float64), torch.eye(9, dtype=torch.float64))


def _metric_error(views: torch.Tensor, approx: torch.Tensor, metric: torch.Tensor) -> float:
    residual = (views - approx).reshape(*views.shape[:-1], -1, metric.shape[0])
    return float(((residual @ metric) * residual).sum())


def test_metric_steps_are_exact_or_descent_steps() -> None:
    generator = torch.Generator().manual_seed(12)
    metric = spatial_metric((3, 3), 0.6, dtype=torch.float64)
    views = torch.randn(5, 2, 4 * 9, generator=generator, dtype=torch.float64)
    scale, primary = rank_one(views)
    masks = (torch.rand(5, 2, 36, generator=generator) < 0.7).double()
    start = _metric_error(views, scale.unsqueeze(-1) * masks * primary.unsqueeze(1), metric)
    better = metric_masks(views, masks, scale.unsqueeze(-1) * primary.unsqueeze(1), metric)
    after_masks = _metric_error(views, scale.unsqueeze(-1) * better * primary.unsqueeze(1), metric)
    assert after_masks <= start + 1e-9
    solved = metric_primary(views, better, scale, metric)
    after_primary = _metric_error(views, scale.unsqueeze(-1) * better * solved.unsqueeze(1), metric)
    assert after_primary <= after_masks + 1e-9
    for _ in range(3):  # a least-squares minimum: any nudge of the primary makes it worse
        nudged = solved + 1e-3 * torch.randn(solved.shape, generator=generator, dtype=torch.float64)
        assert after_primary < _metric_error(views, scale.unsqueeze(-1) * better * nudged.unsqueeze(1), metric)
    fitted_scale = metric_scale(views, better * solved.unsqueeze(1), metric)
    after_scale = _metric_error(views, fitted_scale.unsqueeze(-1) * better * solved.unsqueeze(1), metric)
    assert after_scale <= after_primary + 1e-9


def test_spatial_prior_lowers_the_metric_error_and_zero_keeps_the_plain_fit() -> None:
    generator = torch.Generator().manual_seed(13)
    weight = torch.randn(12, 5, 3, 3, generator=generator, dtype=torch.float64)
    layout = slot_layout(VersatileConv2d(5, 12, 3, bias=False, dtype=torch.float64))
    metric = spatial_metric((3, 3), 0.5, dtype=torch.float64)

    def errors(result: FitResult) -> tuple[float, float]:
        approx = result.scale.view(-1, 1) * result.mask * result.primary[result.primary_index]
        flat = weight.flatten(1)
        return float((flat - approx).pow(2).sum()), _metric_error(flat, approx, metric)

    plain_error, plain_metric = errors(fit_weight(weight, layout, spatial_correlation=0.0))
    prior_error, prior_metric = errors(fit_weight(weight, layout, spatial_correlation=0.5))
    assert prior_metric < plain_metric
    assert plain_error <= prior_error + 1e-9


# --------------------------------------------------------------------------- the entry point
@dataclass(frozen=True)
class Case:
    id: str
    options: dict
    kernel: int | tuple[int, int] = 3
    in_channels: int = 8


CASES = [
    Case("learned-s2", {"mode": "learned"}),
    Case("learned-s4", {"mode": "learned", "secondary": 4}),
    Case("learned-s2-shared", {"mode": "learned", "mask_sharing": "shared"}),
    Case("learned-s3-k3x5", {"mode": "learned", "secondary": 3}, (3, 5)),
    Case("learned-s2-k1", {"mode": "learned"}, 1),
    Case("learned-s2-noscale", {"mode": "learned", "scale": False}),
    Case("learned-s9-alternating-masks", {"mode": "learned", "secondary": 9}),
    Case("spatial-k3", {"mode": "spatial"}),
    Case("spatial-k5", {"mode": "spatial"}, 5),
    Case("channel-s2", {"mode": "channel"}),
    Case("channel-w4-g2", {"mode": "channel", "channel_window": 4, "channel_stride": 2}),
    Case("spatial+channel-w6-g2", {"mode": "spatial+channel", "channel_window": 6, "channel_stride": 2}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_initialise_from_weight_every_mode(case: Case, dtype: torch.dtype) -> None:
    torch.manual_seed(6)
    out_channels = 13  # divisible by none of the group sizes
    conv = nn.Conv2d(case.in_channels, out_channels, case.kernel, padding=1, dtype=dtype)
    naive = from_conv(conv, init="naive", **case.options)
    layer = from_conv(conv, init="naive", **case.options)
    error = initialise_from_weight(layer, conv.weight, conv.bias, "fit")
    assert error == pytest.approx(relative_error(layer.dense_weight().detach(), conv.weight.detach()), rel=1e-4)
    naive_error = relative_error(naive.dense_weight().detach(), conv.weight.detach())
    assert 0 <= error <= naive_error + 1e-6
    assert layer.primary.dtype == dtype
    torch.testing.assert_close(layer.bias, conv.bias)
    if layer.mask_proxy is not None:
        assert set(layer.mask_proxy.unique().tolist()) <= {0.25, 0.75}
    # the written structure is self-consistent: forward, fold and the fixed masks agree
    x = torch.randn(2, case.in_channels, 9, 10, dtype=dtype)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-10
    assert (layer(x) - layer.fold()(x)).abs().max().item() <= tolerance


def test_fit_beats_naive_on_structured_weights() -> None:
    """Filters that come in scaled pairs, shuffled: the fit finds the pairs, naive grouping cannot."""
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(16, 6, 3, 3, generator=generator)
    weight = torch.cat([base, base * torch.rand(16, 1, 1, 1, generator=generator) * -2])
    weight = weight[torch.randperm(32, generator=generator)] + 0.01 * torch.randn(32, 6, 3, 3, generator=generator)
    naive = VersatileConv2d(6, 32, 3, bias=False)
    fitted = VersatileConv2d(6, 32, 3, bias=False)
    naive_error = initialise_from_weight(naive, weight, None, "naive")
    error = initialise_from_weight(fitted, weight, None, "fit")
    assert error < 0.05 < naive_error


@pytest.mark.parametrize(
    "options",
    [
        {"mode": "learned", "secondary": 2},
        {"mode": "learned", "secondary": 3},
        {"mode": "spatial"},
        {"mode": "channel", "channel_window": 4, "channel_stride": 2},
    ],
    ids=["learned-s2", "learned-s3", "spatial", "channel-w4-g2"],
)
def test_weight_of_a_versatile_layer_is_recovered(options: dict) -> None:
    generator = torch.Generator().manual_seed(8)
    source = VersatileConv2d(8, 12, 3, bias=False, dtype=torch.float64, **options)
    order = torch.randperm(12, generator=generator)
    with torch.no_grad():
        source.primary_index.copy_(source.primary_index[order])
        source.secondary_index.copy_(source.secondary_index[order])
        magnitude = torch.rand(12, generator=generator, dtype=torch.float64) + 0.5
        source.scale.copy_(magnitude * torch.sign(torch.randn(12, generator=generator, dtype=torch.float64)))
    source.derive_fixed_structure()
    weight = source.dense_weight().detach()
    target = VersatileConv2d(8, 12, 3, bias=False, dtype=torch.float64, **options)
    assert initialise_from_weight(target, weight, None, "fit", iterations=20) < 1e-4


def _members_and_scale(layer: VersatileConv2d) -> tuple[torch.Tensor, torch.Tensor]:
    members = group_members(layer.primary_index, layer.secondary_index, layer.num_primary)
    return members, layer.scale.detach()[members.clamp_min(0)] * (members >= 0)


def _projected_weight(layer: VersatileConv2d, weight: torch.Tensor) -> torch.Tensor:
    members, scale = _members_and_scale(layer)
    masks, primary, scale = project_onto_groups(weight.flatten(1), members, scale)
    approx = torch.zeros_like(weight.flatten(1))
    valid = members >= 0
    approx[members[valid]] = (scale.unsqueeze(-1) * masks * primary.unsqueeze(1))[valid]
    return approx.view_as(weight)


@pytest.mark.parametrize("secondary", [2, 3], ids=["s2", "s3"])
def test_projection_recovers_a_versatile_weight_and_never_loses_to_the_fit(secondary: int) -> None:
    generator = torch.Generator().manual_seed(3)
    source = VersatileConv2d(6, 11, 3, bias=False, dtype=torch.float64, secondary=secondary)
    with torch.no_grad():
        source.scale.copy_(torch.rand(11, generator=generator, dtype=torch.float64) + 0.5)
    exact = source.dense_weight().detach()
    torch.testing.assert_close(_projected_weight(source, exact), exact)

    weight = torch.randn(11, 6, 3, 3, generator=generator, dtype=torch.float64)
    fitted = VersatileConv2d(6, 11, 3, bias=False, dtype=torch.float64, secondary=secondary)
    fit_error = initialise_from_weight(fitted, weight, None, "fit-plain")
    projected = _projected_weight(fitted, weight)
    assert relative_error(projected, weight) <= fit_error + 1e-12, "the fit's own direction is a candidate"


def test_initialise_refuses_wrong_inputs() -> None:
    layer = VersatileConv2d(4, 6, 3)
    with pytest.raises(ValueError, match="shape"):
        initialise_from_weight(layer, torch.randn(6, 4, 5, 5), torch.zeros(6))
    with pytest.raises(ValueError, match="method must be one of"):
        initialise_from_weight(layer, torch.randn(6, 4, 3, 3), torch.zeros(6), method="svd")
    with pytest.raises(ValueError, match="bias"):
        initialise_from_weight(layer, torch.randn(6, 4, 3, 3), None)
    with pytest.raises(ValueError, match="spatial_correlation"):
        initialise_from_weight(layer, torch.randn(6, 4, 3, 3), torch.zeros(6), spatial_correlation=1.0)


def test_zero_weight_gives_zero_error() -> None:
    layer = VersatileConv2d(4, 6, 3, bias=False)
    assert initialise_from_weight(layer, torch.zeros(6, 4, 3, 3), None) == 0.0


# --------------------------------------------------------------------------- BatchNorm recalibration
def test_recalibration_estimates_data_statistics_and_restores_state() -> None:
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4, 3).view(4, 3, 1, 1))
    model.eval()
    model[2].train()  # a mixed state that must come back exactly
    data = [torch.randn(10, 3, 5, 5) * 3 + 5 for _ in range(4)]
    used = recalibrate_batchnorm(model, data, max_images=30)
    assert used == 30
    norm = model[1]
    assert norm.momentum == 0.3
    assert [m.training for m in model] == [False, False, True]
    images = torch.cat(data)[:30]  # equal batches, so the cumulative average is the mean over images
    torch.testing.assert_close(norm.running_mean[:3], images.mean((0, 2, 3)), rtol=0, atol=1e-4)
    assert float(norm.running_mean[3]) == 0.0  # the zero filter's output
    assert 7 < float(norm.running_var[0]) < 11  # near 3² instead of the initial 1
    assert int(norm.num_batches_tracked) == 3


def test_recalibration_without_batchnorm_uses_no_images() -> None:
    assert recalibrate_batchnorm(nn.Conv2d(3, 3, 1), [torch.randn(2, 3, 4, 4)]) == 0


# --------------------------------------------------------------------------- calibration data
def _write_images(root: Path, classes: int = 2, per_class: int = 5) -> None:
    generator = torch.Generator().manual_seed(10)
    for label in range(classes):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            pixels = torch.randint(0, 256, (12, 10, 3), dtype=torch.uint8, generator=generator)
            Image.fromarray(pixels.numpy()).save(folder / f"{index}.png")


def test_calibration_batches_yield_a_normalised_subset(tmp_path: Path) -> None:
    _write_images(tmp_path / "train")
    (tmp_path / "test").mkdir()  # ignored: the train split is preferred
    batches = list(calibration_batches(tmp_path, (8, 8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), batch_size=4, limit=7))
    assert [b.shape for b in batches] == [(4, 3, 8, 8), (3, 3, 8, 8)]
    values = torch.cat(batches)
    assert float(values.min()) < -1 and float(values.max()) > 1  # (x - 0.5) / 0.25 spans [-2, 2]
    again = list(calibration_batches(tmp_path, (8, 8), (0.5,) * 3, (0.25,) * 3, batch_size=4, limit=7))
    torch.testing.assert_close(torch.cat(again), values)
    everything = list(calibration_batches(tmp_path, (8, 8), (0.5,) * 3, (0.25,) * 3, limit=100))
    assert sum(len(b) for b in everything) == 10


def test_calibration_batches_explain_bad_folders(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="does not exist"):
        next(calibration_batches(tmp_path / "missing", (8, 8), (0.5,) * 3, (0.25,) * 3))
    (tmp_path / "empty" / "class0").mkdir(parents=True)
    with pytest.raises(BadInputError, match="no images"):
        next(calibration_batches(tmp_path / "empty", (8, 8), (0.5,) * 3, (0.25,) * 3))
