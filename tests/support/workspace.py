"""A self-contained local workspace for benchmarks and tests: the real datasets of the
``ingest`` and ``preprocess`` pipelines pointed at one folder, without a Kedro project session.

    catalog = local_catalog(root, params)          # root/drop is the hospital drop
    prepare(catalog)                               # ingest + preprocess with SequentialRunner

The project's own runs use conf/ and ``kedro run``; this exists so that a benchmark or a test
measures the same code path on data it generated itself.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from mvl_pipeline.datasets.case_store import CaseStoreDataset
from mvl_pipeline.datasets.drop import DropFolderDataset
from mvl_pipeline.datasets.json_file import AtomicJSONDataset
from mvl_pipeline.datasets.secret_key import SecretKeyDataset


def local_catalog(root: Path, params: Mapping[str, Any], *, key_hex: str | None = None) -> DataCatalog:
    """Datasets of ingest + preprocess under ``root`` (drop at ``root/drop``); ``params`` maps
    top-level parameter blocks (``ingest``, ``preprocess``, ``model``) to their values."""

    def json_ds(name: str, **kwargs: Any) -> AtomicJSONDataset:
        return AtomicJSONDataset(filepath=str(root / f"{name}.json"), **kwargs)

    catalog = DataCatalog(
        {
            "hospital_drop": DropFolderDataset(filepath=str(root / "drop")),
            "pseudonymisation_key": SecretKeyDataset(credentials={"key": key_hex or secrets.token_hex(32)}),
            "previous_ingest_manifest": json_ds("manifest", missing={}),
            "ingest_manifest": json_ds("manifest"),
            "ingested_cases": CaseStoreDataset(path=str(root / "cases")),
            "quarantine_report": MemoryDataset(),
            "ingest_summary": MemoryDataset(),
            "dataset_fingerprint": json_ds("fingerprint"),
            "previous_dataset_fingerprint": json_ds("fingerprint", missing={}),
            "preprocessing_plan": json_ds("plan"),
            "previous_preprocessing_plan": json_ds("plan", missing={}),
            "model_input_cases": CaseStoreDataset(path=str(root / "model_input"), format="npy"),
            "model_input_records": CaseStoreDataset(path=str(root / "model_input"), format="npy"),
            "ingested_case_index": CaseStoreDataset(path=str(root / "cases"), index_only=True),
            "data_split": json_ds("split"),
            "previous_data_split": json_ds("split", missing={}),
            "legacy_data_split": json_ds("split_legacy", missing={}),
            "development_split": json_ds("split_development"),
            "gate_split": json_ds("split_gate"),
            "test_split": json_ds("split_test"),
        }
    )
    for block, values in params.items():
        catalog[f"params:{block}"] = values
    return catalog


def prepare(catalog: DataCatalog) -> dict[str, Any]:
    """Run ingest then preprocess; return what training needs (loaders, split, plan, manifest)."""
    from mvl_pipeline.pipelines.ingest import create_pipeline as ingest
    from mvl_pipeline.pipelines.preprocess import create_pipeline as preprocess

    runner = SequentialRunner()
    runner.run(ingest(), catalog)
    runner.run(preprocess(), catalog)
    return {
        "model_input_cases": catalog.load("model_input_cases"),
        "ingested_cases": catalog.load("ingested_cases"),
        "data_split": catalog.load("data_split"),
        "development_split": catalog.load("development_split"),
        "gate_split": catalog.load("gate_split"),
        "test_split": catalog.load("test_split"),
        "preprocessing_plan": catalog.load("preprocessing_plan"),
        "ingest_manifest": catalog.load("ingest_manifest"),
    }
