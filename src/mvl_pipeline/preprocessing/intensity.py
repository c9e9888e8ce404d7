"""Intensity normalisation schemes, as nnU-Net chooses them per modality.

- ``ct``: clip to the dataset's foreground 0.5-99.5 percentiles, then z-score with the dataset's
  foreground mean and standard deviation (all three from the saved fingerprint, via the plan):
  HU are absolute, so every case gets the same mapping.
- ``zscore_body``: per case, mean and standard deviation of the voxels inside the body mask
  (MR and other relative-intensity modalities); every voxel is mapped with them.
- ``zscore``: per case, over all voxels.
- ``none``: a float32 copy.

:func:`normalize` returns the image and the parameters it actually applied (for the per-case
record), so a normalised image can be mapped back to its original intensities.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mvl_pipeline.core.errors import NonFiniteValuesError

SCHEMES = ("ct", "zscore_body", "zscore", "none")
_MIN_STD = 1e-8


@dataclass(frozen=True)
class Normalization:
    """One modality's scheme; ``clip``/``mean``/``std`` are dataset statistics (``ct`` only)."""

    scheme: str
    clip: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"normalisation scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.scheme == "ct":
            if self.clip is None or self.mean is None or self.std is None:
                raise ValueError("the 'ct' scheme needs clip, mean and std (from the fingerprint)")
            if not self.clip[0] < self.clip[1]:
                raise ValueError(f"ct clip range must be increasing, got {self.clip}")
            if not (np.isfinite(self.mean) and np.isfinite(self.std)) or self.std <= 0:
                raise ValueError(
                    f"ct mean/std must be finite with std > 0, got {self.mean}, {self.std}"
                )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Normalization:
        unknown = set(values) - {"scheme", "clip", "mean", "std"}
        if unknown:
            raise ValueError(f"unknown normalisation fields: {sorted(unknown)}")
        clip = values.get("clip")
        return cls(
            scheme=str(values["scheme"]),
            clip=None if clip is None else (float(clip[0]), float(clip[1])),
            mean=None if values.get("mean") is None else float(values["mean"]),
            std=None if values.get("std") is None else float(values["std"]),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scheme": self.scheme}
        if self.scheme == "ct":
            out |= {"clip": list(self.clip or ()), "mean": self.mean, "std": self.std}
        return out


def _mean_std(values: np.ndarray, mask: np.ndarray | None) -> tuple[float, float]:
    selected = values[mask] if mask is not None and mask.any() else values
    mean = float(np.mean(selected, dtype=np.float64))
    std = float(np.std(selected, dtype=np.float64))
    return mean, max(std, _MIN_STD)


def normalize(
    image: np.ndarray,
    normalization: Normalization,
    *,
    body_mask: np.ndarray | None = None,
    inplace: bool = False,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Normalise ``image``; returns ``(float32 image, applied parameters)``.

    ``body_mask`` is used by ``zscore_body`` (all voxels when it is None or empty).
    ``inplace=True`` reuses ``image``'s memory when it already is float32.
    Raises :class:`NonFiniteValuesError` when the image holds NaN or Inf.
    """
    out = image if inplace and image.dtype == np.float32 else np.array(image, dtype=np.float32)
    if not np.isfinite(out).all():
        raise NonFiniteValuesError("image holds NaN or Inf values")
    scheme = normalization.scheme
    if scheme == "none":
        return out, {"scheme": "none"}
    if scheme == "ct":
        lo, hi = normalization.clip  # type: ignore[misc]
        mean, std = float(normalization.mean), float(normalization.std)  # type: ignore[arg-type]
        np.clip(out, lo, hi, out=out)
        applied: dict[str, Any] = {"scheme": "ct", "clip": [lo, hi], "mean": mean, "std": std}
    else:
        mean, std = _mean_std(out, body_mask if scheme == "zscore_body" else None)
        applied = {"scheme": scheme, "mean": mean, "std": std}
    out -= np.float32(mean)
    out *= np.float32(1.0 / std)
    return out, applied


def denormalize(image: np.ndarray, applied: Mapping[str, Any]) -> np.ndarray:
    """Back to the original intensity scale (values clipped by ``ct`` stay clipped)."""
    if applied["scheme"] == "none":
        return np.array(image, dtype=np.float32)
    return np.asarray(image, dtype=np.float32) * np.float32(applied["std"]) + np.float32(
        applied["mean"]
    )
