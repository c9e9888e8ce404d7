"""Write volumes as DICOM: single-frame CT/MR image series (DICOM SEG: ``dicom.segmentation``).

Everything here is deterministic: the same inputs give byte-identical files (no ``now()``, no
random UIDs; highdicom's own timestamps and Dimension Organization UID are overwritten). UIDs come
from :func:`make_uid` (``2.25.<int>`` from a name-based UUID over the seed material).

Geometry: ``Volume.affine`` (voxel -> RAS) is converted to LPS; the i axis becomes the DICOM row
direction (first ImageOrientationPatient triplet, spacing ``PixelSpacing[1]``), j the column
direction (``PixelSpacing[0]``), and slice k has ``ImagePositionPatient = A_lps @ (0, 0, k, 1)``.
"""

from __future__ import annotations

import io
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

from mvl_pipeline.core.volume import Volume, lps_to_ras

log = logging.getLogger(__name__)

UID_NAMESPACE = uuid.UUID("6f6a1c52-3b0e-5d0a-9d5e-6d766c2d7069")  # fixed: "mvl_pipeline" UIDs
IMPLEMENTATION_CLASS_UID = "2.25.146030296516045566372302290245577427549"
IMPLEMENTATION_VERSION_NAME = "MVL_PIPELINE_1"

_SOP_CLASS_BY_MODALITY = {"CT": CTImageStorage, "MR": MRImageStorage}
_DEFAULT_WINDOW = {"CT": (40.0, 400.0)}
_ORTHOGONALITY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class SeriesUids:
    """The identifiers of one image series (one SOP Instance UID per slice, in slice order k)."""

    study: str
    series: str
    frame_of_reference: str
    sop_instances: tuple[str, ...]
    series_number: int


def make_uid(*seed_material: Any) -> str:
    """A deterministic DICOM UID ``2.25.<int>`` (at most 44 characters).

    ``make_uid("study", case_id)`` hashes its arguments (name-based UUID, RFC 4122 version 5);
    ``make_uid(rng)`` with a seeded ``numpy.random.Generator`` draws 16 bytes from it instead.
    """
    if len(seed_material) == 1 and isinstance(seed_material[0], np.random.Generator):
        value = uuid.UUID(bytes=seed_material[0].bytes(16), version=4)
    elif seed_material:
        value = uuid.uuid5(UID_NAMESPACE, "\x1f".join(str(part) for part in seed_material))
    else:
        raise ValueError("make_uid needs seed material (strings, numbers or a seeded Generator)")
    return f"2.25.{value.int}"


def series_uids(*seed_material: Any, n_slices: int, series_number: int = 1) -> SeriesUids:
    """All UIDs of one series derived from ``seed_material`` (e.g. ``("drop-7", case_id, "CT")``).

    The study and frame-of-reference UIDs depend on the seed's first two parts only, so a SEG
    or a second series of the same case can share them by reusing those parts.
    """
    study_seed = seed_material[:2]
    return SeriesUids(
        study=make_uid("study", *study_seed),
        series=make_uid("series", *seed_material, series_number),
        frame_of_reference=make_uid("frame-of-reference", *study_seed),
        sop_instances=tuple(
            make_uid("sop", *seed_material, series_number, k) for k in range(n_slices)
        ),
        series_number=series_number,
    )


@dataclass(frozen=True)
class SliceGeometry:
    """DICOM plane geometry of a volume (LPS): what every slice of its series shares."""

    orientation: tuple[float, ...]  # ImageOrientationPatient (row cosine, column cosine)
    pixel_spacing: tuple[float, float]  # (row spacing = along j, column spacing = along i)
    slice_thickness: float  # distance between slice planes along the normal
    affine_lps: np.ndarray

    def position(self, k: int) -> list[float]:
        """ImagePositionPatient (LPS mm) of slice ``k``."""
        return [
            float(v)
            for v in self.affine_lps[:3, :3] @ (0.0, 0.0, float(k)) + self.affine_lps[:3, 3]
        ]

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.orientation[:3], self.orientation[3:])


def slice_geometry(volume: Volume) -> SliceGeometry:
    """The DICOM plane geometry of ``volume``; i and j axes must be orthogonal (DICOM requires it)."""
    affine_lps = lps_to_ras(volume.affine)
    col_i, col_j, col_k = (affine_lps[:3, n] for n in range(3))
    spacing_i, spacing_j = float(np.linalg.norm(col_i)), float(np.linalg.norm(col_j))
    row_cosine, column_cosine = col_i / spacing_i, col_j / spacing_j
    if abs(float(row_cosine @ column_cosine)) > _ORTHOGONALITY_TOLERANCE:
        raise ValueError("the volume's i and j axes are not orthogonal: not representable in DICOM")
    normal = np.cross(row_cosine, column_cosine)
    thickness = abs(float(col_k @ normal))
    if thickness < 1e-6:
        raise ValueError("the volume's k axis lies in the slice plane: not representable in DICOM")
    return SliceGeometry(
        orientation=tuple(round(float(v), 10) + 0.0 for v in (*row_cosine, *column_cosine)),
        pixel_spacing=(spacing_j, spacing_i),
        slice_thickness=thickness,
        affine_lps=affine_lps,
    )


def _file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def _apply_header(ds: Dataset, header: Mapping[str, Any]) -> None:
    """Set every ``keyword: value`` of ``header`` on ``ds``; ``"private"`` holds private tags.

    ``header["private"]`` is a list of ``(group, creator, element_offset, VR, value)``, e.g.
    ``(0x0011, "MVL SITE", 0x01, "LO", "site note")`` -> element (0011,1001) under creator
    (0011,0010) = "MVL SITE".
    """
    for keyword, value in header.items():
        if keyword == "private":
            for group, creator, offset, vr, private_value in value:
                ds.private_block(group, creator, create=True).add_new(offset, vr, private_value)
        elif pydicom.datadict.tag_for_keyword(keyword) is None:
            raise ValueError(f"unknown DICOM keyword in header: {keyword!r}")
        else:
            setattr(ds, keyword, value)


