"""Norms for channels_last_3d feature maps, shared by the ViT's decoder (``decoder.py``) and the
``cnn`` preset (``cnn.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ChannelsLastInstanceNorm3d(nn.InstanceNorm3d):
    """``InstanceNorm3d`` that normalises a channels_last_3d map in its own layout.

    oneDNN convolves a channels_last_3d map about 3x faster than the default layout in bf16, but
    InstanceNorm3d reshapes its input to (1, B x C, ...) and so copies a channels-last map to the
    default layout and back around every norm, which ate most of the gain. One sample alone is a
    batch of one, and ``batch_norm``'s statistics over it, per channel, are the instance norm's:
    batch_norm has a channels-last kernel, so each sample is normalised where it lies (same
    maths; state dict unchanged). The samples are taken with ``split``, whose backward is one
    ``cat`` (indexing each sample's slice would zero-fill and copy a full-size gradient per
    sample). Anything else (running statistics, another layout) is left to InstanceNorm3d."""

    @classmethod
    def replacing(cls, norm: nn.InstanceNorm3d) -> ChannelsLastInstanceNorm3d:
        new = cls(norm.num_features, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                  track_running_stats=norm.track_running_stats)  # fmt: skip
        new.load_state_dict(norm.state_dict())
        return new

    def keeps_layout(self, x: torch.Tensor) -> bool:
        """True where ``x`` is normalised in its channels_last_3d layout (else InstanceNorm3d's way)."""
        return (not self.track_running_stats and x.ndim == 5 and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last_3d))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.keeps_layout(x):
            return super().forward(x)
        samples = [
            F.batch_norm(sample, None, None, self.weight, self.bias, training=True, momentum=0.0, eps=self.eps)
            for sample in x.split(1)
        ]
        return torch.cat(samples) if len(samples) > 1 else samples[0]


def channels_last_norms(module: nn.Module) -> nn.Module:
    """``module`` with every InstanceNorm3d in it replaced by :class:`ChannelsLastInstanceNorm3d`."""
    for name, child in module.named_children():
        if isinstance(child, nn.InstanceNorm3d) and not isinstance(child, ChannelsLastInstanceNorm3d):
            setattr(module, name, ChannelsLastInstanceNorm3d.replacing(child))
        else:
            channels_last_norms(child)
    return module
