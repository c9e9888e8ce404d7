"""Whole-volume prediction by sliding window (MONAI, Gaussian weighting).

Used for validation inside the training loop, by ``evaluate`` and by the ``predict`` command, so
that a model is always applied to a case the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn


@torch.no_grad()
def predict_probabilities(
    model: nn.Module,
    image: np.ndarray,
    *,
    roi_size: Sequence[int],
    num_classes: int,
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Class probabilities ``(C, X, Y, Z)`` float32 for an image ``(X, Y, Z)`` or ``(C_in, X, Y, Z)``.

    For a single sigmoid channel (``num_classes == 1``) the result has two channels
    (background, foreground) so that callers can always take an argmax. Numerical precision is
    the model's own (``model.precision``: bf16 autocast or fp32), as in training.
    """
    device = torch.device(device)
    array = image if image.ndim == 4 else image[None]
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None].to(device)
    was_training = model.training
    model.eval()
    try:
        logits = sliding_window_inference(
            x,
            roi_size=tuple(int(r) for r in roi_size),
            sw_batch_size=sw_batch_size,
            predictor=model,
            overlap=overlap,
            mode="gaussian",
            padding_mode="constant",
            cval=float(array.min()),
        )
    finally:
        model.train(was_training)
    logits = logits.float()[0]
    if num_classes == 1:
        foreground = torch.sigmoid(logits)
        probs = torch.cat([1.0 - foreground, foreground], dim=0)
    else:
        probs = torch.softmax(logits, dim=0)
    return probs.cpu().numpy()
