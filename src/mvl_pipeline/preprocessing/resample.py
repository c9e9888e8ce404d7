"""Resampling a voxel grid to a new spacing: separable, exact about voxel centres, label-safe.

Grid convention (the same as MONAI's ``Spacing`` with its default ``scale_extent=False``): the
centre of voxel 0 stays where it is, the new grid has spacing ``t`` and
``round((n - 1) * s / t + 1)`` voxels (numpy rounding, halves to even) along an axis of ``n`` voxels of spacing ``s``, and output
voxel ``j`` samples the input at index ``j * t / s``. Positions past the last input centre take
the border value (MONAI's ``padding_mode="border"``). With this convention an integer-factor
upsampling puts every input centre exactly on an output centre, which is what lets a label
survive a round trip bit for bit (:mod:`mvl_pipeline.preprocessing.apply`).

Every resampling here is a tensor product of 1-D samplings along the axes, so linear
interpolation is done axis by axis (three cheap passes, shrinking axes first) instead of as a
general 3-D grid sample; ``cubic`` uses scipy's order-3 B-spline (prefiltered) through
``scipy.ndimage.affine_transform``'s diagonal fast path.

Labels are never interpolated linearly on their values: ``nearest`` picks the nearest voxel and
``onehot_linear`` interpolates each label's indicator linearly and takes the argmax, so the
output only ever contains values present in the input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

ImageMode = Literal["nearest", "linear", "cubic"]
LabelMode = Literal["nearest", "onehot_linear"]
IMAGE_MODES: tuple[str, ...] = ("nearest", "linear", "cubic")
LABEL_MODES: tuple[str, ...] = ("nearest", "onehot_linear")


def resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
) -> tuple[int, ...]:
    """Number of voxels per axis on the target grid (voxel-centre convention, see module doc)."""
    return tuple(
        max(1, int(np.round((int(n) - 1) * float(s) / float(t) + 1.0)))
        for n, s, t in zip(shape, spacing, target_spacing, strict=True)
    )


def spacing_scale(spacing: Sequence[float], target_spacing: Sequence[float]) -> tuple[float, ...]:
    """Input index step per output voxel, ``t / s`` per axis."""
    return tuple(float(t) / float(s) for s, t in zip(spacing, target_spacing, strict=True))


def _positions(n_out: int, scale: float, offset: float, n_in: int) -> np.ndarray:
    return np.clip(offset + np.arange(n_out, dtype=np.float64) * scale, 0.0, n_in - 1.0)


def _nearest_indices(n_out: int, scale: float, offset: float, n_in: int) -> np.ndarray:
    # floor(x + 0.5): ties go up, the same way for the forward and the inverse mapping
    x = _positions(n_out, scale, offset, n_in)
    return np.minimum(np.floor(x + 0.5).astype(np.intp), n_in - 1)


def _lerp_axis(array: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of ``array`` (float32) at positions ``x`` along ``axis``."""
    n = array.shape[axis]
    if n == 1:
        return np.take(array, np.zeros(len(x), dtype=np.intp), axis=axis)
    i0 = np.minimum(np.floor(x).astype(np.intp), n - 2)
    w = (x - i0).astype(np.float32)
    if not np.any(w):
        return np.take(array, i0, axis=axis)
    lo = np.take(array, i0, axis=axis)
    hi = np.take(array, i0 + 1, axis=axis)
    shape = [1] * array.ndim
    shape[axis] = len(x)
    hi -= lo
    hi *= w.reshape(shape)
    lo += hi
    return lo


