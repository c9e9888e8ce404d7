"""Read DICOM files and assemble the slices of one series into a :class:`Volume`.

Public entry points:

- :func:`read_header`: one file (path, bytes, fsspec/file object) -> ``pydicom.Dataset`` without
  pixels, after checking that it really is DICOM and not truncated.
- :func:`classify`: image / SEG / RTSTRUCT / other non-image, by SOP Class UID and Modality.
- :func:`assemble_series`: the files (or data sets) of one series -> ``Volume`` in RAS with
  float32 values after the modality LUT (HU for CT); every way a series can be malformed raises
  its own :mod:`~mvl_pipeline.core.errors` class.
- :func:`assemble_many`: several series, optionally in worker processes.

Slices are ordered by ImagePositionPatient projected on the slice normal (never by
InstanceNumber or file name). ``array[i, j, k] = pixel_array_of_slice_k[j, i]``.

Speed: for uncompressed little-endian files the header is parsed by a small scanner over the
file's bytes (only the ~25 attributes assembly needs are decoded) and the pixel bytes are used in
place with ``numpy.frombuffer``; rescaling is one vectorised pass per slice into the output. Any
other file (compressed, big endian, multi-frame, modality LUT, anything the scanner does not
recognise) goes through pydicom's full reader, which is also the reference the scanner is tested
against.
"""

from __future__ import annotations

import enum
import io
import logging
import math
import multiprocessing
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from mvl_pipeline.core.errors import (
    DuplicatePositionError,
    EmptySeriesError,
    ImagingError,
    InconsistentGeometryError,
    MissingSliceError,
    MixedSliceSizeError,
    NoDecoderError,
    NoPixelDataError,
    NotAnImageError,
    NotDicomError,
    TooFewSlicesError,
    UnevenSpacingError,
    UnreadableFileError,
)
from mvl_pipeline.core.volume import Volume, lps_to_ras
from mvl_pipeline.dicom.native import NativeScan, has_preamble, scan_native, tail_truncation

log = logging.getLogger(__name__)

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


# --- reading bytes and headers -----------------------------------------------------------------


def _source_bytes(source: Source) -> tuple[str, bytes]:
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


def _parse_dataset(name: str, data: bytes, *, stop_before_pixels: bool) -> Dataset:
    """pydicom's reader with the project's checks: DICOM at all, meta, truncation."""
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
    name, data = _source_bytes(source)
    return _parse_dataset(name, data, stop_before_pixels=True)


def read_dataset(source: Source) -> Dataset:
    """The whole data set of one DICOM file (pixels included) with :func:`read_header`'s checks."""
    name, data = _source_bytes(source)
    return _parse_dataset(name, data, stop_before_pixels=False)


# --- per-file frame extraction -----------------------------------------------------------------


@dataclass(frozen=True)
class _PixelRef:
    """Where a native frame's stored values lie: a local file (read later) or bytes in memory."""

    source: str | bytes
    offset: int
    dtype: np.dtype
    rows: int
    cols: int
    shift: int  # Bits Allocated - Bits Stored: high bits to ignore, as pydicom does

    @property
    def nbytes(self) -> int:
        return self.rows * self.cols * self.dtype.itemsize

    def read(self, scratch: bytearray | None = None, name: str = "") -> np.ndarray:
        count = self.rows * self.cols
        if isinstance(self.source, bytes):
            raw = np.frombuffer(self.source, dtype=self.dtype, count=count, offset=self.offset)
        else:
            if scratch is None or len(scratch) < self.nbytes:
                scratch = bytearray(self.nbytes)
            view = memoryview(scratch)[: self.nbytes]
            try:
                with open(self.source, "rb", buffering=0) as handle:
                    handle.seek(self.offset)
                    got = handle.readinto(view)
            except OSError as exc:
                raise UnreadableFileError(
                    f"cannot read pixel data: {exc.strerror or exc}", path=name
                ) from exc
            if got != self.nbytes:
                raise UnreadableFileError(
                    "pixel data is truncated (file changed while reading)", path=name
                )
            raw = np.frombuffer(scratch, dtype=self.dtype, count=count)
        raw = raw.reshape(self.rows, self.cols)
        if self.shift:
            raw = np.right_shift(np.left_shift(raw, self.shift), self.shift)
        return raw


