"""The versatile convolution layer and the small pure functions it is built from.

Every variant (2018 spatial and channel filters, 2022 learned masks) is one representation
(docs/ALGEBRA.md §2): a bank of P primary filters of shape (ĉ, kh, kw) and, for each of the N output
channels, a primary index p_o, a secondary index j_o (its slot inside the group of p_o), a channel
offset off_o, a binary mask M_o and a scale α_o. The dense weight is

    W[o, off_o : off_o + ĉ] = α_o · M_o ∘ f[p_o]        (zeros elsewhere)

and the forward pass builds W once and runs a single ``F.conv2d``; ``fold()`` returns W in a plain
``nn.Conv2d``. Module and fold therefore compute the same function by construction; the tests
check that function against independent references written the papers' way.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vconvert.nn.quantize import QUANTIZERS, check_bits, fake_quantize, integers, minmax_step, storage_bits

MODES = ("learned", "spatial", "channel", "spatial+channel")
MASK_SHARING = ("per-filter", "shared")
MASK_THRESHOLD = 0.5
PROXY_OFF, PROXY_ON = 0.25, 0.75
MIN_STEP = 1e-12  # floor of a learned quantization step


# --------------------------------------------------------------------------- pure algebra
def spatial_secondary_count(kernel_size: tuple[int, int]) -> int:
    """Number of nested spatial masks of a kernel: s = ceil(min(kh, kw) / 2)."""
    return math.ceil(min(kernel_size) / 2)


def nested_spatial_masks(kernel_size: tuple[int, int]) -> Tensor:
    """The 2018 spatial masks, shape (s, kh, kw): mask j keeps the centred window shrunk by j per side."""
    kh, kw = kernel_size
    count = spatial_secondary_count(kernel_size)
    masks = torch.zeros(count, kh, kw)
    for j in range(count):
        masks[j, j : kh - j, j : kw - j] = 1.0
    return masks


def channel_window_count(in_channels: int, window: int, stride: int) -> int:
    """Number of channel positions n = (c - ĉ) / g + 1 of a sliding channel window."""
    if not 1 <= window <= in_channels:
        raise ValueError(f"channel_window must be between 1 and in_channels={in_channels}, got {window}.")
    if stride < 1:
        raise ValueError(f"channel_stride must be at least 1, got {stride}.")
    if (in_channels - window) % stride:
        raise ValueError(
            f"channel_window={window} does not tile in_channels={in_channels} with channel_stride={stride}: "
            "(in_channels - channel_window) must be a multiple of channel_stride."
        )
    return (in_channels - window) // stride + 1


def binarize_ste(proxy: Tensor, threshold: float = MASK_THRESHOLD) -> Tensor:
    """Binary mask [proxy > threshold] whose gradient passes straight through to ``proxy``."""
    hard = (proxy > threshold).to(proxy.dtype)
    return hard + (proxy - proxy.detach())


def materialise_weight(
    primary: Tensor,
    primary_index: Tensor,
    mask: Tensor | None,
    scale: Tensor | None,
    channel_offset: Tensor,
    in_channels: int,
) -> Tensor:
    """Dense weight (N, c, kh, kw) with W[o, off_o:off_o+ĉ] = scale_o · mask_o ∘ primary[p_o].

    ``mask`` broadcasts against (N, ĉ, kh, kw) (a spatial mask may have a channel axis of 1).
    """
    weight = primary.index_select(0, primary_index)
    if mask is not None:
        weight = weight * mask
    if scale is not None:
        weight = weight * scale.view(-1, 1, 1, 1)
    window = primary.shape[1]
    if window == in_channels:
        return weight
    out_channels, _, kh, kw = weight.shape
    channel_index = channel_offset.view(-1, 1, 1, 1) + torch.arange(window, device=weight.device).view(1, -1, 1, 1)
    dense = weight.new_zeros(out_channels, in_channels, kh, kw)
    return dense.scatter(1, channel_index.expand(-1, -1, kh, kw), weight)


def group_members(primary_index: Tensor, secondary_index: Tensor, num_primary: int) -> Tensor:
    """(P, s_max) table of output channels per primary filter, -1 where a group has fewer members."""
    width = int(secondary_index.max()) + 1
    members = torch.full((num_primary, width), -1, dtype=torch.long, device=primary_index.device)
    members[primary_index, secondary_index] = torch.arange(primary_index.numel(), device=primary_index.device)
    return members


def orthogonality_penalty(masks: Tensor, members: Tensor) -> Tensor:
    """TPAMI penalty Σ_groups ½‖(1/K) MᵀM − I‖²_F, with M the group's masks as K-long columns.

    ``masks`` is (R, K), one flattened mask per row; ``members`` is (G, s) with the rows of each
    group (-1 for an empty slot, which contributes nothing).
    """
    valid = members >= 0
    grouped = masks[members.clamp(min=0)] * valid.unsqueeze(-1).to(masks.dtype)
    gram = grouped @ grouped.transpose(1, 2) / masks.shape[1]
    identity = torch.diag_embed(valid.to(masks.dtype))
    return 0.5 * (gram - identity).pow(2).sum()


# --------------------------------------------------------------------------- the layer


def slot_channel_offset(slot: Tensor, spatial_masks: int, channel_positions: int, channel_stride: int) -> Tensor:
    """First input channel each secondary slot reads: its channel position times the channel stride
    (slots run through the spatial masks first, then the channel positions; docs/ALGEBRA.md §3)."""
    return ((slot // spatial_masks) % channel_positions) * channel_stride


def slot_ring_mask(slot: Tensor, kernel_size: tuple[int, int], spatial_masks: int) -> Tensor:
    """(slots, kh, kw) fixed spatial mask of each secondary slot (docs/ALGEBRA.md §4)."""
    return nested_spatial_masks(kernel_size).to(slot.device)[slot % spatial_masks]


class VersatileConv2d(nn.Module):
    """A Conv2d (groups=1) whose N filters are derived from few primary filters by binary masks.

    Modes: ``spatial`` (2018 nested masks, s = ceil(d/2)), ``channel`` (2018 sliding channel
    windows of width ĉ and stride g: n = (c-ĉ)/g + 1 secondaries), ``spatial+channel`` (s·n
    secondaries) and ``learned`` (2022: ``secondary`` binary masks per primary over C, H and W,
    trained through a straight-through estimator; ``mask_sharing`` ``per-filter`` gives every
    secondary filter its own mask, ``shared`` one set of masks for the whole layer).

    In the channel modes, ``channel_window`` defaults to c - (secondary-1)·g, i.e. ``secondary``
    channel positions. ``scale`` adds a learnable per-output scale α (N floats).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        *,
        mode: str = "learned",
        secondary: int = 2,
        channel_window: int | None = None,
        channel_stride: int = 1,
        mask_sharing: str = "per-filter",
        scale: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}.")
        if mask_sharing not in MASK_SHARING:
            raise ValueError(f"mask_sharing must be one of {', '.join(MASK_SHARING)}; got {mask_sharing!r}.")
        if mask_sharing != "per-filter" and mode != "learned":
            raise ValueError(f"mask_sharing applies to mode 'learned' only; mode {mode!r} has fixed masks.")
        if secondary < 1:
            raise ValueError(f"secondary must be at least 1, got {secondary}.")
        # nn.Conv2d on the meta device validates and normalises the geometry exactly as torch does.
        geometry = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, bias=False, device="meta"
        )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size: tuple[int, int] = geometry.kernel_size
        self.stride: tuple[int, int] = geometry.stride
        self.padding: tuple[int, int] | str = geometry.padding
        self.dilation: tuple[int, int] = geometry.dilation
        self.mode, self.mask_sharing = mode, mask_sharing

        uses_channels = mode in ("channel", "spatial+channel")
        if channel_window is not None and not uses_channels:
            raise ValueError(f"channel_window applies to the channel modes only, not to mode {mode!r}.")
        self.channel_stride = channel_stride
        if uses_channels:
            window = channel_window if channel_window is not None else in_channels - (secondary - 1) * channel_stride
            if window < 1:
                raise ValueError(
                    f"{secondary} channel positions with channel_stride={channel_stride} do not fit "
                    f"in_channels={in_channels}; pass a smaller secondary or an explicit channel_window."
                )
            self.channel_positions = channel_window_count(in_channels, window, channel_stride)
        else:
            window, self.channel_positions = in_channels, 1
        self.channel_window = window
        self.spatial_masks = spatial_secondary_count(self.kernel_size) if mode.startswith("spatial") else 1
        if mode == "learned":
            self.group_size = secondary
        else:
            self.group_size = self.spatial_masks * self.channel_positions
        self.num_primary = math.ceil(out_channels / self.group_size)

        factory = {"device": device, "dtype": dtype}
        kh, kw = self.kernel_size
        self.primary = nn.Parameter(torch.empty(self.num_primary, window, kh, kw, **factory))
        self.scale = nn.Parameter(torch.ones(out_channels, **factory)) if scale else None
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        outputs = torch.arange(out_channels, device=device)
        self.register_buffer("primary_index", outputs // self.group_size)
        self.register_buffer("secondary_index", outputs % self.group_size)
        self.register_buffer("channel_offset", torch.empty_like(outputs))
        self.mask_threshold = MASK_THRESHOLD  # a mask bit is on where its proxy exceeds this
        self.latent_share = 0.0  # mask rule project: weight of the dense latent weight in the forward
        self.weight_bits: int | None = None  # fake-quantised primaries (set_weight_bits), None: float
        self.weight_quantizer: str | None = None
        self.primary_step: nn.Parameter | None = None  # lsq: the learned step of each primary filter
        self.mask_proxy: nn.Parameter | None = None
        self.fixed_mask: Tensor | None
        if mode == "learned":
            rows = secondary if mask_sharing == "shared" else out_channels
            self.mask_proxy = nn.Parameter(torch.empty(rows, window, kh, kw, **factory))
            self.register_buffer("fixed_mask", None)
        elif mode.startswith("spatial"):
            self.register_buffer("fixed_mask", torch.empty(out_channels, 1, kh, kw, **factory))
        else:
            self.register_buffer("fixed_mask", None)
        self.derive_fixed_structure()
        self.reset_parameters()

    # ---- construction -----------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Random initialisation for training from scratch (Conv2d's rule; random binary masks)."""
        nn.init.kaiming_uniform_(self.primary, a=math.sqrt(5))
        if self.scale is not None:
            nn.init.ones_(self.scale)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
            nn.init.uniform_(self.bias, -bound, bound)
        if self.mask_proxy is not None:
            with torch.no_grad():
                on = torch.rand(self.mask_proxy.shape, device=self.mask_proxy.device) < 0.5
                self.mask_proxy.copy_(torch.where(on, PROXY_ON, PROXY_OFF))

    @torch.no_grad()
    def derive_fixed_structure(self) -> None:
        """Recompute channel offsets and fixed masks from the secondary indices (after regrouping)."""
        slot = self.secondary_index
        self.channel_offset.copy_(
            slot_channel_offset(slot, self.spatial_masks, self.channel_positions, self.channel_stride)
        )
        if self.fixed_mask is not None:
            self.fixed_mask.copy_(slot_ring_mask(slot, self.kernel_size, self.spatial_masks).unsqueeze(1))

    @classmethod
    def shaped_like(cls, conv: nn.Conv2d, device: torch.device | str | None = None, **options) -> VersatileConv2d:
        """An untrained layer with ``conv``'s geometry and dtype (on ``conv``'s device unless given;
        ``device="meta"`` sizes it without allocating)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(
                f"VersatileConv2d.from_conv and shaped_like expect an nn.Conv2d, got {type(conv).__name__}."
            )
        if conv.groups != 1:
            raise ValueError(f"grouped or depthwise convolutions (groups={conv.groups}) cannot be made versatile.")
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported; only 'zeros' is.")
        return cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.bias is not None,
            device=device if device is not None else conv.weight.device,
            dtype=conv.weight.dtype,
            **options,
        )

    # ---- quantized primaries -------------------------------------------------------------
    def set_weight_bits(self, bits: int | None, quantizer: str = "lsq") -> None:
        """Fake-quantise the primary filters to ``bits`` (symmetric, one step per filter; ``quantizer``
        ``lsq``: a learned step, started at max|P_p|/Q; ``minmax``: max|P_p|/Q at every forward), or with
        None go back to float primaries. The per-output scales stay float."""
        if bits is not None:
            check_bits(bits)
            if quantizer not in QUANTIZERS:
                raise ValueError(f"quantizer must be one of {', '.join(QUANTIZERS)}; got {quantizer!r}.")
        self._parameters.pop("primary_step", None)
        self.primary_step = None
        self.weight_bits, self.weight_quantizer = bits, quantizer if bits is not None else None
        if bits is not None and quantizer == "lsq":
            self.primary_step = nn.Parameter(minmax_step(self.primary, bits).to(self.primary.dtype))

    @torch.no_grad()
    def reset_primary_steps(self) -> None:
        """Restart a learned step at max|P_p|/Q of the current primaries (after they were replaced)."""
        if self.primary_step is not None:
            self.primary_step.copy_(minmax_step(self.primary, self.weight_bits))

    def primary_steps(self) -> Tensor:
        """(P,) step of each primary filter (quantized layers only)."""
        if self.weight_bits is None:
            raise ValueError("this layer's primary filters are not quantized.")
        if self.primary_step is None:
            return minmax_step(self.primary, self.weight_bits)
        return self.primary_step.clamp_min(MIN_STEP)  # a learned step that reached 0 or below would divide by it

    def quantized_primary(self) -> Tensor:
        """The primary filters the forward pass uses: fake-quantised when ``weight_bits`` is set."""
        if self.weight_bits is None:
            return self.primary
        return fake_quantize(self.primary, self.primary_steps(), self.weight_bits)

    @torch.no_grad()
    def primary_integers(self) -> tuple[Tensor, Tensor]:
        """(k (P, ĉ, kh, kw) int8, t (P,) float): the integers and steps whose product the forward pass uses."""
        steps = self.primary_steps().detach()
        return integers(self.primary, steps, self.weight_bits).to(torch.int8), steps

    # ---- the representation ------------------------------------------------------------
    def output_mask(self) -> Tensor | None:
        """Per-output binary mask, broadcastable to (N, ĉ, kh, kw); STE-differentiable when learned."""
        if self.mask_proxy is not None:
            mask = binarize_ste(self.mask_proxy, self.mask_threshold)
            return mask.index_select(0, self.secondary_index) if self.mask_sharing == "shared" else mask
        return self.fixed_mask

    def dense_weight(self) -> Tensor:
        """The materialised secondary filters, shape (out_channels, in_channels, kh, kw).

        While a ``latent_weight`` parameter is registered (mask rule ``project``), its gradient is the
        materialised weight's: the forward uses the versatile weight (blended with the latent one while
        ``latent_share`` > 0), the update goes to the latent one.
        """
        weight = materialise_weight(
            self.quantized_primary(),
            self.primary_index,
            self.output_mask(),
            self.scale,
            self.channel_offset,
            self.in_channels,
        )
        latent = self._parameters.get("latent_weight")
        if latent is not None:
            value = torch.lerp(weight.detach(), latent.detach(), self.latent_share) if self.latent_share else weight
            learned_step = (weight - weight.detach()) if weight.requires_grad else 0.0  # lsq steps learn here too
            weight = value.detach() + (latent - latent.detach()) + learned_step
        return weight

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.dense_weight(), self.bias, self.stride, self.padding, self.dilation)

    @torch.no_grad()
    def fold(self) -> nn.Conv2d:
        """A plain nn.Conv2d (same dtype and device) holding the materialised secondary filters."""
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            bias=self.bias is not None,
            device=self.primary.device,
            dtype=self.primary.dtype,
        )
        conv.weight.copy_(self.dense_weight())
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv.train(self.training)

    # ---- training helpers ----------------------------------------------------------------
    def orthogonality_loss(self) -> Tensor:
        """TPAMI orthogonality penalty of the learned masks (zero for fixed masks)."""
        if self.mask_proxy is None:
            return self.primary.new_zeros(())
        masks = binarize_ste(self.mask_proxy, self.mask_threshold).flatten(1)
        if self.mask_sharing == "shared":
            members = torch.arange(masks.shape[0], device=masks.device).unsqueeze(0)
        else:
            members = group_members(self.primary_index, self.secondary_index, self.num_primary)
        return orthogonality_penalty(masks, members)

    @torch.no_grad()
    def clip_mask_proxy_(self) -> None:
        """Clip the mask proxies back into [0, 1] (call after every optimiser step)."""
        if self.mask_proxy is not None:
            self.mask_proxy.clamp_(0.0, 1.0)

    # ---- storage accounting ------------------------------------------------------------
    def _float_bits(self) -> int:
        return self.primary.element_size() * 8

    def dense_bits(self) -> int:
        """Bits a dense Conv2d of the same shape stores (weight and bias)."""
        kh, kw = self.kernel_size
        count = self.out_channels * self.in_channels * kh * kw + (self.out_channels if self.bias is not None else 0)
        return count * self._float_bits()

    def stored_bits(self) -> int:
        """Bits this layer stores: primary filters as floats (as 4- or 8-bit integers when quantized, see
        :func:`vconvert.nn.quantize.storage_bits`; their steps fold into the scales), scales and bias as
        floats, 1 bit per learned mask element, and the output → (primary, slot) assignment as packed integers.
        Fixed (spatial) masks and channel offsets follow from the slot and cost nothing."""
        floats = sum(p.numel() for p in (self.scale, self.bias) if p is not None)
        bits_each = storage_bits(self.weight_bits) if self.weight_bits else self._float_bits()
        primary_bits = self.primary.numel() * bits_each
        mask_bits = self.mask_proxy.numel() if self.mask_proxy is not None else 0
        index_bits = self.out_channels * (_bits_for(self.num_primary) + _bits_for(self.group_size))
        return floats * self._float_bits() + primary_bits + mask_bits + index_bits

    def compression_ratio(self) -> float:
        """dense_bits() / stored_bits()."""
        return self.dense_bits() / self.stored_bits()

    def extra_repr(self) -> str:
        parts = [
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}",
            f"padding={self.padding!r}" if isinstance(self.padding, str) else f"padding={self.padding}",
            f"dilation={self.dilation}, bias={self.bias is not None}, mode={self.mode!r}",
            f"primary={self.num_primary}, secondary={self.group_size}",
        ]
        if self.channel_positions > 1:
            parts.append(f"channel_window={self.channel_window}, channel_stride={self.channel_stride}")
        if self.mode == "learned":
            parts.append(f"mask_sharing={self.mask_sharing!r}")
        if self.weight_bits is not None:
            parts.append(f"weight_bits={self.weight_bits}, weight_quantizer={self.weight_quantizer!r}")
        return ", ".join(parts)


def _bits_for(count: int) -> int:
    return math.ceil(math.log2(count)) if count > 1 else 0


# --------------------------------------------------------------------------- model-level helpers
def versatile_layers(model: nn.Module) -> Iterator[tuple[str, VersatileConv2d]]:
    """(qualified name, layer) for every VersatileConv2d in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, VersatileConv2d):
            yield name, module


