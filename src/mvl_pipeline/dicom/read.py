"""Read DICOM files: headers, whole data sets, and what kind of object each one is.

- :func:`read_header`: one file (path, bytes, ``(name, bytes)``, file object) -> ``pydicom.Dataset``
  without pixels, after checking that it really is DICOM and not truncated.
- :func:`read_dataset`: the same with pixel data.
- :func:`classify`: image / SEG / RTSTRUCT / other non-image, by SOP Class UID and Modality.
- :func:`sort_study`: the files of a study sorted into image series and label objects (the one
  place that groups a study's files: ingest and predict both use it).
"""

from __future__ import annotations

import enum
import functools
import io
import logging
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from mvl_pipeline.core.errors import (
    ImagingError,
    NotAnImageError,
    NotDicomError,
    UnreadableFileError,
)
from mvl_pipeline.dicom.native import has_preamble, scan_native, tail_truncation

Source = str | os.PathLike | bytes | tuple[str, bytes] | BinaryIO | Dataset


SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"


_NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports, key object selection
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.481.",  # RT objects (RT Image, 481.1, is handled below)
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF / CDA / STL ...
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, registration, fiducials, SEG, surface seg ...
    "1.2.840.10008.5.1.4.1.1.67",  # real world value mapping
    "1.2.840.10008.5.1.4.1.1.68.",  # surface scans
    "1.2.840.10008.5.1.4.1.1.4.2",  # MR spectroscopy
    "1.2.840.10008.5.1.4.1.1.200.",  # protocol storage
    "1.2.840.10008.5.1.4.1.1.90.",  # content assessment results
    "1.2.840.10008.5.1.4.1.1.91.",  # microscopy annotations
    "1.2.840.10008.5.1.4.34.",  # RT treatment delivery
    "1.2.840.10008.5.1.4.38.",  # hanging protocols
    "1.2.840.10008.5.1.4.39.",  # colour palettes
    "1.2.840.10008.5.1.4.43.",  # implant templates
    "1.2.840.10008.1.3.10",  # media storage directory (DICOMDIR)
)


_IMAGE_EXCEPTIONS = ("1.2.840.10008.5.1.4.1.1.481.1",)  # RT Image Storage


_NON_IMAGE_MODALITIES = frozenset(
    "SR KO PR RTPLAN RTDOSE RTSTRUCT RTRECORD SEG REG FID DOC ECG HD AU RWV PLAN RESP EPS HC SMR "
    "TEXTUREMAP M3D".split()
)


class ObjectKind(enum.Enum):
    IMAGE = "image"
    SEGMENTATION = "segmentation"
    RTSTRUCT = "rtstruct"
    NON_IMAGE = "non_image"


@dataclass(frozen=True)
class Classification:
    """What a DICOM object is; ``error`` says why a non-image is skipped (None for images)."""

    kind: ObjectKind
    sop_class: str
    modality: str
    error: NotAnImageError | None = None

    @property
    def is_label_source(self) -> bool:
        return self.kind in (ObjectKind.SEGMENTATION, ObjectKind.RTSTRUCT)


def _classify_uid(sop_class: str, modality: str, path: str | None) -> Classification:
    name = UID(sop_class).name if sop_class else "no SOP Class UID"
    if sop_class == SEGMENTATION_STORAGE:
        kind = ObjectKind.SEGMENTATION
    elif sop_class == RT_STRUCTURE_SET_STORAGE:
        kind = ObjectKind.RTSTRUCT
    elif sop_class.startswith(_IMAGE_EXCEPTIONS):
        kind = ObjectKind.IMAGE
    elif sop_class.startswith(_NON_IMAGE_SOP_PREFIXES) or modality in _NON_IMAGE_MODALITIES:
        kind = ObjectKind.NON_IMAGE
    else:
        kind = ObjectKind.IMAGE
    error = None
    if kind is not ObjectKind.IMAGE:
        label = " (label source)" if kind is not ObjectKind.NON_IMAGE else ""
        error = NotAnImageError(f"non-image object {name} ({modality or '-'}){label}", path=path)
    return Classification(kind, sop_class, modality, error)


def classify(ds: Dataset, *, path: str | None = None) -> Classification:
    """Image storage object, DICOM SEG, RTSTRUCT, or other non-image (SR, RTPLAN, PR, KOS ...)."""
    return _classify_uid(
        str(ds.get("SOPClassUID", "") or ""), str(ds.get("Modality", "") or ""), path
    )


def check_is_image(ds: Dataset, *, path: str | None = None) -> None:
    """Raise :class:`NotAnImageError` (with the reason) unless ``ds`` is an image storage object."""
    error = classify(ds, path=path).error
    if error is not None:
        raise error


def source_bytes(source: Source) -> tuple[str, bytes]:
    """``(display name, file bytes)`` of a path, bytes, ``(name, bytes)`` or file object."""
    if isinstance(source, tuple):
        return str(source[0]), bytes(source[1])
    if isinstance(source, bytes | bytearray | memoryview):
        return "<bytes>", bytes(source)
    if isinstance(source, str | os.PathLike):
        name = os.fspath(source)
        try:
            with open(name, "rb") as handle:
                return name, handle.read()
        except OSError as exc:
            raise UnreadableFileError(
                f"cannot read file: {exc.strerror or exc}", path=name
            ) from exc
    name = str(getattr(source, "path", None) or getattr(source, "name", None) or "<stream>")
    try:
        return name, source.read()
    except OSError as exc:
        raise UnreadableFileError(f"cannot read file: {exc}", path=name) from exc


