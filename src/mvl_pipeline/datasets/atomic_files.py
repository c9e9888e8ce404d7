"""kedro-datasets' CSV, JSON and text datasets, saved atomically.

Their own ``save`` opens the target file and writes into it, so a run killed (or a disk that
fills) mid-write leaves a truncated file where the next run, or a ``--from-nodes`` rerun, loads
it: for the ablation's versioned ``results.csv`` the newest version is the one loaded, and a
truncated one either fails with a misleading error or, cut inside its last rows, gives wrong
statistics in silence. These subclasses serialise to bytes first, then write them with
:func:`mvl_pipeline.core.storage.write_bytes_atomic` (a hidden temporary renamed into place
locally; one PUT on an object store), so a reader sees the old file or the whole new one. Loading,
versioning and the MLflow artifact wrapper (which reads ``_filepath``) are the parents'.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pandas as pd
from kedro.io.core import get_filepath_str
from kedro_datasets.json import JSONDataset
from kedro_datasets.pandas import CSVDataset
from kedro_datasets.text import TextDataset

from mvl_pipeline.core import storage


def _save_atomic(dataset: Any, payload: bytes) -> None:
    path = get_filepath_str(dataset._get_save_path(), dataset._protocol)
    storage.write_bytes_atomic(dataset._fs, dataset._protocol, path, payload)
    dataset._invalidate_cache()


class AtomicCSVDataset(CSVDataset):
    """``pandas.CSVDataset`` whose save is atomic (module docstring)."""

    def save(self, data: pd.DataFrame) -> None:
        buffer = io.StringIO()
        data.to_csv(path_or_buf=buffer, **self._save_args)
        _save_atomic(self, buffer.getvalue().encode("utf-8"))


class AtomicJSONFileDataset(JSONDataset):
    """``json.JSONDataset`` whose save is atomic (module docstring)."""

    def save(self, data: Any) -> None:
        _save_atomic(self, json.dumps(data, **self._save_args).encode("utf-8"))


class AtomicTextDataset(TextDataset):
    """``text.TextDataset`` whose save is atomic (module docstring)."""

    def save(self, data: str) -> None:
        _save_atomic(self, data.encode("utf-8"))