def orthogonality_loss(model: nn.Module) -> Tensor:
    """Sum of the orthogonality penalties of every learned-mask layer in ``model``."""
    losses = [layer.orthogonality_loss() for _, layer in versatile_layers(model) if layer.mask_proxy is not None]
    if not losses:
        return torch.zeros(())
    return torch.stack(losses).sum()


def clip_mask_proxies_(model: nn.Module) -> None:
    """Clip every mask proxy of ``model`` into [0, 1]; call it after each optimiser step."""
    for _, layer in versatile_layers(model):
        layer.clip_mask_proxy_()


def weight_quantization(model: nn.Module) -> dict | None:
    """How the primaries of ``model``'s versatile layers are quantized: None when all are float, else
    {"bits", "quantizer"}; when the layers differ in width (a plan that gives each layer its own, some float)
    also "layers": {qualified name: bits or None}, with "bits" the widest. ValueError when the quantized
    layers use different quantizers."""
    widths = {name: layer.weight_bits for name, layer in versatile_layers(model)}
    quantizers = {layer.weight_quantizer for _, layer in versatile_layers(model) if layer.weight_bits is not None}
    if len(quantizers) > 1:
        raise ValueError(f"the versatile layers use different quantizers: {sorted(quantizers)}.")
    quantized = [bits for bits in widths.values() if bits is not None]
    if not quantized:
        return None
    record: dict = {"bits": max(quantized), "quantizer": quantizers.pop()}
    if len(set(widths.values())) > 1:
        record["layers"] = widths
    return record


