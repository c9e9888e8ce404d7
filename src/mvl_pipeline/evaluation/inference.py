"""Whole-volume prediction by sliding window (MONAI, Gaussian weighting).

Used for validation inside the training loop, by ``evaluate``, the registry gate, the ablation
and the model's pyfunc, so that a model is always applied to a case the same way.

Many cases, one forward pass: a case no larger than the window (most cases of a task whose plan
sized the window from the median case, e.g. the Hippocampus) is, for the sliding window, ONE
window: the case padded to the window (MONAI's padding: half before, the rest after, with the
case's minimum), whose Gaussian-weighted average is that window's own prediction.
:func:`predict_many` stacks such cases ``case_batch`` at a time into one forward pass, which
keeps the matrix units busier than a batch of one (1.6x the cases per second of one case at a
time on 2 Xeon cores, 4 cases a pass: bench_model.py, 2026-12-01); larger cases go through the
sliding window one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

T = TypeVar("T")


def _as_channels_first(image: np.ndarray) -> np.ndarray:
    """(X, Y, Z) or (C_in, X, Y, Z) -> contiguous, writable float32 (C_in, X, Y, Z) (a read-only
    memory-mapped case is copied: torch warns on a tensor over read-only memory)."""
    array = np.ascontiguousarray(image if image.ndim == 4 else image[None], dtype=np.float32)
    return array if array.flags.writeable else array.copy()


def _probabilities(logits: torch.Tensor, num_classes: int) -> np.ndarray:
    """Logits (K, X, Y, Z) -> probabilities (C, X, Y, Z) float32; one sigmoid channel becomes
    (background, foreground) so that callers can always take an argmax."""
    logits = logits.float()
    if num_classes == 1:
        foreground = torch.sigmoid(logits)
        probs = torch.cat([1.0 - foreground, foreground], dim=0)
    else:
        probs = torch.softmax(logits, dim=0)
    return probs.cpu().numpy()


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
    array = _as_channels_first(image)
    x = torch.from_numpy(array)[None].to(device)
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
    return _probabilities(logits[0], num_classes)


def fits_one_window(spatial_shape: Sequence[int], roi_size: Sequence[int]) -> bool:
    """Whether the sliding window covers an image of ``spatial_shape`` with one window."""
    return all(int(s) <= int(r) for s, r in zip(spatial_shape, roi_size, strict=True))


def _pad_to_window(array: np.ndarray, roi_size: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """``array`` (C, X, Y, Z) padded to ``roi_size`` as MONAI's sliding window pads it (half of
    the difference before, the rest after, with the image's minimum), and the slices that cut
    the image back out."""
    pad, crop = [], []
    for size, roi in zip(array.shape[1:], roi_size, strict=True):
        diff = int(roi) - int(size)
        pad.append((diff // 2, diff - diff // 2))
        crop.append(slice(diff // 2, diff // 2 + int(size)))
    # np.pad copies, so a read-only (memory-mapped) case never reaches torch.from_numpy
    padded = np.pad(array, [(0, 0), *pad], mode="constant", constant_values=array.min())
    return torch.from_numpy(padded), tuple(crop)


def _one_window_batch(
    model: nn.Module, pending: list[tuple[T, np.ndarray]], roi_size: Sequence[int], num_classes: int, device: torch.device
) -> Iterator[tuple[T, np.ndarray]]:
    """One forward pass over cases that each fit in one window."""
    padded = [_pad_to_window(array, roi_size) for _, array in pending]
    x = torch.stack([p for p, _ in padded]).to(device)  # (N, C_in, *roi)
    was_training = model.training
    model.eval()
    try:
        logits = model(x)  # (N, K, *roi)
    finally:
        model.train(was_training)
    for (item, _), (_, crop), case_logits in zip(pending, padded, logits, strict=True):
        yield item, _probabilities(case_logits[(slice(None), *crop)], num_classes)


@torch.no_grad()
def predict_many(
    model: nn.Module,
    items: Iterable[T],
    image_of: Callable[[T], np.ndarray],
    *,
    roi_size: Sequence[int],
    num_classes: int,
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    case_batch: int = 4,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[T, np.ndarray]]:
    """``(item, probabilities)`` for every item, in order, as :func:`predict_probabilities`
    would give for ``image_of(item)``; items are read lazily (at most ``case_batch`` held).

    Cases that fit in one window are predicted ``case_batch`` at a time in one forward pass
    (module docstring); ``case_batch: 1`` predicts every case on its own.
    """
    if case_batch < 1:
        raise ValueError(f"case_batch must be >= 1; got {case_batch}")
    device = torch.device(device)
    roi = tuple(int(r) for r in roi_size)
    pending: list[tuple[T, np.ndarray]] = []
    for item in items:
        array = _as_channels_first(image_of(item))
        if case_batch > 1 and fits_one_window(array.shape[1:], roi):
            pending.append((item, array))
            if len(pending) == case_batch:
                yield from _one_window_batch(model, pending, roi, num_classes, device)
                pending = []
            continue
        if pending:  # keep the order of the items
            yield from _one_window_batch(model, pending, roi, num_classes, device)
            pending = []
        yield item, predict_probabilities(
            model, array, roi_size=roi, num_classes=num_classes, overlap=overlap,
            sw_batch_size=sw_batch_size, device=device,
        )  # fmt: skip
    if pending:
        yield from _one_window_batch(model, pending, roi, num_classes, device)
