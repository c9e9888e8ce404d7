"""Parameter blocks from conf/*/parameters_*.yml into typed dataclasses: one rule for all of them.

A key the dataclass does not know is a typo or a setting from another version: it fails with the
known keys listed, never silently ignored (``fit.loop.epcohs: 5`` must not train 24 epochs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any


def known_only(cls: type, params: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """``params`` as a new dict, or ``ValueError`` naming the unknown keys and the known ones."""
    values = dict(params or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; known keys: {sorted(known)}")
    return values
