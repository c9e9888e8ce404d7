"""The catalog's CSV, JSON and text datasets are written whole or not at all: a save that fails
half-way (here a value that cannot be written, after thousands of rows) leaves the previous file,
or the previous version, as it was. kedro-datasets' own CSVDataset leaves a truncated file there,
which is what the next run loaded (an audit, 2026-12-07)."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml
from kedro.io import DatasetError
from kedro.io.core import Version
from kedro_datasets.pandas import CSVDataset

from mvl_pipeline.datasets.atomic_files import (
    AtomicCSVDataset,
    AtomicJSONFileDataset,
    AtomicTextDataset,
)
from tests.pipelines.conftest import ROOT


class Unwritable:
    def __str__(self) -> str:
        raise OSError("disk full")


def rows(n: int, *, broken_at: int | None = None) -> pd.DataFrame:
    values = [Unwritable() if k == broken_at else f"case-{k:06d}" for k in range(n)]
    return pd.DataFrame({"case_id": values, "dice": [0.5] * n})


def test_kedro_datasets_own_csv_save_leaves_a_truncated_file(tmp_path):
    """The premise: the parent class writes into the target as it goes."""
    path = tmp_path / "parent.csv"
    CSVDataset(filepath=str(path), save_args={"index": False}).save(rows(10))
    with pytest.raises(DatasetError):
        CSVDataset(filepath=str(path), save_args={"index": False}).save(rows(50_000, broken_at=40_000))
    assert len(pd.read_csv(path)) not in (10, 50_000)  # neither the old file nor the new one


def test_a_failed_csv_save_leaves_the_previous_file_whole(tmp_path):
    path = tmp_path / "results.csv"
    AtomicCSVDataset(filepath=str(path), save_args={"index": False}).save(rows(10))
    with pytest.raises(DatasetError, match="disk full"):
        AtomicCSVDataset(filepath=str(path), save_args={"index": False}).save(rows(50_000, broken_at=40_000))
    assert len(AtomicCSVDataset(filepath=str(path)).load()) == 10
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]  # no temporary left


def test_a_failed_save_of_a_versioned_csv_leaves_the_previous_version_the_one_loaded(tmp_path):
    path = str(tmp_path / "results.csv")
    AtomicCSVDataset(filepath=path, version=Version(None, "2026-12-07T00.00.00.000Z"), save_args={"index": False}).save(rows(10))
    with pytest.raises(DatasetError, match="disk full"):
        AtomicCSVDataset(filepath=path, version=Version(None, "2026-12-07T01.00.00.000Z"),
                         save_args={"index": False}).save(rows(50_000, broken_at=40_000))  # fmt: skip
    assert len(AtomicCSVDataset(filepath=path, version=Version(None, None)).load()) == 10


def test_json_and_text_saves_are_whole_or_absent(tmp_path):
    json_path, text_path = tmp_path / "summary.json", tmp_path / "report.md"
    AtomicJSONFileDataset(filepath=str(json_path), save_args={"allow_nan": False}).save({"mean": 0.8})
    with pytest.raises(DatasetError):
        AtomicJSONFileDataset(filepath=str(json_path), save_args={"allow_nan": False}).save({"mean": float("nan")})
    assert AtomicJSONFileDataset(filepath=str(json_path)).load() == {"mean": 0.8}
    AtomicTextDataset(filepath=str(text_path)).save("# report\n")
    assert AtomicTextDataset(filepath=str(text_path)).load() == "# report\n"


def test_the_catalog_writes_no_file_with_kedro_datasets_own_in_place_writers():
    in_place = {"pandas.CSVDataset", "json.JSONDataset", "text.TextDataset"}
    found = []
    for path in sorted((ROOT / "conf").rglob("catalog*.yml")):
        for name, entry in (yaml.safe_load(path.read_text()) or {}).items():
            if not isinstance(entry, dict):
                continue
            types = {entry.get("type"), (entry.get("dataset") or {}).get("type") if isinstance(entry.get("dataset"), dict) else None}
            if types & in_place:
                found.append(f"{path.name}: {name}")
    assert found == []


_KILLED_MID_WRITE = r"""
import os, signal, sys
import pandas as pd
from mvl_pipeline.datasets.atomic_files import AtomicCSVDataset
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # the bytes are out, the rename not yet
AtomicCSVDataset(filepath=sys.argv[1], save_args={"index": False}).save(
    pd.DataFrame({"case_id": [f"case-{k:06d}" for k in range(50_000)], "dice": [0.5] * 50_000}))
"""


def test_a_save_killed_while_writing_leaves_the_previous_file_and_a_hidden_temporary(tmp_path):
    """The write itself interrupted (a real SIGKILL after the new bytes are written, before they
    replace the file): the previous file loads, whole; the temporary is hidden and swept."""
    import subprocess
    import sys

    from mvl_pipeline.core import storage

    path = tmp_path / "results.csv"
    AtomicCSVDataset(filepath=str(path), save_args={"index": False}).save(rows(10))
    done = subprocess.run([sys.executable, "-c", _KILLED_MID_WRITE, str(path)], capture_output=True, timeout=120, check=False)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    assert len(AtomicCSVDataset(filepath=str(path)).load()) == 10
    assert [p.name.startswith(".results.csv.tmp-") for p in sorted(tmp_path.iterdir())] == [True, False]
    assert storage.remove_temporaries(str(tmp_path)) == 1
