"""Multi-scale fusion decoder (UNETR-style): token maps tapped at several encoder depths are
lifted to finer grids by transposed convs, fused level by level on the way up, and finally
fused with a full-resolution conv stem of the input.

Levels: 0 is the token grid (1/patch), level ``s`` is after ``s`` x2 upsampling stages, level
``S = len(stage_factors)`` is full resolution. Bottleneck (the final tokens) -> 3x3 conv block;
then per level: transposed conv x2 -> concat with the tap lifted to that level (the deepest tap
joins at level 1, the next at 2...) -> 3x3 conv block; at full resolution the concat partner is
the conv stem of the image. On CPU the full-resolution convs dominate time: ``stem_channels``
is the knob.

``full_res="space_to_depth"`` moves that last fusion one level down: the image is folded into
channels (each 2x2x2 block of voxels becomes 8 channels, nothing is lost), convolved and fused
with the finest decoder level at its grid, and one transposed conv (a GEMM) unfolds the fused
features to full resolution. No convolution, norm or activation runs at full resolution: on 2
CPU cores those were about 40% of the training step, memory-bound work on 8-channel maps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .config import FULL_RES_MODES
from .norms import ChannelsLastInstanceNorm3d
from .patch_ops import PatchConvTranspose3d, space_to_depth

Grid = tuple[int, int, int]


def _channels_last(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous(memory_format=torch.channels_last_3d)


def _bf16_conv_unsafe(x: torch.Tensor, conv: nn.Module) -> bool:
    """True where oneDNN's bf16 Conv3d backward is known to return a NaN weight gradient.

    torch 2.13 (CPU, oneDNN) gives a NaN weight gradient from finite inputs, at random (it reads
    memory it did not write), for a 3x3x3 convolution whose input is 2 voxels deep, at any width
    and height tried (2x4x4 to 2x32x32, 16-64 channels; not 1, 3 or more deep, not fp32, not
    with oneDNN off). Such grids arise on small crops or thin planned axes (a token grid of 2).
    Where it applies the block convolves in fp32 instead: tiny maps, so the cost is nil.
    """
    return (
        x.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and isinstance(conv, nn.Conv3d)
        and max(conv.kernel_size) > 1
        and 2 in x.shape[2:]  # measured on the first spatial axis; the others are kept safe too
    )


def default_conv_norm(channels: int) -> nn.Module:
    return nn.InstanceNorm3d(channels, affine=True)


def default_conv_act() -> nn.Module:
    return nn.LeakyReLU(0.01)


class ConvNormAct(nn.Module):
    """Conv3d (same padding, no bias: the norm has one) -> norm -> activation.

    Memory formats, for CPU speed: oneDNN convolves a channels_last_3d input about 2x faster,
    and an elementwise backward whose gradient and input differ in layout is slow. So the conv,
    the activation and the output are channels_last. A :class:`ChannelsLastInstanceNorm3d`
    (``cpu_ops: tuned``) normalises the map where it lies; any other norm gets it in the default
    layout and hands it back channels_last (two copies, the step before).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        norm_layer: Callable[[int], nn.Module] = default_conv_norm,
        act_layer: Callable[[], nn.Module] = default_conv_act,
    ):
        super().__init__()
        self.conv = nn.Conv3d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False
        )
        self.norm = norm_layer(out_channels)
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last_3d)
        if _bf16_conv_unsafe(x, self.conv):
            with torch.autocast("cpu", enabled=False):
                x = self.conv(x.float()).to(torch.bfloat16)  # (B, C_out, X, Y, Z)
        else:
            x = self.conv(x)
        if isinstance(self.norm, ChannelsLastInstanceNorm3d) and self.norm.keeps_layout(x):
            x = self.norm(x)
        else:
            x = self.norm(x.contiguous()).contiguous(memory_format=torch.channels_last_3d)
        x = self.act(x)
        if x.requires_grad:  # the activation's backward is ~20x slower when its gradient arrives
            x.register_hook(_channels_last)  # in another layout (e.g. through a cat), so match it
        return x


class UpNormAct(ConvNormAct):
    """Transposed conv with kernel = stride = ``factor`` (per axis) -> norm -> activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        factor: Grid,
        norm_layer: Callable[[int], nn.Module] = default_conv_norm,
        act_layer: Callable[[], nn.Module] = default_conv_act,
        matmul: bool = True,
    ):
        super().__init__(in_channels, out_channels, 1, norm_layer, act_layer)
        self.conv = PatchConvTranspose3d(in_channels, out_channels, factor, bias=False, matmul=matmul)


class PointwiseConv3d(nn.Conv3d):
    """``Conv3d(kernel_size=1)`` (a class head) whose weight gradient keeps the parameter's layout.

    On a channels_last_3d input oneDNN (and cuDNN) return the (C_out, C_in, 1, 1, 1) weight's
    gradient with channels_last strides, which differ from the parameter's; DistributedDataParallel
    then warned "Grad strides do not match bucket view strides" and copied it every step. The
    convolution here takes the weight through a reshape, whose backward hands the gradient back
    as a view in the parameter's own strides: same values, same kernel, no copy."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight.flatten(1).reshape(self.weight.shape), self.bias)


def upsample(in_channels: int, out_channels: int, factor: Grid, matmul: bool = True) -> nn.ConvTranspose3d:
    """Plain learned upsampling (UNETR's decoder step): a fusion conv block follows it."""
    return PatchConvTranspose3d(in_channels, out_channels, factor, matmul=matmul)


