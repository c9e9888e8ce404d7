"""The site's pseudonymisation key, handed to nodes through the catalog (never via parameters,
which kedro-mlflow would log).

Found the same way under every Kedro environment (``local``, ``cluster``, a site's own
``conf/<env>``), because ``conf/local`` is only read by Kedro under ``local``:

1. the environment variable named by ``env_var`` (the catalog names ``MVL_PSEUDONYM_KEY``: a
   Kubernetes Secret, CI), else
2. ``pseudonymisation.key`` in the YAML file ``filepath`` (the catalog names
   ``conf/local/credentials.yml``, the file ``make key`` creates), else
3. ``credentials={"key": ...}`` when a catalog passes Kedro credentials explicitly.

Both 1 and 2 set and different is refused (two keys would split one cohort under two sets of
pseudonyms). Neither set: a message naming both places. The value is checked by
:func:`mvl_pipeline.core.pseudonyms.require_key` (the only key rule) and never shown.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from kedro.io import AbstractDataset, DatasetError

from mvl_pipeline.core.pseudonyms import PseudonymKeyError, require_key

KEY_ENTRY = "pseudonymisation"


class SecretKeyDataset(AbstractDataset[bytes, None]):
    """Read-only: ``load()`` returns the key bytes (see the module docstring for where from)."""

    def __init__(
        self,
        *,
        filepath: str | None = None,
        env_var: str | None = None,
        credentials: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._filepath = filepath
        self._env_var = env_var
        self._value = (credentials or {}).get("key")
        self.metadata = metadata

    def _from_file(self) -> str | None:
        if not self._filepath or not Path(self._filepath).is_file():
            return None
        try:
            data = yaml.safe_load(Path(self._filepath).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise DatasetError(f"{self._filepath} is not valid YAML ({type(exc).__name__})") from None
        entry = data.get(KEY_ENTRY) if isinstance(data, dict) else None
        value = entry.get("key") if isinstance(entry, dict) else None
        return str(value) if value else None

    def _sources(self) -> dict[str, str]:
        found = {}
        if self._env_var and os.environ.get(self._env_var, "").strip():
            found[f"${self._env_var}"] = os.environ[self._env_var].strip()
        from_file = self._from_file()
        if from_file:
            found[str(self._filepath)] = from_file.strip()
        if self._value:
            found["credentials"] = str(self._value).strip()
        return found

    def load(self) -> bytes:
        found = self._sources()
        if len(set(found.values())) > 1:
            raise DatasetError(
                f"two different pseudonymisation keys are configured ({' and '.join(sorted(found))}): "
                "keep one, or every case would get two sets of pseudonyms"
            )
        try:
            return require_key(next(iter(found.values()), None))
        except PseudonymKeyError as exc:
            raise DatasetError(str(exc)) from None

    def save(self, data: None) -> None:
        raise DatasetError("the pseudonymisation key is read-only configuration")

    def _exists(self) -> bool:
        return bool(self._sources())

    def _describe(self) -> dict[str, Any]:  # where it may come from, never the value
        return {"filepath": self._filepath, "env_var": self._env_var, "configured": self._exists()}
