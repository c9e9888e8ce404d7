"""Segmentation loss: soft Dice + cross-entropy, with gradients through BOTH terms.

The reference code computed its Dice term on thresholded predictions, which has no gradient;
here the Dice term is MONAI's soft Dice on softmax (or sigmoid) probabilities.
"""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss
from torch import nn


def make_loss(num_classes: int, *, lambda_dice: float = 1.0, lambda_ce: float = 1.0, batch_dice: bool = True) -> nn.Module:
    """``num_classes`` output channels: 1 -> sigmoid (binary), otherwise softmax over classes.

    The loss takes ``(logits (B, C, X, Y, Z), target (B, 1, X, Y, Z) integer labels)``.
    Background is left out of the Dice term for softmax (as nnU-Net), included for sigmoid.
    """
    if num_classes == 1:
        return DiceCELoss(sigmoid=True, batch=batch_dice, lambda_dice=lambda_dice, lambda_ce=lambda_ce)
    return DiceCELoss(
        to_onehot_y=True,
        softmax=True,
        include_background=False,
        batch=batch_dice,
        lambda_dice=lambda_dice,
        lambda_ce=lambda_ce,
    )


def prepare_target(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer labels (B, X, Y, Z) -> the loss's target layout (B, 1, X, Y, Z)."""
    target = target.unsqueeze(1)
    return (target > 0).float() if num_classes == 1 else target.long()


def deep_supervision_weights(levels: int) -> list[float]:
    """Loss weights of the full-resolution output and ``levels`` coarser ones (finest first):
    halving per level, normalised to sum 1 (nnU-Net)."""
    raw = [0.5**i for i in range(levels + 1)]
    return [w / sum(raw) for w in raw]


def supervised_loss(
    loss_fn: nn.Module, logits: torch.Tensor, coarse: list[torch.Tensor], labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """``loss_fn`` on the full-resolution logits and, with deep supervision, on each coarser
    level's logits against the label map downsampled to that grid (nearest: labels stay labels),
    weighted by :func:`deep_supervision_weights`. ``labels``: integer (B, X, Y, Z)."""
    weights = deep_supervision_weights(len(coarse))
    total = weights[0] * loss_fn(logits.float(), prepare_target(labels, num_classes))
    for weight, level in zip(weights[1:], coarse, strict=True):
        small = torch.nn.functional.interpolate(labels[:, None].float(), size=level.shape[2:], mode="nearest")[:, 0]
        total = total + weight * loss_fn(level.float(), prepare_target(small.to(labels.dtype), num_classes))
    return total
