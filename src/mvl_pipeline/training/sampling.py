"""Training patches: foreground-oversampled crops, augmented on the fly (never stored).

As in nnU-Net, about a third of the patches are centred on a foreground voxel (class chosen
uniformly among the classes present, then a voxel of that class), the rest anywhere. Every draw
comes from an explicit ``numpy.random.Generator``, so a worker's stream of patches is fixed by
its seed. Augmentation acts on the extracted batch with torch: flips, a small rotation about the
slice axis with a scale change (image linear, label nearest), and intensity jitter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from mvl_pipeline.core.config import known_only


@dataclass(frozen=True)
class AugmentConfig:
    flip_prob: float = 0.5
    rotate_prob: float = 0.2
    max_rotation_deg: float = 15.0
    scale_prob: float = 0.2
    scale_range: tuple[float, float] = (0.85, 1.15)
    intensity_prob: float = 0.3
    brightness: float = 0.1
    contrast: float = 0.1
    noise_prob: float = 0.15
    noise_std: float = 0.1

    @classmethod
    def from_params(cls, params: dict | None) -> AugmentConfig:
        params = known_only(cls, params, "fit.loop.augment")
        if "scale_range" in params:
            params["scale_range"] = tuple(params["scale_range"])
        return cls(**params)


@dataclass
class TrainingVolume:
    """One case held by a worker: arrays plus the foreground voxel index per class."""

    image: np.ndarray  # (X, Y, Z) float32, normalised
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


def _pad_to(array: np.ndarray, shape: Sequence[int], value: float) -> np.ndarray:
    pads = [(0, max(0, int(s) - d)) for d, s in zip(array.shape, shape, strict=True)]
    if not any(p[1] for p in pads):
        return array
    pads = [(p // 2, p - p // 2) for _, p in pads]
    return np.pad(array, pads, mode="constant", constant_values=value)


def sample_patch(
    volume: TrainingVolume,
    patch: Sequence[int],
    rng: np.random.Generator,
    *,
    force_foreground: bool,
    rare_class_prob: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One (image, label) crop of shape ``patch``; padded if the volume is smaller.

    A foreground-centred crop picks its class uniformly among the classes present (nnU-Net),
    or, with probability ``rare_class_prob``, the rarest class present (small lesions).
    """
    image = _pad_to(volume.image, patch, float(volume.image.min()))
    label = _pad_to(volume.label, patch, 0)
    offset = np.array([(i - v) // 2 if i > v else 0 for i, v in zip(image.shape, volume.image.shape, strict=True)])
    shape = np.array(image.shape)
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
    return image[window], label[window]


def sample_batch(
    volumes: Sequence[TrainingVolume],
    patch: Sequence[int],
    batch_size: int,
    rng: np.random.Generator,
    *,
    foreground_fraction: float = 1 / 3,
    rare_class_prob: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch ``(images (B, 1, *patch) float32, labels (B, *patch) int64)``.

    At least ``round(foreground_fraction * batch_size)`` patches are foreground-centred, as
    nnU-Net forces the last third of each batch; the rest are random.
    """
    n_fg = max(1, round(foreground_fraction * batch_size)) if foreground_fraction > 0 else 0
    images, labels = [], []
    for index in range(batch_size):
        volume = volumes[int(rng.integers(len(volumes)))]
        force = index >= batch_size - n_fg
        image, label = sample_patch(volume, patch, rng, force_foreground=force, rare_class_prob=rare_class_prob)
        images.append(image)
        labels.append(label)
    x = torch.from_numpy(np.stack(images)[:, None].copy())
    y = torch.from_numpy(np.stack(labels).astype(np.int64))
    return x, y


def augment(
    x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, config: AugmentConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch in place of stored copies. ``x`` (B, C, X, Y, Z), ``y`` (B, X, Y, Z)."""
    x = x.clone()
    y = y.clone()
    batch = x.shape[0]
    for b in range(batch):
        for axis in range(3):
            if rng.random() < config.flip_prob:
                x[b] = torch.flip(x[b], dims=(axis + 1,))
                y[b] = torch.flip(y[b], dims=(axis,))
    # Rotation about the slice (Z) axis and isotropic scaling, one affine per sample.
    thetas = []
    needs_warp = False
    for _ in range(batch):
        angle = 0.0
        scale = 1.0
        if rng.random() < config.rotate_prob:
            angle = math.radians(rng.uniform(-config.max_rotation_deg, config.max_rotation_deg))
            needs_warp = True
        if rng.random() < config.scale_prob:
            scale = float(rng.uniform(*config.scale_range))
            needs_warp = True
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        # affine_grid works in (x=W, y=H, z=D) = (Z, Y, X) of our (X, Y, Z) layout: rotate X-Y.
        thetas.append([[1.0 / scale, 0.0, 0.0, 0.0], [0.0, cos, -sin, 0.0], [0.0, sin, cos, 0.0]])
    if needs_warp:
        theta = torch.tensor(thetas, dtype=x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        y = (
            F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0]
            .round()
            .long()
        )
    for b in range(batch):
        if rng.random() < config.intensity_prob:
            gain = 1.0 + rng.uniform(-config.contrast, config.contrast)
            shift = rng.uniform(-config.brightness, config.brightness)
            x[b] = x[b] * gain + shift
        if rng.random() < config.noise_prob:
            std = rng.uniform(0.0, config.noise_std)
            generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
            x[b] = x[b] + std * torch.randn(x[b].shape, generator=generator)
    return x, y
