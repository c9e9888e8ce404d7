"""A JSON document saved atomically, with an optional value for "not written yet".

kedro-datasets' JSONDataset writes in place, so a crash mid-save can leave a truncated file that
the next run fails to parse; manifests, plans and splits are read back by later runs, so they use
this dataset. ``missing`` (e.g. ``{}``) is what ``load()`` returns before the first save, which is
how a pipeline reads "the previous manifest / split" on its first run.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from mvl_pipeline.core import storage

_NO_DEFAULT = object()


class AtomicJSONDataset(AbstractDataset[Any, Any]):
    def __init__(
        self,
        *,
        filepath: str,
        missing: Any = _NO_DEFAULT,
        indent: int | None = 1,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._fs, self._protocol, self._path = storage.filesystem(filepath, credentials, fs_args)
        self._missing = missing
        self._indent = indent
        self.metadata = metadata

    def load(self) -> Any:
        try:
            raw = self._fs.cat_file(self._path)
        except FileNotFoundError:
            if self._missing is _NO_DEFAULT:
                raise DatasetError(f"{storage.full_path(self._protocol, self._path)} does not exist yet") from None
            return copy.deepcopy(self._missing)
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"{storage.full_path(self._protocol, self._path)} is not valid JSON: {exc}"
            ) from exc

    def save(self, data: Any) -> None:
        payload = json.dumps(data, indent=self._indent, sort_keys=True, allow_nan=False) + "\n"
        storage.write_bytes_atomic(self._fs, self._protocol, self._path, payload.encode("utf-8"))

    def _exists(self) -> bool:
        return self._fs.exists(self._path)

    def _describe(self) -> dict[str, Any]:
        return {"filepath": storage.full_path(self._protocol, self._path)}
