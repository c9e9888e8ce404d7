"""MLflow down at register (issue 15), with a real ``mlflow server`` process killed by SIGKILL:

- the server gone before register: the run fails naming the registry, nothing registered;
- the server killed between creating the version and setting its alias (the one window where a
  registration can be half done): the next run finds the version by its weights, sets the alias
  its gate decided and marks it complete; one version, never two; a third run changes nothing.

The kill is placed by wrapping the client's alias call: the wrapper sends SIGKILL to the server
process, then makes the real call, which fails on the dead socket."""

from __future__ import annotations

import pytest
import torch
from kedro.io import DataCatalog, DatasetError, MemoryDataset
from kedro.runner import SequentialRunner
from mlflow.tracking import MlflowClient

from mvl_pipeline.datasets.model_registry import (
    INTENDED_ALIASES,
    REGISTRATION_COMPLETE,
    MlflowRegistryDataset,
    RegistrationRequest,
)
from mvl_pipeline.formats.model_bundle import weights_sha256
from mvl_pipeline.pipelines.register import create_pipeline
from tests.support.mlflow_server import Server

pytestmark = pytest.mark.slow

NAME = "tiny-fault"
WEIGHTS = ({"head.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, {"model": {"num_classes": 2}})


@pytest.fixture
def server(tmp_path, monkeypatch):
    # fail fast on a dead server instead of MLflow's default minutes of retries
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    running = Server(tmp_path)
    running.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", running.uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", running.uri)
    yield running
    running.kill()


def _catalog(uri: str) -> DataCatalog:
    def registry() -> MlflowRegistryDataset:
        return MlflowRegistryDataset(model_name=NAME, tracking_uri=uri, registry_uri=uri)

    def never_loaded():
        raise AssertionError("registered weights must not be scored again")

    return DataCatalog(
        {
            "trained_model": MemoryDataset(WEIGHTS, copy_mode="assign"),
            "registry_before": registry(),
            "model_registry": registry(),
            "register.registration_request": MemoryDataset(copy_mode="assign"),
            "ingested_cases": MemoryDataset({"case-g1": never_loaded}, copy_mode="assign"),
            "gate_split": MemoryDataset({"gate": ["case-g1"], "patients": {"gate": ["pt-g1"]}}),
            "preprocessing_plan": MemoryDataset({"plan_id": "p1"}),
            "fit_history": MemoryDataset({"data_version": "v1", "run_name": "fault"}),
            "lineage": MemoryDataset({"git_commit": "0" * 40}),
            "evaluation_summary": MemoryDataset({"weights_sha256": weights_sha256(WEIGHTS[0]), "classes": {}}),
            "params:fit.llm_cache_dir": MemoryDataset("unused"),
            "params:evaluate": MemoryDataset({}),
            "params:register": MemoryDataset({}),
        }
    )


def test_a_registry_that_is_down_fails_the_register_run_naming_it(server):
    server.kill()
    with pytest.raises(DatasetError, match=f"cannot read the registry for model '{NAME}'") as error:
        SequentialRunner().run(create_pipeline(), _catalog(server.uri))
    assert f"127.0.0.1:{server.port}" in str(error.value)


def test_a_registration_cut_off_before_its_alias_is_finished_by_the_next_run_exactly_once(server, monkeypatch):
    request = RegistrationRequest(weights=WEIGHTS, plan={"plan_id": "p1"}, aliases=("champion",),
                                  tags={"weights_sha256": weights_sha256(WEIGHTS[0])}, run_name="fault", num_classes=2)  # fmt: skip
    real_alias = MlflowClient.set_registered_model_alias

    def kill_then_call(self, *args, **kwargs):
        server.kill()  # SIGKILL: the registry dies between the version and its alias
        return real_alias(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", kill_then_call)
    with pytest.raises(Exception) as error:  # noqa: B017  (whatever the HTTP client raises on a dead socket)
        MlflowRegistryDataset(model_name=NAME, tracking_uri=server.uri, registry_uri=server.uri).save(request)
    assert server.process.poll() is not None, f"the save failed before the alias call: {error.value!r}"
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", real_alias)

    server.start()  # the same backend store, back again
    client = MlflowClient(server.uri, server.uri)
    (version,) = client.search_model_versions(f"name = '{NAME}'")
    assert version.tags[INTENDED_ALIASES] == "champion" and REGISTRATION_COMPLETE not in version.tags
    assert not version.aliases  # half registered: a version nobody serves

    catalog = _catalog(server.uri)
    SequentialRunner().run(create_pipeline(), catalog)
    report = catalog.load("registration_report")
    assert "registration was interrupted" in report["reason"] and report["already_registered_as"] == "1"
    (version,) = client.search_model_versions(f"name = '{NAME}'")  # still exactly one version
    assert version.tags[REGISTRATION_COMPLETE] == "true"
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert report["champion_version_now"] == "1"

    catalog = _catalog(server.uri)  # a third run: nothing to finish, nothing new
    SequentialRunner().run(create_pipeline(), catalog)
    assert "already registered as version 1: nothing registered" in catalog.load("registration_report")["reason"]
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 1
