"""Kedro datasets for DICOM: an image series folder and a DICOM SEG file.

Both work the same on local paths and ``s3://`` (fsspec via ``core.storage``) and save
atomically: a crash mid-save never leaves something a later load accepts.

Catalog example::

    ct_series:
      type: mvl_pipeline.datasets.dicom.DicomSeriesDataset
      filepath: s3://bucket/02_intermediate/case-1f3a/ct
      credentials: s3
      load_args: {min_slices: 3, spacing_tolerance: 0.01}

Folders saved by :class:`DicomSeriesDataset` carry a ``_COMPLETE`` marker and loads require it
(``load_args: {require_complete: false}`` reads folders written by other tools, e.g. a drop).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

from kedro.io import AbstractDataset
from pydicom.dataset import Dataset

from mvl_pipeline.core.errors import EmptySeriesError, UnreadableFileError
from mvl_pipeline.core.storage import (
    COMPLETE_MARKER,
    atomic_directory,
    filesystem,
    full_path,
    is_complete,
    join,
    write_bytes_atomic,
)
from mvl_pipeline.core.volume import Volume
from mvl_pipeline.dicom.assemble import assemble_series
from mvl_pipeline.dicom.read import read_dataset
from mvl_pipeline.dicom.write import SeriesUids, dataset_bytes, write_image_series

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def save_dataset(ds: Dataset, fs: Any, protocol: str, path: str) -> None:
    """Write ``ds`` to ``path`` on ``fs`` atomically (``core.storage.write_bytes_atomic``)."""
    write_bytes_atomic(fs, protocol, path, dataset_bytes(ds))


@dataclass(frozen=True)
class DicomSeriesSave:
    """What :class:`DicomSeriesDataset` saves: a volume plus the header and UIDs of its series."""

    volume: Volume
    header: Mapping[str, Any]
    uids: SeriesUids
    rescale: tuple[float, float] = (1.0, -1024.0)


@dataclass(frozen=True)
class DicomSeg:
    """A loaded DICOM SEG: the data set and its segment table ``{segment number: label}``."""

    dataset: Dataset
    segments: dict[int, str] = field(default_factory=dict)


class _FsDataset:
    """fsspec set-up shared by both datasets (kept out of ``_describe``: no credentials)."""

    def _setup(
        self,
        filepath: str | os.PathLike,
        credentials: dict[str, Any] | None,
        fs_args: dict[str, Any] | None,
        load_args: dict[str, Any] | None,
        save_args: dict[str, Any] | None,
        metadata: dict[str, Any] | None,
    ) -> None:
        self._filepath = str(filepath)
        self._fs, self._protocol, self._path = filesystem(
            self._filepath, deepcopy(credentials) or {}, deepcopy(fs_args) or {}
        )
        self._load_args = {**getattr(self, "DEFAULT_LOAD_ARGS", {}), **(load_args or {})}
        self._save_args = {**getattr(self, "DEFAULT_SAVE_ARGS", {}), **(save_args or {})}
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {
            "filepath": self._filepath,
            "protocol": self._protocol,
            "load_args": self._load_args,
            "save_args": self._save_args,
        }


class DicomSeriesDataset(_FsDataset, AbstractDataset[DicomSeriesSave | Sequence[Dataset], Volume]):
    """One folder = one DICOM image series.

    ``load()`` assembles every file in the folder (not sub-folders; names starting with ``.``
    or ``_`` are ignored) into a :class:`Volume` with
    :func:`~mvl_pipeline.dicom.assemble.assemble_series` (``load_args`` go to it, except
    ``require_complete``). ``save()`` takes a :class:`DicomSeriesSave` (written with
    ``write_image_series``) or ready-made data sets (e.g. de-identified ones) and writes one
    ``<SOPInstanceUID>.dcm`` per slice, atomically for the whole folder.
    """

    DEFAULT_LOAD_ARGS: dict[str, Any] = {"require_complete": True}

    def __init__(
        self,
        *,
        filepath: str | os.PathLike,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
        load_args: dict[str, Any] | None = None,
        save_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._setup(filepath, credentials, fs_args, load_args, save_args, metadata)

    def _slice_paths(self) -> list[str]:
        if not self._fs.isdir(self._path):
            raise UnreadableFileError("no such series folder", path=self._filepath)
        if self._load_args.get("require_complete", True) and not is_complete(
            self._fs, self._protocol, self._path
        ):
            raise UnreadableFileError(
                f"incomplete series folder (no {COMPLETE_MARKER} marker: an interrupted save?)",
                path=self._filepath,
            )
        paths = sorted(
            p
            for p in self._fs.find(self._path, maxdepth=1, withdirs=False)
            if not os.path.basename(p.rstrip("/")).startswith((".", "_"))
        )
        if not paths:
            raise EmptySeriesError("no slices in the series folder", path=self._filepath)
        return paths

    def load(self) -> Volume:
        paths = self._slice_paths()
        kwargs = {k: v for k, v in self._load_args.items() if k != "require_complete"}
        if self._protocol == "file":
            return assemble_series(paths, **kwargs)
        contents = self._fs.cat([full_path(self._protocol, p) for p in paths], on_error="return")
        sources = []
        for key, value in sorted(contents.items()):
            if isinstance(value, Exception):
                raise UnreadableFileError(f"cannot read slice: {type(value).__name__}", path=key)
            sources.append((key, value))
        return assemble_series(sources, **kwargs)

    def save(self, data: DicomSeriesSave | Sequence[Dataset]) -> None:
        if isinstance(data, DicomSeriesSave):
            datasets = write_image_series(
                data.volume, header=data.header, uids=data.uids, rescale=data.rescale
            )
        else:
            datasets = list(data)
        if not datasets:
            raise EmptySeriesError("nothing to save: no slices", path=self._filepath)
        with atomic_directory(self._fs, self._protocol, self._path) as folder:
            for ds in datasets:
                save_dataset(ds, self._fs, self._protocol, join(folder, f"{ds.SOPInstanceUID}.dcm"))
        self._fs.invalidate_cache(self._path)

    def _exists(self) -> bool:
        if not self._fs.isdir(self._path):
            return False
        if self._load_args.get("require_complete", True):
            return is_complete(self._fs, self._protocol, self._path)
        return True


class DicomSegDataset(_FsDataset, AbstractDataset[Dataset | DicomSeg, DicomSeg]):
    """One DICOM SEG file. ``load()`` -> :class:`DicomSeg` (data set + segment table);
    ``save()`` takes a SEG data set (e.g. from ``write_segmentation``) and writes it atomically.

    Turning it into a label volume needs the image grid, so that is a node's job:
    ``read_segmentation(seg.dataset, image_volume)``.
    """

    def __init__(
        self,
        *,
        filepath: str | os.PathLike,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
        load_args: dict[str, Any] | None = None,
        save_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._setup(filepath, credentials, fs_args, load_args, save_args, metadata)

    def load(self) -> DicomSeg:
        try:
            data = self._fs.cat_file(full_path(self._protocol, self._path))
        except FileNotFoundError as exc:
            raise UnreadableFileError("no such file", path=self._filepath) from exc
        except OSError as exc:
            raise UnreadableFileError(f"cannot read file: {exc}", path=self._filepath) from exc
        ds = read_dataset((self._filepath, data))
        if str(ds.get("SOPClassUID", "")) != SEGMENTATION_STORAGE:
            raise UnreadableFileError(
                f"not a DICOM SEG (SOP Class {ds.get('SOPClassUID', 'missing')})",
                path=self._filepath,
            )
        segments = {
            int(item.SegmentNumber): str(item.get("SegmentLabel", "") or "")
            for item in ds.get("SegmentSequence", [])
        }
        return DicomSeg(ds, segments)

    def save(self, data: Dataset | DicomSeg) -> None:
        ds = data.dataset if isinstance(data, DicomSeg) else data
        if str(ds.get("SOPClassUID", "")) != SEGMENTATION_STORAGE:
            raise UnreadableFileError(
                "refusing to save a non-SEG data set as a DICOM SEG", path=self._filepath
            )
        save_dataset(ds, self._fs, self._protocol, self._path)
        self._fs.invalidate_cache(self._path)

    def _exists(self) -> bool:
        return self._fs.isfile(self._path)