@dataclass
class _Frames:
    """The frames of one file and what assembly needs to place them.

    ``pixels`` holds decoded frames ``(frames, rows, cols)`` (pydicom path), or ``ref`` says
    where the single native frame lies (fast path: read when it is written into the volume).
    """

    name: str
    positions: list[tuple[float, ...] | None]
    orientations: list[tuple[float, ...] | None]
    pixel_spacings: list[tuple[float, ...] | None]
    slopes: list[float]
    intercepts: list[float]
    acquisition_numbers: list[str]
    attrs: dict[str, Any]
    pixels: np.ndarray | None = None
    ref: _PixelRef | None = None

    @property
    def fast(self) -> bool:
        return self.ref is not None

    @property
    def n_frames(self) -> int:
        return 1 if self.ref is not None else int(self.pixels.shape[0])  # type: ignore[union-attr]

    @property
    def frame_shape(self) -> tuple[int, int]:
        if self.ref is not None:
            return self.ref.rows, self.ref.cols
        return int(self.pixels.shape[1]), int(self.pixels.shape[2])  # type: ignore[union-attr]

    def stored(self, index: int, scratch: bytearray | None = None) -> np.ndarray:
        if self.ref is not None:
            return self.ref.read(scratch, self.name)
        return self.pixels[index]  # type: ignore[index]


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    text = str(value).strip(" \x00")
    return text or None


def _floats(name: str, keyword: str, value: Any, count: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, bytes | str):
        text = _text(value)
        if text is None:
            return None
        parts: Sequence[Any] = text.split("\\")
    elif isinstance(value, Sequence):
        parts = value
    else:
        parts = [value]
    try:
        numbers = tuple(float(p) for p in parts)
    except (TypeError, ValueError) as exc:
        raise UnreadableFileError(f"invalid {keyword} value", path=name) from exc
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        raise UnreadableFileError(f"{keyword} must have {count} finite values", path=name)
    return numbers


def _integer(name: str, keyword: str, value: Any) -> int | None:
    if value is None or isinstance(value, int):
        return value
    text = _text(value) if isinstance(value, bytes | str) else value
    if text is None:
        return None
    try:
        return int(text)
    except (TypeError, ValueError) as exc:
        raise UnreadableFileError(f"invalid {keyword} value", path=name) from exc


_TEXT_ATTRS = (
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "PhotometricInterpretation",
    "BurnedInAnnotation",
    "RescaleType",
)
_INT_ATTRS = (
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "NumberOfFrames",
)


def _common_attrs(name: str, get: Callable[[str], Any]) -> dict[str, Any]:
    """File-level attributes from a getter over scanner values or a pydicom data set.

    Non-images (SEG, RTSTRUCT, SR, RTPLAN ...) are refused first, with their reason.
    """
    sop_class, modality = _text(get("SOPClassUID")), _text(get("Modality"))
    classification = _classify_uid(sop_class or "", modality or "", name)
    if classification.error is not None:
        raise classification.error
    attrs: dict[str, Any] = {"SOPClassUID": sop_class, "Modality": modality}
    for keyword in _TEXT_ATTRS:
        attrs[keyword] = _text(get(keyword))
    for keyword in _INT_ATTRS:
        attrs[keyword] = _integer(name, keyword, get(keyword))
    for keyword in ("SliceThickness", "SpacingBetweenSlices"):
        value = _floats(name, keyword, get(keyword), 1)
        attrs[keyword] = value[0] if value else None
    if (attrs["SamplesPerPixel"] or 1) != 1:
        raise NotAnImageError(
            f"colour image (SamplesPerPixel={attrs['SamplesPerPixel']}) is not a greyscale volume",
            path=name,
        )
    return attrs


