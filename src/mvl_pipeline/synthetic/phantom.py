"""CT-like abdominal phantoms defined analytically in world millimetres (RAS+).

An :class:`Anatomy` is a patient: a body outline (a super-ellipse cross-section whose size varies
along z) with a subcutaneous fat layer, a vertebral column (bright bone, the distractor), one
liver-like organ (a deformed, rotated ellipsoid with a smooth texture) and 0-3 lesions inside the
organ. It is a function of world position only, so :func:`render` can sample it on any voxel grid:
an axial, a coronal and an oblique acquisition of the same anatomy agree exactly where they
overlap (up to sampling at voxel centres, without partial-volume averaging).

Pure numpy; all randomness comes from an explicit :class:`numpy.random.Generator`.

Typical use::

    rng = np.random.default_rng(seed)
    anatomy = sample_anatomy(rng)
    affine = acquisition_affine(shape=(128, 128, 48), spacing=(3.0, 3.0, 5.0),
                                orientation="axial", centre=anatomy.scan_centre)
    image, label = simulate_ct(anatomy, affine, (128, 128, 48), rng)
    # image: Volume float32 HU; label: Volume uint8 (0 background, 1 organ, 2 lesion)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from mvl_pipeline.core.volume import Volume

AIR_HU = -1000.0
FAT_HU = -100.0
SOFT_TISSUE_HU = 40.0
BONE_HU = 700.0
DISC_HU = 80.0
CT_RANGE_HU = (-1024.0, 3071.0)

LABEL_BACKGROUND, LABEL_ORGAN, LABEL_LESION = 0, 1, 2
LABEL_NAMES = {LABEL_BACKGROUND: "background", LABEL_ORGAN: "Liver", LABEL_LESION: "Lesion"}

Orientation = Literal["axial", "coronal", "sagittal", "oblique"]

# Row and column directions (RAS) of the standard DICOM acquisition planes: axial rows run to the
# patient's left and columns to posterior, as ImageOrientationPatient [1,0,0,0,1,0] (LPS) does.
_PLANES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),
    "coronal": ((-1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, -1.0, 0.0), (0.0, 0.0, -1.0)),
}


@dataclass(frozen=True)
class PlaneWave:
    """``amplitude * sin(dot(wavevector, x) + phase)``: a smooth term of a shape or texture."""

    wavevector: tuple[float, float, float]
    phase: float
    amplitude: float

    def __call__(self, points: np.ndarray) -> np.ndarray:
        # points: (..., 3)
        return self.amplitude * np.sin(points @ np.asarray(self.wavevector) + self.phase)


@dataclass(frozen=True)
class Lesion:
    centre: tuple[float, float, float]  # RAS mm
    radii: tuple[float, float, float]  # mm, along the organ's axes
    contrast_hu: float  # added to the organ's attenuation (negative: hypodense)


@dataclass(frozen=True)
class Anatomy:
    """One phantom patient, in world millimetres (RAS+)."""

    body_centre: tuple[float, float]  # x, y of the body axis
    body_semi_axes: tuple[float, float]  # left-right, anterior-posterior, at z = centre_z
    body_exponent: float  # super-ellipse exponent (2: ellipse; larger: boxier)
    body_profile: tuple[PlaneWave, ...]  # relative size change along z (wavevectors along z)
    centre_z: float
    fat_thickness: float
    spine_centre: tuple[float, float]
    spine_radius: float
    disc_period: float  # mm between intervertebral discs
    disc_phase: float
    organ_centre: tuple[float, float, float]
    organ_semi_axes: tuple[float, float, float]
    organ_rotation: tuple[tuple[float, float, float], ...]  # 3x3, columns = organ axes in RAS
    organ_bumps: tuple[PlaneWave, ...]  # relative radius change over the unit sphere
    organ_hu: float
    organ_texture: tuple[PlaneWave, ...]  # HU, over world position
    tissue_texture: tuple[PlaneWave, ...]  # HU, over world position
    lesions: tuple[Lesion, ...]
    noise_sigma_hu: float

    @property
    def scan_centre(self) -> tuple[float, float, float]:
        """Where a scan of the organ would be centred: body axis in x, y; the organ in z."""
        return (self.body_centre[0], self.body_centre[1], self.organ_centre[2])


def _rotation(rz: float, rx: float, ry: float) -> np.ndarray:
    """Rotation matrix for angles (radians) about z, then x, then y."""
    cz, sz = np.cos(rz), np.sin(rz)
    cx, sx = np.cos(rx), np.sin(rx)
    cy, sy = np.cos(ry), np.sin(ry)
    mz = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    mx = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    my = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    return my @ mx @ mz


def _random_waves(
    rng: np.random.Generator,
    n: int,
    wavelength_mm: tuple[float, float],
    amplitude: tuple[float, float],
    axes: Literal["xyz", "z"] = "xyz",
) -> tuple[PlaneWave, ...]:
    waves = []
    for _ in range(n):
        if axes == "z":
            direction = np.array([0.0, 0.0, 1.0])
        else:
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
        k = 2.0 * np.pi / rng.uniform(*wavelength_mm)
        waves.append(
            PlaneWave(
                wavevector=tuple(float(v) for v in direction * k),
                phase=float(rng.uniform(0.0, 2.0 * np.pi)),
                amplitude=float(rng.uniform(*amplitude)),
            )
        )
    return tuple(waves)


def _sample_lesions(
    rng: np.random.Generator,
    organ_centre: np.ndarray,
    organ_semi_axes: np.ndarray,
    rotation: np.ndarray,
    n_lesions: int,
) -> tuple[Lesion, ...]:
    lesions = []
    for _ in range(n_lesions):
        # A point well inside the organ: at most 55% of the way to the (undeformed) surface.
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        u = direction * 0.55 * rng.uniform(0.0, 1.0) ** (1.0 / 3.0)
        centre = organ_centre + rotation @ (u * organ_semi_axes)
        radius = rng.uniform(4.0, 15.0)
        radii = radius * rng.uniform(0.85, 1.15, size=3)
        sign = -1.0 if rng.uniform() < 0.7 else 1.0
        lesions.append(
            Lesion(
                centre=tuple(float(v) for v in centre),
                radii=tuple(float(v) for v in radii),
                contrast_hu=float(sign * rng.uniform(25.0, 60.0)),
            )
        )
    return tuple(lesions)


def sample_anatomy(
    rng: np.random.Generator,
    *,
    max_lesions: int = 3,
    noise_sigma_hu: tuple[float, float] = (10.0, 20.0),
) -> Anatomy:
    """Draw one phantom patient. Sizes are adult-abdomen-like (body 30-34 cm wide)."""
    semi_lr = rng.uniform(140.0, 170.0)
    semi_ap = rng.uniform(100.0, 125.0)
    body_centre = np.array([rng.uniform(-10.0, 10.0), rng.uniform(-15.0, 5.0)])
    centre_z = rng.uniform(-40.0, 40.0)
    spine_radius = rng.uniform(14.0, 19.0)
    spine_centre = body_centre + np.array([0.0, -(semi_ap - spine_radius - rng.uniform(25, 35))])

    organ_semi_axes = np.array(
        [rng.uniform(55.0, 72.0), rng.uniform(50.0, 68.0), rng.uniform(60.0, 85.0)]
    )
    # Patient's right (RAS +x), somewhat anterior: where a liver sits.
    organ_centre = np.array(
        [
            body_centre[0] + semi_lr * rng.uniform(0.30, 0.38),
            body_centre[1] + semi_ap * rng.uniform(-0.05, 0.15),
            centre_z + rng.uniform(-15.0, 15.0),
        ]
    )
    rotation = _rotation(
        rng.uniform(-0.35, 0.35), rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15)
    )
    n_lesions = int(rng.integers(0, max_lesions + 1))
    return Anatomy(
        body_centre=(float(body_centre[0]), float(body_centre[1])),
        body_semi_axes=(float(semi_lr), float(semi_ap)),
        body_exponent=float(rng.uniform(2.0, 2.6)),
        body_profile=_random_waves(rng, 2, (150.0, 400.0), (0.02, 0.05), axes="z"),
        centre_z=float(centre_z),
        fat_thickness=float(rng.uniform(8.0, 25.0)),
        spine_centre=(float(spine_centre[0]), float(spine_centre[1])),
        spine_radius=float(spine_radius),
        disc_period=float(rng.uniform(28.0, 34.0)),
        disc_phase=float(rng.uniform(0.0, 1.0)),
        organ_centre=tuple(float(v) for v in organ_centre),
        organ_semi_axes=tuple(float(v) for v in organ_semi_axes),
        organ_rotation=tuple(tuple(float(v) for v in row) for row in rotation),
        organ_bumps=_random_waves(rng, 4, (1.5, 4.0), (0.03, 0.08)),
        organ_hu=float(rng.uniform(90.0, 110.0)),
        organ_texture=_random_waves(rng, 3, (15.0, 50.0), (2.0, 5.0)),
        tissue_texture=_random_waves(rng, 3, (20.0, 80.0), (3.0, 8.0)),
        lesions=_sample_lesions(rng, organ_centre, organ_semi_axes, rotation, n_lesions),
        noise_sigma_hu=float(rng.uniform(*noise_sigma_hu)),
    )


def follow_up(anatomy: Anatomy, rng: np.random.Generator) -> Anatomy:
    """The same patient months later: lesions grew or shrank, image noise differs."""
    lesions = tuple(
        replace(lesion, radii=tuple(float(r * g) for r in lesion.radii))
        for lesion, g in zip(
            anatomy.lesions, rng.uniform(0.7, 1.4, size=len(anatomy.lesions)), strict=True
        )
    )
    return replace(
        anatomy, lesions=lesions, noise_sigma_hu=float(rng.uniform(10.0, 20.0))
    )


def acquisition_affine(
    *,
    shape: Sequence[int],
    spacing: Sequence[float],
    orientation: Orientation,
    centre: Sequence[float],
    tilt_deg: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Voxel->RAS affine of a DICOM-like acquisition whose grid is centred on ``centre`` (mm).

    ``i`` runs along image rows, ``j`` down the columns and ``k`` along ``cross(i, j)``, the
    slice normal, as DICOM readers stack slices. ``oblique`` is an axial plane tilted by
    ``tilt_deg`` = (about left-right, about anterior-posterior) degrees.
    """
    if orientation == "oblique":
        row, col = (np.asarray(v) for v in _PLANES["axial"])
        tilt = _rotation(0.0, np.deg2rad(tilt_deg[0]), np.deg2rad(tilt_deg[1]))
        row, col = tilt @ row, tilt @ col
    elif orientation in _PLANES:
        row, col = (np.asarray(v) for v in _PLANES[orientation])
    else:
        raise ValueError(f"unknown orientation {orientation!r}")
    direction = np.stack([row, col, np.cross(row, col)], axis=1)
    linear = direction * np.asarray(spacing, dtype=np.float64)[None, :]
    half_extent = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = np.asarray(centre, dtype=np.float64) - linear @ half_extent
    return affine


