"""What the volume codecs share: their error, and turning decoded arrays into volumes."""

from __future__ import annotations

from typing import Any

import numpy as np

from mvl_pipeline.core.errors import NotAVolumeError, UnreadableFileError
from mvl_pipeline.core.volume import Volume


class VolumeFileError(UnreadableFileError):
    """A volume file is missing, truncated, not NIfTI/NRRD, or not a 3-D volume."""

    reason = "unreadable_file"


class NotA3DVolumeError(VolumeFileError, NotAVolumeError):
    """A readable volume file of another dimensionality (a 4-D image)."""

    reason = NotAVolumeError.reason


def storable(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    return np.ascontiguousarray(array)


def as_3d(array: np.ndarray, path: str, *, channels: bool = False) -> np.ndarray:
    """A decoded ``(X, Y, Z)`` array; with ``channels``, a 4-D ``(X, Y, Z, C)`` array (several
    contrasts of one grid) becomes channel-first ``(C, X, Y, Z)``."""
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if channels and array.ndim == 4:
        return np.ascontiguousarray(np.moveaxis(array, -1, 0))
    if array.ndim != 3:
        why = ("a 4-D image holds several channels or time points, which are not supported as one input yet"
               if array.ndim > 3 else "an image of fewer than 3 axes (one slice?) cannot be segmented in 3-D")  # fmt: skip
        raise NotA3DVolumeError(f"not a 3-D volume (shape {array.shape}): {why}", path=path)
    return np.ascontiguousarray(array)


def make_volume(array: np.ndarray, affine: np.ndarray, meta: dict[str, Any], path: str) -> Volume:
    if array.dtype.kind not in "biuf":  # complex, RGB (a structured type), text ...
        kind = "RGB" if array.dtype.names else str(array.dtype)
        raise VolumeFileError(f"voxels of type {kind} are not supported: an image of real numbers is needed", path=path)
    try:
        return Volume(array, affine, meta)
    except ValueError as exc:
        raise VolumeFileError(f"invalid volume geometry ({exc})", path=path) from exc
