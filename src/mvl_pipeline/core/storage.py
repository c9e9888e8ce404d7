"""fsspec plumbing shared by the project's datasets: one code path for local paths and ``s3://``.

Saves are atomic. A single file is written to a temporary sibling and renamed into place (local)
or uploaded in one PUT (object stores only show completed uploads). A multi-file artefact (a
folder) is written with :func:`atomic_directory`: locally into a temporary sibling folder that is
swapped in when complete; on object stores the folder's ``_COMPLETE`` marker is removed first
(then any objects of an earlier version) and written last, and :func:`is_complete` is what
loaders check. A crash mid-save therefore never leaves something a later load would accept; the
hidden temporaries a killed process leaves locally are removed by :func:`remove_temporaries`
(the next run, once it holds the run lock: ``hooks.RunLockHook``), which puts a complete new
folder in place where a swap was killed between its two renames.

Object stores fail transiently. Every S3 filesystem made here attempts a request at most
``S3_RETRY["total_max_attempts"]`` times (botocore's ``standard`` mode: exponential backoff with
jitter), and nothing else retries around it (:data:`S3FS_RETRIES`); a catalog entry's ``fs_args``
may set another ``config_kwargs``. When the store stays unreachable, :func:`outage_guard` turns the
client's error into :class:`StorageUnavailableError`, which names the endpoint, never the object
key (hospital folder names can carry identity) or credentials: callers let it stop the run
instead of recording it as a verdict on the data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import fsspec
from kedro.io.core import get_protocol_and_path

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "_COMPLETE"

#: botocore retry policy of every S3 client made here: a request is attempted at most 4 times in
#: all, with waits of rand(0, 1) x 1, 2, 4 s between attempts (truncated exponential backoff, full
#: jitter), on connection errors, timeouts, 5xx and throttling.
S3_RETRY = {"mode": "standard", "total_max_attempts": 4}
#: s3fs's own retry loop (it wraps botocore's, and nests: a read is a call inside a call) is off,
#: so that the bound above is the whole bound.
S3FS_RETRIES = 1
#: Seconds to wait for a connection / for data on an open one before the attempt counts as failed.
S3_TIMEOUTS = {"connect_timeout": 10, "read_timeout": 60}


def path_problem(relpath: str) -> str | None:
    """What keeps ``relpath`` from being a plain relative POSIX path inside its folder (a
    backslash, an empty, `.` or `..` part, a hidden part), or None. Never the path itself: a
    hospital drop's paths may carry names."""
    if "\\" in relpath:
        return "a backslash in the path"
    parts = relpath.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "an empty, '.' or '..' part in the path"
    if any(part.startswith(".") for part in parts):
        return "a hidden part in the path"
    return None


class StorageUnavailableError(RuntimeError):
    """The object store did not answer within the bounded retries: an outage, not bad data.

    The message names the endpoint (``scheme://host:port``) and the client's error type only.
    Not an ``OSError``, so that no reader's ``except OSError`` turns an outage into a verdict on a
    file.
    """


def _s3_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    config = {"retries": dict(S3_RETRY), **S3_TIMEOUTS, **(kwargs.get("config_kwargs") or {})}
    return {**kwargs, "config_kwargs": config}


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
    elif protocol in ("s3", "s3a"):
        kwargs = _s3_options(kwargs)
    fs = fsspec.filesystem(protocol, **kwargs)
    if protocol in ("s3", "s3a"):
        fs.retries = S3FS_RETRIES  # an attribute of s3fs, not a constructor argument
    return fs, protocol, path