def _body_masks(anatomy: Anatomy, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inside the body outline, inside the fat layer's inner boundary) for (N, 3) points."""
    scale = 1.0 + sum(
        (wave(points - np.array([0.0, 0.0, anatomy.centre_z])) for wave in anatomy.body_profile),
        start=np.zeros(len(points)),
    )
    dx = np.abs(points[:, 0] - anatomy.body_centre[0])
    dy = np.abs(points[:, 1] - anatomy.body_centre[1])
    a = anatomy.body_semi_axes[0] * scale
    b = anatomy.body_semi_axes[1] * scale
    p = anatomy.body_exponent
    body = (dx / a) ** p + (dy / b) ** p <= 1.0
    t = anatomy.fat_thickness
    inner = (dx / (a - t)) ** p + (dy / (b - t)) ** p <= 1.0
    return body, inner


def _organ_coordinates(anatomy: Anatomy, points: np.ndarray) -> np.ndarray:
    """Points in the organ's frame, scaled so the undeformed surface is the unit sphere."""
    rotation = np.asarray(anatomy.organ_rotation)
    local = (points - np.asarray(anatomy.organ_centre)) @ rotation  # (N, 3): R^T (p - c)
    return local / np.asarray(anatomy.organ_semi_axes)


def _organ_mask(anatomy: Anatomy, points: np.ndarray) -> np.ndarray:
    u = _organ_coordinates(anatomy, points)
    rho = np.linalg.norm(u, axis=1)
    unit = u / np.maximum(rho, 1e-9)[:, None]
    surface = 1.0 + sum((wave(unit) for wave in anatomy.organ_bumps), start=np.zeros(len(u)))
    return rho <= surface


def _lesion_masks(anatomy: Anatomy, points: np.ndarray) -> list[np.ndarray]:
    rotation = np.asarray(anatomy.organ_rotation)
    masks = []
    for lesion in anatomy.lesions:
        local = (points - np.asarray(lesion.centre)) @ rotation / np.asarray(lesion.radii)
        masks.append(np.einsum("ij,ij->i", local, local) <= 1.0)
    return masks


def _spine_mask(anatomy: Anatomy, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bone, intervertebral disc) masks: a vertebral body plus a spinous process."""
    sx, sy = anatomy.spine_centre
    r = anatomy.spine_radius
    vertebral_body = (points[:, 0] - sx) ** 2 + (points[:, 1] - sy) ** 2 <= r**2
    process = (np.abs(points[:, 0] - sx) <= 0.25 * r) & (
        (points[:, 1] < sy - 0.6 * r) & (points[:, 1] > sy - 2.4 * r)
    )
    cycle = np.mod(points[:, 2] / anatomy.disc_period + anatomy.disc_phase, 1.0)
    disc = vertebral_body & (cycle < 0.15)
    return (vertebral_body | process) & ~disc, disc


def render_points(anatomy: Anatomy, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free HU (float64) and labels (uint8) at world points ``(N, 3)`` in RAS mm."""
    body, inner = _body_masks(anatomy, points)
    hu = np.full(len(points), AIR_HU)
    tissue = SOFT_TISSUE_HU + sum(
        (wave(points) for wave in anatomy.tissue_texture), start=np.zeros(len(points))
    )
    hu[body] = FAT_HU
    hu[inner] = tissue[inner]

    bone, disc = _spine_mask(anatomy, points)
    bone &= inner
    disc &= inner
    hu[bone] = BONE_HU
    hu[disc] = DISC_HU

    organ = _organ_mask(anatomy, points) & inner & ~bone & ~disc
    organ_hu = anatomy.organ_hu + sum(
        (wave(points) for wave in anatomy.organ_texture), start=np.zeros(len(points))
    )
    hu[organ] = organ_hu[organ]
    label = np.zeros(len(points), dtype=np.uint8)
    label[organ] = LABEL_ORGAN

    for lesion, mask in zip(anatomy.lesions, _lesion_masks(anatomy, points), strict=True):
        inside = mask & organ
        hu[inside] = organ_hu[inside] + lesion.contrast_hu
        label[inside] = LABEL_LESION
    return hu, label


def render(
    anatomy: Anatomy, affine: np.ndarray, shape: Sequence[int], *, slab: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``anatomy`` at the voxel centres of the grid ``(affine, shape)``.

    Returns noise-free HU ``float32 [i, j, k]`` and labels ``uint8 [i, j, k]``. Works through the
    grid in slabs of ``slab`` slices to bound memory.
    """
    ni, nj, nk = (int(s) for s in shape)
    hu = np.empty((ni, nj, nk), dtype=np.float32)
    label = np.empty((ni, nj, nk), dtype=np.uint8)
    ii, jj = np.meshgrid(np.arange(ni), np.arange(nj), indexing="ij")
    for k0 in range(0, nk, slab):
        ks = np.arange(k0, min(k0 + slab, nk))
        index = np.stack(
            [
                np.broadcast_to(ii[..., None], (ni, nj, len(ks))),
                np.broadcast_to(jj[..., None], (ni, nj, len(ks))),
                np.broadcast_to(ks[None, None, :], (ni, nj, len(ks))),
            ],
            axis=-1,
        ).reshape(-1, 3)  # (N, 3) voxel indices
        points = index @ affine[:3, :3].T + affine[:3, 3]  # (N, 3) RAS mm
        slab_hu, slab_label = render_points(anatomy, points)
        hu[:, :, ks] = slab_hu.reshape(ni, nj, len(ks))
        label[:, :, ks] = slab_label.reshape(ni, nj, len(ks))
    return hu, label


def simulate_ct(
    anatomy: Anatomy,
    affine: np.ndarray,
    shape: Sequence[int],
    rng: np.random.Generator,
) -> tuple[Volume, Volume]:
    """A CT acquisition of ``anatomy`` on the grid ``(affine, shape)``.

    Returns ``(image, label)``: image ``float32`` HU with white Gaussian noise
    (``anatomy.noise_sigma_hu``), clipped to the CT range; label ``uint8`` (0 background,
    1 organ, 2 lesion) on the same grid.
    """
    clean, label = render(anatomy, affine, shape)
    noise = rng.normal(0.0, anatomy.noise_sigma_hu, size=clean.shape).astype(np.float32)
    image = np.clip(clean + noise, *CT_RANGE_HU).astype(np.float32)
    meta = {"modality": "CT"}
    return (
        Volume(image, affine.copy(), meta),
        Volume(label, affine.copy(), {"label_names": {str(k): v for k, v in LABEL_NAMES.items()}}),
    )