def _frames_fast(name: str, source: str | bytes, scan: NativeScan) -> _Frames | None:
    """A native little-endian single-frame file from its scanned header, or None."""
    values = scan.values
    if scan.needs_pydicom or scan.pixel_offset < 0 or "SOPClassUID" not in values:
        return None
    attrs = _common_attrs(name, values.get)
    rows, cols, bits = attrs["Rows"], attrs["Columns"], attrs["BitsAllocated"]
    if (
        attrs["NumberOfFrames"] not in (None, 1)
        or attrs["SamplesPerPixel"] != 1
        or bits not in (8, 16, 32)
        or attrs["PixelRepresentation"] not in (0, 1)
        or not rows
        or not cols
        or attrs["PhotometricInterpretation"] not in ("MONOCHROME1", "MONOCHROME2")
    ):
        return None
    dtype = np.dtype(f"<{'i' if attrs['PixelRepresentation'] else 'u'}{bits // 8}")
    if scan.pixel_length < rows * cols * dtype.itemsize:
        raise UnreadableFileError(
            f"pixel data has {scan.pixel_length} bytes, {rows * cols * dtype.itemsize} expected",
            path=name,
        )
    stored = attrs["BitsStored"] or bits
    slope = _floats(name, "RescaleSlope", values.get("RescaleSlope"), 1)
    intercept = _floats(name, "RescaleIntercept", values.get("RescaleIntercept"), 1)
    attrs["TransferSyntaxUID"] = scan.transfer_syntax
    return _Frames(
        name=name,
        positions=[_floats(name, "ImagePositionPatient", values.get("ImagePositionPatient"), 3)],
        orientations=[
            _floats(name, "ImageOrientationPatient", values.get("ImageOrientationPatient"), 6)
        ],
        pixel_spacings=[_floats(name, "PixelSpacing", values.get("PixelSpacing"), 2)],
        slopes=[slope[0] if slope else 1.0],
        intercepts=[intercept[0] if intercept else 0.0],
        acquisition_numbers=[_text(values.get("AcquisitionNumber")) or ""],
        attrs=attrs,
        ref=_PixelRef(source, scan.pixel_offset, dtype, rows, cols, max(bits - stored, 0)),
    )


def _transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""


def _transfer_syntax_name(uid: str) -> str:
    return UID(uid).name if uid else "unknown"


def _decode_pixels(name: str, ds: Dataset) -> np.ndarray:
    """``ds.pixel_array`` with decoder failures mapped to the project's errors."""
    uid = _transfer_syntax(ds)
    no_decoder = f"no decoder for transfer syntax {_transfer_syntax_name(uid)} ({uid})"
    try:
        return ds.pixel_array
    except NotImplementedError as exc:
        raise NoDecoderError(no_decoder, path=name) from exc
    except RuntimeError as exc:
        if "Unable to decode" in str(exc) or "plugin" in str(exc):
            # no file name here: drop paths can carry identity (the error names it for the caller)
            log.debug("every decoder plugin failed for %s: %s", _transfer_syntax_name(uid), exc)
            error = NoDecoderError(no_decoder, path=name)
            error.plugin_errors = str(exc)  # type: ignore[attr-defined]
            raise error from exc
        raise UnreadableFileError(f"pixel data cannot be decoded: {exc}", path=name) from exc
    except (ValueError, AttributeError, TypeError, KeyError, IndexError) as exc:
        text = str(exc)
        if "less than expected" in text:
            raise UnreadableFileError("pixel data is truncated", path=name) from exc
        raise UnreadableFileError(
            f"pixel data cannot be decoded: {type(exc).__name__}: {text}", path=name
        ) from exc


def _functional_item(ds: Dataset, frame: Dataset | None, sequence: str) -> Dataset | None:
    """The item of a functional group for one frame (per-frame first, then shared)."""
    for groups in (frame, (ds.get("SharedFunctionalGroupsSequence") or [None])[0]):
        if groups is not None and sequence in groups and len(groups[sequence].value):
            return groups[sequence].value[0]
    return None


