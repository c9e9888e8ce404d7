"""Content hashes of JSON documents: one way to turn a document into a short, stable id.

Used for plan and fingerprint ids, Ray run names, the ingest settings id and set hashes (a gate
set, a split): the document is serialised with sorted keys and compact separators (values JSON
cannot hold, such as paths, as their ``str``), then hashed with sha256.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any


def json_digest(document: Any, *, length: int = 16, exclude: Iterable[str] = ()) -> str:
    """The first ``length`` hex characters of the sha256 of ``document`` (keys in ``exclude`` of
    a top-level mapping left out)."""
    skip = set(exclude)
    if skip and isinstance(document, Mapping):
        document = {k: v for k, v in document.items() if k not in skip}
    payload = json.dumps(document, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:length]


def set_digest(items: Iterable[str], *, length: int = 16) -> str:
    """Order-independent hash of a set of ids (e.g. the patients of a gate set)."""
    return json_digest(sorted(set(items)), length=length)
