"""VersatileConv2d: fold parity, independent references, gradients, penalty and accounting."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vconvert import VersatileConv2d, clip_mask_proxies_, fold_model, orthogonality_loss
from vconvert.fit.initialise import from_conv
from vconvert.nn.versatile import nested_spatial_masks

IN_CHANNELS, OUT_CHANNELS = 8, 13  # 13 is divisible by none of the group sizes used below


@dataclass(frozen=True)
class Variant:
    id: str
    options: dict


VARIANTS = [
    Variant("learned-s2", {"mode": "learned"}),
    Variant("learned-s4-shared", {"mode": "learned", "secondary": 4, "mask_sharing": "shared"}),
    Variant("spatial", {"mode": "spatial"}),
    Variant("channel-s2", {"mode": "channel"}),
    Variant("channel-w4-g2", {"mode": "channel", "channel_window": 4, "channel_stride": 2}),
    Variant("spatial+channel-w6-g2", {"mode": "spatial+channel", "channel_window": 6, "channel_stride": 2}),
]
KERNELS = [1, 3, 5, 7, (3, 5), (5, 2)]
GEOMETRIES = {
    "s1-p0": {"stride": 1, "padding": 0},
    "s1-p1-nobias": {"stride": 1, "padding": 1, "bias": False},
    "s2-p2": {"stride": 2, "padding": 2},
    "s1-same": {"stride": 1, "padding": "same"},
    "s1-same-d2": {"stride": 1, "padding": "same", "dilation": 2},
    "s2-valid-d2": {"stride": 2, "padding": "valid", "dilation": 2},
    "s2-p12-nobias": {"stride": (2, 1), "padding": (1, 2), "bias": False},
    "s12-p1-d21": {"stride": (1, 2), "padding": 1, "dilation": (2, 1)},
}


def _shuffle_grouping(layer: VersatileConv2d, generator: torch.Generator) -> None:
    """Give outputs an arbitrary (primary, slot) assignment, as data-free fitting does."""
    order = torch.randperm(layer.out_channels, generator=generator)
    with torch.no_grad():
        layer.primary_index.copy_(layer.primary_index[order])
        layer.secondary_index.copy_(layer.secondary_index[order])
        if layer.scale is not None:
            layer.scale.uniform_(-2.0, 2.0, generator=generator)
    layer.derive_fixed_structure()


def _make(kernel, variant: Variant, seed: int = 0, **geometry) -> VersatileConv2d:
    torch.manual_seed(seed)
    layer = VersatileConv2d(IN_CHANNELS, OUT_CHANNELS, kernel, **geometry, **variant.options)
    _shuffle_grouping(layer, torch.Generator().manual_seed(seed))
    return layer


@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: f"k{k}" if isinstance(k, int) else f"k{k[0]}x{k[1]}")
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.id)
def test_fold_matches_module(variant: Variant, kernel, geometry: dict) -> None:
    layer = _make(kernel, variant, **geometry)
    if layer.mask_proxy is not None:
        density = (layer.mask_proxy > 0.5).float().mean().item()
        assert 0.2 < density < 0.8, "masks must be random, not all-ones"
    assert bool((layer.channel_offset + layer.channel_window <= IN_CHANNELS).all())
    x = torch.randn(2, IN_CHANNELS, 15, 18)
    folded = layer.fold()
    assert type(folded) is nn.Conv2d
    expected = folded(x)
    assert (layer(x) - expected).abs().max().item() <= 1e-5
    # the fold is a real Conv2d with the layer's geometry, not a re-use of the layer's forward
    reference = F.conv2d(x, folded.weight, folded.bias, folded.stride, folded.padding, folded.dilation)
    torch.testing.assert_close(expected, reference)


def _spatial_reference(layer: VersatileConv2d, x: torch.Tensor) -> torch.Tensor:
    """The authors' formulation: one cropped conv per ring j with padding reduced by j, concatenated."""
    kh, kw = layer.kernel_size
    dh, dw = layer.dilation
    ph, pw = layer.padding
    pieces, order = [], []
    for ring in range(int(layer.secondary_index.max()) + 1):
        outputs = torch.nonzero(layer.secondary_index == ring).flatten()
        kernels = layer.primary[layer.primary_index[outputs]][:, :, ring : kh - ring, ring : kw - ring]
        kernels = kernels * layer.scale[outputs].view(-1, 1, 1, 1)
        bias = layer.bias[outputs] if layer.bias is not None else None
        padding = (ph - ring * dh, pw - ring * dw)
        pieces.append(F.conv2d(x, kernels, bias, layer.stride, padding, layer.dilation))
        order.append(outputs)
    stacked = torch.cat(pieces, dim=1)
    result = torch.empty_like(stacked)
    result[:, torch.cat(order)] = stacked
    return result


