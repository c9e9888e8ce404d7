"""DICOM label objects -> integer label volumes on the grid of their image series.

- :func:`read_segmentation`: a DICOM SEG (BINARY, FRACTIONAL or LABELMAP) -> label volume, each
  frame placed by its Plane Position on the reference grid (frames may be missing, e.g. empty
  ones omitted, or cover only part of the grid).
- :func:`rasterise_rtstruct`: an RT Structure Set's CLOSED_PLANAR contours -> label volume
  (voxel centres inside the polygon, holes by even-odd rule).

Both return ``(label_volume, {label value: name})``; the label volume has the reference's
affine, so ``label.same_grid(reference)`` holds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from mvl_pipeline.core.errors import LabelGridMismatchError, UnreadableFileError
from mvl_pipeline.core.volume import Volume, lps_to_ras

log = logging.getLogger(__name__)

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
_POSITION_TOLERANCE_VOXELS = 0.05
_DIRECTION_TOLERANCE = 1e-3
_BOUNDARY_VOXELS = 1e-3


def referenced_series_uids(ds: Dataset) -> list[str]:
    """The image series a SEG or RTSTRUCT refers to (Series Instance UIDs, in file order)."""
    uids: list[str] = []
    if str(ds.get("SOPClassUID", "")) == RT_STRUCTURE_SET_STORAGE:
        for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
            for study in frame.get("RTReferencedStudySequence", []):
                uids.extend(
                    str(s.SeriesInstanceUID) for s in study.get("RTReferencedSeriesSequence", [])
                )
    else:
        uids.extend(str(s.SeriesInstanceUID) for s in ds.get("ReferencedSeriesSequence", []))
    return list(dict.fromkeys(uid for uid in uids if uid))


def _grid(reference: Volume) -> tuple[np.ndarray, np.ndarray]:
    """The reference's voxel->LPS affine and its inverse."""
    affine_lps = lps_to_ras(reference.affine)
    return affine_lps, np.linalg.inv(affine_lps)


def _label_dtype(max_label: int) -> type:
    return np.uint8 if max_label < 256 else np.uint16


def _item(groups: Dataset | None, sequence: str) -> Dataset | None:
    if groups is not None and sequence in groups and len(groups[sequence].value):
        return groups[sequence].value[0]
    return None


def _frame_attribute(seg: Dataset, per_frame: Dataset | None, sequence: str, keyword: str) -> Any:
    shared = (seg.get("SharedFunctionalGroupsSequence") or [None])[0]
    for groups in (per_frame, shared):
        item = _item(groups, sequence)
        if item is not None and keyword in item:
            return item.get(keyword)
    return seg.get(keyword)


def _segment_names(seg: Dataset) -> dict[int, str]:
    return {
        int(item.SegmentNumber): str(
            item.get("SegmentLabel", "") or f"segment {item.SegmentNumber}"
        )
        for item in seg.get("SegmentSequence", [])
    }