def _frames_from_dataset(name: str, ds: Dataset) -> _Frames:
    """Frames of any image data set through pydicom (compressed, big endian, enhanced ...)."""
    attrs = _common_attrs(name, ds.get)
    if not any(
        keyword in ds for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
    ):
        raise NoPixelDataError("image object without pixel data", path=name)
    attrs["TransferSyntaxUID"] = _transfer_syntax(ds)
    pixels = _decode_pixels(name, ds)
    if pixels.ndim == 2:
        pixels = pixels[None]
    n_frames = attrs["NumberOfFrames"] or 1
    if pixels.ndim != 3 or pixels.shape[0] != n_frames:
        raise UnreadableFileError(f"decoded pixel data has shape {pixels.shape}", path=name)
    has_lut = "ModalityLUTSequence" in ds
    if has_lut:
        pixels = pydicom.pixels.apply_modality_lut(pixels, ds).astype(np.float32)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    frames = _Frames(name, [], [], [], [], [], [], attrs, pixels=pixels)
    for index in range(n_frames):
        frame_groups = (
            per_frame[index] if per_frame is not None and index < len(per_frame) else None
        )
        plane = _functional_item(ds, frame_groups, "PlanePositionSequence") or ds
        orientation = _functional_item(ds, frame_groups, "PlaneOrientationSequence") or ds
        measures = _functional_item(ds, frame_groups, "PixelMeasuresSequence") or ds
        transform = _functional_item(ds, frame_groups, "PixelValueTransformationSequence") or ds
        frames.positions.append(
            _floats(name, "ImagePositionPatient", plane.get("ImagePositionPatient"), 3)
        )
        frames.orientations.append(
            _floats(name, "ImageOrientationPatient", orientation.get("ImageOrientationPatient"), 6)
        )
        frames.pixel_spacings.append(_floats(name, "PixelSpacing", measures.get("PixelSpacing"), 2))
        slope = None if has_lut else _floats(name, "RescaleSlope", transform.get("RescaleSlope"), 1)
        intercept = (
            None
            if has_lut
            else _floats(name, "RescaleIntercept", transform.get("RescaleIntercept"), 1)
        )
        frames.slopes.append(slope[0] if slope else 1.0)
        frames.intercepts.append(intercept[0] if intercept else 0.0)
        frames.acquisition_numbers.append(_text(ds.get("AcquisitionNumber")) or "")
        if attrs.get("RescaleType") is None and transform is not ds:
            attrs["RescaleType"] = _text(transform.get("RescaleType"))
    return frames


_HEAD_BYTES = 16384


def _read_frames(source: Source) -> _Frames:
    """One file's frames: the scanner fast path where possible, else pydicom.

    A local file is read in two steps: its head now (header only), its pixels when the frame
    is written into the volume; everything else is read whole.
    """
    if isinstance(source, Dataset):
        return _frames_from_dataset(str(getattr(source, "filename", None) or "<dataset>"), source)
    if isinstance(source, str | os.PathLike):
        name = os.fspath(source)
        try:
            with open(name, "rb", buffering=0) as handle:
                size = os.fstat(handle.fileno()).st_size
                data = handle.read(_HEAD_BYTES)
                scan = scan_native(data, size)
                if scan is None or scan.need_more or scan.truncated:
                    data += handle.read()
                    scan = scan_native(data)
                if scan is not None and not scan.truncated and 0 <= scan.pixel_end < size:
                    handle.seek(scan.pixel_end)
                    scan.truncated = tail_truncation(handle.read(), scan.explicit)
        except OSError as exc:
            raise UnreadableFileError(
                f"cannot read file: {exc.strerror or exc}", path=name
            ) from exc
        pixel_source: str | bytes = name
        complete = len(data) == size
    else:
        name, data = _source_bytes(source)
        scan = scan_native(data)
        if scan is not None and not scan.truncated and 0 <= scan.pixel_end < len(data):
            scan.truncated = tail_truncation(data[scan.pixel_end :], scan.explicit)
        pixel_source, complete = data, True
    if scan is not None:
        if scan.truncated:
            raise UnreadableFileError(f"file is truncated ({scan.truncated})", path=name)
        frames = _frames_fast(name, pixel_source, scan)
        if frames is not None:
            return frames
    whole = data if complete else _source_bytes(name)[1]
    return _frames_from_dataset(name, _parse_dataset(name, whole, stop_before_pixels=False))


def read_frames(source: Source) -> np.ndarray:
    """The decoded frames of one file as ``(frames, rows, columns)`` stored values (no rescale).

    Useful on objects without usable geometry (e.g. pydicom-data's emri_small, whose functional
    groups were stripped); raises :class:`NoDecoderError` where no plugin can decode the data.
    """
    frames = _read_frames(source)
    return np.stack([np.array(frames.stored(i)) for i in range(frames.n_frames)])


# --- assembly --------------------------------------------------------------------------------

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


# --- several series, several processes -----------------------------------------------------------


