"""``VolumeDataset``: one NIfTI or NRRD file <-> :class:`~mvl_pipeline.core.volume.Volume`.

The format follows the file name (the registry of :mod:`mvl_pipeline.formats.volumes`): ``.nii``
/ ``.nii.gz`` or ``.nrrd`` / ``.nhdr`` (a detached header next to its data file); geometry and
metadata as the codecs define them (:mod:`mvl_pipeline.formats.nifti`,
:mod:`mvl_pipeline.formats.nrrd`). Local paths and ``s3://`` URLs behave the same (fsspec).

Saves are atomic (:mod:`mvl_pipeline.core.storage`). A ``.nhdr`` save writes its data file under
a content-addressed name first and the header last, so a crash leaves the old header pointing at
its old, untouched data file. Bad input raises :class:`VolumeFileError` (an
``UnreadableFileError`` and a Kedro ``DatasetError``) naming the path.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
from copy import deepcopy
from pathlib import PurePosixPath
from typing import Any

from kedro.io.core import AbstractVersionedDataset, DatasetError, Version, get_filepath_str

from mvl_pipeline.core import storage
from mvl_pipeline.core.volume import Volume
from mvl_pipeline.formats import codec
from mvl_pipeline.formats.nrrd import nrrd_header
from mvl_pipeline.formats.volumes import encode_volume, read_volume, volume_format

logger = logging.getLogger(__name__)


class VolumeFileError(codec.VolumeFileError, DatasetError):
    """A volume file is missing, truncated, not NIfTI/NRRD, or not a 3-D volume."""


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
        try:
            volume = read_volume(self._read(path), path, read_sibling=self._read)
        except codec.VolumeFileError as exc:
            raise VolumeFileError(exc.detail, path=exc.path) from exc
        dtype = self._load_args["dtype"]
        if dtype is not None:
            volume = Volume(volume.array.astype(dtype), volume.affine, volume.meta)
        return volume

    def save(self, data: Volume) -> None:
        if not isinstance(data, Volume):
            raise DatasetError(f"VolumeDataset saves a Volume, got {type(data).__name__}")
        path = get_filepath_str(self._get_save_path(), self._protocol)
        level = int(self._save_args["compresslevel"])
        if self._format == "nhdr":
            self._save_nhdr(data, path, level)
            self._invalidate_cache()
            return
        payload = encode_volume(data, path, compresslevel=level, nrrd_encoding=self._save_args["nrrd_encoding"])
        storage.write_bytes_atomic(self._fs, self._protocol, path, payload)
        self._invalidate_cache()

    def _save_nhdr(self, volume: Volume, path: str, level: int) -> None:
        """Data file under a content-addressed name, then the header, then drop the old data."""
        import nrrd

        encoding = self._save_args["nrrd_encoding"]
        array = codec.storable(volume.array)
        digest = hashlib.sha256(array.tobytes() + str(array.dtype).encode()).hexdigest()[:16]
        stem = PurePosixPath(path).name[: -len(".nhdr")]
        suffix = {"raw": ".raw", "gzip": ".raw.gz", "gz": ".raw.gz"}.get(encoding)
        if suffix is None:
            raise DatasetError(f"nrrd_encoding {encoding!r} not supported for .nhdr")
        data_name = f"{stem}.{digest}{suffix}"
        old_data = self._previous_data_file(path)
        with tempfile.TemporaryDirectory() as tmp:
            local_header = os.path.join(tmp, f"{stem}.nhdr")
            header = {**nrrd_header(volume), "encoding": encoding}
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