def resample_array(
    array: np.ndarray,
    out_shape: Sequence[int],
    scale: Sequence[float],
    mode: str = "linear",
    *,
    offset: Sequence[float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """Sample ``array`` at input indices ``offset + j * scale`` for ``j`` over ``out_shape``.

    ``nearest`` keeps the dtype; ``linear`` and ``cubic`` return float32. Out-of-range positions
    take the border value.
    """
    if mode not in IMAGE_MODES:
        raise ValueError(f"image interpolation must be one of {IMAGE_MODES}, got {mode!r}")
    if array.ndim != len(out_shape) or len(scale) != array.ndim or len(offset) != array.ndim:
        raise ValueError("array, out_shape, scale and offset must have the same number of axes")
    out_shape = tuple(int(n) for n in out_shape)
    if mode == "nearest":
        index = [
            _nearest_indices(m, float(s), float(o), n)
            for m, s, o, n in zip(out_shape, scale, offset, array.shape, strict=True)
        ]
        return array[np.ix_(*index)]
    if mode == "cubic":
        from scipy import ndimage

        return ndimage.affine_transform(
            np.asarray(array, dtype=np.float32),
            np.asarray(scale, dtype=np.float64),
            offset=np.asarray(offset, dtype=np.float64),
            output_shape=out_shape,
            order=3,
            mode="nearest",
            prefilter=True,
        ).astype(np.float32, copy=False)
    result = np.asarray(array, dtype=np.float32)
    # Shrinking axes first keeps the intermediate arrays small.
    order = np.argsort([m / n for m, n in zip(out_shape, array.shape, strict=True)], kind="stable")
    for axis in order:
        axis = int(axis)
        n_in, m = array.shape[axis], out_shape[axis]
        if m == n_in and scale[axis] == 1.0 and offset[axis] == 0.0:
            continue
        result = _lerp_axis(
            result, _positions(m, float(scale[axis]), float(offset[axis]), n_in), axis
        )
    if result is array:  # identity: never hand back the caller's array
        result = result.copy()
    return result


def resample_label(
    array: np.ndarray,
    out_shape: Sequence[int],
    scale: Sequence[float],
    mode: str = "nearest",
    *,
    offset: Sequence[float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """Resample an integer label map; the output holds only values present in ``array``.

    ``nearest``: nearest voxel. ``onehot_linear``: each label's indicator is interpolated
    linearly and the label with the largest weight wins (ties: the smaller label value).
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"label interpolation must be one of {LABEL_MODES}, got {mode!r}")
    if not np.issubdtype(array.dtype, np.integer) and not np.issubdtype(array.dtype, np.bool_):
        raise TypeError(f"label maps must have an integer dtype, got {array.dtype}")
    if mode == "nearest":
        return resample_array(array, out_shape, scale, "nearest", offset=offset)
    values = np.unique(array)
    best = np.full(tuple(int(n) for n in out_shape), -1.0, dtype=np.float32)
    result = np.full(best.shape, values[0], dtype=array.dtype)
    for value in values:
        weight = resample_array(
            (array == value).astype(np.float32), out_shape, scale, "linear", offset=offset
        )
        better = weight > best
        result[better] = value
        best[better] = weight[better]
    return result


def resample_to_spacing(
    array: np.ndarray,
    spacing: Sequence[float],
    target_spacing: Sequence[float],
    mode: str = "linear",
    *,
    is_label: bool = False,
) -> np.ndarray:
    """Resample ``array`` (voxel spacing ``spacing``) onto the grid of spacing ``target_spacing``."""
    out_shape = resampled_shape(array.shape, spacing, target_spacing)
    scale = spacing_scale(spacing, target_spacing)
    if is_label:
        return resample_label(array, out_shape, scale, mode)
    return resample_array(array, out_shape, scale, mode)


def resampled_affine(
    affine: np.ndarray, spacing: Sequence[float], target_spacing: Sequence[float]
) -> np.ndarray:
    """Affine of the resampled grid: same voxel-0 centre, axis vectors scaled to the new spacing."""
    out = np.asarray(affine, dtype=np.float64).copy()
    out[:3, :3] = out[:3, :3] * np.asarray(spacing_scale(spacing, target_spacing))[None, :]
    return out


# -- one grid onto another (the channels of a study: preprocessing/channels.py) ----------------
def grid_mapping(affine: np.ndarray, reference_affine: np.ndarray) -> np.ndarray:
    """4x4 map from a voxel index of the reference grid to the (fractional) index of the grid
    ``affine`` at the same point in world millimetres."""
    return np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.asarray(reference_affine, dtype=np.float64)


def _inside(positions: np.ndarray, n: int) -> np.ndarray:
    """Positions within half a voxel of the first and last voxel centres (the field of view)."""
    return (positions >= -0.5) & (positions <= n - 0.5)


def resample_onto(
    array: np.ndarray,
    affine: np.ndarray,
    reference_shape: Sequence[int],
    reference_affine: np.ndarray,
    *,
    mode: str = "linear",
    is_label: bool = False,
    fill: float | None = None,
) -> tuple[np.ndarray, float]:
    """Sample ``array`` (on the grid ``affine``) at the voxel centres of the reference grid, in
    world coordinates. Returns ``(array on the reference grid, coverage)``: the fraction of the
    reference voxels inside ``array``'s field of view. Voxels outside it get ``fill`` (default:
    the array's minimum; 0 for labels).

    Grids that differ by axis permutations, flips, spacing and origin (every pair of axial,
    coronal and sagittal series of one study) take the separable path above; an oblique pair is
    sampled point by point, one reference slice at a time.
    """
    shape = tuple(int(n) for n in reference_shape)
    mapping = grid_mapping(affine, reference_affine)
    matrix, shift = mapping[:3, :3], mapping[:3, 3]
    nonzero = np.abs(matrix) > 1e-6 * max(float(np.abs(matrix).max()), 1.0)
    if fill is None:
        fill = 0.0 if is_label else float(np.min(array))
    if (nonzero.sum(axis=0) == 1).all() and (nonzero.sum(axis=1) == 1).all():
        source_axes = [int(np.argmax(nonzero[:, r])) for r in range(3)]
        moved = np.transpose(array, source_axes)  # axis r runs along reference axis r
        scale, offset, inside = [], [], []
        for r, s in enumerate(source_axes):
            step, start, n = float(matrix[s, r]), float(shift[s]), int(array.shape[s])
            if step < 0:  # flip the source axis so that positions grow with the reference index
                moved = np.flip(moved, axis=r)
                step, start = -step, (n - 1) - start
            scale.append(step)
            offset.append(start)
            inside.append(_inside(start + np.arange(shape[r]) * step, n))
        if is_label:
            out = resample_label(moved, shape, scale, mode, offset=offset)
        else:
            out = resample_array(moved, shape, scale, mode, offset=offset)
        mask = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    else:
        out, mask = _resample_general(array, mapping, shape, "nearest" if is_label else mode)
    if not mask.all():
        out = np.where(mask, out, np.asarray(fill, dtype=out.dtype))
    return np.ascontiguousarray(out), float(mask.mean())


def _resample_general(
    array: np.ndarray, mapping: np.ndarray, shape: tuple[int, ...], mode: str
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest or trilinear sampling at ``mapping @ index`` for every reference voxel."""
    n_in = np.asarray(array.shape, dtype=np.float64)
    source = array if mode == "nearest" else np.asarray(array, dtype=np.float32)
    out = np.empty(shape, dtype=source.dtype)
    mask = np.empty(shape, dtype=bool)
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    plane = np.stack([ii.ravel(), jj.ravel(), np.zeros(ii.size)]).astype(np.float64)  # (3, N)
    for k in range(shape[2]):
        plane[2] = k
        points = mapping[:3, :3] @ plane + mapping[:3, 3:4]  # (3, N) source indices
        mask[:, :, k] = np.all((points >= -0.5) & (points <= n_in[:, None] - 0.5), axis=0).reshape(shape[:2])
        points = np.clip(points, 0.0, n_in[:, None] - 1.0)
        if mode == "nearest":
            index = np.minimum(np.floor(points + 0.5).astype(np.intp), (n_in[:, None] - 1).astype(np.intp))
            out[:, :, k] = source[index[0], index[1], index[2]].reshape(shape[:2])
            continue
        low = np.minimum(np.floor(points).astype(np.intp), np.maximum(n_in[:, None] - 2, 0).astype(np.intp))
        weight = (points - low).astype(np.float32)
        high = np.minimum(low + 1, (n_in[:, None] - 1).astype(np.intp))
        value = np.zeros(points.shape[1], dtype=np.float32)
        for corner in range(8):
            bits = [(corner >> axis) & 1 for axis in range(3)]
            index = [high[a] if bits[a] else low[a] for a in range(3)]
            w = np.prod([weight[a] if bits[a] else 1.0 - weight[a] for a in range(3)], axis=0)
            value += w * source[index[0], index[1], index[2]]
        out[:, :, k] = value.reshape(shape[:2])
    return out, mask