def read_segmentation(seg_ds: Dataset, reference: Volume) -> tuple[Volume, dict[int, str]]:
    """A DICOM SEG as an integer label volume (segment numbers) on ``reference``'s grid.

    Where segments overlap, the highest segment number wins. Raises
    :class:`LabelGridMismatchError` when a frame's orientation, pixel spacing or position does not
    fit the reference grid (checked geometrically, so no SOP Instance UIDs are needed).
    """
    import highdicom as hd

    if str(seg_ds.get("SOPClassUID", "")) != SEGMENTATION_STORAGE:
        raise UnreadableFileError("not a DICOM SEG (Segmentation Storage)")
    # the errors' own messages are not kept: a library's message may quote a header value
    try:
        seg = hd.seg.Segmentation.from_dataset(seg_ds, copy=True)  # validates; input left untouched
    except (ValueError, AttributeError, KeyError, TypeError, IndexError) as exc:
        raise UnreadableFileError(f"not a valid DICOM SEG ({type(exc).__name__} in highdicom)") from exc
    names = _segment_names(seg)
    segmentation_type = str(seg.SegmentationType)
    try:
        frames = np.asarray(seg.pixel_array)
    except (ValueError, AttributeError, KeyError, TypeError, IndexError) as exc:
        raise UnreadableFileError(
            f"the SEG's pixel data does not fit its frames (truncated, or a wrong Number of Frames: {type(exc).__name__})"
        ) from exc
    if frames.ndim == 2:
        frames = frames[None]
    per_frame = seg.get("PerFrameFunctionalGroupsSequence") or [None] * frames.shape[0]
    if len(per_frame) != frames.shape[0]:
        raise UnreadableFileError(f"{len(per_frame)} per-frame items for {frames.shape[0]} frames")

    affine_lps, inverse = _grid(reference)
    nx, ny, nz = reference.shape
    spacing_i, spacing_j = np.linalg.norm(affine_lps[:3, 0]), np.linalg.norm(affine_lps[:3, 1])
    direction_i, direction_j = affine_lps[:3, 0] / spacing_i, affine_lps[:3, 1] / spacing_j
    labels = np.zeros(reference.shape, dtype=_label_dtype(max(names, default=1)))
    max_fraction = float(seg.get("MaximumFractionalValue", 1) or 1)

    order = sorted(
        range(frames.shape[0]), key=lambda f: _segment_number(seg, per_frame[f], segmentation_type)
    )
    for f in order:
        groups = per_frame[f]
        orientation = _frame_attribute(
            seg, groups, "PlaneOrientationSequence", "ImageOrientationPatient"
        )
        spacing = _frame_attribute(seg, groups, "PixelMeasuresSequence", "PixelSpacing")
        position = _frame_attribute(seg, groups, "PlanePositionSequence", "ImagePositionPatient")
        if orientation is None or spacing is None or position is None:
            raise LabelGridMismatchError(f"SEG frame {f + 1} has no plane geometry")
        orientation = np.asarray([float(v) for v in orientation])
        if not (
            np.allclose(orientation[:3], direction_i, atol=_DIRECTION_TOLERANCE)
            and np.allclose(orientation[3:], direction_j, atol=_DIRECTION_TOLERANCE)
        ):
            raise LabelGridMismatchError(
                f"SEG frame {f + 1} orientation differs from the image grid"
            )
        if not np.allclose([float(v) for v in spacing], (spacing_j, spacing_i), rtol=1e-3):
            raise LabelGridMismatchError(
                f"SEG frame {f + 1} pixel spacing differs from the image grid"
            )
        ijk = inverse @ np.array([*(float(v) for v in position), 1.0])
        corner = np.rint(ijk[:3]).astype(int)
        rows, cols = frames.shape[1:]
        i0, j0, k = (int(v) for v in corner)
        if np.abs(ijk[:3] - corner).max() > _POSITION_TOLERANCE_VOXELS or not (
            0 <= k < nz and 0 <= i0 and i0 + cols <= nx and 0 <= j0 and j0 + rows <= ny
        ):
            raise LabelGridMismatchError(
                f"SEG frame {f + 1} does not lie on a slice of the image grid"
            )
        frame = frames[f].T  # (row=j, column=i) -> (i, j)
        target = labels[i0 : i0 + cols, j0 : j0 + rows, k]
        if segmentation_type == "LABELMAP":
            np.copyto(target, frame, where=frame > 0, casting="unsafe")
        elif segmentation_type == "FRACTIONAL":
            target[frame.astype(np.float32) / max_fraction >= 0.5] = _segment_number(
                seg, groups, segmentation_type
            )
        else:
            target[frame > 0] = _segment_number(seg, groups, segmentation_type)
    meta = {
        "label_names": {str(k): v for k, v in names.items()},
        "label_source": "SEG",
        "segmentation_type": segmentation_type,
        "series_instance_uid": str(seg.get("SeriesInstanceUID", "")),
    }
    return Volume(labels, reference.affine.copy(), meta), names


def _segment_number(seg: Dataset, groups: Dataset | None, segmentation_type: str) -> int:
    if segmentation_type == "LABELMAP":
        return 0
    item = _item(groups, "SegmentIdentificationSequence")
    if item is None:
        item = _item(
            (seg.get("SharedFunctionalGroupsSequence") or [None])[0],
            "SegmentIdentificationSequence",
        )
    if item is None:
        raise UnreadableFileError("SEG frame without Segment Identification")
    return int(item.ReferencedSegmentNumber)