SPATIAL_CASES = [
    (kernel, stride, dilation, extra_padding, bias)
    for kernel, stride, dilation, extra_padding, bias in itertools.product(
        [3, 5, 7, (3, 5), (7, 3)], [1, 2], [1, 2], [0, 1], [True, False]
    )
]


@pytest.mark.parametrize(
    ("kernel", "stride", "dilation", "extra_padding", "bias"),
    SPATIAL_CASES,
    ids=[f"k{k}-s{s}-d{d}-p+{p}-{'bias' if b else 'nobias'}" for k, s, d, p, b in SPATIAL_CASES],
)
def test_spatial_mode_matches_paper_formulation(kernel, stride, dilation, extra_padding, bias) -> None:
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    rings = (min(kh, kw) + 1) // 2
    # the cropped formulation needs padding >= (rings - 1) * dilation on both axes
    padding = ((rings - 1) * dilation + extra_padding, (rings - 1) * dilation + extra_padding)
    layer = _make(
        kernel, Variant("spatial", {"mode": "spatial"}), stride=stride, padding=padding, dilation=dilation, bias=bias
    )
    x = torch.randn(2, IN_CHANNELS, 13, 10)
    torch.testing.assert_close(layer(x), _spatial_reference(layer, x), atol=1e-5, rtol=1e-5)


def test_nested_spatial_masks_5x5() -> None:
    masks = nested_spatial_masks((5, 5))
    assert masks.shape == (3, 5, 5)
    assert masks.sum(dim=(1, 2)).tolist() == [25.0, 9.0, 1.0]
    assert masks[2, 2, 2] == 1.0


CHANNEL_CASES = [(4, 2), (6, 1), (2, 3), (8, 1)]


@pytest.mark.parametrize(("window", "channel_stride"), CHANNEL_CASES, ids=[f"w{w}-g{g}" for w, g in CHANNEL_CASES])
@pytest.mark.parametrize("kernel", [1, 3, (3, 5)], ids=["k1", "k3", "k3x5"])
def test_channel_mode_equals_conv3d(kernel, window: int, channel_stride: int) -> None:
    variant = Variant("channel", {"mode": "channel", "channel_window": window, "channel_stride": channel_stride})
    layer = _make(kernel, variant, stride=2, padding=1, dilation=1)
    x = torch.randn(2, IN_CHANNELS, 12, 9)
    # conv3d over (channel, H, W): kernel depth ĉ, depth stride g, no depth padding (docs/ALGEBRA.md §3)
    volume = F.conv3d(
        x.unsqueeze(1),
        layer.primary.unsqueeze(1),
        stride=(channel_stride, *layer.stride),
        padding=(0, *layer.padding),
        dilation=(1, *layer.dilation),
    )  # (B, P, n, H', W')
    position = layer.channel_offset // channel_stride
    expected = volume[:, layer.primary_index, position] * layer.scale.view(1, -1, 1, 1)
    expected = expected + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def _output_masks(layer: VersatileConv2d) -> torch.Tensor:
    mask = layer.output_mask()
    if mask is None:
        return torch.ones(layer.out_channels, 1, *layer.kernel_size)
    return mask.detach().expand(layer.out_channels, -1, -1, -1)


