"""The champion/challenger gate against a real MLflow registry (sqlite in tmp_path)."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from mvl_pipeline.datasets.model_registry import MlflowRegistryDataset
from mvl_pipeline.evaluation.gate import gate_score
from mvl_pipeline.evaluation.scoring import EvaluateConfig, cases_in, score_cases
from mvl_pipeline.evaluation.summary import summarise
from mvl_pipeline.model import model_from_weights
from mvl_pipeline.pipelines.register.nodes import decide_registration, report_registration

pytestmark = pytest.mark.slow

LINEAGE = {"git_commit": "0" * 40, "git_dirty": False, "dvc_data_version": "abc123.dir"}


@pytest.fixture
def registry(tmp_path, llm_cache_dir, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # mlflow.set_*_uri also export MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI: monkeypatch them so
    # that later tests' subprocesses (kedro run) do not inherit this test's registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield MlflowRegistryDataset(
        model_name="tiny-mvl", tracking_uri=uri, registry_uri=uri, llm_cache_dir=llm_cache_dir
    ), MlflowClient(uri, uri)
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def holdout_summary(data, weights):
    model = model_from_weights(*weights, llm_cache_dir=data["llm_cache_dir"])
    classes = {int(v): k for k, v in data["labels"].items()}
    rows, _ = score_cases(model, cases_in(data["ingested_cases"], data["data_split"], "test"),
                          data["preprocessing_plan"], classes, num_classes=model.cfg.num_classes,
                          params=EvaluateConfig())  # fmt: skip
    return {"classes": summarise(rows)}


def register(dataset, data, weights, summary):
    request, decision = decide_registration(
        weights, summary, dataset.load(), data["ingested_cases"], data["data_split"], data["preprocessing_plan"],
        {"data_version": "v1", "run_name": "test-run"}, LINEAGE, data["llm_cache_dir"],
        {}, {"margin": 0.005},
    )  # fmt: skip
    dataset.save(request)
    return report_registration(dataset.load(), decision)


def test_first_champion_then_a_worse_model_is_held_back_then_a_better_one_wins(
    tiny_training_data, tiny_models, registry
):
    dataset, client = registry
    data = tiny_training_data
    scores = {name: holdout_summary(data, w) for name, w in tiny_models.items()}
    dice = {name: gate_score(s["classes"]) for name, s in scores.items()}
    # the test is only meaningful if the three models really differ in quality
    assert dice["untrained"] + 0.005 < dice["short"] < dice["long"] - 0.005, dice

    first = register(dataset, data, tiny_models["short"], scores["short"])
    assert first["promoted"] and first["reason"] == "first model"
    assert str(client.get_model_version_by_alias("tiny-mvl", "champion").version) == "1"

    worse = register(dataset, data, tiny_models["untrained"], scores["untrained"])
    assert not worse["promoted"]
    assert worse["champion_dice"] == pytest.approx(dice["short"], abs=1e-6)  # re-scored now, same holdout
    assert worse["registered_aliases"] == ["challenger"]
    assert str(client.get_model_version_by_alias("tiny-mvl", "champion").version) == "1"

    better = register(dataset, data, tiny_models["long"], scores["long"])
    assert better["promoted"]
    assert str(client.get_model_version_by_alias("tiny-mvl", "champion").version) == "3"

    tags = client.get_model_version("tiny-mvl", "3").tags
    assert tags["git_commit"] == LINEAGE["git_commit"] and tags["plan_id"] == data["preprocessing_plan"]["plan_id"]
    assert tags["dvc_data_version"] == "abc123.dir" and "holdout_organ_dice" in tags
    # no case or patient pseudonym (let alone identity) in any tag
    assert not any("case-" in v or "pt-" in v for v in tags.values())


def test_registered_model_loads_as_pyfunc_and_predicts_probabilities(tiny_training_data, tiny_models, registry):
    import numpy as np

    dataset, _ = registry
    data = tiny_training_data
    register(dataset, data, tiny_models["short"], holdout_summary(data, tiny_models["short"]))
    model = mlflow.pyfunc.load_model("models:/tiny-mvl@champion")
    patch = data["preprocessing_plan"]["patch_size"]
    out = model.predict(np.zeros((1, 1, *patch), np.float32))
    assert out.shape == (1, 3, *patch)
    assert np.allclose(out.sum(axis=1), 1.0, atol=1e-4)