def _polygon_mask(points_ij: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Voxel centres inside (or on) a closed polygon given in voxel coordinates (i, j)."""
    from matplotlib.path import Path

    mask = np.zeros(shape, dtype=bool)
    low = np.clip(np.floor(points_ij.min(axis=0)).astype(int), 0, np.array(shape) - 1)
    high = np.clip(np.ceil(points_ij.max(axis=0)).astype(int), 0, np.array(shape) - 1)
    if np.any(points_ij.max(axis=0) < 0) or np.any(points_ij.min(axis=0) > np.array(shape) - 1):
        return mask
    ii, jj = np.meshgrid(
        np.arange(low[0], high[0] + 1), np.arange(low[1], high[1] + 1), indexing="ij"
    )
    centres = np.column_stack([ii.ravel(), jj.ravel()]).astype(np.float64)
    path = Path(points_ij)
    # centres on the boundary (within rounding of the contour coordinates) count as inside; the
    # sign of matplotlib's radius depends on the polygon's winding, so take both
    inside = path.contains_points(centres, radius=_BOUNDARY_VOXELS) | path.contains_points(
        centres, radius=-_BOUNDARY_VOXELS
    )
    mask[low[0] : high[0] + 1, low[1] : high[1] + 1] = inside.reshape(ii.shape)
    return mask


def rasterise_rtstruct(rt_ds: Dataset, reference: Volume) -> tuple[Volume, dict[int, str]]:
    """An RTSTRUCT's CLOSED_PLANAR contours as a label volume on ``reference``'s grid.

    ROIs get labels 1..N in StructureSetROISequence order (later ROIs overwrite earlier ones
    where they overlap); within one ROI and slice, contours combine by the even-odd rule, so an
    inner contour is a hole. POINT and OPEN_PLANAR contours are skipped (counted in ``meta``).
    A contour off the slice planes raises :class:`LabelGridMismatchError`.
    """
    if str(rt_ds.get("SOPClassUID", "")) != RT_STRUCTURE_SET_STORAGE:
        raise UnreadableFileError("not an RT Structure Set")
    rois: Sequence[Dataset] = rt_ds.get("StructureSetROISequence", [])
    label_of = {int(roi.ROINumber): index + 1 for index, roi in enumerate(rois)}
    names = {
        label_of[int(roi.ROINumber)]: str(roi.get("ROIName", "") or f"roi {roi.ROINumber}")
        for roi in rois
    }
    _, inverse = _grid(reference)
    nx, ny, nz = reference.shape
    labels = np.zeros(reference.shape, dtype=_label_dtype(max(names, default=1)))
    skipped = 0
    contours_by_label = sorted(
        (
            (label_of.get(int(item.ReferencedROINumber)), item)
            for item in rt_ds.get("ROIContourSequence", [])
        ),
        key=lambda pair: pair[0] or 0,
    )
    for label, item in contours_by_label:
        if label is None:
            raise UnreadableFileError(
                f"contour for an undeclared ROI number {item.ReferencedROINumber}"
            )
        per_slice: dict[int, np.ndarray] = {}
        for contour in item.get("ContourSequence", []):
            if str(contour.get("ContourGeometricType", "")) != "CLOSED_PLANAR":
                skipped += 1
                continue
            points = np.asarray([float(v) for v in contour.ContourData], dtype=np.float64).reshape(
                -1, 3
            )
            ijk = (inverse @ np.column_stack([points, np.ones(len(points))]).T).T[:, :3]
            k = int(np.rint(ijk[:, 2].mean()))
            if np.abs(ijk[:, 2] - k).max() > 0.25 or not 0 <= k < nz:
                raise LabelGridMismatchError(
                    f"a contour of ROI '{names[label]}' is not on a slice of the image grid"
                )
            mask = _polygon_mask(ijk[:, :2], (nx, ny))
            per_slice[k] = per_slice[k] ^ mask if k in per_slice else mask
        for k, mask in per_slice.items():
            labels[:, :, k][mask] = label
    meta = {
        "label_names": {str(k): v for k, v in names.items()},
        "label_source": "RTSTRUCT",
        "skipped_contours": skipped,
    }
    return Volume(labels, reference.affine.copy(), meta), names
