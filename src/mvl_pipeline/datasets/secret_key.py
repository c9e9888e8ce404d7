"""The site's pseudonymisation key, handed to nodes through the catalog (never via parameters,
which kedro-mlflow would log). Its value comes from ``credentials.yml``; without one the
pipeline refuses to run rather than fall back to a guessable key.
"""

from __future__ import annotations

from typing import Any

from kedro.io import AbstractDataset, DatasetError

MISSING_KEY_HELP = (
    "no pseudonymisation key configured. Add one to conf/local/credentials.yml:\n"
    "  pseudonymisation:\n    key: <64+ hex characters>\n"
    "(`make train` creates a random one: `python -m mvl_pipeline.cli.secrets ensure-key "
    "conf/local/credentials.yml`). On Kubernetes it comes from the Secret's MVL_PSEUDONYM_KEY."
)


def parse_key(value: Any) -> bytes:
    """A random hex key of at least 256 bits -> bytes (the rules of ``deid.require_key``);
    anything else is refused with a message that says how to make one."""
    from mvl_pipeline.dicom.deid import DeidKeyError, require_key

    text = str(value or "").strip()
    if not text or text.lower() in {"none", "null", "???"}:
        raise DatasetError(MISSING_KEY_HELP)
    try:
        return require_key(text)
    except DeidKeyError as exc:
        raise DatasetError(f"{exc}; " + MISSING_KEY_HELP) from None


class SecretKeyDataset(AbstractDataset[bytes, None]):
    """Read-only: ``load()`` returns the key bytes from ``credentials={"key": ...}``."""

    def __init__(self, *, credentials: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None) -> None:
        self._value = (credentials or {}).get("key")
        self.metadata = metadata

    def load(self) -> bytes:
        return parse_key(self._value)

    def save(self, data: None) -> None:
        raise DatasetError("the pseudonymisation key is read-only configuration")

    def _exists(self) -> bool:
        return bool(self._value)

    def _describe(self) -> dict[str, Any]:
        return {"configured": bool(self._value)}  # never the value
