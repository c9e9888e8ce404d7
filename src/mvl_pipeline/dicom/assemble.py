"""Assemble the slices of one DICOM series into a :class:`~mvl_pipeline.core.volume.Volume`.

Slices are ordered by ImagePositionPatient projected on the slice normal (never by
InstanceNumber or file name); ``array[i, j, k] = pixel_array_of_slice_k[j, i]``, in RAS, float32
after the modality LUT (HU for CT). Every way a series can be malformed (mixed sizes, missing
slices, uneven spacing, duplicate positions, inconsistent orientation) raises its own
:mod:`~mvl_pipeline.core.errors` class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mvl_pipeline.core.errors import (
    DuplicatePositionError,
    EmptySeriesError,
    InconsistentGeometryError,
    MissingSliceError,
    MixedSliceSizeError,
    TooFewSlicesError,
    UnevenSpacingError,
)
from mvl_pipeline.core.volume import Volume, lps_to_ras
from mvl_pipeline.dicom.decode import _Frames, _read_frames
from mvl_pipeline.dicom.read import Source

_ORIENTATION_TOLERANCE = 1e-3


_DUPLICATE_TOLERANCE_MM = 0.01


@dataclass(frozen=True)
class AssemblyReport:
    """What :func:`assemble_series` did (JSON-able via :meth:`as_dict`; also in ``meta``)."""

    n_files: int
    n_frames: int
    fast_path_files: int
    pydicom_files: int
    reordered: bool
    slice_step_mm: float
    gantry_tilt: bool

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _first(values: Iterable[Any]) -> Any:
    return next(iter(values))


def _validate_plane(
    files: Sequence[_Frames], frames: list[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray, tuple[float, float], tuple[int, int]]:
    """Orientation, normal, pixel spacing and size shared by every frame (else an error)."""
    sizes = {f.frame_shape for f in files}
    if len(sizes) > 1:
        raise MixedSliceSizeError(
            f"slices have different sizes (rows x columns): {sorted(sizes)}", path=files[0].name
        )
    orientations = [files[f].orientations[i] for f, i in frames]
    spacings = [files[f].pixel_spacings[i] for f, i in frames]
    positions = [files[f].positions[i] for f, i in frames]
    for (f, _), orientation, spacing, position in zip(
        frames, orientations, spacings, positions, strict=True
    ):
        missing = [
            keyword
            for keyword, value in (
                ("ImageOrientationPatient", orientation),
                ("PixelSpacing", spacing),
                ("ImagePositionPatient", position),
            )
            if value is None
        ]
        if missing:
            raise InconsistentGeometryError(
                f"no plane geometry ({', '.join(missing)} missing)", path=files[f].name
            )
    all_orientations, all_spacings = np.asarray(orientations), np.asarray(spacings)
    reference, spacing0 = all_orientations[0], all_spacings[0]
    differ = np.abs(all_orientations - reference).max(axis=1) > _ORIENTATION_TOLERANCE
    if differ.any():
        name = files[frames[int(np.argmax(differ))][0]].name
        raise InconsistentGeometryError("slices have different orientations", path=name)
    differ = (np.abs(all_spacings - spacing0) > 1e-5 + 1e-4 * np.abs(spacing0)).any(axis=1)
    if differ.any():
        name = files[frames[int(np.argmax(differ))][0]].name
        raise InconsistentGeometryError("slices have different pixel spacings", path=name)
    row_cosine, column_cosine = reference[:3], reference[3:]
    normal = np.cross(row_cosine, column_cosine)
    if not (0.99 < np.linalg.norm(normal) < 1.01) or abs(float(row_cosine @ column_cosine)) > 1e-3:
        raise InconsistentGeometryError(
            "ImageOrientationPatient is not two orthogonal unit vectors", path=files[0].name
        )
    return reference, normal, (float(spacing0[0]), float(spacing0[1])), _first(sizes)


def _slice_step(
    files: Sequence[_Frames],
    frames: list[tuple[int, int]],
    positions: np.ndarray,
    distances: np.ndarray,
    normal: np.ndarray,
    spacing_tolerance: float,
) -> np.ndarray:
    """The vector between consecutive slices, after checking duplicates, gaps and evenness."""
    names = [files[f].name for f, _ in frames]
    gaps = np.diff(distances)
    duplicate = np.flatnonzero(gaps < _DUPLICATE_TOLERANCE_MM)
    if duplicate.size:
        a, b = int(duplicate[0]), int(duplicate[0]) + 1
        acquisitions = {
            files[frames[a][0]].acquisition_numbers[frames[a][1]],
            files[frames[b][0]].acquisition_numbers[frames[b][1]],
        }
        what = (
            f"several acquisitions ({', '.join(sorted(acquisitions))})"
            if len(acquisitions) > 1
            else "several slices"
        )
        raise DuplicatePositionError(
            f"{what} at position {distances[a]:.3f} mm ({duplicate.size} duplicate(s))",
            path=names[b],
        )
    if len(distances) == 1:
        first = files[frames[0][0]]
        thickness = (
            first.attrs.get("SpacingBetweenSlices") or first.attrs.get("SliceThickness") or 1.0
        )
        return normal * float(thickness)
    # the regular step: the smallest gaps (a median would be fooled by missing slices)
    smallest = float(gaps.min())
    step = float(np.median(gaps[gaps <= smallest * (1 + 2 * spacing_tolerance)]))
    ratio = gaps / step
    for index, r in enumerate(ratio):
        if abs(r - 1.0) <= spacing_tolerance:
            continue
        k = round(float(r))
        if k >= 2 and abs(r - k) <= spacing_tolerance * k:
            raise MissingSliceError(
                f"{k - 1} slice(s) missing between {distances[index]:.3f} and "
                f"{distances[index + 1]:.3f} mm (regular step {step:.3f} mm)",
                path=names[index + 1],
            )
        raise UnevenSpacingError(
            f"slice gap {gaps[index]:.3f} mm differs from the regular step {step:.3f} mm",
            path=names[index + 1],
        )
    n = len(distances)
    vector = (positions[-1] - positions[0]) / (n - 1)
    expected = positions[0] + np.arange(n)[:, None] * vector[None, :]
    deviation = np.linalg.norm(positions - expected, axis=1)
    if float(deviation.max()) > max(spacing_tolerance * step, _DUPLICATE_TOLERANCE_MM):
        raise InconsistentGeometryError(
            f"slice positions do not lie on one line (off by {deviation.max():.3f} mm)",
            path=names[int(deviation.argmax())],
        )
    return vector


def _check_same_series(files: Sequence[_Frames]) -> None:
    for keyword in ("SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {f.attrs.get(keyword) for f in files}
        if len(values) > 1:
            raise InconsistentGeometryError(
                f"files from {len(values)} different {keyword} values in one series",
                path=files[0].name,
            )


def _assemble_frames(
    files: Sequence[_Frames],
    *,
    min_slices: int,
    spacing_tolerance: float,
    out: Callable[[tuple[int, ...]], np.ndarray] | None = None,
) -> Volume:
    """Sort, validate, rescale and stack the frames read from the files of one series."""
    if not files:
        raise EmptySeriesError("no image slices")
    _check_same_series(files)
    frames = [(f, i) for f, file_frames in enumerate(files) for i in range(file_frames.n_frames)]
    orientation, normal, pixel_spacing, (rows, cols) = _validate_plane(files, frames)
    positions = np.array([files[f].positions[i] for f, i in frames], dtype=np.float64)
    distances = positions @ normal
    order = np.argsort(distances, kind="stable")
    if len(order) < min_slices:
        raise TooFewSlicesError(
            f"{len(order)} slice(s), at least {min_slices} needed", path=files[0].name
        )
    frames = [frames[index] for index in order]
    positions, distances = positions[order], distances[order]
    step = _slice_step(files, frames, positions, distances, normal, spacing_tolerance)

    shape = (len(frames), rows, cols)
    volume = out(shape) if out is not None else np.empty(shape, dtype=np.float32)
    scratch = bytearray(max((f.ref.nbytes for f in files if f.ref is not None), default=0))
    for k, (f, i) in enumerate(frames):
        # one cast-copy plus in-place rescale; the scratch buffer is reused (no page faults)
        target = volume[k]
        np.copyto(target, files[f].stored(i, scratch), casting="unsafe")
        slope, intercept = files[f].slopes[i], files[f].intercepts[i]
        if slope != 1.0:
            target *= np.float32(slope)
        if intercept != 0.0:
            target += np.float32(intercept)

    affine_lps = np.eye(4)
    affine_lps[:3, 0] = orientation[:3] * pixel_spacing[1]
    affine_lps[:3, 1] = orientation[3:] * pixel_spacing[0]
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = positions[0]
    first = files[frames[0][0]].attrs
    syntaxes = sorted({f.attrs.get("TransferSyntaxUID") or "" for f in files})
    step_along_normal = float(step @ normal)
    report = AssemblyReport(
        n_files=len(files),
        n_frames=len(frames),
        fast_path_files=sum(f.fast for f in files),
        pydicom_files=sum(not f.fast for f in files),
        reordered=bool(np.any(order != np.arange(len(order)))),
        slice_step_mm=step_along_normal,
        gantry_tilt=bool(np.linalg.norm(step - normal * step_along_normal) > 1e-3),
    )
    meta = {
        "modality": first.get("Modality"),
        "sop_class_uid": first.get("SOPClassUID"),
        "study_instance_uid": first.get("StudyInstanceUID"),
        "series_instance_uid": first.get("SeriesInstanceUID"),
        "frame_of_reference_uid": first.get("FrameOfReferenceUID"),
        "rows": rows,
        "columns": cols,
        "n_slices": len(frames),
        "photometric_interpretation": first.get("PhotometricInterpretation"),
        "burned_in_annotation": first.get("BurnedInAnnotation"),
        "rescale_type": first.get("RescaleType"),
        "transfer_syntax": syntaxes[0] if len(syntaxes) == 1 else syntaxes,
        "slice_positions": [float(d) for d in distances],
        "assembly": report.as_dict(),
    }
    # (k, row=j, column=i) -> (i, j, k): a transposed view, no copy
    return Volume(volume.transpose(2, 1, 0), lps_to_ras(affine_lps), meta)


def assemble_series(
    sources: Iterable[Source],
    *,
    min_slices: int = 3,
    spacing_tolerance: float = 0.01,
) -> Volume:
    """Assemble the files (paths, bytes, ``(name, bytes)``, file objects or data sets) of one series.

    ``spacing_tolerance`` is relative to the regular slice step: a gap within it counts as
    regular, a gap of about k steps as k-1 missing slices, anything else as uneven spacing.
    The volume's ``array`` is float32 (HU for CT) and a transposed view of a C-ordered
    ``(slice, row, column)`` block; ``meta["assembly"]`` is an :class:`AssemblyReport` dict.
    """
    files = [_read_frames(source) for source in sources]
    return _assemble_frames(files, min_slices=min_slices, spacing_tolerance=spacing_tolerance)
