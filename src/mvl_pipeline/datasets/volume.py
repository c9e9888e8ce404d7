"""``VolumeDataset``: one NIfTI or NRRD file <-> :class:`~mvl_pipeline.core.volume.Volume`.

The format follows the file name: ``.nii`` / ``.nii.gz`` (nibabel; NIfTI-1 and NIfTI-2 are read,
NIfTI-1 is written) or ``.nrrd`` / ``.nhdr`` (pynrrd; ``.nhdr`` is a detached header next to its
data file). Local paths and ``s3://`` URLs behave the same (fsspec).

Geometry. The loaded ``Volume.affine`` maps voxel ``(i, j, k)`` to RAS+ millimetres. NIfTI stores
RAS+ already (sform, else qform). NRRD stores ``space directions`` (one vector per axis),
``space origin`` and a ``space`` naming the world axes (``left-posterior-superior`` / ``LPS``,
``right-anterior-superior`` / ``RAS``, ``left-anterior-superior`` / ``LAS``); axes named left or
posterior are negated into RAS. A NRRD without a ``space`` but with ``spacings`` is read on an
axis-aligned RAS grid (logged); anything else without geometry is rejected.

Metadata. ``Volume.meta`` (JSON-serialisable) travels *inside* the file, so that one atomic write
saves the whole volume: in NIfTI as a comment extension (code 6) whose text is
``mvl_pipeline.volume/1 {"meta": ..., "affine": ...}`` (the float64 affine as well, since the
NIfTI header keeps only float32; it is used when it agrees with the header to 1e-3 mm), and in
NRRD as the key/value field ``mvl_meta:=<json>``. Files written by other tools load with
``meta == {}``.

Data types are kept: float images stay float, integer labels keep their integer type (``bool``
is written as ``uint8``). Saves are atomic (:mod:`mvl_pipeline.core.storage`); ``.nii.gz`` and
gzip NRRD are written deterministically (no timestamps). A ``.nhdr`` save writes its data file
under a content-addressed name first and the header last, so a crash leaves the old header
pointing at its old, untouched data file.

Bad input raises :class:`VolumeFileError` (an ``UnreadableFileError`` and a Kedro
``DatasetError``) naming the path.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import tempfile
from copy import deepcopy
from pathlib import PurePosixPath
from typing import Any

import numpy as np
from kedro.io.core import AbstractVersionedDataset, DatasetError, Version, get_filepath_str

from mvl_pipeline.core import storage
from mvl_pipeline.core.errors import UnreadableFileError
from mvl_pipeline.core.volume import Volume

logger = logging.getLogger(__name__)

NIFTI_META_CODE = 6  # NIFTI_ECODE_COMMENT
NIFTI_META_PREFIX = b"mvl_pipeline.volume/1 "
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


class VolumeFileError(UnreadableFileError, DatasetError):
    """A volume file is missing, truncated, not NIfTI/NRRD, or not a 3-D volume."""

    reason = "unreadable_file"


def volume_format(path: str) -> str:
    """``"nifti"``, ``"nifti-gz"``, ``"nrrd"`` or ``"nhdr"`` from the file name."""
    name = PurePosixPath(path).name.lower()
    for suffix, fmt in ((".nii.gz", "nifti-gz"), (".nii", "nifti"), (".nrrd", "nrrd"), (".nhdr", "nhdr")):
        if name.endswith(suffix):
            return fmt
    raise ValueError(f"{path!r}: expected .nii, .nii.gz, .nrrd or .nhdr")


def _storable(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    return np.ascontiguousarray(array)


# -------------------------------------------------------------------------------------- NIfTI


def encode_nifti(volume: Volume, *, compress: bool, compresslevel: int = 6) -> bytes:
    """NIfTI-1 bytes (gzip-compressed when ``compress``) holding ``volume`` and its meta."""
    import nibabel as nib

    array = _storable(volume.array)
    image = nib.Nifti1Image(array, volume.affine, dtype=array.dtype)
    image.header.set_sform(volume.affine, code=1)
    image.header.set_qform(volume.affine, code=1)
    image.header.set_xyzt_units("mm")
    payload = json.dumps(
        {"meta": dict(volume.meta), "affine": volume.affine.tolist()}, sort_keys=True
    ).encode("utf-8")
    image.header.extensions.append(
        nib.nifti1.Nifti1Extension(NIFTI_META_CODE, NIFTI_META_PREFIX + payload)
    )
    raw = image.to_bytes()
    return gzip.compress(raw, compresslevel=compresslevel, mtime=0) if compress else raw


def decode_nifti(data: bytes, *, compressed: bool, path: str) -> Volume:
    """Parse NIfTI-1/2 bytes into a Volume; :class:`VolumeFileError` naming ``path`` if bad."""
    import nibabel as nib

    try:
        raw = gzip.decompress(data) if compressed else data
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise VolumeFileError(f"not a readable gzip file ({exc})", path=path) from exc
    if len(raw) < 348:
        raise VolumeFileError(f"too short for a NIfTI header ({len(raw)} bytes)", path=path)
    sizeof_hdr = {int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")}
    if 540 in sizeof_hdr:
        klass: Any = nib.Nifti2Image
    elif 348 in sizeof_hdr:
        klass = nib.Nifti1Image
    else:
        raise VolumeFileError("not a NIfTI file (bad header size field)", path=path)
    try:
        image = klass.from_bytes(raw)
        magic = bytes(image.header["magic"])[:3]
        if magic not in (b"n+1", b"n+2", b"ni1", b"ni2"):
            raise ValueError(f"bad NIfTI magic {magic!r}")
        array = np.asanyarray(image.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt or truncated data
        raise VolumeFileError(f"not a readable NIfTI volume ({exc})", path=path) from exc
    array = _as_3d(array, path)
    affine = np.asarray(image.affine, dtype=np.float64)
    meta: dict[str, Any] = {}
    for extension in image.header.extensions:
        content = extension.get_content()
        if extension.get_code() == NIFTI_META_CODE and content.startswith(NIFTI_META_PREFIX):
            stored = json.loads(content[len(NIFTI_META_PREFIX) :].decode("utf-8"))
            meta = dict(stored.get("meta", {}))
            exact = np.asarray(stored.get("affine", affine), dtype=np.float64)
            if exact.shape == (4, 4) and np.allclose(exact, affine, atol=1e-3):
                affine = exact
    return _volume(array, affine, meta, path)


# --------------------------------------------------------------------------------------- NRRD


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


def _nrrd_header(volume: Volume) -> dict[str, Any]:
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

    header = {**_nrrd_header(volume), "encoding": encoding}
    buffer = io.BytesIO()
    nrrd.write(buffer, _storable(volume.array), header, compression_level=compresslevel)
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
    array = _as_3d(array, path)
    if tuple(array.shape) != tuple(int(s) for s in header["sizes"]):
        raise VolumeFileError(f"NRRD data shape {array.shape} != sizes {header['sizes']}", path=path)
    meta: dict[str, Any] = {}
    if NRRD_META_KEY in header:
        meta = dict(json.loads(header[NRRD_META_KEY]))
    return _volume(array, nrrd_affine(header, path), meta, path)


def _as_3d(array: np.ndarray, path: str) -> np.ndarray:
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise VolumeFileError(f"not a 3-D volume (shape {array.shape})", path=path)
    return np.ascontiguousarray(array)


def _volume(array: np.ndarray, affine: np.ndarray, meta: dict[str, Any], path: str) -> Volume:
    try:
        return Volume(array, affine, meta)
    except ValueError as exc:
        raise VolumeFileError(f"invalid volume geometry ({exc})", path=path) from exc


# ------------------------------------------------------------------------------------ dataset


class VolumeDataset(AbstractVersionedDataset[Volume, Volume]):
    """A NIfTI or NRRD volume file (local or ``s3://``) as a :class:`Volume` (see module doc).

    Example catalog entry::

        reference_image:
          type: mvl_pipeline.datasets.volume.VolumeDataset
          filepath: data/01_raw/reference/image.nii.gz
          save_args: {compresslevel: 6}
          load_args: {dtype: float32}     # optional cast on load
    """

    DEFAULT_SAVE_ARGS: dict[str, Any] = {"compresslevel": 6, "nrrd_encoding": "gzip"}
    DEFAULT_LOAD_ARGS: dict[str, Any] = {"dtype": None}

    def __init__(  # noqa: PLR0913
        self,
        *,
        filepath: str,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
        load_args: dict[str, Any] | None = None,
        save_args: dict[str, Any] | None = None,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._format = volume_format(str(filepath))
        self._fs, self._protocol, path = storage.filesystem(
            str(filepath), deepcopy(credentials), deepcopy(fs_args)
        )
        self._load_args = {**self.DEFAULT_LOAD_ARGS, **(load_args or {})}
        self._save_args = {**self.DEFAULT_SAVE_ARGS, **(save_args or {})}
        for given, allowed, what in (
            (self._load_args, self.DEFAULT_LOAD_ARGS, "load_args"),
            (self._save_args, self.DEFAULT_SAVE_ARGS, "save_args"),
        ):
            unknown = set(given) - set(allowed)
            if unknown:
                raise DatasetError(f"unknown {what} {sorted(unknown)}; allowed: {sorted(allowed)}")
        self.metadata = metadata
        super().__init__(
            filepath=PurePosixPath(path),
            version=version,
            exists_function=self._fs.exists,
            glob_function=self._fs.glob,
        )

    def _describe(self) -> dict[str, Any]:
        return {
            "filepath": self._filepath,
            "protocol": self._protocol,
            "format": self._format,
            "load_args": self._load_args,
            "save_args": self._save_args,
            "version": self._version,
        }

    def _read(self, path: str) -> bytes:
        try:
            return self._fs.cat_file(path)
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise VolumeFileError("no such volume file", path=path) from exc

    def load(self) -> Volume:
        path = get_filepath_str(self._get_load_path(), self._protocol)
        if self._format in ("nifti", "nifti-gz"):
            volume = decode_nifti(
                self._read(path), compressed=self._format == "nifti-gz", path=path
            )
        elif self._format == "nrrd":
            volume = decode_nrrd(self._read(path), path=path)
        else:
            volume = self._load_nhdr(path)
        dtype = self._load_args["dtype"]
        if dtype is not None:
            volume = Volume(volume.array.astype(dtype), volume.affine, volume.meta)
        return volume

    def _load_nhdr(self, path: str) -> Volume:
        import nrrd

        header_bytes = self._read(path)
        try:
            header = nrrd.read_header(io.BytesIO(header_bytes))
        except Exception as exc:  # pynrrd raises NRRDError, UnicodeDecodeError ...
            raise VolumeFileError(f"not a readable NRRD header ({exc})", path=path) from exc
        data_file = header.get("data file", header.get("datafile"))
        if not isinstance(data_file, str) or not data_file or data_file.startswith("LIST"):
            raise VolumeFileError("detached NRRD header without a single data file", path=path)
        data_path = (
            data_file
            if data_file.startswith("/")
            else storage.join(str(PurePosixPath(path).parent), data_file)
        )
        return decode_nrrd(header_bytes, path=path, data_bytes=self._read(data_path))

    def save(self, data: Volume) -> None:
        if not isinstance(data, Volume):
            raise DatasetError(f"VolumeDataset saves a Volume, got {type(data).__name__}")
        path = get_filepath_str(self._get_save_path(), self._protocol)
        level = int(self._save_args["compresslevel"])
        if self._format in ("nifti", "nifti-gz"):
            payload = encode_nifti(data, compress=self._format == "nifti-gz", compresslevel=level)
        elif self._format == "nrrd":
            payload = encode_nrrd(
                data, encoding=self._save_args["nrrd_encoding"], compresslevel=level
            )
        else:
            self._save_nhdr(data, path, level)
            self._invalidate_cache()
            return
        storage.write_bytes_atomic(self._fs, self._protocol, path, payload)
        self._invalidate_cache()

    def _save_nhdr(self, volume: Volume, path: str, level: int) -> None:
        """Data file under a content-addressed name, then the header, then drop the old data."""
        import nrrd

        encoding = self._save_args["nrrd_encoding"]
        array = _storable(volume.array)
        digest = hashlib.sha256(array.tobytes() + str(array.dtype).encode()).hexdigest()[:16]
        stem = PurePosixPath(path).name[: -len(".nhdr")]
        suffix = {"raw": ".raw", "gzip": ".raw.gz", "gz": ".raw.gz"}.get(encoding)
        if suffix is None:
            raise DatasetError(f"nrrd_encoding {encoding!r} not supported for .nhdr")
        data_name = f"{stem}.{digest}{suffix}"
        old_data = self._previous_data_file(path)
        with tempfile.TemporaryDirectory() as tmp:
            local_header = os.path.join(tmp, f"{stem}.nhdr")
            header = {**_nrrd_header(volume), "encoding": encoding}
            nrrd.write(
                local_header,
                array,
                header,
                detached_header=os.path.join(tmp, data_name),
                compression_level=level,
            )
            with open(os.path.join(tmp, data_name), "rb") as handle:
                data_bytes = handle.read()
            with open(local_header, "rb") as handle:
                header_bytes = handle.read()
        parent = str(PurePosixPath(path).parent)
        storage.write_bytes_atomic(self._fs, self._protocol, storage.join(parent, data_name), data_bytes)
        storage.write_bytes_atomic(self._fs, self._protocol, path, header_bytes)
        if old_data is not None and PurePosixPath(old_data).name != data_name:
            try:
                self._fs.rm_file(storage.join(parent, PurePosixPath(old_data).name))
            except FileNotFoundError:
                pass

    def _previous_data_file(self, path: str) -> str | None:
        import nrrd

        try:
            header = nrrd.read_header(io.BytesIO(self._fs.cat_file(path)))
        except Exception:  # no previous header, or an unreadable one: nothing to clean up
            return None
        data_file = header.get("data file", header.get("datafile"))
        return data_file if isinstance(data_file, str) and "/" not in data_file else None

    def _exists(self) -> bool:
        try:
            path = get_filepath_str(self._get_load_path(), self._protocol)
        except DatasetError:
            return False
        return bool(self._fs.exists(path))

    def _release(self) -> None:
        super()._release()
        self._invalidate_cache()

    def _invalidate_cache(self) -> None:
        self._fs.invalidate_cache(get_filepath_str(self._filepath, self._protocol))
