"""The optimiser, nanoGPT style: AdamW over the trainable parameters only, weight decay on
matrices and conv kernels, none on norms, biases, gates and positional embeddings."""

from __future__ import annotations

import logging

import torch
from torch import nn

from .blocks import PositionalEmbedding3d

logger = logging.getLogger(__name__)


def configure_optimizers(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.AdamW:
    embeddings = {
        id(p)
        for module in model.modules()
        if isinstance(module, PositionalEmbedding3d | nn.Embedding)
        for p in module.parameters()
    }
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 and id(param) not in embeddings else no_decay).append(param)
    logger.info(
        "AdamW: %d decayed tensors (%d elements), %d not decayed (%d elements)",
        len(decay), sum(p.numel() for p in decay), len(no_decay), sum(p.numel() for p in no_decay),
    )  # fmt: skip
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused: one kernel per step over all parameters instead of ~10 elementwise ops per tensor
    # (CPU and CUDA; every trainable parameter here is a float tensor on one device)
    devices = {p.device.type for p in decay + no_decay}
    fused = len(devices) == 1 and devices <= {"cpu", "cuda"}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
