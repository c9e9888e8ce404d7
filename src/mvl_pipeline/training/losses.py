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
