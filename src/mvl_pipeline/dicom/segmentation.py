"""Write a label volume as a DICOM SEG on its source series (single- or multi-frame images).

Deterministic as ``dicom.write``: the same inputs give byte-identical files (highdicom's own
timestamps and Dimension Organization UID are overwritten). A SEG of reference labels marks its
segments ``MANUAL``; one of a model's output ``AUTOMATIC``, with the algorithm identified.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from mvl_pipeline.core.errors import LabelGridMismatchError, UnknownLabelValueError
from mvl_pipeline.core.volume import Volume
from mvl_pipeline.dicom.write import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    make_uid,
    slice_geometry,
)


def _code(name: str):
    """A SNOMED CT code from pydicom's code dictionary by its meaning (``"Liver"``, ``"Tissue"``),
    or a local code ``99MVL`` when the dictionary has none."""
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    attribute = "".join(part[:1].upper() + part[1:] for part in name.replace("-", " ").split())
    try:
        return getattr(codes.SCT, attribute)
    except AttributeError:
        return Code(
            value=attribute.upper()[:16] or "UNKNOWN", scheme_designator="99MVL", meaning=name
        )


def _frame_positions(ds: Dataset) -> list[Any]:
    """The ImagePositionPatient of each frame of a source image: its own for a single-frame one,
    each frame's plane position (per-frame or shared functional group) for a multi-frame one."""
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" not in ds and "SharedFunctionalGroupsSequence" not in ds:
        return [ds.ImagePositionPatient] * n_frames if n_frames == 1 else []
    from mvl_pipeline.dicom.decode import functional_item

    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    positions = []
    for index in range(n_frames):
        plane = functional_item(ds, per_frame[index] if index < len(per_frame) else None, "PlanePositionSequence")
        positions.append((plane or ds).get("ImagePositionPatient"))
    return positions


def _source_slice_order(label: Volume, source_images: Sequence[Dataset]) -> list[int]:
    """For each frame of each source image (in order), the k index of ``label`` it lies on
    (error if not on the grid)."""
    geometry = slice_geometry(label)
    inverse = np.linalg.inv(geometry.affine_lps)
    order = []
    for ds in source_images:
        if (int(ds.Rows), int(ds.Columns)) != (label.shape[1], label.shape[0]):
            raise LabelGridMismatchError("source image size differs from the label grid")
        positions = _frame_positions(ds)
        if not positions or any(p is None for p in positions):
            raise LabelGridMismatchError("a source image has no position for each of its frames")
        for position in positions:
            ijk = inverse @ np.array([*map(float, position), 1.0])
            k = int(round(ijk[2]))
            if not np.allclose(ijk[:3], (0.0, 0.0, k), atol=1e-3) or not 0 <= k < label.shape[2]:
                raise LabelGridMismatchError("a source image does not lie on a slice of the label grid")
            order.append(k)
    return order


def write_segmentation(
    label: Volume,
    *,
    source_images: Sequence[Dataset],
    segments: Sequence[tuple[int, str, str]],
    uids: tuple[str, str, int],
    header_overrides: Mapping[str, Any] | None = None,
    algorithm: tuple[str, str] | None = None,
) -> Dataset:
    """A BINARY multi-segment DICOM SEG of ``label`` (integer labels on the source series grid).

    ``segments`` are ``(label value, name, category)``, e.g. ``(1, "Liver", "Organ")``; label
    values must be 1..N (they become the segment numbers, so :func:`read_segmentation
    <mvl_pipeline.dicom.labels.read_segmentation>` restores them exactly). ``uids`` is
    ``(series_instance_uid, sop_instance_uid, series_number)``. Content and instance-creation
    date/time are the study's, so the output is deterministic. ``header_overrides`` (DICOM
    keywords) are set last, e.g. ``{"SeriesDescription": "reference labels"}``. ``algorithm``
    ``(name, version)``: the segments are a model's output (``AUTOMATIC``, the algorithm
    identified as artificial intelligence); without it they are reference labels (``MANUAL``).
    """
    import highdicom as hd  # slow to import: only when a SEG is written

    values = sorted(int(value) for value, _, _ in segments)
    if values != list(range(1, len(values) + 1)):
        raise ValueError(f"segment label values must be 1..N, got {values}")
    unique = np.unique(label.array)
    if not np.array_equal(unique, np.round(unique)):
        raise ValueError("label volume has non-integer values")
    present = {int(v) for v in unique} - {0}
    if present - set(values):
        raise UnknownLabelValueError(
            f"label values {sorted(present - set(values))} have no segment"
        )
    if not source_images:
        raise ValueError("write_segmentation needs the source image data sets")
    order = _source_slice_order(label, source_images)
    labels = np.asarray(label.array)
    frames = np.stack([labels[:, :, k].T for k in order]).astype(np.uint8)  # (frames, rows, cols)

    if algorithm is None:
        algorithm_type, identification = hd.seg.SegmentAlgorithmTypeValues.MANUAL, None
    else:
        from pydicom.sr.codedict import codes

        name, version = algorithm
        algorithm_type = hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        identification = hd.AlgorithmIdentificationSequence(
            name=name[:64], family=codes.cid7162.ArtificialIntelligence, version=version[:64]
        )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=int(value),
            segment_label=name,
            segmented_property_category=_code(category),
            segmented_property_type=_code(name),
            algorithm_type=algorithm_type,
            algorithm_identification=identification,
        )
        for value, name, category in sorted(segments)
    ]
    series_uid, sop_uid, series_number = uids
    first = source_images[0]
    study_date = str(first.get("StudyDate", "") or "19000101")
    study_time = str(first.get("StudyTime", "") or "000000")
    seg = hd.seg.Segmentation(
        source_images=list(source_images),
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=int(series_number),
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="mvl_pipeline",
        manufacturer_model_name="mvl_pipeline",
        software_versions="1",
        device_serial_number="0",
        content_date=study_date,
        content_time=study_time,
        content_label="LABELS",
    )
    _make_deterministic(seg, sop_uid, f"{study_date}{study_time}")
    for keyword, value in (header_overrides or {}).items():
        setattr(seg, keyword, value)
    seg.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    seg.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    seg.preamble = b"\x00" * 128
    return seg


def _make_deterministic(seg: Dataset, sop_uid: str, study_datetime: str) -> None:
    """Overwrite what highdicom derives from the clock or a random UID."""
    seg.InstanceCreationDate = study_datetime[:8]
    seg.InstanceCreationTime = study_datetime[8:]
    dimension_uid = make_uid("dimension-organization", sop_uid)
    for item in seg.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = dimension_uid
    for item in seg.get("DimensionIndexSequence", []):
        item.DimensionOrganizationUID = dimension_uid
    for item in seg.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = study_datetime
