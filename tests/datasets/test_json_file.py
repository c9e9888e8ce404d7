"""AtomicJSONDataset: "not written yet" default, atomic replace, S3."""

import json

import pytest
from kedro.io import DatasetError

from mvl_pipeline.datasets.json_file import AtomicJSONDataset


def test_missing_default_and_round_trip(tmp_path):
    path = tmp_path / "sub" / "split.json"
    assert AtomicJSONDataset(filepath=str(path), missing={}).load() == {}
    with pytest.raises(DatasetError, match="does not exist"):
        AtomicJSONDataset(filepath=str(path)).load()
    AtomicJSONDataset(filepath=str(path)).save({"test": ["case-b", "case-a"]})
    assert AtomicJSONDataset(filepath=str(path)).load() == {"test": ["case-b", "case-a"]}


def test_a_failed_save_keeps_the_previous_document(tmp_path):
    path = tmp_path / "manifest.json"
    dataset = AtomicJSONDataset(filepath=str(path))
    dataset.save({"units": {"u-1": 1}})
    with pytest.raises(DatasetError, match="not JSON compliant"):
        dataset.save({"bad": float("nan")})  # allow_nan=False: nothing is written
    assert json.loads(path.read_text()) == {"units": {"u-1": 1}}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp file left


def test_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("{truncated")
    with pytest.raises(DatasetError, match="not valid JSON"):
        AtomicJSONDataset(filepath=str(path), missing={}).load()


def test_s3_round_trip(s3_bucket):
    url = f"s3://{s3_bucket['bucket']}/reports/summary.json"
    dataset = AtomicJSONDataset(filepath=url, credentials=s3_bucket["credentials"])
    dataset.save({"mean_dice": 0.9})
    assert AtomicJSONDataset(filepath=url, credentials=s3_bucket["credentials"]).load() == {"mean_dice": 0.9}