#: DICOM's defined terms for Modality (0008,0060), PS3.3 C.7.3.1.1.1, retired ones included.
MODALITIES = frozenset("""
    AR ASMT AU BDUS BI BMD CFM CR CT CTPROTOCOL DMS DG DOC DX ECG EEG EMG EOG EPS ES FID GM HC HD IO
    IOL IVOCT IVUS KER KO LEN LS MG MR M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PA PLAN POS
    PR PT PX REG RESP RF RG RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM
    SMR SR SRF STAIN TEXTUREMAP TG US VA XA XAPROTOCOL XC DS DF CF CD DD VF CS LP MA MS FA EC
""".split())


def modality_of(header: Any, default: str = "OT") -> str:
    """The header's Modality when it is one of DICOM's defined terms, else ``default``: the value
    goes into case metadata, the plan and logs, and a header can hold any text there."""
    value = str(header.get("Modality", "") or "").strip().upper()
    return value if value in MODALITIES else default


@functools.cache  # once per process: it sets globals (and setLevel walks every logger's cache)
def quiet_pydicom() -> None:
    """No validation of values while pydicom reads: its messages quote the value, in its log and
    as a Python warning ("Invalid value for VR IS: 'Kowalczyk'"), and a header value may be a
    name. What a value must be is checked where it is used (geometry, pixel module). Its logger
    keeps errors only: a value that fails to convert is logged at WARNING with the value, and a
    worker process has no logging configuration to hold that back."""
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def _parse_dataset(name: str, data: bytes, *, stop_before_pixels: bool) -> Dataset:
    """pydicom's reader with the project's checks: DICOM at all, meta, truncation."""
    quiet_pydicom()  # values are validated lazily, when first read: so in every process that reads
    scan = scan_native(data)
    if scan is not None and not scan.truncated and 0 <= scan.pixel_end < len(data):
        scan.truncated = tail_truncation(data[scan.pixel_end :], scan.explicit)
    if scan is not None and scan.truncated:
        raise UnreadableFileError(f"file is truncated ({scan.truncated})", path=name)
    preamble = has_preamble(data)
    try:
        ds = pydicom.dcmread(
            io.BytesIO(data), force=not preamble, stop_before_pixels=stop_before_pixels
        )
    except InvalidDicomError as exc:
        raise NotDicomError(f"not a DICOM file: {exc}", path=name) from exc
    except NotImplementedError as exc:  # pydicom on some plain text: 'Unknown Value Representation'
        raise NotDicomError(f"not a DICOM file: {exc}", path=name) from exc
    except (EOFError, struct.error, ValueError, KeyError, IndexError, TypeError) as exc:
        raise UnreadableFileError(
            f"cannot parse DICOM: {type(exc).__name__}: {exc}", path=name
        ) from exc
    if preamble and "TransferSyntaxUID" not in ds.file_meta:
        raise UnreadableFileError("file meta information has no Transfer Syntax UID", path=name)
    has_identity = "SOPClassUID" in ds or any(
        element.tag.group == 0x0008 for element in ds.iterall()
    )
    if not has_identity:
        raise NotDicomError(
            "no SOP Class UID and no group 0008 element: not a DICOM data set", path=name
        )
    return ds


def read_header(source: Source) -> Dataset:
    """The data set of one DICOM file without pixel data.

    Accepts a path (any suffix), bytes, ``(name, bytes)`` or a file object; files with or without
    the 128-byte preamble. Raises :class:`NotDicomError` if it is not DICOM and
    :class:`UnreadableFileError` if it is missing, truncated or has no transfer syntax.
    """
    name, data = source_bytes(source)
    return _parse_dataset(name, data, stop_before_pixels=True)


def read_dataset(source: Source) -> Dataset:
    """The whole data set of one DICOM file (pixels included) with :func:`read_header`'s checks."""
    name, data = source_bytes(source)
    return _parse_dataset(name, data, stop_before_pixels=False)


@dataclass
class StudyFiles:
    """A study's files sorted by :func:`sort_study` (keys are the caller's: paths, names ...)."""

    series: dict[str, list[Any]] = field(default_factory=dict)  # image SeriesInstanceUID -> files
    labels: dict[str, list[Any]] = field(default_factory=dict)  # referenced series UID -> SEG/RTSTRUCT
    label_files: list[Any] = field(default_factory=list)
    skipped: list[tuple[Any, ImagingError]] = field(default_factory=list)  # non-image objects


def sort_study(headers: Mapping[Any, Dataset]) -> StudyFiles:
    """Image series (by SeriesInstanceUID) and the label objects (DICOM SEG, RTSTRUCT) that
    reference each series; other non-image objects (SR, RTPLAN, PR ...) are skipped with the
    reason. ``headers`` maps the caller's keys (in the order to keep) to their headers."""
    from mvl_pipeline.dicom.labels import referenced_series_uids

    study = StudyFiles()
    for key, header in headers.items():
        classification = classify(header)
        if classification.is_label_source:
            study.label_files.append(key)
            for referenced in referenced_series_uids(header):
                study.labels.setdefault(referenced, []).append(key)
        elif classification.error is not None:
            study.skipped.append((key, classification.error))
        else:
            study.series.setdefault(str(header.get("SeriesInstanceUID", "")), []).append(key)
    return study
