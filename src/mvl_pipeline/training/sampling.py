"""Training patches: foreground-oversampled crops (augmented on the fly by ``augmentation``).

As in nnU-Net, about a third of the patches are centred on a foreground voxel (class chosen
uniformly among the classes present, then a voxel of that class), the rest anywhere. Every draw
comes from an explicit ``numpy.random.Generator``, so a worker's stream of patches is fixed by
its seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class TrainingVolume:
    """One case held by a worker: arrays plus the foreground voxel index per class."""

    image: np.ndarray  # (X, Y, Z) or channel-first (C, X, Y, Z) float32, normalised
    label: np.ndarray  # (X, Y, Z) uint8
    foreground: dict[int, np.ndarray]  # class -> (N, 3) voxel coordinates (subsampled)
    counts: dict[int, int] = field(default_factory=dict)  # class -> voxel count

    @classmethod
    def from_arrays(cls, image: np.ndarray, label: np.ndarray, *, max_points: int = 20000, seed: int = 0) -> TrainingVolume:
        rng = np.random.default_rng(seed)
        foreground, counts = {}, {}
        for value in np.unique(label):
            if value == 0:
                continue
            coords = np.argwhere(label == value)
            counts[int(value)] = len(coords)
            if len(coords) > max_points:
                coords = coords[rng.choice(len(coords), max_points, replace=False)]
            foreground[int(value)] = coords.astype(np.int32)
        return cls(
            np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(label, dtype=np.uint8), foreground, counts
        )


def _pad_to(array: np.ndarray, shape: Sequence[int], value: float | np.ndarray) -> np.ndarray:
    """``array`` padded (centred) to at least ``shape`` on its last three axes; a channel axis
    in front is padded per channel with ``value[c]``."""
    spatial = array.shape[-3:]
    pads = [(0, max(0, int(s) - d)) for d, s in zip(spatial, shape, strict=True)]
    if not any(p[1] for p in pads):
        return array
    pads = [(p // 2, p - p // 2) for _, p in pads]
    if array.ndim == 3:
        return np.pad(array, pads, mode="constant", constant_values=value)
    values = np.broadcast_to(np.asarray(value, dtype=array.dtype), (array.shape[0],))
    return np.stack([np.pad(c, pads, mode="constant", constant_values=v) for c, v in zip(array, values, strict=True)])


def sample_patch(
    volume: TrainingVolume,
    patch: Sequence[int],
    rng: np.random.Generator,
    *,
    force_foreground: bool,
    rare_class_prob: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One (image, label) crop of shape ``patch`` (a multi-channel image: ``(C, *patch)``);
    padded if the volume is smaller.

    A foreground-centred crop picks its class uniformly among the classes present (nnU-Net),
    or, with probability ``rare_class_prob``, the rarest class present (small lesions).
    """
    if volume.image.ndim == 3:
        image = _pad_to(volume.image, patch, float(volume.image.min()))
    else:  # each channel padded with its own minimum
        image = _pad_to(volume.image, patch, volume.image.reshape(volume.image.shape[0], -1).min(axis=1))
    label = _pad_to(volume.label, patch, 0)
    spatial = volume.image.shape[-3:]
    offset = np.array([(i - v) // 2 if i > v else 0 for i, v in zip(label.shape, spatial, strict=True)])
    shape = np.array(label.shape)
    size = np.array(patch)
    high = shape - size  # inclusive upper bound of the start corner
    if force_foreground and volume.foreground:
        classes = sorted(volume.foreground)
        if rare_class_prob > 0 and rng.random() < rare_class_prob:
            cls = min(classes, key=lambda c: (volume.counts.get(c, 0), c))
        else:
            cls = classes[int(rng.integers(len(classes)))]
        points = volume.foreground[cls]
        centre = points[int(rng.integers(len(points)))] + offset
        start = np.clip(centre - size // 2, 0, high)
    else:
        start = np.array([int(rng.integers(0, h + 1)) for h in high])
    window = tuple(slice(int(s), int(s + n)) for s, n in zip(start, size, strict=True))
    return image[(Ellipsis, *window)], label[window]


def sample_batch(
    volumes: Sequence[TrainingVolume],
    patch: Sequence[int],
    batch_size: int,
    rng: np.random.Generator,
    *,
    foreground_fraction: float = 1 / 3,
    rare_class_prob: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch ``(images (B, C, *patch) float32, labels (B, *patch) int64)`` (C = 1 for 3-D volumes).

    At least ``max(1, round(foreground_fraction * batch_size))`` patches are foreground-centred,
    as nnU-Net forces the last third of each batch (and at least one): at batch 2 that is one
    patch of two, 0.5 of them; the rest are random.
    """
    n_fg = max(1, round(foreground_fraction * batch_size)) if foreground_fraction > 0 else 0
    images, labels = [], []
    for index in range(batch_size):
        volume = volumes[int(rng.integers(len(volumes)))]
        force = index >= batch_size - n_fg
        image, label = sample_patch(volume, patch, rng, force_foreground=force, rare_class_prob=rare_class_prob)
        images.append(image)
        labels.append(label)
    stacked = np.stack(images)
    x = torch.from_numpy((stacked[:, None] if stacked.ndim == 4 else stacked).copy())
    y = torch.from_numpy(np.stack(labels).astype(np.int64))
    return x, y


