"""The CNN a segmentation user would pick instead: MONAI's ``DynUNet``, configured the nnU-Net way
from the preprocessing plan (preset ``cnn``; no hand-written CNN).

The topology follows nnU-Net's rule for the training patch and target spacing: an axis is pooled
(x2) while its feature map stays at least ``min_feature_map`` voxels and its spacing is within 2x
of the finest axis (so thick-slice axes are pooled later), 3x3x3 kernels except 1 on an axis that
is still too coarse; filters double per level from ``base_filters`` up to ``max_filters``. The
derived kernel sizes and strides are stored in the model's config, so a saved model is rebuilt
without its plan.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mvl_pipeline.core.config import ConfigBlock

from .norms import channels_last_norms


@dataclass(frozen=True)
class CNNConfig(ConfigBlock):
    """``model.cnn``: used by preset ``cnn`` only."""

    WHERE = "model.cnn"

    base_filters: int = 16  # nnU-Net uses 32; 16 keeps CPU training to minutes
    max_filters: int = 320
    min_feature_map: int = 4
    max_pools: int = 5
    res_block: bool = False
    kernel_sizes: tuple[tuple[int, int, int], ...] | None = None  # derived from the plan
    strides: tuple[tuple[int, int, int], ...] | None = None  # derived from the plan

    @property
    def filters(self) -> tuple[int, ...]:
        levels = len(self.strides or ())
        return tuple(min(self.base_filters * 2**i, self.max_filters) for i in range(levels))


def nnunet_topology(
    patch_size: Sequence[int], spacing: Sequence[float], *, min_feature_map: int = 4, max_pools: int = 5
) -> tuple[tuple[tuple[int, int, int], ...], tuple[tuple[int, int, int], ...]]:
    """``(kernel_sizes, strides)`` for a DynUNet on ``patch_size`` voxels at ``spacing`` mm."""
    shape = [int(s) for s in patch_size]
    current = [float(s) for s in spacing]
    kernels: list[tuple[int, int, int]] = []
    strides: list[tuple[int, int, int]] = [(1, 1, 1)]
    while True:
        finest = min(current)
        kernels.append(tuple(3 if s <= 2 * finest else 1 for s in current))  # type: ignore[arg-type]
        pool = [
            2 if shape[a] % 2 == 0 and shape[a] // 2 >= min_feature_map and current[a] <= 2 * finest else 1
            for a in range(3)
        ]
        if max(pool) == 1 or len(strides) > max_pools:
            break
        strides.append(tuple(pool))  # type: ignore[arg-type]
        shape = [s // p for s, p in zip(shape, pool, strict=True)]
        current = [s * p for s, p in zip(current, pool, strict=True)]
    return tuple(kernels), tuple(strides)


def monai_dynunet(cfg) -> nn.Module:  # cfg: MedVisionLlamaConfig with preset "cnn", its topology derived
    """MONAI's DynUNet with the preset's topology, as MONAI builds it (default layout, its own norms)."""
    from monai.networks.nets import DynUNet

    cnn = cfg.cnn
    return DynUNet(
        spatial_dims=3,
        in_channels=cfg.in_channels,
        out_channels=cfg.num_classes,
        kernel_size=[list(k) for k in cnn.kernel_sizes],
        strides=[list(s) for s in cnn.strides],
        upsample_kernel_size=[list(s) for s in cnn.strides[1:]],
        filters=list(cnn.filters),
        norm_name="instance",
        deep_supervision=False,
        res_block=cnn.res_block,
    )


class CNNSegmenter(nn.Module):
    """DynUNet with the interface the training loop, inference and the registry expect.

    For CPU speed it runs in the channels_last_3d layout, with norms that keep that layout
    (``norms.ChannelsLastInstanceNorm3d``): the same network and state dict as MONAI builds it.
    The bare bf16 train step at the Hippocampus patch on one core: 1.47x MONAI's, inference 1.49x
    (``benchmarks/bench_cnn.py``, 2026-12-06, Xeon with AMX; 1.19-1.23x before the norm took its
    samples by ``split``); the ablation's CNN trials: README, measured."""

    def __init__(self, cfg) -> None:  # cfg: MedVisionLlamaConfig with preset "cnn"
        super().__init__()
        if cfg.cnn.kernel_sizes is None or cfg.cnn.strides is None:
            raise ValueError("model.cnn topology unknown: it is derived from the preprocessing plan (for_plan)")
        self.cfg = cfg
        self.llm_reference = None
        self.net = monai_dynunet(cfg)
        channels_last_norms(self.net).to(memory_format=torch.channels_last_3d)

    @property
    def divisor(self) -> tuple[int, int, int]:
        """What every spatial size must be a multiple of (the product of the strides)."""
        strides = self.cfg.cnn.strides or ((1, 1, 1),)
        return tuple(int(torch.tensor([s[a] for s in strides]).prod()) for a in range(3))  # type: ignore[return-value]

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"expected input (B, {self.cfg.in_channels}, X, Y, Z); got {tuple(x.shape)}")
        if any(s % d for s, d in zip(x.shape[2:], self.divisor, strict=True)):
            raise ValueError(f"input spatial shape {tuple(x.shape[2:])} is not divisible by {self.divisor}")

    def _autocast(self, x: torch.Tensor) -> contextlib.AbstractContextManager:
        enabled = self.cfg.precision == "bf16-mixed"
        return torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=enabled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = x.contiguous(memory_format=torch.channels_last_3d)
        with self._autocast(x):
            return self.net(x).float().contiguous()  # (B, num_classes, X, Y, Z)

    def frozen_llm_state_names(self) -> Iterator[str]:
        return iter(())