def _hand_built_weight(layer: VersatileConv2d) -> torch.Tensor:
    weight = torch.zeros(layer.out_channels, layer.in_channels, *layer.kernel_size)
    masks = _output_masks(layer)
    for o in range(layer.out_channels):
        offset = int(layer.channel_offset[o])
        primary = layer.primary[layer.primary_index[o]].detach()
        weight[o, offset : offset + layer.channel_window] = layer.scale[o].detach() * masks[o] * primary
    return weight


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.id)
def test_gradients_through_dense_weight(variant: Variant) -> None:
    layer = _make(3, variant, stride=1, padding=1)
    x = torch.randn(3, IN_CHANNELS, 7, 6)
    target = torch.randn(3, OUT_CHANNELS, 7, 6)

    dense = _hand_built_weight(layer).requires_grad_(True)
    torch.testing.assert_close(dense.detach(), layer.dense_weight().detach())
    F.mse_loss(F.conv2d(x, dense, layer.bias.detach(), padding=1), target).backward()
    grad_dense = dense.grad

    F.mse_loss(layer(x), target).backward()
    masks = _output_masks(layer)

    expected_primary = torch.zeros_like(layer.primary)
    expected_proxy = torch.zeros_like(layer.mask_proxy) if layer.mask_proxy is not None else None
    for o in range(OUT_CHANNELS):
        offset = int(layer.channel_offset[o])
        grad_window = grad_dense[o, offset : offset + layer.channel_window]
        mask = masks[o]
        p = int(layer.primary_index[o])
        # primary filters receive Σ_j α_j M_j ∘ ∂L/∂f̂_j
        expected_primary[p] += layer.scale[o].detach() * mask * grad_window
        if expected_proxy is not None:
            row = int(layer.secondary_index[o]) if layer.mask_sharing == "shared" else o
            # straight-through: ∂L/∂H = ∂L/∂M = α f ∘ ∂L/∂f̂
            expected_proxy[row] += layer.scale[o].detach() * layer.primary[p].detach() * grad_window
    torch.testing.assert_close(layer.primary.grad, expected_primary, atol=1e-6, rtol=1e-5)
    if expected_proxy is not None:
        torch.testing.assert_close(layer.mask_proxy.grad, expected_proxy, atol=1e-6, rtol=1e-5)


def test_mask_proxies_learn_and_stay_in_unit_interval() -> None:
    layer = _make(3, VARIANTS[0], stride=1, padding=1)
    before = layer.output_mask().detach().clone()
    optimiser = torch.optim.SGD(layer.parameters(), lr=1e4)
    x, target = torch.randn(4, IN_CHANNELS, 8, 8), torch.randn(4, OUT_CHANNELS, 8, 8)
    F.mse_loss(layer(x), target).backward()
    optimiser.step()
    assert layer.mask_proxy.min() < 0 or layer.mask_proxy.max() > 1, "the step must push proxies out of [0,1]"
    clip_mask_proxies_(layer)
    assert layer.mask_proxy.min() >= 0 and layer.mask_proxy.max() <= 1
    assert (layer.output_mask() != before).any(), "a large step must flip some mask bits"


def _learned_layer_with_masks(masks: torch.Tensor, **options) -> VersatileConv2d:
    rows, channels, kh, kw = masks.shape
    layer = VersatileConv2d(channels, options.pop("out_channels", rows), (kh, kw), mode="learned", **options)
    with torch.no_grad():
        layer.mask_proxy.copy_(torch.where(masks > 0, 0.75, 0.25))
    return layer


def test_orthogonality_loss_hand_computed_pair() -> None:
    # one primary, s=2, K = 1·1·2: M1 = [1,1], M2 = [1,0]; MᵀM/2 = [[1,.5],[.5,.5]]; minus I → 0.75 squared sum
    layer = _learned_layer_with_masks(torch.tensor([[[[1.0, 1.0]]], [[[1.0, 0.0]]]]))
    torch.testing.assert_close(layer.orthogonality_loss(), torch.tensor(0.375))


