"""Multi-series MR studies of the phantoms: one anatomy, several contrasts, one Frame of Reference.

A hospital MR protocol is a study of several series (T1, T2, FLAIR ...) that a radiologist reads
together. :func:`simulate_mr` renders an :class:`~mvl_pipeline.synthetic.phantom.Anatomy` as one
contrast on any grid: every tissue of the phantom gets the contrast's own intensity
(:data:`MR_CONTRASTS`: a T1 shows fat bright and lesions dark, a T2 lesions and discs bright, so
the contrasts carry different information), the smooth texture of soft tissue and organ carries
over, and Rician noise is added. :func:`contrast_grids` gives the grid of each contrast: the first
on the study's grid, the others with thicker slices over the same extent (as a T2 often is), so
that ingest has to resample them onto the first contrast's grid.

Pure numpy; all randomness from the caller's :class:`numpy.random.Generator`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mvl_pipeline.core.volume import Volume
from mvl_pipeline.synthetic import phantom

#: Intensity of each tissue class per contrast (arbitrary MR units, as a scanner stores them).
MR_CONTRASTS: dict[str, dict[str, float]] = {
    "t1": {"air": 0.0, "fat": 950.0, "tissue": 420.0, "bone": 220.0, "disc": 300.0, "organ": 560.0, "lesion": 260.0},
    "t2": {"air": 0.0, "fat": 600.0, "tissue": 300.0, "bone": 120.0, "disc": 750.0, "organ": 220.0, "lesion": 820.0},
    "flair": {"air": 0.0, "fat": 500.0, "tissue": 380.0, "bone": 100.0, "disc": 120.0, "organ": 330.0, "lesion": 780.0},
    "pd": {"air": 0.0, "fat": 700.0, "tissue": 600.0, "bone": 300.0, "disc": 800.0, "organ": 640.0, "lesion": 720.0},
}
TEXTURE_PER_HU = 4.0  # MR units per HU of the phantom's soft-tissue and organ texture
NOISE_FRACTION = 0.02  # noise sigma as a share of the contrast's brightest tissue
MR_RESCALE = (1.0, 0.0)  # stored integers = MR units


def check_contrasts(contrasts: Sequence[str]) -> None:
    unknown = [c for c in contrasts if c not in MR_CONTRASTS]
    if unknown or len(set(contrasts)) != len(contrasts):
        raise ValueError(f"MR contrasts must be distinct names among {sorted(MR_CONTRASTS)}; got {list(contrasts)}")


def tissue_intensities(hu: np.ndarray, label: np.ndarray, anatomy: phantom.Anatomy, contrast: str) -> np.ndarray:
    """Noise-free MR intensities of one contrast from the phantom's noise-free HU and labels."""
    values = MR_CONTRASTS[contrast]
    out = (values["tissue"] + (hu - phantom.SOFT_TISSUE_HU) * TEXTURE_PER_HU).astype(np.float32)
    for tissue, hu_value in (("fat", phantom.FAT_HU), ("bone", phantom.BONE_HU), ("disc", phantom.DISC_HU)):
        out[np.isclose(hu, hu_value, atol=1e-3)] = values[tissue]
    out[hu <= -500.0] = values["air"]
    organ = label == phantom.LABEL_ORGAN
    out[organ] = values["organ"] + (hu[organ] - anatomy.organ_hu) * TEXTURE_PER_HU
    out[label == phantom.LABEL_LESION] = values["lesion"]
    return np.maximum(out, 0.0)


def simulate_mr(
    anatomy: phantom.Anatomy,
    affine: np.ndarray,
    shape: Sequence[int],
    rng: np.random.Generator,
    contrast: str,
) -> tuple[Volume, Volume]:
    """One MR contrast of ``anatomy`` on the grid ``(affine, shape)``: ``(image, label)``, the
    image float32 with Rician noise, the label uint8 (0 background, 1 organ, 2 lesion)."""
    check_contrasts([contrast])
    hu, label = phantom.render(anatomy, affine, shape)
    clean = tissue_intensities(hu, label, anatomy, contrast)
    sigma = NOISE_FRACTION * max(MR_CONTRASTS[contrast].values())
    real = clean + rng.normal(0.0, sigma, size=clean.shape).astype(np.float32)
    imaginary = rng.normal(0.0, sigma, size=clean.shape).astype(np.float32)
    image = np.sqrt(real**2 + imaginary**2).astype(np.float32)
    names = {str(k): v for k, v in phantom.LABEL_NAMES.items()}
    return (
        Volume(image, affine.copy(), {"modality": "MR", "contrast": contrast}),
        Volume(label, affine.copy(), {"label_names": names}),
    )


def contrast_grids(
    shape: Sequence[int], spacing: Sequence[float], n_contrasts: int, slice_ratio: float
) -> list[tuple[tuple[int, int, int], tuple[float, float, float]]]:
    """``(shape, spacing)`` of each contrast: the first on the study's grid, the others with
    slices ``slice_ratio`` times thicker over the same extent (centred where the first is)."""
    nx, ny, nz = (int(v) for v in shape)
    sx, sy, sz = (float(v) for v in spacing)
    thick = max(2, int(round((nz - 1) / slice_ratio)) + 1)
    grids = [((nx, ny, nz), (sx, sy, sz))]
    grids += [((nx, ny, thick), (sx, sy, sz * (nz - 1) / (thick - 1)))] * (n_contrasts - 1)
    return grids
