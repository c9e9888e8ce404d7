"""The data version of a hospital drop: a fingerprint of its listing, not of its content.

sha256 over the sorted ``(relative path, size, ETag)`` of every file under the drop URL, read
with fsspec (local folders and ``s3://`` alike). Listing is cheap even for terabytes of DICOM, and
S3's ETag changes whenever an object's content does. Filesystems without ETags (a local folder)
use the modification time instead. Paths only enter the hash: they are never logged or returned,
since hospital file names can carry patient identifiers.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DropFingerprint:
    """sha256 hex digest of a drop listing and the number of files it covers."""

    sha256: str
    n_files: int


def listing_digest(entries: Iterable[tuple[str, int, str]]) -> str:
    """sha256 hex digest of ``(relative path, size, etag)`` entries, independent of their order."""
    digest = hashlib.sha256()
    for rel_path, size, etag in sorted(entries):
        digest.update(f"{rel_path}\0{size}\0{etag}\n".encode())
    return digest.hexdigest()


def _change_marker(info: Mapping[str, Any]) -> str:
    for key in ("ETag", "etag", "md5Hash", "md5"):
        value = info.get(key)
        if value:
            return f"etag:{value}"
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value is not None:
            return f"mtime:{value}"
    return ""


def drop_fingerprint(
    url: str, *, storage_options: Mapping[str, Any] | None = None
) -> DropFingerprint:
    """Fingerprint the listing of every file below ``url`` (a folder or an ``s3://`` prefix)."""
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(url, **dict(storage_options or {}))
    fs.invalidate_cache()  # a fresh listing, never one cached earlier in this process
    root = root.rstrip("/")
    files = fs.find(root, detail=True, withdirs=False)
    entries = []
    for path, info in files.items():
        if info.get("type") == "directory":
            continue
        rel_path = path[len(root) :].lstrip("/") if path.startswith(root) else path
        entries.append((rel_path, int(info.get("size") or 0), _change_marker(info)))
    fingerprint = DropFingerprint(sha256=listing_digest(entries), n_files=len(entries))
    if not entries:
        logger.warning("the drop is empty: its data version is the hash of an empty listing")
    logger.info("drop listing: %d files, data version %s", fingerprint.n_files, fingerprint.sha256)
    return fingerprint
