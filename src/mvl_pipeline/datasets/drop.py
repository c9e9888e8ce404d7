"""``DropFolderDataset``: a hospital drop folder (local or ``s3://``) of files at any depth.

``load()`` lists the folder and returns a :class:`DropFolder`: the file list (relative POSIX
paths, sizes and a cheap change marker) plus methods that read one file at a time. A
``DropFolder`` is picklable: it carries the filepath, credentials and fs_args, and recreates its
fsspec filesystem lazily in whichever process uses it (e.g. a Ray or multiprocessing worker).

Hidden entries (any path component starting with ``.``) are skipped: they are temporary files of
an unfinished atomic write (``storage.write_bytes_atomic``) or OS litter.

``save(mapping)`` takes ``{relpath: pydicom.Dataset | bytes}`` and writes each file atomically
(DICOM data sets as Part 10 files with preamble and file meta). Files already in the folder and
not named in the mapping are never touched; a file named again is replaced atomically. A save
marks the folder (``SAVE_MARKER``, hidden) until its last file is written: a save killed half-way
(the sample drop's generation stopped with Ctrl-C) leaves the marker, ``load()`` refuses the
folder as incomplete, and ``make sample-data`` generates it again instead of using it.

The fingerprint of a file is ``"mtime_ns:size"`` locally and ``"etag:<ETag>"`` on object stores:
enough to notice that a file changed since it was last ingested, without reading it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Mapping
from copy import deepcopy
from dataclasses import dataclass
from pathlib import PurePosixPath
from stat import S_ISDIR, S_ISREG
from typing import IO, Any

from kedro.io import AbstractDataset, DatasetError
from kedro.io.core import get_protocol_and_path

from mvl_pipeline.core import storage
from mvl_pipeline.core.errors import EmptySeriesError, UnreadableFileError
from mvl_pipeline.core.storage import path_problem

_CHUNK = 1 << 20

logger = logging.getLogger(__name__)

#: Hidden (never listed as a drop file): present while a save into the folder is unfinished.
SAVE_MARKER = ".mvl-save-incomplete"


#: Where a missing or empty drop comes from, for `kedro run` without the Makefile (which makes both).
DROP_HINT = ("it is drop_url in conf/<env>/globals.yml: `make sample-data` generates the sample drop, "
             "`make data-msd` fetches the MSD task that --env msd reads (or set MVL_MSD_TASK)")  # fmt: skip


class DropFolderError(UnreadableFileError, DatasetError):
    """The drop folder (or a file in it) is missing or cannot be read."""

    reason = "unreadable_file"


class EmptyDropFolderError(EmptySeriesError, DatasetError):
    """The drop folder exists but holds no (non-hidden) file."""

    reason = "empty_drop_folder"


@dataclass(frozen=True, order=True)
class DropFile:
    relpath: str  # POSIX path relative to the drop folder's root
    size: int  # bytes
    fingerprint: str  # "mtime_ns:size" (local) or "etag:<ETag>" (object store)
    # why the entry cannot be read as a file (listed, never read): invalid_path, broken_link,
    # link_to_folder, not_a_regular_file or unreadable_folder (ingest quarantines it: ingestion.units.ENTRY_PROBLEMS;
    # a file that fails when ingest hashes it becomes unreadable_file there)
    problem: str | None = None


def check_relpath(relpath: str) -> str:
    """``relpath`` if it is a plain relative POSIX path inside the folder, else ``ValueError``
    (which does not quote the path: a drop's paths may carry names)."""
    if (problem := path_problem(relpath)) is not None:
        raise ValueError(f"not a plain relative path inside the drop folder: {problem}")
    return relpath


def _is_hidden(relpath: str) -> bool:
    return any(part.startswith(".") for part in PurePosixPath(relpath).parts)


class DropFolder:
    """A listed drop folder: ``files`` plus per-file readers (see module doc)."""

    def __init__(
        self,
        *,
        filepath: str,
        files: tuple[DropFile, ...],
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.filepath = filepath
        self.files = list(files)
        self._storage_options = dict(storage_options or {})
        self._fs: Any = None

    # -- pickling: drop the live filesystem, rebuild it on first use in the new process --
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fs"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:  # never the storage options: they hold credentials
        return f"DropFolder(filepath={self.filepath!r}, files={len(self.files)})"

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[DropFile]:
        return iter(self.files)

    def _filesystem(self) -> tuple[Any, str, str]:
        if self._fs is None:
            options = deepcopy(self._storage_options)
            self._fs = storage.filesystem(self.filepath, options.pop("credentials", None), options)
        return self._fs

    def path(self, relpath: str) -> str:
        """The full fsspec path (``bucket/key`` on s3) of ``relpath``."""
        _, _, root = self._filesystem()
        return storage.join(root, check_relpath(relpath))

    def open(self, relpath: str) -> IO[bytes]:
        """A binary file object for ``relpath`` (close it, or use ``with``)."""
        fs, protocol, _ = self._filesystem()
        path = self.path(relpath)
        try:
            with storage.outage_guard(fs, protocol):
                return fs.open(path, "rb")
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise DropFolderError("no such file in the drop folder", path=path) from exc
        except PermissionError:  # its message quotes the path: not chained
            raise DropFolderError("the file may not be read (permission denied)", path=path) from None

    def read_bytes(self, relpath: str) -> bytes:
        """The file's content. An unreachable store raises ``storage.StorageUnavailableError``
        (an outage stops the run; it is never recorded as a verdict on the file)."""
        fs, protocol, _ = self._filesystem()
        path = self.path(relpath)
        try:
            with storage.outage_guard(fs, protocol):
                return fs.cat_file(path)
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise DropFolderError("no such file in the drop folder", path=path) from exc
        except PermissionError:  # its message quotes the path: not chained
            raise DropFolderError("the file may not be read (permission denied)", path=path) from None

    def sha256(self, relpath: str) -> str:
        """Hex SHA-256 of the file's content, streamed in 1 MiB chunks."""
        fs, protocol, _ = self._filesystem()
        digest = hashlib.sha256()
        try:
            with self.open(relpath) as handle, storage.outage_guard(fs, protocol):
                for chunk in iter(lambda: handle.read(_CHUNK), b""):
                    digest.update(chunk)
        except PermissionError:  # an object store may refuse the read, not the open
            raise DropFolderError("the file may not be read (permission denied)", path=self.path(relpath)) from None
        return digest.hexdigest()


def list_drop_files(fs: Any, protocol: str, root: str) -> tuple[DropFile, ...]:
    """Every non-hidden file under ``root`` at any depth, sorted by relative path."""
    fs.invalidate_cache(root)
    unlisted: list[OSError] = []  # local folders that may not be listed
    with storage.outage_guard(fs, protocol):
        if not fs.isdir(root):
            raise DropFolderError(f"drop folder not found ({DROP_HINT})", path=storage.full_path(protocol, root))
        if protocol == "file":  # one walk that says which folders it could not list (fsspec's find skips them unsaid)
            infos: dict[str, Mapping[str, Any]] = dict.fromkeys(_local_names(root, unlisted), {})
        else:
            infos = {name.split("://", 1)[-1]: info for name, info in fs.find(root, detail=True).items()
                     if info.get("type") != "directory"}  # fmt: skip
    prefix = root.rstrip("/") + "/"
    files = [_unlisted_folder(error, protocol, prefix) for error in unlisted]
    for name, info in infos.items():
        if not name.startswith(prefix) or _is_hidden(relpath := name[len(prefix) :]):
            continue
        if protocol == "file":
            problem, fingerprint, size = _local_entry(name)
        else:
            etag = info.get("ETag") or info.get("etag") or info.get("md5")
            size = int(info.get("size") or 0)
            fingerprint, problem = (f"etag:{str(etag).strip(chr(34))}" if etag else f"size:{size}"), None
        if path_problem(relpath) is not None:
            problem, fingerprint = "invalid_path", f"size:{size}"
        files.append(DropFile(relpath=relpath, size=size, fingerprint=fingerprint, problem=problem))
    return tuple(sorted(files))


def _local_names(root: str, unlisted: list[OSError]) -> list[str]:
    """Every entry under the local folder ``root`` that is not a folder, links to folders included
    (listed, not followed); hidden folders are not entered. A folder whose listing fails is
    appended to ``unlisted``."""
    names = []
    for folder, dirs, entries in os.walk(root, onerror=unlisted.append):
        links = [name for name in dirs if os.path.islink(os.path.join(folder, name))]
        dirs[:] = [name for name in dirs if not name.startswith(".") and name not in links]
        names += [f"{folder}/{name}" for name in (*entries, *links)]
    return names


def _unlisted_folder(error: OSError, protocol: str, prefix: str) -> DropFile:
    """A local folder of the drop whose listing failed (permission denied): one entry ingest
    quarantines, so its files are not silently missing; the drop's own root fails the load."""
    name = str(error.filename or "").rstrip("/")
    if not name.startswith(prefix):
        path = storage.full_path(protocol, prefix.rstrip("/"))
        raise DropFolderError("the drop folder may not be listed (permission denied)", path=path) from None
    return DropFile(relpath=name[len(prefix) :], size=0, fingerprint="unlisted", problem="unreadable_folder")


def _local_entry(name: str) -> tuple[str | None, str, int]:
    """``(problem, fingerprint, size)`` of a local entry; a link counts as what it points to."""
    try:
        stat = os.stat(name)
    except OSError:  # a dangling link, or one that loops
        return "broken_link", "broken", 0
    if not S_ISREG(stat.st_mode):
        return ("link_to_folder" if S_ISDIR(stat.st_mode) else "not_a_regular_file"), f"{stat.st_mode:o}", 0
    return None, f"{stat.st_mtime_ns}:{stat.st_size}", int(stat.st_size)


def encode_file(data: Any) -> bytes:
    """Bytes to store for one mapping value: raw bytes, or a pydicom Dataset as a Part 10 file."""
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    from pydicom.dataset import Dataset

    if isinstance(data, Dataset):
        from mvl_pipeline.dicom.write import dataset_bytes

        return dataset_bytes(data)
    raise DatasetError(f"a drop folder stores bytes or pydicom Datasets, not {type(data).__name__}")


class DropFolderDataset(AbstractDataset[Mapping[str, Any], DropFolder]):
    """A hospital drop folder (see module doc).

    Example catalog entry::

        sample_drop:
          type: mvl_pipeline.datasets.drop.DropFolderDataset
          filepath: data/01_raw/sample_drop
    """

    def __init__(  # noqa: PLR0913
        self,
        *,
        filepath: str,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
        load_args: dict[str, Any] | None = None,
        save_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._filepath = str(filepath).rstrip("/")
        if get_protocol_and_path(self._filepath)[0] == "file":
            # workers may run elsewhere: the DropFolder they receive carries an absolute path
            self._filepath = os.path.abspath(get_protocol_and_path(self._filepath)[1])
        self._storage_options = {
            **deepcopy(fs_args or {}),
            **({"credentials": deepcopy(credentials)} if credentials else {}),
        }
        self._fs, self._protocol, self._root = storage.filesystem(
            self._filepath, deepcopy(credentials), deepcopy(fs_args)
        )
        self._load_args = {"allow_empty": False, **(load_args or {})}
        self._save_args = dict(save_args or {})
        if set(self._load_args) - {"allow_empty"}:
            raise DatasetError(f"unknown load_args {sorted(set(self._load_args) - {'allow_empty'})}")
        if self._save_args:
            raise DatasetError(f"DropFolderDataset takes no save_args, got {sorted(self._save_args)}")
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath, "protocol": self._protocol, "load_args": self._load_args}

    def load(self) -> DropFolder:
        files = list_drop_files(self._fs, self._protocol, self._root)
        if self._fs.exists(storage.join(self._root, SAVE_MARKER)):
            # refused, not warned about: a run on it would train on part of the drop and record a data
            # version for that part (an audit, 2026-12-07)
            raise DatasetError(
                f"a save into this drop folder did not finish ({SAVE_MARKER} is there): it is incomplete. For the "
                "sample drop run `make sample-data` (or `kedro run --pipelines sample_data`) again; to use the "
                "folder as it is, delete that file"
            )
        if not files and not self._load_args["allow_empty"]:
            raise EmptyDropFolderError(f"drop folder holds no files ({DROP_HINT})", path=self._filepath)
        return DropFolder(
            filepath=self._filepath, files=files, storage_options=self._storage_options
        )

    def save(self, data: Mapping[str, Any]) -> None:
        if not isinstance(data, Mapping):
            raise DatasetError(f"DropFolderDataset saves a mapping relpath -> file, got {type(data).__name__}")
        checked = {check_relpath(str(relpath)): value for relpath, value in data.items()}
        marker = storage.join(self._root, SAVE_MARKER)
        storage.write_bytes_atomic(self._fs, self._protocol, marker, b"a save into this folder has not finished\n")
        for relpath in sorted(checked):
            storage.write_bytes_atomic(
                self._fs,
                self._protocol,
                storage.join(self._root, relpath),
                encode_file(checked[relpath]),
            )
        self._fs.rm_file(marker)
        self._fs.invalidate_cache(self._root)

    def _exists(self) -> bool:
        try:
            return bool(list_drop_files(self._fs, self._protocol, self._root))
        except DropFolderError:
            return False
