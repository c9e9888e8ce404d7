"""Idempotent registration through the ``register`` pipeline (SequentialRunner, a real MLflow
registry in sqlite): weights that are a registered version already register nothing, the run
completes and says which version they are. Fast: the gate stops before scoring anything."""

from __future__ import annotations

import mlflow
import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from mlflow.tracking import MlflowClient

from mvl_pipeline.datasets.model_registry import (
    GATE_CHAMPION,
    INTENDED_ALIASES,
    REGISTRATION_COMPLETE,
    MlflowRegistryDataset,
)
from mvl_pipeline.formats.model_bundle import weights_sha256
from mvl_pipeline.pipelines.register import create_pipeline

NAME = "tiny-idempotent"


@pytest.fixture
def registry_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    yield uri
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def _catalog(uri: str, weights, ingested) -> DataCatalog:
    def registry() -> MlflowRegistryDataset:
        return MlflowRegistryDataset(model_name=NAME, tracking_uri=uri, registry_uri=uri)

    return DataCatalog(
        {
            "trained_model": MemoryDataset(weights, copy_mode="assign"),
            "registry_before": registry(),
            "model_registry": registry(),
            "register.registration_request": MemoryDataset(copy_mode="assign"),
            "ingested_cases": MemoryDataset(ingested, copy_mode="assign"),
            "gate_split": MemoryDataset({"gate": ["case-g1"], "patients": {"gate": ["pt-g1"]}}),
            "preprocessing_plan": MemoryDataset({"plan_id": "p1"}),
            "fit_history": MemoryDataset({"data_version": "v1", "run_name": "again"}),
            "lineage": MemoryDataset({"git_commit": "0" * 40}),
            "evaluation_summary": MemoryDataset({"weights_sha256": weights_sha256(weights[0]), "classes": {}}),
            "params:fit.llm_cache_dir": MemoryDataset("unused"),
            "params:evaluate": MemoryDataset({}),
            "params:register": MemoryDataset({}),
        }
    )


def test_registering_weights_that_are_a_version_already_changes_nothing(registry_uri, tmp_path):
    weights = ({"head.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, {"model": {"num_classes": 2}})
    digest = weights_sha256(weights[0])
    client = MlflowClient(registry_uri, registry_uri)
    client.create_registered_model(NAME)
    for tag in ("0" * 64, digest, digest):  # another model, then these weights (twice, as before the fix)
        client.create_model_version(NAME, source=str(tmp_path / "elsewhere"), tags={"weights_sha256": tag})
    client.set_registered_model_alias(NAME, "champion", "2")

    def never_loaded():
        raise AssertionError("a registered model must not be scored again")

    catalog = _catalog(registry_uri, weights, {"case-g1": never_loaded})
    SequentialRunner().run(create_pipeline(), catalog)

    versions = client.search_model_versions(f"name = '{NAME}'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]  # nothing new
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"  # nothing moved
    report = catalog.load("registration_report")
    assert report["registered"] is False and report["promoted"] is False
    assert report["already_registered_as"] == "2"  # the oldest version holding these weights
    assert "already registered as version 2: nothing registered" in report["reason"]
    assert report["registered_version"] is None and report["registered_aliases"] == []
    assert report["champion_version_now"] == "2"


def _with_champion_v1(registry_uri: str, tmp_path):
    """A registry whose v1 is the champion (registration complete), and the weights to register."""
    weights = ({"head.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, {"model": {"num_classes": 2}})
    client = MlflowClient(registry_uri, registry_uri)
    client.create_registered_model(NAME)
    source = str(tmp_path / "elsewhere")
    client.create_model_version(NAME, source=source, tags={"weights_sha256": "1" * 64, REGISTRATION_COMPLETE: "true"})
    client.set_registered_model_alias(NAME, "champion", "1")
    return weights, client, source


@pytest.mark.parametrize("recorded", [True, False], ids=["gate-champion-recorded", "older-version-without-the-tag"])
def test_finishing_an_interrupted_champion_registration_never_replaces_a_newer_champion(registry_uri, tmp_path, recorded):
    """An audit (2026-12-05, real processes): a registration whose gate chose "champion" against
    v1 was SIGKILLed before the alias; another model was then gated against v1 and promoted (v3);
    the retried run finished the old decision and moved the champion alias back to weights never
    compared with v3 (the real gate refused them against v3). Such a decision is now finished as
    challenger."""
    weights, client, source = _with_champion_v1(registry_uri, tmp_path)
    interrupted = {"weights_sha256": weights_sha256(weights[0]), INTENDED_ALIASES: "champion"}
    if recorded:
        interrupted[GATE_CHAMPION] = "1"
    client.create_model_version(NAME, source=source, tags=interrupted)  # v2: cut off before its alias
    client.create_model_version(NAME, source=source, tags={"weights_sha256": "3" * 64, REGISTRATION_COMPLETE: "true"})
    client.set_registered_model_alias(NAME, "champion", "3")  # gated against v1 and promoted meanwhile

    catalog = _catalog(registry_uri, weights, {"case-g1": lambda: None})
    SequentialRunner().run(create_pipeline(), catalog)

    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "3"
    finished = client.get_model_version(NAME, "2")
    assert "challenger" in finished.aliases and finished.tags[REGISTRATION_COMPLETE] == "true"
    report = catalog.load("registration_report")
    assert report["promoted"] is False and "the champion is now version 3" in report["reason"]


def test_finishing_an_interrupted_champion_registration_still_promotes_when_the_champion_is_unchanged(registry_uri, tmp_path):
    weights, client, source = _with_champion_v1(registry_uri, tmp_path)
    client.create_model_version(NAME, source=source, tags={"weights_sha256": weights_sha256(weights[0]),
                                                          INTENDED_ALIASES: "champion", GATE_CHAMPION: "1"})  # fmt: skip
    SequentialRunner().run(create_pipeline(), _catalog(registry_uri, weights, {"case-g1": lambda: None}))
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
