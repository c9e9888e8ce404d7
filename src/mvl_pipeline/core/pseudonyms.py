"""Keyed pseudonyms for everything ingest lets downstream: case ids, patient ids, file keys.

All of them are HMAC-SHA256 under the site's secret key (conf/local/credentials.yml), so they
are stable across runs (incremental ingest, a fixed holdout) and cannot be recomputed from a
patient's identifiers without the key.
"""

from __future__ import annotations

import hashlib
import hmac


def keyed_digest(key: bytes, *parts: str) -> str:
    """Hex HMAC-SHA256 of the parts (unambiguously joined)."""
    message = "\x1f".join(parts).encode("utf-8")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def case_pseudonym(key: bytes, *source_ids: str) -> str:
    return "case-" + keyed_digest(key, "case", *source_ids)[:16]


def patient_pseudonym(key: bytes, *source_ids: str) -> str:
    return "pt-" + keyed_digest(key, "patient", *source_ids)[:16]


def file_key(key: bytes, relpath: str) -> str:
    """Manifest key of a source file: the drop's paths may carry names, so they never leave."""
    return "f-" + keyed_digest(key, "file", relpath)[:24]


def unit_key(key: bytes, kind: str, source_id: str) -> str:
    """Key of a unit of ingest work (a DICOM study, an image/label pair, an unreadable file)."""
    return "u-" + keyed_digest(key, "unit", kind, source_id)[:24]


def content_key(key: bytes, sha256_hex: str) -> str:
    """Keyed form of a file's content hash (a bare hash could confirm a file's identity)."""
    return keyed_digest(key, "content", sha256_hex)[:32]