def test_orthogonality_loss_sums_groups_and_ignores_missing_members() -> None:
    # three outputs, s=2: group 0 = (o0, o1) disjoint halves of K=4, group 1 = (o2) alone, full mask
    masks = torch.tensor([[1.0, 1.0, 0, 0], [0, 0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]).view(3, 1, 2, 2)
    layer = _learned_layer_with_masks(masks)
    # group 0: diag 0.5, off-diag 0 → ½(0.25+0.25) = 0.25; group 1: (1-1)² = 0
    torch.testing.assert_close(layer.orthogonality_loss(), torch.tensor(0.25))
    model = nn.Sequential(layer, nn.ReLU(), _learned_layer_with_masks(torch.tensor([[[[1.0, 1.0]]], [[[1.0, 0.0]]]])))
    torch.testing.assert_close(orthogonality_loss(model), torch.tensor(0.625))


def test_orthogonality_loss_shared_masks() -> None:
    # shared: one set of s=2 masks for all 6 outputs; penalty counted once for the layer
    layer = _learned_layer_with_masks(
        torch.tensor([[[[1.0, 1.0]]], [[[1.0, 0.0]]]]), out_channels=6, mask_sharing="shared"
    )
    torch.testing.assert_close(layer.orthogonality_loss(), torch.tensor(0.375))


def test_orthogonality_loss_is_zero_for_fixed_masks() -> None:
    assert VersatileConv2d(4, 4, 3, mode="spatial").orthogonality_loss().item() == 0.0


def test_stored_bits_hand_counted() -> None:
    layer = VersatileConv2d(4, 8, 3, mode="learned", secondary=2)
    # floats: 4 primaries x 4x3x3 + 8 scales + 8 biases = 160; masks 8x4x3x3 bits; index 8 x (2 + 1) bits
    assert layer.stored_bits() == 160 * 32 + 288 + 24
    assert layer.dense_bits() == (8 * 4 * 9 + 8) * 32
    spatial = VersatileConv2d(4, 8, 3, mode="spatial", bias=False, scale=False)
    assert spatial.stored_bits() == 4 * 4 * 9 * 32 + 8 * (2 + 1)
    assert spatial.compression_ratio() > 1.9


def test_fold_keeps_dtype_and_device() -> None:
    layer = VersatileConv2d(4, 6, 3, padding=1, dtype=torch.float64)
    folded = layer.fold()
    assert folded.weight.dtype == torch.float64 and folded.weight.device == layer.primary.device
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    assert (folded(x) - layer(x)).abs().max().item() <= 1e-12


def test_fold_model_copies_and_leaves_input_untouched() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Sequential(VersatileConv2d(8, 8, 3, padding=1), nn.ReLU()),
        VersatileConv2d(8, 4, 1, mode="learned"),
    ).train()
    x = torch.randn(2, 3, 9, 9)
    folded = fold_model(model)
    assert model.training and not folded.training
    assert isinstance(model[3][0], VersatileConv2d) and type(folded[3][0]) is nn.Conv2d
    assert not any(isinstance(m, VersatileConv2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), model.eval()(x), atol=1e-5, rtol=1e-5)
    assert type(fold_model(VersatileConv2d(2, 2, 1))) is nn.Conv2d


def test_from_conv_copies_geometry_and_approximates_weights() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, (3, 5), stride=2, padding=(1, 2), dilation=1, bias=True, dtype=torch.float64)
    naive = from_conv(conv, init="naive", mode="learned")
    layer = from_conv(conv, mode="learned")
    assert (layer.kernel_size, layer.stride, layer.padding) == (conv.kernel_size, conv.stride, conv.padding)
    assert layer.primary.dtype == torch.float64
    torch.testing.assert_close(layer.bias, conv.bias)
    torch.testing.assert_close(naive.dense_weight()[0], conv.weight[0])  # the group's first filter is exact
    naive_error = (naive.dense_weight() - conv.weight).norm() / conv.weight.norm()
    error = (layer.dense_weight() - conv.weight).norm() / conv.weight.norm()
    assert error < naive_error < 1.0


@pytest.mark.parametrize(
    ("conv", "message"),
    [
        (nn.Conv2d(4, 4, 3, groups=2), "groups=2"),
        (nn.Conv2d(4, 4, 3, groups=4), "depthwise"),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
    ],
    ids=["grouped", "depthwise", "reflect-padding"],
)
def test_from_conv_refuses_unsupported_convs(conv: nn.Conv2d, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_conv(conv)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "pruned"}, "mode must be one of"),
        ({"mode": "spatial", "mask_sharing": "shared"}, "mask_sharing applies to mode 'learned'"),
        ({"mode": "learned", "mask_sharing": "global"}, "mask_sharing must be one of"),
        ({"mode": "channel", "channel_window": 3, "channel_stride": 2}, "does not tile"),
        ({"mode": "channel", "secondary": 9}, "do not fit"),
        ({"mode": "learned", "channel_window": 4}, "channel modes only"),
        ({"mode": "learned", "secondary": 0}, "at least 1"),
        ({"stride": 2, "padding": "same"}, "same"),
    ],
    ids=[
        "bad-mode",
        "shared-fixed-masks",
        "bad-sharing",
        "window-does-not-tile",
        "too-many-windows",
        "window-in-learned",
        "zero-secondary",
        "same-with-stride",
    ],
)
def test_constructor_refuses_bad_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VersatileConv2d(8, 8, 3, **kwargs)
