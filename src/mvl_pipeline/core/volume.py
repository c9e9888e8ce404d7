"""A volume is an array on a voxel grid plus the geometry that places it in the patient.

Conventions used everywhere in this project (the contract between readers, preprocessing,
training and inference):

- ``array`` is indexed ``[i, j, k]`` (spatial order X, Y, Z of the voxel grid), the order of
  NIfTI, nibabel and MONAI; a multi-channel image (several MR contrasts or CT phases on one grid)
  is channel-first ``[c, i, j, k]``, as MONAI and the model take it, and ``shape`` stays spatial. A DICOM slice's ``pixel_array`` is ``[row, column]``; readers
  transpose it so that ``i`` runs along the row direction (the first ImageOrientationPatient
  triplet, i.e. along a row, across columns).
- ``affine`` maps a voxel index ``(i, j, k, 1)`` to world millimetres in **RAS+** (the NIfTI
  convention). DICOM is LPS+; :func:`lps_to_ras` converts.
- ``meta`` holds JSON-serialisable facts about the volume (modality, pseudonymous identifiers,
  label names ...). Never identity: readers that see PHI keep it out of ``meta``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_to_ras(affine_lps: np.ndarray) -> np.ndarray:
    """Convert a voxel->LPS affine into a voxel->RAS affine (and back: the map is its own inverse)."""
    return LPS_TO_RAS @ np.asarray(affine_lps, dtype=np.float64)


def affine_from_geometry(
    spacing: tuple[float, float, float] | np.ndarray,
    origin: tuple[float, float, float] | np.ndarray = (0.0, 0.0, 0.0),
    direction: np.ndarray | None = None,
) -> np.ndarray:
    """Build a 4x4 affine from spacing (mm), origin (world position of voxel 0) and direction.

    ``direction`` holds the unit vectors of the i, j, k axes as its columns (identity if None).
    """
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(spacing, dtype=np.float64)[None, :]
    affine[:3, 3] = np.asarray(origin, dtype=np.float64)
    return affine


@dataclass(frozen=True)
class Volume:
    """An image or label volume: ``array[i, j, k]`` (or ``[c, i, j, k]``) + voxel->RAS ``affine`` + ``meta``."""

    array: np.ndarray
    affine: np.ndarray
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim not in (3, 4):
            raise ValueError(
                f"a Volume array must be 3-D (i, j, k) or channel-first 4-D (c, i, j, k); got shape {self.array.shape}"
            )
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"a Volume affine must be 4x4; got shape {affine.shape}")
        if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise ValueError("a Volume affine must be finite and invertible")
        object.__setattr__(self, "affine", affine)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The spatial shape ``(X, Y, Z)`` (without the channel axis of a multi-channel image)."""
        return tuple(int(s) for s in self.array.shape[-3:])  # type: ignore[return-value]

    @property
    def n_channels(self) -> int:
        return 1 if self.array.ndim == 3 else int(self.array.shape[0])

    def channel(self, index: int) -> Volume:
        """Channel ``index`` as a 3-D volume on the same grid (a view; channel 0 of a 3-D volume
        is the volume itself)."""
        if self.array.ndim == 3:
            if index != 0:
                raise IndexError(f"channel {index} of a single-channel volume")
            return self
        return Volume(self.array[index], self.affine.copy(), dict(self.meta))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def origin(self) -> tuple[float, float, float]:
        """RAS world position (mm) of the centre of voxel (0, 0, 0)."""
        return tuple(float(v) for v in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the unit vectors of the i, j, k axes in RAS."""
        return self.affine[:3, :3] / np.asarray(self.spacing)[None, :]

    @property
    def orientation(self) -> str:
        """Axis codes such as ``"RAS"`` or ``"LPS"`` (nibabel's ``aff2axcodes``)."""
        from nibabel.orientations import aff2axcodes

        return "".join(aff2axcodes(self.affine))

    def with_array(self, array: np.ndarray, **meta_updates: Any) -> Volume:
        """Same geometry, new voxel values (shape must match)."""
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} does not match the grid {self.array.shape}")
        return Volume(array, self.affine.copy(), {**self.meta, **meta_updates})

    def same_grid(self, other: Volume, atol_mm: float = 1e-3) -> bool:
        """True when ``other`` lies on exactly this voxel grid (shape and affine)."""
        return self.shape == other.shape and bool(
            np.allclose(self.affine, other.affine, atol=atol_mm)
        )


def guess_modality(volume: Volume) -> str:
    """``"CT"`` when the volume holds air (its 1st intensity percentile is at or below -500, in
    HU), else ``"MR"``: for NIfTI/NRRD files, which carry no modality."""
    sample = np.asarray(volume.array)[..., ::4, ::4, :]
    return "CT" if float(np.percentile(sample, 1)) <= -500.0 else "MR"
