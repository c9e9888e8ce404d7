"""Body masks and bounding boxes: where the patient is in a volume, and cropping to it.

The body mask is a threshold, chosen per modality: CT above ``ct_threshold_hu`` (air is about
-1000 HU, fat -100), anything else above ``relative_threshold`` times the volume's 99th
percentile (MR background is near zero). A box is the extent of the slices that hold at least
``min_voxels_per_slice`` mask voxels (so isolated noise voxels do not stretch it), grown by a
margin and clipped to the volume. No table removal: a CT table within the field of view is
inside the box.

Boxes are half-open ``[(lo, hi), ...]`` voxel ranges, JSON-friendly as lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mvl_pipeline.core.config import ConfigBlock

Box = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class BodyMaskConfig(ConfigBlock):
    """``preprocess.body_mask``: where the patient is (crop box, fingerprint, MR z-score)."""

    WHERE = "preprocess.body_mask"

    ct_threshold_hu: float = -500.0
    relative_threshold: float = 0.05
    min_voxels_per_slice: int = 10

    def __post_init__(self) -> None:
        if self.min_voxels_per_slice < 1:
            raise ValueError("preprocess.body_mask.min_voxels_per_slice must be >= 1")


def body_threshold(image: np.ndarray, modality: str, config: BodyMaskConfig) -> float:
    """The intensity above which a voxel counts as body."""
    if modality.upper() == "CT":
        return float(config.ct_threshold_hu)
    # A strided subsample is plenty for a percentile and keeps this cheap on large volumes.
    sample = image[::2, ::2, ::2] if image.size > 2_000_000 else image
    high = float(np.percentile(sample, 99.0))
    low = float(np.min(sample))
    return low + config.relative_threshold * (high - low)


def body_mask(image: np.ndarray, modality: str, config: BodyMaskConfig) -> np.ndarray:
    """Boolean mask of the body (see module doc)."""
    return image > body_threshold(image, modality, config)


def bounding_box(mask: np.ndarray, min_voxels_per_slice: int = 1) -> Box | None:
    """Half-open box of the slices holding ``>= min_voxels_per_slice`` mask voxels; None if none."""
    if mask.ndim == 3:  # two passes over the volume instead of three
        plane = np.count_nonzero(mask, axis=2)  # (X, Y)
        counts = [plane.sum(axis=1), plane.sum(axis=0), np.count_nonzero(mask, axis=(0, 1))]
    else:
        counts = [
            np.count_nonzero(mask, axis=tuple(a for a in range(mask.ndim) if a != axis))
            for axis in range(mask.ndim)
        ]
    box = []
    for axis_counts in counts:
        index = np.flatnonzero(axis_counts >= max(1, min_voxels_per_slice))
        if index.size == 0:
            return None
        box.append((int(index[0]), int(index[-1]) + 1))
    return tuple(box)


def union_box(a: Box | None, b: Box | None) -> Box | None:
    if a is None:
        return b
    if b is None:
        return a
    return tuple((min(x[0], y[0]), max(x[1], y[1])) for x, y in zip(a, b, strict=True))


def grow_box(box: Box, margin: Sequence[int], shape: Sequence[int]) -> Box:
    """``box`` grown by ``margin`` voxels per axis and clipped to ``shape``."""
    return tuple(
        (max(0, lo - int(m)), min(int(n), hi + int(m)))
        for (lo, hi), m, n in zip(box, margin, shape, strict=True)
    )


def margin_voxels(margin_mm: float, spacing: Sequence[float]) -> tuple[int, ...]:
    """A margin in millimetres as whole voxels per axis (rounded up)."""
    return tuple(int(np.ceil(float(margin_mm) / float(s) - 1e-9)) for s in spacing)


def full_box(shape: Sequence[int]) -> Box:
    return tuple((0, int(n)) for n in shape)


def box_slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(lo, hi) for lo, hi in box)


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(hi - lo for lo, hi in box)


def body_box(
    image: np.ndarray,
    modality: str,
    config: BodyMaskConfig,
    *,
    margin_mm: float = 0.0,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    label: np.ndarray | None = None,
) -> Box:
    """Box of the body (and of the label's foreground, if given) grown by ``margin_mm``.

    The whole volume when no body is found.
    """
    box = bounding_box(body_mask(image, modality, config), config.min_voxels_per_slice)
    if label is not None:
        box = union_box(box, bounding_box(label > 0))
    if box is None:
        return full_box(image.shape)
    return grow_box(box, margin_voxels(margin_mm, spacing), image.shape)