def endpoint(fs: fsspec.AbstractFileSystem) -> str:
    """``scheme://host[:port]`` of the store behind ``fs`` (no credentials, no path)."""
    url = (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url") or getattr(fs, "endpoint_url", None)
    if not url:
        client = getattr(fs, "s3", None)  # s3fs: the client, once connected
        url = getattr(getattr(client, "meta", None), "endpoint_url", None)
    return _endpoint_of(url)


def _endpoint_of(url: str | None) -> str:
    """``scheme://host[:port]`` of an endpoint URL: no credentials, no path."""
    if not url:
        return "the default endpoint"
    parts = urlsplit(str(url))
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def _is_unreachable(exc: BaseException) -> bool:
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:  # pragma: no cover - botocore comes with s3fs
        return isinstance(exc, ConnectionError | TimeoutError)
    return isinstance(exc, BotoConnectionError | HTTPClientError | ConnectionError | TimeoutError)


@contextlib.contextmanager
def outage_guard(fs: fsspec.AbstractFileSystem, protocol: str) -> Iterator[None]:
    """Re-raise a remote store's connection failure (after the client's retries) as
    :class:`StorageUnavailableError` naming the endpoint; everything else passes unchanged."""
    try:
        yield
    except StorageUnavailableError:
        raise
    except Exception as exc:
        if protocol == "file" or not _is_unreachable(exc):
            raise
        bound = str(S3_RETRY["total_max_attempts"]) if protocol in ("s3", "s3a") else "repeated"
        message = (
            f"{protocol} storage at {endpoint(fs)} is unreachable ({type(exc).__name__}) after {bound} attempts "
            f"with backoff: check that the endpoint is up, then run again (what was saved is kept)"
        )
        # `from None`: the client's own message quotes the object's key, which may carry identity
        raise StorageUnavailableError(message) from None


# -- Ray Train's checkpoint storage (pyarrow filesystems) ------------------------------------------
#: What pyarrow's S3 client reports for a store it cannot reach: the AWS SDK's network error
#: class, curl's "could not resolve / connect" and timeouts.
_ARROW_UNREACHABLE = re.compile(r"AWS Error NETWORK_CONNECTION|curlCode: (6|7|28)\b")


def _s3_endpoint_from_env() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def train_storage(url: str, timeouts: Mapping[str, float] | None = None) -> tuple[str, Any | None]:
    """Ray Train's ``(storage_path, storage_filesystem)`` for ``url``.

    For ``s3://`` a pyarrow ``S3FileSystem`` bounded like every other S3 client here: the endpoint
    from ``AWS_ENDPOINT_URL`` (as boto3 reads it), each request attempted at most
    ``S3_RETRY["total_max_attempts"]`` times (the AWS SDK's standard strategy: exponential backoff
    with jitter) and :data:`S3_TIMEOUTS`, or ``timeouts`` (the same keys: ``fit.storage_timeouts``).
    Anything else is returned as it is (Ray picks the filesystem)."""
    protocol, path = get_protocol_and_path(url)
    if protocol not in ("s3", "s3a"):
        return url, None
    from pyarrow import fs as arrow_fs

    bounds = {**S3_TIMEOUTS, **(timeouts or {})}
    options: dict[str, Any] = {
        "retry_strategy": arrow_fs.AwsStandardS3RetryStrategy(max_attempts=int(S3_RETRY["total_max_attempts"])),
        "connect_timeout": float(bounds["connect_timeout"]),
        "request_timeout": float(bounds["read_timeout"]),
    }
    if (endpoint_url := _s3_endpoint_from_env()) is not None:
        parts = urlsplit(endpoint_url)
        options.update(endpoint_override=parts.netloc, scheme=parts.scheme or "https")
    return path, arrow_fs.S3FileSystem(**options)


def train_storage_outage(url: str, exc: BaseException) -> StorageUnavailableError | None:
    """:class:`StorageUnavailableError` naming the endpoint when ``exc`` (Ray Train's error, which
    quotes its workers' and controller's tracebacks as text) says the checkpoint store at ``url``
    could not be reached; None for any other failure."""
    protocol, _ = get_protocol_and_path(url)
    if protocol == "file":
        return None
    text, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    if not any(_ARROW_UNREACHABLE.search(t) for t in text):
        return None
    where = _endpoint_of(_s3_endpoint_from_env() if protocol in ("s3", "s3a") else None)
    bound = str(S3_RETRY["total_max_attempts"]) if protocol in ("s3", "s3a") else "repeated"
    # curl's 28: connected (or not) but no answer in time: a hung store, bounded by fit.storage_timeouts
    kind = "Timeout: no answer within fit.storage_timeouts" if any("curlCode: 28" in t for t in text) else "NETWORK_CONNECTION"
    return StorageUnavailableError(
        f"{protocol} storage at {where} is unreachable ({kind}) while "
        f"checkpointing, after {bound} attempts with backoff per request and fit.max_failures restarts: check "
        "that the endpoint is up, then run the same command again (it resumes from the last checkpoint)"
    )


#: What an interrupted save leaves beside its target: ``.<name>.tmp-<uuid hex>`` (being written)
#: and ``.<name>.old-<uuid hex>`` (the replaced version, between the two renames of a swap).
TEMPORARY = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old)-[0-9a-f]{32}$")


def remove_temporaries(root: str) -> int:
    """Remove the temporaries of interrupted saves under the local folder ``root``; their count.

    Loaders never read them (hidden names, no ``_COMPLETE``), but DVC would hash them into a
    data version. Only safe while no other process writes under ``root`` (the run lock). A
    complete new folder whose target is gone (a swap killed between its two renames) is put in
    place instead of removed: it is the saved version, and the old one is already out of place.
    """
    removed = 0
    for parent, dirs, files in os.walk(root):
        for name, match in [(d, m) for d in dirs if (m := TEMPORARY.match(d))]:
            dirs.remove(name)
            folder, target = os.path.join(parent, name), os.path.join(parent, match["target"])
            complete = os.path.exists(os.path.join(folder, COMPLETE_MARKER))
            if match["kind"] == "tmp" and complete and not os.path.exists(target):
                # a swap killed between its two renames: the new version is whole, the target gone
                os.replace(folder, target)
                logger.info("an interrupted save's complete folder was put in place")
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
        for name in (f for f in files if TEMPORARY.match(f)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(parent, name))
                removed += 1
    return removed


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


def remove_directory(fs: fsspec.AbstractFileSystem, protocol: str, path: str) -> None:
    """Remove a folder written by :func:`atomic_directory` so that no reader ever sees it
    half-removed as complete: locally it is first renamed to a temporary name (which loaders
    skip and :func:`remove_temporaries` clears), on an object store its ``_COMPLETE`` marker
    goes first."""
    if protocol == "file":
        parent, base = os.path.dirname(path.rstrip("/")) or ".", os.path.basename(path.rstrip("/"))
        doomed = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex}")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        return
    marker = join(path, COMPLETE_MARKER)
    if fs.exists(marker):
        fs.rm_file(marker)
    fs.rm(path, recursive=True)
    fs.invalidate_cache(path)


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
