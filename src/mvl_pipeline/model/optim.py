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
    return torch.optim.AdamW(groups, lr=lr, betas=betas)
