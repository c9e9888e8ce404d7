"""Reorienting a voxel grid to a target axis code (``"RAS"``) by axis permutation and flips only.

Reorientation never interpolates: the array is transposed and flipped so that voxel axis ``i``
points closest to the first code's direction (R for ``"RAS"``), ``j`` to the second and ``k`` to
the third, and the affine is updated so every voxel keeps its world position. An oblique grid
stays oblique (its direction cosines remain in the affine), as nnU-Net and MONAI's
``Orientation`` do; only the nearest axis assignment changes.

An :class:`AxisTransform` is the record of what was done: ``(axis, flip)`` pairs in nibabel's
``ornt`` convention, JSON-serialisable via :meth:`AxisTransform.to_list`, and exactly invertible
with :meth:`AxisTransform.inverse`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)


@dataclass(frozen=True)
class AxisTransform:
    """Permutation + flips taking a source grid to a target orientation (nibabel ``ornt``).

    Row ``r`` of ``ornt`` says: source axis ``r`` becomes output axis ``ornt[r, 0]``, flipped
    when ``ornt[r, 1] == -1``.
    """

    ornt: tuple[tuple[int, int], ...]

    @classmethod
    def from_array(cls, ornt: np.ndarray) -> AxisTransform:
        return cls(tuple((int(axis), int(flip)) for axis, flip in np.asarray(ornt)))

    @classmethod
    def from_list(cls, pairs: Sequence[Sequence[int]]) -> AxisTransform:
        return cls(tuple((int(axis), int(flip)) for axis, flip in pairs))

    def to_list(self) -> list[list[int]]:
        return [[axis, flip] for axis, flip in self.ornt]

    @property
    def array(self) -> np.ndarray:
        return np.asarray(self.ornt, dtype=np.float64)

    @property
    def is_identity(self) -> bool:
        return all(axis == r and flip == 1 for r, (axis, flip) in enumerate(self.ornt))

    def inverse(self) -> AxisTransform:
        """The transform taking the output grid back to the source grid."""
        inverse = [(0, 1)] * len(self.ornt)
        for source_axis, (target_axis, flip) in enumerate(self.ornt):
            inverse[target_axis] = (source_axis, flip)
        return AxisTransform(tuple(inverse))

    def output_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        out = [0] * len(self.ornt)
        for source_axis, (target_axis, _) in enumerate(self.ornt):
            out[target_axis] = int(shape[source_axis])
        return tuple(out)

    def permute(self, values: Sequence[float]) -> tuple[float, ...]:
        """Per-axis values (e.g. spacing) of the source grid, in output axis order."""
        out = [0.0] * len(self.ornt)
        for source_axis, (target_axis, _) in enumerate(self.ornt):
            out[target_axis] = float(values[source_axis])
        return tuple(out)

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Reorient the spatial axes (the last three) of ``array``; returns a view when possible."""
        if self.is_identity:
            return array
        if array.ndim == 3:
            return apply_orientation(array, self.array)
        # (C, X, Y, Z): move the channel axis last, where nibabel leaves extra axes alone.
        moved = np.moveaxis(array, 0, -1)
        return np.moveaxis(apply_orientation(moved, self.array), -1, 0)

    def apply_to_affine(self, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """Affine of the output grid, given the source grid's ``affine`` and ``shape``."""
        return np.asarray(affine, dtype=np.float64) @ inv_ornt_aff(self.array, tuple(shape))


def orientation_transform(affine: np.ndarray, target: str = "RAS") -> AxisTransform:
    """The permutation/flips that make the grid of ``affine`` closest to ``target`` axis codes.

    ``target`` is any valid triple of nibabel axis codes (``"RAS"``, ``"LPS"`` ...).
    """
    if len(target) != 3:
        raise ValueError(f"orientation must be three axis codes such as 'RAS', got {target!r}")
    source = io_orientation(np.asarray(affine, dtype=np.float64))
    return AxisTransform.from_array(ornt_transform(source, axcodes2ornt(tuple(target.upper()))))


def reorient(
    array: np.ndarray, affine: np.ndarray, target: str = "RAS"
) -> tuple[np.ndarray, np.ndarray, AxisTransform]:
    """``(array, affine)`` reoriented to ``target``; also returns the transform applied."""
    transform = orientation_transform(affine, target)
    return transform.apply(array), transform.apply_to_affine(affine, array.shape), transform