def _stored_values(volume: Volume, rescale: tuple[float, float], dtype: np.dtype) -> np.ndarray:
    """HU (or MR intensity) -> stored integers, ``round((value - intercept) / slope)``."""
    slope, intercept = rescale
    if slope == 0:
        raise ValueError("rescale slope must not be 0")
    stored = np.rint((np.asarray(volume.array, dtype=np.float64) - intercept) / slope)
    info = np.iinfo(dtype)
    clipped = int(np.count_nonzero((stored < info.min) | (stored > info.max)))
    if clipped:
        log.warning("%d voxels outside the %s range were clipped", clipped, np.dtype(dtype).name)
    return np.clip(stored, info.min, info.max).astype(dtype)


def _ds(value: float) -> str:
    """A DS string: the most significant digits that fit in 16 characters.

    (pydicom's ``format_number_as_ds`` can yield 17 characters when rounding carries, e.g.
    9.999999999999998 -> "10.00000000000000".)
    """
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"cannot write {value} as a DICOM decimal string")
    for digits in range(16, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(f"cannot write {value} in 16 characters")  # unreachable for finite floats


def write_image_series(
    volume: Volume,
    *,
    header: Mapping[str, Any],
    uids: SeriesUids,
    rescale: tuple[float, float] = (1.0, -1024.0),
    dtype: Any = np.int16,
) -> list[Dataset]:
    """One CT (or MR) Image Storage data set per slice ``k`` of ``volume`` (values in HU for CT).

    ``header`` holds DICOM keywords (``PatientName``, ``PatientID``, ``StudyDate`` ...,
    ``Modality`` = "CT" by default, "MR" allowed) and optionally ``"private"`` (see
    :func:`_apply_header`). Explicit VR little endian with file meta and preamble; deterministic.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.int16), np.dtype(np.uint16)):
        raise ValueError(f"dtype must be int16 or uint16, got {dtype}")
    n_slices = volume.shape[2]
    if len(uids.sop_instances) != n_slices:
        raise ValueError(f"{len(uids.sop_instances)} SOP Instance UIDs for {n_slices} slices")
    modality = str(header.get("Modality", "CT"))
    if modality not in _SOP_CLASS_BY_MODALITY:
        raise ValueError(f"write_image_series writes CT or MR, not {modality!r}")
    sop_class_uid = _SOP_CLASS_BY_MODALITY[modality]
    geometry = slice_geometry(volume)
    stored = _stored_values(volume, rescale, dtype)
    slope, intercept = rescale
    if modality in _DEFAULT_WINDOW:
        center, width = _DEFAULT_WINDOW[modality]
    else:
        low, high = (float(v) for v in np.percentile(volume.array, [1, 99]))
        center, width = (low + high) / 2, max(high - low, 1.0)

    datasets = []
    for k in range(n_slices):
        ds = Dataset()
        ds.file_meta = _file_meta(sop_class_uid, uids.sop_instances[k])
        ds.preamble = b"\x00" * 128
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if modality == "CT" else "OTHER"]
        ds.SOPClassUID = sop_class_uid
        ds.SOPInstanceUID = uids.sop_instances[k]
        ds.StudyDate = ds.StudyTime = ds.AccessionNumber = ""
        ds.Modality = modality
        ds.Manufacturer = ds.ReferringPhysicianName = ""
        ds.PatientName = ds.PatientID = ds.PatientBirthDate = ds.PatientSex = ""
        ds.StudyInstanceUID = uids.study
        ds.SeriesInstanceUID = uids.series
        ds.StudyID = ""
        ds.SeriesNumber = uids.series_number
        ds.InstanceNumber = k + 1
        ds.FrameOfReferenceUID = uids.frame_of_reference
        ds.PositionReferenceIndicator = ""
        ds.PatientOrientation = ""
        if modality == "CT":
            ds.KVP = ""
            ds.AcquisitionNumber = 1
        else:
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "RM", "NONE", ""
            ds.MRAcquisitionType = "3D"
            ds.EchoTrainLength = ""
            ds.RepetitionTime = ds.EchoTime = ""
        _apply_header(ds, header)
        if "ContentDate" not in header:
            ds.ContentDate, ds.ContentTime = ds.StudyDate, ds.StudyTime
        ds.SliceThickness = _ds(geometry.slice_thickness)
        ds.ImagePositionPatient = [_ds(v) for v in geometry.position(k)]
        ds.ImageOrientationPatient = [_ds(v) for v in geometry.orientation]
        ds.SliceLocation = _ds(float(geometry.normal @ geometry.position(k)))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.PixelSpacing = [_ds(v) for v in geometry.pixel_spacing]
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if dtype == np.dtype(np.int16) else 0
        if "WindowCenter" not in header:
            ds.WindowCenter, ds.WindowWidth = _ds(center), _ds(width)
        ds.RescaleIntercept = _ds(intercept)
        ds.RescaleSlope = _ds(slope)
        ds.RescaleType = "HU" if modality == "CT" else "US"
        # pixel_array[row, column] = stored[i=column, j=row, k]
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype("<" + dtype.str[1:]).tobytes()
        datasets.append(ds)
    return datasets


def dataset_bytes(ds: Dataset) -> bytes:
    """``ds`` as a DICOM Part 10 file (preamble, file meta), bytes in memory."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
