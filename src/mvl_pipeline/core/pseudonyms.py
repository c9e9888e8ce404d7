"""The site's pseudonymisation key and everything keyed by it: one home for both.

- :func:`require_key`: the only rule for what a usable key is (64+ hex characters, i.e. at
  least 256 random bits). A missing, short or obviously non-random key raises
  :class:`PseudonymKeyError` with a message that says where the key is read from and how to
  make one; nothing ever falls back to a default key.
- Keyed pseudonyms: case ids, patient ids, manifest file keys, unit keys and content keys are
  HMAC-SHA256 under that key, so they are stable across runs (incremental ingest, a fixed split)
  and cannot be recomputed from a patient's identifiers without the key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any

KEY_BYTES = 32  # 256 bits
KEY_ENV_VAR = "MVL_PSEUDONYM_KEY"
KEY_FILE = "conf/local/credentials.yml"
HOW_TO_SET = (
    f"Set it in {KEY_FILE} (pseudonymisation: {{key: <64 hex characters>}}; `make key` creates a "
    f"random one) or in the environment variable {KEY_ENV_VAR} (e.g. from a Kubernetes Secret). "
    "Keep it and back it up: with another key every case and patient gets another pseudonym."
)


class PseudonymKeyError(ValueError):
    """The pseudonymisation key is missing or too weak: the pipeline refuses to run."""


def require_key(value: Any) -> bytes:
    """The key as bytes: a hex string of 64+ characters (or 32+ raw bytes), random-looking."""
    if value is None or (isinstance(value, str | bytes) and not value.strip()):
        raise PseudonymKeyError(f"no pseudonymisation key configured. {HOW_TO_SET}")
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in {"none", "null", "???"}:
            raise PseudonymKeyError(f"no pseudonymisation key configured. {HOW_TO_SET}")
        if not re.fullmatch(r"[0-9a-fA-F]+", text) or len(text) % 2:
            raise PseudonymKeyError(
                f"the pseudonymisation key must be a hex string (e.g. secrets.token_hex(32)). {HOW_TO_SET}"
            )
        key = bytes.fromhex(text)
    elif isinstance(value, bytes | bytearray):
        key = bytes(value)
    else:
        raise PseudonymKeyError(f"the pseudonymisation key must be a hex string, not {type(value).__name__}")
    if len(key) < KEY_BYTES:
        raise PseudonymKeyError(
            f"the pseudonymisation key has {len(key)} bytes; at least {KEY_BYTES} are required. {HOW_TO_SET}"
        )
    if len(set(key)) < KEY_BYTES // 2:
        raise PseudonymKeyError(
            f"the pseudonymisation key does not look random (too few distinct bytes). {HOW_TO_SET}"
        )
    return key


def keyed_digest(key: bytes, *parts: str) -> str:
    """Hex HMAC-SHA256 of the parts (unambiguously joined). A part that is not UTF-8 text (a file
    name made on Windows, read with Python's surrogate escapes) is hashed as its original bytes."""
    message = "\x1f".join(parts).encode("utf-8", "surrogateescape")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def key_id(key: bytes) -> str:
    """A name for the key itself (an HMAC of a constant: it reveals nothing about the key). Data
    made under one key carries it, so that pseudonyms made under two keys are never mixed."""
    return "key-" + keyed_digest(key, "key-id")[:12]


class KeyChangedError(PseudonymKeyError):
    """Data made under another pseudonymisation key would be mixed with this key's."""


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