def layer_widths(model: nn.Module) -> dict[str, int | None]:
    """{qualified name: weight bits or None (float primaries)} of every versatile layer of ``model``."""
    return {name: layer.weight_bits for name, layer in versatile_layers(model)}


def set_weight_bits_(model: nn.Module, bits: int | Mapping[str, int | None] | None, quantizer: str = "lsq") -> int:
    """:meth:`VersatileConv2d.set_weight_bits` on every versatile layer of ``model`` (``bits`` one width for all,
    or {qualified name: width} for each); returns how many layers were set."""
    layers = dict(versatile_layers(model))
    widths = bits if isinstance(bits, Mapping) else dict.fromkeys(layers, bits)
    unknown = sorted(set(widths) - set(layers))
    if unknown:
        raise ValueError(f"no versatile layer is named {unknown[0]!r}.")
    for name, width in widths.items():
        layers[name].set_weight_bits(width, quantizer)
    return len(widths)


def set_weight_quantization_(model: nn.Module, record: Mapping | None) -> None:
    """Quantize ``model``'s primaries as a :func:`weight_quantization` record says (None: leave them float)."""
    if record is not None:
        set_weight_bits_(model, record.get("layers") or record["bits"], record["quantizer"])


def fold_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every VersatileConv2d folded into a plain Conv2d.

    The input model is not modified.
    """
    folded = copy.deepcopy(model).eval()
    if isinstance(folded, VersatileConv2d):
        return folded.fold()
    for name, layer in list(versatile_layers(folded)):
        folded.set_submodule(name, layer.fold())
    return folded
