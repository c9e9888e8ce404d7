"""The volume file formats and their suffixes: the one registry everyone asks.

``.nii`` / ``.nii.gz`` -> :mod:`.nifti`, ``.nrrd`` / ``.nhdr`` (detached header) -> :mod:`.nrrd`.
:func:`read_volume` decodes a file's bytes whatever its format (a detached header's data file is
fetched through the caller's ``read_sibling``), :func:`encode_volume` writes one. Used by the
``VolumeDataset``, the case store, ingest (drop files, MSD tasks) and predict.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable

from mvl_pipeline.core.volume import Volume
from mvl_pipeline.formats.codec import VolumeFileError
from mvl_pipeline.formats.nifti import decode_nifti, encode_nifti
from mvl_pipeline.formats.nrrd import decode_nrrd, detached_data_file, encode_nrrd

#: suffix -> format name, longest suffix first
VOLUME_FORMATS = {".nii.gz": "nifti-gz", ".nii": "nifti", ".nrrd": "nrrd", ".nhdr": "nhdr"}
VOLUME_SUFFIXES = tuple(VOLUME_FORMATS)


def volume_suffix(path: str) -> str | None:
    """The volume suffix of ``path`` (case-insensitive), or None for any other file."""
    lower = str(path).lower()
    return next((s for s in VOLUME_SUFFIXES if lower.endswith(s)), None)


def volume_format(path: str) -> str:
    """``"nifti"``, ``"nifti-gz"``, ``"nrrd"`` or ``"nhdr"`` from the file name."""
    suffix = volume_suffix(posixpath.basename(str(path)))
    if suffix is None:
        raise ValueError(f"{path!r}: expected one of {', '.join(VOLUME_SUFFIXES)}")
    return VOLUME_FORMATS[suffix]


def read_volume(
    data: bytes,
    path: str,
    *,
    read_sibling: Callable[[str], bytes] | None = None,
    name: str | None = None,
    channels: bool = False,
) -> Volume:
    """Decode a volume file's bytes. ``path`` picks the format; a detached ``.nhdr`` reads its
    data file with ``read_sibling(path of the data file)``. ``name`` is what errors and logs
    show (a drop's paths may carry names: ingest passes a placeholder). ``channels``: a 4-D NIfTI
    is read as a channel-first multi-channel volume (NRRD stays 3-D only)."""
    fmt, shown = volume_format(path), name or path
    if fmt in ("nifti", "nifti-gz"):
        return decode_nifti(data, compressed=fmt == "nifti-gz", path=shown, channels=channels)
    data_file = detached_data_file(data, shown) if fmt == "nhdr" else None
    if data_file is None:
        return decode_nrrd(data, path=shown)
    if read_sibling is None:
        raise VolumeFileError("a detached NRRD header needs its data file", path=shown)
    sibling = data_file if data_file.startswith("/") else posixpath.join(posixpath.dirname(path), data_file)
    return decode_nrrd(data, path=shown, data_bytes=read_sibling(sibling))


def encode_volume(volume: Volume, path: str, *, compresslevel: int = 6, nrrd_encoding: str = "gzip") -> bytes:
    """A NIfTI or attached-header NRRD file's bytes for ``volume`` (format from ``path``)."""
    fmt = volume_format(path)
    if fmt in ("nifti", "nifti-gz"):
        return encode_nifti(volume, compress=fmt == "nifti-gz", compresslevel=compresslevel)
    if fmt == "nrrd":
        return encode_nrrd(volume, encoding=nrrd_encoding, compresslevel=compresslevel)
    raise ValueError(f"{path!r}: a detached .nhdr is written by VolumeDataset (header + data file)")