def _shared_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _assemble_in_worker(
    sources: Sequence[Source], kwargs: Mapping[str, Any], then: Callable[[Volume], Any] | None
) -> Any:
    """Worker: assemble one series; return ``then(volume)``, or the volume via shared memory.

    An ImagingError is returned (not raised) so that one bad series does not hide the others.
    """
    holder: dict[str, str] = {}

    def allocate(shape: tuple[int, ...]) -> np.ndarray:
        handle = tempfile.NamedTemporaryFile(dir=_shared_dir(), prefix="mvl-series-", delete=False)
        handle.close()
        holder["path"] = handle.name
        return np.lib.format.open_memmap(handle.name, mode="w+", dtype=np.float32, shape=shape)

    try:
        files = [_read_frames(source) for source in sources]
        volume = _assemble_frames(files, out=None if then is not None else allocate, **kwargs)
    except ImagingError as error:
        if "path" in holder:
            os.unlink(holder["path"])
        return error
    if then is not None:
        return then(volume)
    return _SharedVolume(holder["path"], volume.affine, dict(volume.meta))


@dataclass(frozen=True)
class _SharedVolume:
    path: str
    affine: np.ndarray
    meta: dict[str, Any]

    def attach(self) -> Volume:
        try:
            block = np.load(self.path, mmap_mode="r+")
        finally:
            os.unlink(self.path)  # the mapping keeps the memory until the array is dropped
        return Volume(block.transpose(2, 1, 0), self.affine, self.meta)


def assemble_many(
    series: Sequence[Sequence[Source]],
    *,
    workers: int = 1,
    executor: Executor | None = None,
    then: Callable[[Volume], Any] | None = None,
    min_slices: int = 3,
    spacing_tolerance: float = 0.01,
) -> list[Any]:
    """Assemble several series; each result is a Volume (or ``then(volume)``) or the
    :class:`ImagingError` that series raised.

    Parallel: ``workers > 1`` starts a process pool for this call; ``executor`` uses yours
    (keep one for a whole ingest: worker start-up costs about a second). In worker processes,
    ``then`` (a picklable module-level function, e.g. "write the volume, return its path")
    runs next to the assembly and only its result travels back; without ``then`` the volume
    is assembled into shared memory (``/dev/shm``) and mapped by the caller. A
    ``ThreadPoolExecutor`` also works (pixel copies release the GIL; nothing is transferred).
    """
    kwargs = {"min_slices": min_slices, "spacing_tolerance": spacing_tolerance}

    def in_process(sources: Sequence[Source]) -> Any:
        try:
            volume = assemble_series(sources, **kwargs)
        except ImagingError as error:
            return error
        return then(volume) if then is not None else volume

    if executor is None and workers <= 1:
        return [in_process(sources) for sources in series]
    if isinstance(executor, ThreadPoolExecutor):
        return list(executor.map(in_process, series))
    own = executor is None
    pool = process_pool(workers) if own else executor
    try:
        futures = [
            pool.submit(_assemble_in_worker, list(sources), kwargs, then) for sources in series
        ]
        results = [future.result() for future in futures]
    finally:
        if own:
            pool.shutdown()
    return [r.attach() if isinstance(r, _SharedVolume) else r for r in results]


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool for :func:`assemble_many` (forkserver start: safe with threads around)."""
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))


def group_by_series(
    sources: Iterable[Source],
) -> tuple[
    dict[str, list[Source]], list[tuple[Source, Classification]], list[tuple[Source, ImagingError]]
]:
    """Sort a drop's files by SeriesInstanceUID.

    Returns ``(image series uid -> sources, label sources (SEG/RTSTRUCT) with their
    classification, rejected sources with the error saying why)``; reads headers only.
    """
    series: dict[str, list[Source]] = {}
    labels: list[tuple[Source, Classification]] = []
    rejected: list[tuple[Source, ImagingError]] = []
    for source in sources:
        try:
            ds = source if isinstance(source, Dataset) else read_header(source)
        except ImagingError as error:
            rejected.append((source, error))
            continue
        classification = classify(
            ds, path=str(source) if isinstance(source, str | os.PathLike) else None
        )
        if classification.is_label_source:
            labels.append((source, classification))
        elif classification.error is not None:
            rejected.append((source, classification.error))
        else:
            series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(source)
    return series, labels, rejected
