"""Decode the pixels of DICOM files into frames with the geometry attributes assembly needs.

Speed: for uncompressed little-endian files the header is parsed by a small scanner over the
file's bytes (:mod:`.native`: only the ~25 attributes assembly needs are decoded) and the pixel
bytes are used in place with ``numpy.frombuffer``. Any other file (compressed, big endian,
multi-frame, modality LUT, anything the scanner does not recognise) goes through pydicom's full
reader, which is also the reference the scanner is tested against; a transfer syntax no
installed plugin can decode raises :class:`NoDecoderError`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

from mvl_pipeline.core.errors import (
    NoDecoderError,
    NoPixelDataError,
    NotAnImageError,
    UnreadableFileError,
)
from mvl_pipeline.dicom.native import NativeScan, scan_native, tail_truncation
from mvl_pipeline.dicom.read import Source, _classify_uid, _parse_dataset, source_bytes

log = logging.getLogger(__name__)

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


_POSITIVE = frozenset({"PixelSpacing"})  # the geometry divides by it; a thickness of 0 is written by some scanners


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
    if keyword in _POSITIVE and not all(v > 0 for v in numbers):
        raise UnreadableFileError(f"{keyword} must be positive", path=name)
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


def functional_item(ds: Dataset, frame: Dataset | None, sequence: str) -> Dataset | None:
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
        plane = functional_item(ds, frame_groups, "PlanePositionSequence") or ds
        orientation = functional_item(ds, frame_groups, "PlaneOrientationSequence") or ds
        measures = functional_item(ds, frame_groups, "PixelMeasuresSequence") or ds
        transform = functional_item(ds, frame_groups, "PixelValueTransformationSequence") or ds
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
        name, data = source_bytes(source)
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
    whole = data if complete else source_bytes(name)[1]
    return _frames_from_dataset(name, _parse_dataset(name, whole, stop_before_pixels=False))


def read_frames(source: Source) -> np.ndarray:
    """The decoded frames of one file as ``(frames, rows, columns)`` stored values (no rescale).

    Useful on objects without usable geometry (e.g. pydicom-data's emri_small, whose functional
    groups were stripped); raises :class:`NoDecoderError` where no plugin can decode the data.
    """
    frames = _read_frames(source)
    return np.stack([np.array(frames.stored(i)) for i in range(frames.n_frames)])
