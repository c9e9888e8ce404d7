"""A folder of cases, one sub-folder per case pseudonym: the partitioned store of ingested and
preprocessed data (local or ``s3://``).

    <root>/<case_id>/image.nii.gz | image.npy
                     label.nii.gz | label.npy      (absent for unlabelled cases)
                     case.json                     (ids, affine, PHI-free metadata)
                     _COMPLETE                     (written last; incomplete folders are ignored)

``load()`` returns ``{case_id: loader}`` where ``loader()`` reads that case only (Kedro's
partitioned-dataset convention), so a node can stream over thousands of cases; with
``index_only: true`` it returns ``{case_id: {"patient_id", "meta"}}`` from the case.json files
alone (what a split needs, without reading a voxel). ``save()`` takes
``{case_id: Case | callable returning Case | None}``: it writes only the cases given (each one
atomically, replacing an older version of the same case), and ``None`` deletes a case. Cases not
named are left untouched, which is what makes incremental runs cheap.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
from kedro.io import AbstractDataset, DatasetError

from mvl_pipeline.core import storage
from mvl_pipeline.core.case import Case
from mvl_pipeline.core.errors import UnreadableFileError
from mvl_pipeline.core.volume import Volume
from mvl_pipeline.formats.nifti import decode_nifti, encode_nifti

logger = logging.getLogger(__name__)

_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
FORMATS = ("nifti", "npy")


def _check_case_id(case_id: str) -> str:
    if not _CASE_ID.match(case_id):
        raise DatasetError(f"invalid case id {case_id!r}: letters, digits, '_', '.', '-' only")
    return case_id


def _encode(volume: Volume, fmt: str, compresslevel: int) -> bytes:
    if fmt == "npy":
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(volume.array), allow_pickle=False)
        return buffer.getvalue()
    # the geometry travels in case.json; the NIfTI header carries it too, for viewers
    return encode_nifti(Volume(volume.array, volume.affine, {}), compress=True, compresslevel=compresslevel)


def _decode(data: bytes, fmt: str, path: str) -> np.ndarray:
    if fmt == "npy":
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UnreadableFileError(f"cannot decode npy volume: {exc}", path=path) from exc
    return np.asarray(decode_nifti(data, compressed=True, path=path, channels=True).array)  # (C, X, Y, Z) too


class CaseStoreDataset(AbstractDataset[dict[str, Callable[[], Case]], dict[str, Any]]):
    """Partitioned store of :class:`~mvl_pipeline.core.case.Case` objects (see module doc)."""

    def __init__(
        self,
        *,
        path: str,
        format: str = "nifti",  # noqa: A002 - the catalog key users write
        compresslevel: int = 1,
        mmap: bool = True,
        index_only: bool = False,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if format not in FORMATS:
            raise DatasetError(f"format must be one of {FORMATS}, got {format!r}")
        self._fs, self._protocol, self._root = storage.filesystem(path, credentials, fs_args)
        self._format = format
        self._suffix = ".npy" if format == "npy" else ".nii.gz"
        self._compresslevel = int(compresslevel)
        self._mmap = bool(mmap)
        self._index_only = bool(index_only)
        self.metadata = metadata

    # -- reading -------------------------------------------------------------------------
    def case_ids(self) -> list[str]:
        """Ids of the completely written cases, sorted."""
        if not self._fs.exists(self._root):
            return []
        ids = []
        for entry in self._fs.ls(self._root, detail=True):
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry["type"] == "directory" and not name.startswith(".") and _CASE_ID.match(name):
                if storage.is_complete(self._fs, self._protocol, storage.join(self._root, name)):
                    ids.append(name)
        return sorted(ids)

    def load(self) -> dict[str, Callable[[], Case]] | dict[str, dict[str, Any]]:
        if self._index_only:  # ids and PHI-free records only: no image is read
            return {case_id: self.load_record(case_id) for case_id in self.case_ids()}
        return {case_id: partial(self.load_case, case_id) for case_id in self.case_ids()}

    def load_record(self, case_id: str) -> dict[str, Any]:
        """``{"patient_id", "meta"}`` of one case, from its case.json only."""
        folder = storage.join(self._root, _check_case_id(case_id))
        try:
            record = json.loads(self._fs.cat_file(storage.join(folder, "case.json")))
        except (FileNotFoundError, json.JSONDecodeError) as exc:
            raise UnreadableFileError(f"case record unreadable: {exc}", path=folder) from exc
        return {"patient_id": record["patient_id"], "meta": record.get("meta", {})}

    def _read_array(self, folder: str, stem: str) -> np.ndarray:
        path = storage.join(folder, stem + self._suffix)
        if self._format == "npy" and self._protocol == "file" and self._mmap:
            try:
                return np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise UnreadableFileError(f"cannot read volume: {exc}", path=path) from exc
        try:
            data = self._fs.cat_file(path)
        except FileNotFoundError as exc:
            raise UnreadableFileError("volume file missing", path=path) from exc
        return _decode(data, self._format, path)

    def load_case(self, case_id: str) -> Case:
        folder = storage.join(self._root, _check_case_id(case_id))
        if not storage.is_complete(self._fs, self._protocol, folder):
            raise DatasetError(f"case {case_id!r} is missing or incomplete in {self._describe()['path']}")
        try:
            record = json.loads(self._fs.cat_file(storage.join(folder, "case.json")))
        except (FileNotFoundError, json.JSONDecodeError) as exc:
            raise UnreadableFileError(f"case record unreadable: {exc}", path=folder) from exc
        image = Volume(
            self._read_array(folder, "image"),
            np.asarray(record["image"]["affine"]),
            record["image"].get("meta", {}),
        )
        label = None
        if record.get("label") is not None:
            label = Volume(
                self._read_array(folder, "label"),
                np.asarray(record["label"]["affine"]),
                record["label"].get("meta", {}),
            )
        return Case(record["case_id"], record["patient_id"], image, label, record.get("meta", {}))

    # -- writing -------------------------------------------------------------------------
    def save(self, data: dict[str, Any]) -> None:
        for case_id, value in sorted(data.items()):
            _check_case_id(case_id)
            folder = storage.join(self._root, case_id)
            if value is None:
                if self._fs.exists(folder):
                    storage.remove_directory(self._fs, self._protocol, folder)
                    logger.info("removed case %s", case_id)
                continue
            case = value() if callable(value) else value
            if not isinstance(case, Case):
                raise DatasetError(f"case {case_id!r}: expected a Case, got {type(case).__name__}")
            if case.case_id != case_id:
                raise DatasetError(f"case key {case_id!r} does not match case_id {case.case_id!r}")
            self._write_case(folder, case)

    def _write_case(self, folder: str, case: Case) -> None:
        record: dict[str, Any] = {
            "case_id": case.case_id,
            "patient_id": case.patient_id,
            "format": self._format,
            "meta": dict(case.meta),
            "image": _volume_record(case.image),
            "label": None if case.label is None else _volume_record(case.label),
        }
        with storage.atomic_directory(self._fs, self._protocol, folder) as target:
            files = {"image": case.image} | ({} if case.label is None else {"label": case.label})
            for stem, volume in files.items():
                payload = _encode(volume, self._format, self._compresslevel)
                self._put(storage.join(target, stem + self._suffix), payload)
            self._put(
                storage.join(target, "case.json"),
                json.dumps(record, indent=1, sort_keys=True, default=_json_default).encode(),
            )

    def _put(self, path: str, payload: bytes) -> None:
        if self._protocol == "file":
            with open(path, "wb") as handle:
                handle.write(payload)
        else:
            self._fs.pipe_file(path, payload)

    def _exists(self) -> bool:
        return bool(self.case_ids())

    def _describe(self) -> dict[str, Any]:
        return {"path": storage.full_path(self._protocol, self._root), "format": self._format}


def _volume_record(volume: Volume) -> dict[str, Any]:
    return {
        "affine": volume.affine.tolist(),
        "shape": list(volume.shape),
        "dtype": str(volume.array.dtype),
        "meta": dict(volume.meta),
    }


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