def cumulative_factor(stage_factors: Sequence[Grid], level: int) -> Grid:
    """Per-axis upsampling factor from the token grid (level 0) to ``level``."""
    return tuple(math.prod(f[a] for f in stage_factors[:level]) for a in range(3))  # type: ignore[return-value]


class FusionDecoder(nn.Module):
    """Bottleneck tokens + tapped token maps + full-resolution stem -> full-resolution features."""

    def __init__(
        self,
        embed_dim: int,
        in_channels: int,
        channels: Sequence[int],
        stem_channels: int,
        stage_factors: Sequence[Grid],
        num_taps: int,
        norm_layer: Callable[[int], nn.Module] = default_conv_norm,
        act_layer: Callable[[], nn.Module] = default_conv_act,
        matmul: bool = True,
        num_classes: int = 0,
        deep_supervision: bool = False,
        full_res: str = "conv",
    ):
        super().__init__()
        if full_res not in FULL_RES_MODES:
            raise ValueError(f"full_res must be one of {list(FULL_RES_MODES)}; got {full_res!r}")
        levels = len(stage_factors)
        if len(channels) != levels or num_taps > levels - 1:
            raise ValueError(
                f"{levels} upsampling stages need {levels} channel entries and at most "
                f"{levels - 1} taps; got {len(channels)} channels, {num_taps} taps"
            )
        self.num_taps = num_taps
        blocks = {"norm_layer": norm_layer, "act_layer": act_layer}
        self.bottleneck = ConvNormAct(embed_dim, channels[0], 3, **blocks)
        # tap i (0 = deepest) joins at level i + 1: one transposed conv straight to that grid
        self.tap_lifts = nn.ModuleList(
            UpNormAct(embed_dim, channels[i + 1], cumulative_factor(stage_factors, i + 1), **blocks, matmul=matmul)
            for i in range(num_taps)
        )
        self.ups = nn.ModuleList(
            upsample(channels[s - 1], channels[s], stage_factors[s - 1], matmul) for s in range(1, levels)
        )
        self.fuses = nn.ModuleList(
            ConvNormAct(channels[s] * (2 if s <= num_taps else 1), channels[s], 3, **blocks)
            for s in range(1, levels)
        )
        self.full_res, self.last_factor = full_res, tuple(stage_factors[-1])
        if full_res == "conv":
            self.stem = ConvNormAct(in_channels, stem_channels, 3, **blocks)
            self.up_full = upsample(channels[-1], stem_channels, stage_factors[-1], matmul)
            self.fuse_full = ConvNormAct(2 * stem_channels, stem_channels, 3, **blocks)
            self.out_channels = stem_channels
        else:  # image folded to the finest level's grid, fused there, unfolded by one GEMM
            if num_classes < 1:
                raise ValueError("full_res space_to_depth needs num_classes")
            folded = in_channels * math.prod(stage_factors[-1])
            self.stem = ConvNormAct(folded, channels[-1], 3, **blocks)
            self.fuse_full = ConvNormAct(2 * channels[-1], 2 * channels[-1], 3, **blocks)
            # straight to class logits: a 1x1x1 classifier after this linear map would add nothing
            self.up_full = upsample(2 * channels[-1], num_classes, stage_factors[-1], matmul)
            self.out_channels = num_classes
        # deep supervision: a class head on every level below full resolution, finest first
        if deep_supervision and num_classes < 1:
            raise ValueError("deep supervision needs num_classes")
        self.aux_heads = nn.ModuleList(
            PointwiseConv3d(channels[levels - 1 - i], num_classes)
            for i in range(levels if deep_supervision else 0)
        )

    def forward(
        self, image: torch.Tensor, bottleneck: torch.Tensor, taps: Sequence[torch.Tensor], *, aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """image (B, C_in, X, Y, Z); bottleneck and taps (B, E, gx, gy, gz), taps deepest first.
        Returns (B, out_channels, X, Y, Z) (``stem_channels`` features, or with
        ``space_to_depth`` the class logits themselves); with ``aux``, also the deep-supervision logits
        (B, num_classes, level grid), finest level first."""
        if len(taps) != self.num_taps:
            raise ValueError(f"expected {self.num_taps} tapped maps, got {len(taps)}")
        levels = [self.bottleneck(bottleneck)]  # (B, c0, gx, gy, gz)
        x = levels[0]
        for s, (up, fuse) in enumerate(zip(self.ups, self.fuses, strict=True), start=1):
            x = up(x.contiguous(memory_format=torch.channels_last_3d))  # (B, c_s, level-s grid)
            if s <= self.num_taps:
                x = torch.cat([x, self.tap_lifts[s - 1](taps[s - 1])], dim=1)  # (B, 2 c_s, ...)
            x = fuse(x)  # (B, c_s, level-s grid)
            levels.append(x)
        if self.full_res == "conv":
            x = self.up_full(x.contiguous(memory_format=torch.channels_last_3d))  # (B, c_stem, X, Y, Z)
            stem = self.stem(image)  # (B, c_stem, X, Y, Z)
            features = self.fuse_full(torch.cat([x, stem.to(x.dtype)], dim=1))  # (B, c_stem, X, Y, Z)
        else:
            stem = self.stem(space_to_depth(image, self.last_factor))  # (B, c_last, finest grid)
            x = self.fuse_full(torch.cat([x, stem.to(x.dtype)], dim=1))  # (B, 2 c_last, finest grid)
            features = self.up_full(x.contiguous(memory_format=torch.channels_last_3d))  # (B, classes, X, Y, Z)
        if not aux:
            return features
        return features, [head(levels[-1 - i]) for i, head in enumerate(self.aux_heads)]
