"""A minimal scanner for DICOM Part 10 files in a native little-endian transfer syntax.

It walks the element stream of a file (or of its head) up to Pixel Data and decodes only the
attributes series assembly needs (:data:`WANTED`), so that the pixel bytes can be used in place.
Explicit and implicit VR little endian; sequences of defined and undefined length are skipped,
including the implicit-VR sequences inside explicit ``UN`` elements. Anything else (other
syntaxes, encapsulated pixel data, odd structure) makes :func:`scan_native` return None and the
caller uses pydicom; the test suite checks both paths give the same volumes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

FAST_SYNTAXES = {"1.2.840.10008.1.2": False, "1.2.840.10008.1.2.1": True}  # uid -> explicit VR


def has_preamble(data: bytes) -> bool:
    """A 128-byte preamble followed by ``DICM``."""
    return len(data) >= 132 and data[128:132] == b"DICM"


_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
_HEAD = struct.Struct("<HH2sH")
_TAG = struct.Struct("<HH")
_TAG_LENGTH = struct.Struct("<HHI")
_U32 = struct.Struct("<I")

# keyword -> tag for everything assembly needs; US values are decoded as integers
WANTED = {
    "SOPClassUID": 0x00080016,
    "SOPInstanceUID": 0x00080018,
    "Modality": 0x00080060,
    "SliceThickness": 0x00180050,
    "SpacingBetweenSlices": 0x00180088,
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
    "AcquisitionNumber": 0x00200012,
    "InstanceNumber": 0x00200013,
    "ImagePositionPatient": 0x00200032,
    "ImageOrientationPatient": 0x00200037,
    "FrameOfReferenceUID": 0x00200052,
    "SamplesPerPixel": 0x00280002,
    "PhotometricInterpretation": 0x00280004,
    "NumberOfFrames": 0x00280008,
    "Rows": 0x00280010,
    "Columns": 0x00280011,
    "PixelSpacing": 0x00280030,
    "BitsAllocated": 0x00280100,
    "BitsStored": 0x00280101,
    "PixelRepresentation": 0x00280103,
    "BurnedInAnnotation": 0x00280301,
    "RescaleIntercept": 0x00281052,
    "RescaleSlope": 0x00281053,
    "RescaleType": 0x00281054,
}
_US_TAGS = frozenset({0x00280002, 0x00280010, 0x00280011, 0x00280100, 0x00280101, 0x00280103})
_SLOW_TAGS = frozenset(
    {
        0x00283000,  # Modality LUT Sequence
        0x52009229,  # Shared Functional Groups (enhanced multi-frame)
        0x52009230,  # Per-Frame Functional Groups
        0x7FE00008,  # Float Pixel Data
        0x7FE00009,  # Double Float Pixel Data
    }
)
_TAG_WANTED = {tag: keyword for keyword, tag in WANTED.items()}


class _Unsupported(Exception):
    """The scanner meets something it does not handle; the caller uses pydicom instead."""


class _Truncated(Exception):
    pass


@dataclass
class NativeScan:
    transfer_syntax: str = ""
    values: dict[str, bytes | int] = field(default_factory=dict)
    pixel_offset: int = -1
    pixel_length: int = 0
    needs_pydicom: bool = False
    truncated: str = ""
    need_more: bool = False  # ``data`` was only the head of the file and did not reach the pixels
    explicit: bool = True

    @property
    def pixel_end(self) -> int:
        return self.pixel_offset + self.pixel_length


def _skip_sequence(buf: bytes, pos: int, explicit: bool) -> int:
    """Skip the items of an undefined-length sequence starting at ``pos``; return the end."""
    end = len(buf)
    while True:
        if pos + 8 > end:
            raise _Truncated(f"sequence runs past the end at byte {pos}")
        group, element, length = _TAG_LENGTH.unpack_from(buf, pos)
        pos += 8
        if group != 0xFFFE:
            raise _Unsupported("unexpected element in a sequence")
        if element == 0xE0DD:
            return pos
        if element != 0xE000:
            raise _Unsupported("unexpected delimiter in a sequence")
        if length == _UNDEFINED:
            pos = _skip_item(buf, pos, explicit)
        else:
            pos += length
            if pos > end:
                raise _Truncated(f"sequence item runs past the end at byte {pos}")


def _skip_item(buf: bytes, pos: int, explicit: bool) -> int:
    """Skip the elements of an undefined-length item up to and including its delimiter."""
    end = len(buf)
    while True:
        if pos + 12 > end:
            raise _Truncated(f"item runs past the end at byte {pos}")
        group, element = _TAG.unpack_from(buf, pos)
        if group == 0xFFFE and element == 0xE00D:
            return pos + 8
        if explicit:
            _, _, vr, length = _HEAD.unpack_from(buf, pos)
            if vr in _LONG_VRS:
                length = _U32.unpack_from(buf, pos + 8)[0]
                pos += 12
            else:
                pos += 8
        else:
            vr = b""
            length = _U32.unpack_from(buf, pos + 4)[0]
            pos += 8
        if length == _UNDEFINED:
            pos = _skip_sequence(buf, pos, explicit and vr != b"UN")
        else:
            pos += length
            if pos > end:
                raise _Truncated(f"element ({group:04X},{element:04X}) runs past the end")


def scan_native(data: bytes, size: int | None = None) -> NativeScan | None:
    """Scan a Part 10 file in a native little-endian syntax up to its Pixel Data element.

    ``data`` is the whole file or its head (``size`` = the file's length); for a head that
    stops short of the pixel data the result has ``need_more``. Returns None for files the
    scanner does not handle (no preamble, other transfer syntax, unexpected structure), and a
    scan with ``truncated`` set when an element runs past the end of the file.
    """
    if not has_preamble(data):
        return None
    scan = NativeScan()
    end = len(data)
    size = end if size is None else size
    pos = 132
    try:
        # file meta: always explicit VR little endian, group 0002
        while True:
            if pos + 12 > end:
                raise _Truncated("file meta information runs past the end")
            group, element, vr, length = _HEAD.unpack_from(data, pos)
            if group != 0x0002:
                break
            if vr in _LONG_VRS:
                length = _U32.unpack_from(data, pos + 8)[0]
                pos += 12
            else:
                pos += 8
            if pos + length > end:
                raise _Truncated("file meta information runs past the end")
            if element == 0x0010:
                scan.transfer_syntax = (
                    data[pos : pos + length].decode("ascii", "replace").strip("\x00 ")
                )
            pos += length
        explicit = FAST_SYNTAXES.get(scan.transfer_syntax)
        if explicit is None:
            return None
        scan.explicit = explicit
        values = scan.values
        wanted = _TAG_WANTED
        while True:
            if pos + 12 > end:
                if pos == end == size:
                    break  # a file without pixel data
                if pos + 8 > end or explicit:
                    raise _Truncated(f"element header cut at byte {pos}")
            group, element, vr, length = _HEAD.unpack_from(data, pos)
            tag = group << 16 | element
            if explicit:
                if vr in _LONG_VRS:
                    length = _U32.unpack_from(data, pos + 8)[0]
                    pos += 12
                else:
                    pos += 8
            else:
                vr = b""
                length = _U32.unpack_from(data, pos + 4)[0]
                pos += 8
            if tag == _PIXEL_DATA:
                if length == _UNDEFINED:
                    raise _Unsupported("encapsulated pixel data in a native syntax")
                scan.pixel_offset, scan.pixel_length = pos, length
                if pos + length > size:
                    scan.truncated = f"pixel data has {size - pos} of {length} bytes"
                break
            if length == _UNDEFINED:
                pos = _skip_sequence(data, pos, explicit and vr != b"UN")
                if tag in _SLOW_TAGS:
                    scan.needs_pydicom = True
                continue
            if pos + length > end:
                raise _Truncated(f"element ({group:04X},{element:04X}) runs past the end")
            keyword = wanted.get(tag)
            if keyword is not None:
                if tag in _US_TAGS:
                    if length != 2:
                        raise _Unsupported(f"{keyword} has length {length}")
                    values[keyword] = data[pos] | data[pos + 1] << 8
                else:
                    values[keyword] = data[pos : pos + length]
            elif tag in _SLOW_TAGS:
                scan.needs_pydicom = True
            pos += length
    except _Truncated as exc:
        if end < size:
            scan.need_more = True
        else:
            scan.truncated = str(exc)
    except (_Unsupported, struct.error):
        return None
    return scan


def tail_truncation(tail: bytes, explicit: bool) -> str:
    """Why the elements after the pixel data (e.g. trailing padding) are cut short, or ""."""
    pos, end = 0, len(tail)
    try:
        while pos < end:
            if pos + 8 > end:
                raise _Truncated("element header after the pixel data is cut")
            group, element, vr, length = _HEAD.unpack_from(tail, pos)
            if explicit and vr in _LONG_VRS:
                if pos + 12 > end:
                    raise _Truncated("element header after the pixel data is cut")
                length = _U32.unpack_from(tail, pos + 8)[0]
                pos += 12
            elif explicit:
                pos += 8
            else:
                vr, length, pos = b"", _U32.unpack_from(tail, pos + 4)[0], pos + 8
            if length == _UNDEFINED:
                pos = _skip_sequence(tail, pos, explicit and vr != b"UN")
            elif pos + length > end:
                raise _Truncated(
                    f"element ({group:04X},{element:04X}) after the pixel data runs past the end"
                )
            else:
                pos += length
    except _Truncated as exc:
        return str(exc)
    except (_Unsupported, struct.error):
        return ""  # not ours to judge: pydicom reads such trailers leniently too
    return ""
