"""fsspec plumbing shared by the project's datasets: one code path for local paths and ``s3://``.

Saves are atomic. A single file is written to a temporary sibling and renamed into place (local)
or uploaded in one PUT (object stores only show completed uploads). A multi-file artefact (a
folder) is written with :func:`atomic_directory`: locally into a temporary sibling folder that is
swapped in when complete; on object stores the folder's ``_COMPLETE`` marker is removed first
(then any objects of an earlier version) and written last, and :func:`is_complete` is what
loaders check. A crash mid-save therefore never leaves something a later load would accept.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

import fsspec
from kedro.io.core import get_protocol_and_path

COMPLETE_MARKER = "_COMPLETE"


def filesystem(
    filepath: str,
    credentials: dict[str, Any] | None = None,
    fs_args: dict[str, Any] | None = None,
) -> tuple[fsspec.AbstractFileSystem, str, str]:
    """Return ``(fs, protocol, path)`` for ``filepath`` (local path or URL such as ``s3://b/k``).

    ``credentials`` and ``fs_args`` go to the fsspec filesystem constructor (for s3fs: ``key``,
    ``secret``, ``client_kwargs={"endpoint_url": ...}``).
    """
    protocol, path = get_protocol_and_path(str(filepath))
    kwargs = {**(fs_args or {}), **(credentials or {})}
    if protocol == "file":
        kwargs.setdefault("auto_mkdir", True)
    return fsspec.filesystem(protocol, **kwargs), protocol, path


def full_path(protocol: str, path: str) -> str:
    """A path as fsspec expects it for this protocol (``bucket/key`` stays as is for s3)."""
    return path if protocol == "file" else f"{protocol}://{path}"


def join(path: str, *parts: str) -> str:
    return str(PurePosixPath(path, *parts))


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, protocol: str, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    if protocol == "file":
        parent = os.path.dirname(path) or "."
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        fs.pipe_file(path, data)


def is_complete(fs: fsspec.AbstractFileSystem, protocol: str, path: str) -> bool:
    """True when the folder at ``path`` was completely written by :func:`atomic_directory`."""
    return fs.exists(join(path, COMPLETE_MARKER))


@contextlib.contextmanager
def atomic_directory(fs: fsspec.AbstractFileSystem, protocol: str, path: str) -> Iterator[str]:
    """Yield a folder to write into; on success it becomes ``path`` in one step.

    Local: a temporary sibling folder, swapped with any existing ``path`` at the end (the old
    version is removed only after the new one is in place). Object stores: ``path`` itself, with
    its ``_COMPLETE`` marker deleted before the first write (then the earlier version's objects,
    so that old and new files never mix) and written after the last.
    """
    if protocol == "file":
        parent = os.path.dirname(path.rstrip("/")) or "."
        os.makedirs(parent, exist_ok=True)
        base = os.path.basename(path.rstrip("/"))
        tmp = os.path.join(parent, f".{base}.tmp-{uuid.uuid4().hex}")
        os.makedirs(tmp)
        try:
            yield tmp
            with open(os.path.join(tmp, COMPLETE_MARKER), "w", encoding="utf-8") as handle:
                handle.write("")
            old = None
            if os.path.exists(path):
                old = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex}")
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    else:
        marker = join(path, COMPLETE_MARKER)
        if fs.exists(marker):
            fs.rm_file(marker)
        # objects of an earlier version would otherwise mix with the new ones
        stale = fs.find(path) if fs.isdir(path) else []
        if stale:
            fs.rm(stale)
        yield path
        fs.pipe_file(marker, b"")
        fs.invalidate_cache(path)
