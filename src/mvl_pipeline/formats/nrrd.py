"""NRRD bytes (attached or detached header) <-> :class:`~mvl_pipeline.core.volume.Volume` (pynrrd).

NRRD stores ``space directions`` (one vector per axis), ``space origin`` and a ``space`` naming the
world axes (``left-posterior-superior`` / ``LPS``, ``right-anterior-superior`` / ``RAS``,
``left-anterior-superior`` / ``LAS``); axes named left or posterior are negated into RAS. A NRRD
without a ``space`` but with ``spacings`` is read on an axis-aligned RAS grid (logged); anything
else without geometry is rejected. ``Volume.meta`` travels as the key/value field
``mvl_meta:=<json>``. Written in LPS, as 3D Slicer and ITK write.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import numpy as np

from mvl_pipeline.core.volume import Volume
from mvl_pipeline.formats.codec import VolumeFileError, as_3d, make_volume, storable

logger = logging.getLogger(__name__)

NRRD_META_KEY = "mvl_meta"


# NRRD world-space names -> sign that turns each axis into RAS+.
_NRRD_SPACES: dict[str, tuple[float, float, float]] = {
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
}


_NRRD_SAVE_SPACE = "left-posterior-superior"  # what 3D Slicer and ITK write


def nrrd_affine(header: dict[str, Any], path: str) -> np.ndarray:
    """Voxel->RAS affine from a pynrrd header (``space`` + ``space directions`` + origin)."""
    space = header.get("space")
    if space is not None:
        signs = _NRRD_SPACES.get(str(space).lower())
        if signs is None:
            raise VolumeFileError(f"unsupported NRRD space {space!r}", path=path)
        directions = np.asarray(header.get("space directions"), dtype=np.float64)  # (axis, xyz)
        if directions.shape != (3, 3) or not np.all(np.isfinite(directions)):
            raise VolumeFileError("NRRD space directions are not three 3-D vectors", path=path)
        origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
        flip = np.diag(signs)
        affine = np.eye(4)
        affine[:3, :3] = flip @ directions.T  # columns: the i, j, k axes in RAS
        affine[:3, 3] = flip @ origin
        return affine
    spacings = header.get("spacings")
    if spacings is not None and len(spacings) == 3 and np.all(np.isfinite(spacings)):
        logger.warning("NRRD without 'space': assuming an axis-aligned RAS grid [%s]", path)
        return np.diag([*np.asarray(spacings, dtype=np.float64), 1.0])
    raise VolumeFileError("NRRD has no world geometry (no 'space' nor 'spacings')", path=path)


def nrrd_header(volume: Volume) -> dict[str, Any]:
    flip = np.diag(_NRRD_SPACES[_NRRD_SAVE_SPACE])
    return {
        "dimension": 3,
        "space": _NRRD_SAVE_SPACE,
        "space directions": (flip @ volume.affine[:3, :3]).T,
        "space origin": flip @ volume.affine[:3, 3],
        "kinds": ["domain", "domain", "domain"],
        "endian": "little",
        NRRD_META_KEY: json.dumps(dict(volume.meta), sort_keys=True),
    }


def encode_nrrd(volume: Volume, *, encoding: str = "gzip", compresslevel: int = 6) -> bytes:
    """Attached-header NRRD bytes (LPS space) holding ``volume`` and its meta."""
    import nrrd

    header = {**nrrd_header(volume), "encoding": encoding}
    buffer = io.BytesIO()
    nrrd.write(buffer, storable(volume.array), header, compression_level=compresslevel)
    return buffer.getvalue()


def decode_nrrd(
    header_bytes: bytes, *, path: str, data_bytes: bytes | None = None
) -> Volume:
    """Parse NRRD bytes (or a detached header plus its data file's bytes) into a Volume."""
    import nrrd

    handle = io.BytesIO(header_bytes)
    try:
        header = nrrd.read_header(handle)
    except Exception as exc:  # pynrrd raises NRRDError, UnicodeDecodeError ...
        raise VolumeFileError(f"not a readable NRRD header ({exc})", path=path) from exc
    if int(header.get("dimension", 0)) != 3:
        raise VolumeFileError(f"NRRD dimension {header.get('dimension')} is not 3", path=path)
    try:
        if data_bytes is not None:
            header = {k: v for k, v in header.items() if k not in ("data file", "datafile")}
            handle = io.BytesIO(data_bytes)
        array = nrrd.read_data(header, handle, index_order="F")
    except Exception as exc:  # truncated or corrupt data
        raise VolumeFileError(f"cannot read NRRD data ({exc})", path=path) from exc
    array = as_3d(array, path)
    if tuple(array.shape) != tuple(int(s) for s in header["sizes"]):
        raise VolumeFileError(f"NRRD data shape {array.shape} != sizes {header['sizes']}", path=path)
    meta: dict[str, Any] = {}
    if NRRD_META_KEY in header:
        meta = dict(json.loads(header[NRRD_META_KEY]))
    return make_volume(array, nrrd_affine(header, path), meta, path)


def detached_data_file(header_bytes: bytes, path: str) -> str | None:
    """The data file a detached ``.nhdr`` header names (relative to the header), or None when
    the header holds its data itself."""
    import nrrd

    try:
        header = nrrd.read_header(io.BytesIO(header_bytes))
    except Exception as exc:  # pynrrd raises NRRDError, UnicodeDecodeError ...
        raise VolumeFileError(f"not a readable NRRD header ({exc})", path=path) from exc
    data_file = header.get("data file", header.get("datafile"))
    if data_file is None:
        return None
    if not isinstance(data_file, str) or not data_file or data_file.startswith("LIST"):
        raise VolumeFileError("detached NRRD header without a single data file", path=path)
    return data_file
