"""The promotion gate with real tiny models against a real MLflow registry (sqlite in tmp_path).

Each test names the defect of the earlier gate it would have caught: a 2-step model deployed as
the first champion, a worse model promoted on another run's numbers (a stale
``evaluation_summary``), the same weights registered again on every retrain, a champion re-scored
on its own training patients after a re-split.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import mlflow
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mvl_pipeline.datasets.json_file import AtomicJSONDataset
from mvl_pipeline.datasets.model_registry import MlflowRegistryDataset
from mvl_pipeline.evaluation.leakage import (
    RECORD_KEY,
    LeakageError,
    development_record,
    shared_patients,
)
from mvl_pipeline.formats.model_bundle import weights_sha256
from mvl_pipeline.pipelines.evaluate.nodes import evaluate_holdout
from mvl_pipeline.pipelines.register import create_pipeline
from mvl_pipeline.pipelines.register.nodes import (
    attach_test_report,
    decide_registration,
    report_registration,
)
from mvl_pipeline.preprocessing.split import DEVELOPMENT, SplitConfig, make_split, role_view

pytestmark = pytest.mark.slow

NAME = "tiny-mvl"
LINEAGE = {"git_commit": "0" * 40, "git_dirty": False, "dvc_data_version": "abc123.dir"}
FIRST_ANYWAY = {"first_model_floor": 0.0}  # where a test needs a champion of whatever quality


@pytest.fixture
def registry(tmp_path, llm_cache_dir, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # mlflow.set_*_uri also export MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI: monkeypatch them so
    # that later tests' subprocesses (kedro run) do not inherit this test's registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield MlflowRegistryDataset(model_name=NAME, tracking_uri=uri, registry_uri=uri, llm_cache_dir=llm_cache_dir), \
        MlflowClient(uri, uri)  # fmt: skip
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def register(dataset, data, weights, params=None, *, summary=None, gate_split=None):
    """The register pipeline's three nodes, called in order: the registration report."""
    request, decision = decide_registration(
        weights, dataset.load(), data["ingested_cases"], gate_split or data["gate_split"], data["preprocessing_plan"],
        {"data_version": "v1", "run_name": "test-run"}, LINEAGE, data["llm_cache_dir"], {}, params or {},
    )  # fmt: skip
    dataset.save(attach_test_report(request, summary or {}))
    return report_registration(dataset.load(), decision)


def locked_test_summary(data, weights) -> dict:
    """What ``evaluate`` writes for ``weights``: its locked-test summary."""
    _, summary, _ = evaluate_holdout(weights, data["ingested_cases"], data["test_split"], data["preprocessing_plan"],
                                     data["llm_cache_dir"], {"overlay_cases": 0})  # fmt: skip
    return json.loads(json.dumps(summary))  # as read back from its JSON file


def champion_version(client) -> str | None:
    try:
        return str(client.get_model_version_by_alias(NAME, "champion").version)
    except MlflowException:
        return None


def versions(client) -> list[int]:
    return sorted(int(v.version) for v in client.search_model_versions(f"name = '{NAME}'"))


def test_a_first_model_below_the_floor_is_registered_without_the_champion_alias(
    tiny_training_data, one_step_models, registry
):
    """The defect: a 2-step model (gate Dice ~0.5) became champion because it came first."""
    dataset, client = registry
    # a held-out patient whose cases left the data stays listed in the gate: not counted as scored
    gate = dict(tiny_training_data["gate_split"])
    gate["patients"] = {**gate["patients"], "gate": [*gate["patients"]["gate"], "pt-withdrawn"]}
    report = register(dataset, tiny_training_data, one_step_models[0], {"first_model_floor": 0.5}, gate_split=gate)
    assert report["n_gate_patients_scored"] == len(tiny_training_data["gate_split"]["patients"]["gate"])
    assert report["n_gate_patients"] == report["n_gate_patients_scored"] + 1  # listed
    assert report["n_gate_patients_without_cases"] == 1
    assert report["challenger_gate_dice"] < 0.5  # the premise: a model below the floor
    assert report["registered"] is True and report["promoted"] is False
    assert report["alias"] is None and report["registered_aliases"] == []
    assert f"first model: gate Dice {report['challenger_gate_dice']:.4f} < the floor 0.5" in report["reason"]
    assert "registered without an alias, not deployed" in report["reason"]
    assert versions(client) == [1] and champion_version(client) is None
    assert report["champion_version_now"] is None and report["champion_test_performance"] == {}
    tags = client.get_model_version(NAME, "1").tags
    assert tags["gate"] == "not promoted" and tags["weights_sha256"] == weights_sha256(one_step_models[0][0])


def test_a_one_step_challenger_never_replaces_a_trained_champion(tiny_training_data, tiny_models, one_step_models,
                                                                 registry):  # fmt: skip
    dataset, client = registry
    data = tiny_training_data
    first = register(dataset, data, tiny_models["long"], FIRST_ANYWAY)
    assert first["promoted"] and champion_version(client) == "1"
    gate_cases = sorted(data["gate_split"]["gate"])
    for seed, worse in one_step_models.items():
        report = register(dataset, data, worse)
        # refused by the statistics on 6 gate patients, not for want of evidence
        assert report["promoted"] is False, (seed, report["reason"])
        assert "does not clear the margin" in report["reason"], (seed, report["reason"])
        assert report["paired"]["dice"]["n_patients"] == 6 and report["paired"]["dice"]["ci"][1] < 0
        assert report["registered_aliases"] == ["challenger"]
        assert champion_version(client) == "1"
        # both models scored now, by the gate, on the gate cases; the record says on what
        assert report["champion_gate_dice"] == pytest.approx(first["challenger_gate_dice"])
        assert sorted(report["per_case"]["challenger"]) == sorted(report["per_case"]["champion"]) == gate_cases
        assert report["gate_set_hash"] == first["gate_set_hash"] and report["n_gate_patients"] == 6
        assert report["weights_sha256"] == weights_sha256(worse[0])
        assert report["champion_weights_sha256"] == weights_sha256(tiny_models["long"][0])
    assert versions(client) == [1, 2, 3, 4]


def test_a_better_model_is_promoted_and_the_champion_reports_its_own_locked_test_metrics(
    tiny_training_data, tiny_models, registry
):
    dataset, client = registry
    data = tiny_training_data
    register(dataset, data, tiny_models["short"], FIRST_ANYWAY, summary=locked_test_summary(data, tiny_models["short"]))
    assert champion_version(client) == "1"
    # Boundary tolerances opened wide: a tiny model's HD95 is dominated by the worst case of the
    # lesions it misses; this test is about Dice evidence moving the alias, the HD95 rule has its own
    boundary_blind = {"hd95_tolerance_mm": 1e4, "nsd_tolerance": 1.0}
    summary = locked_test_summary(data, tiny_models["long"])
    report = register(dataset, data, tiny_models["long"], boundary_blind, summary=summary)
    assert report["paired"]["dice"]["ci"][0] > 0, report["reason"]
    assert report["promoted"] is True and report["registered_aliases"] == ["champion"]
    assert champion_version(client) == "2" == report["champion_version_now"]

    tags = client.get_model_version(NAME, "2").tags
    assert tags["git_commit"] == LINEAGE["git_commit"] and tags["plan_id"] == data["preprocessing_plan"]["plan_id"]
    assert tags["dvc_data_version"] == "abc123.dir" and tags["weights_sha256"] == weights_sha256(tiny_models["long"][0])
    assert tags["gate_set_hash"] == report["gate_set_hash"] and tags["gate"] == "promoted"
    assert tags["test_report"] == "attached" and tags["test_set_hash"] == summary["test_set_hash"]
    organ = summary["classes"]["organ"]
    assert tags["test_organ_dice"] == f"{organ['dice']['mean']:.4f}"
    assert tags["test_organ_dice_ci95"] == f"{organ['dice']['ci95'][0]:.4f}-{organ['dice']['ci95'][1]:.4f}"
    # what registration.json shows as the champion's performance: its own locked-test figures
    assert report["champion_test_performance"]["organ_dice"] == tags["test_organ_dice"]
    # no case or patient pseudonym (let alone identity) in any tag
    assert not any("case-" in v or "pt-" in v for v in tags.values())


def _register_catalog(dataset, data, weights, summary_path, params) -> DataCatalog:
    return DataCatalog(
        {
            "trained_model": MemoryDataset(weights, copy_mode="assign"),
            "registry_before": dataset,
            "model_registry": dataset,
            "register.registration_request": MemoryDataset(copy_mode="assign"),
            "ingested_cases": MemoryDataset(data["ingested_cases"], copy_mode="assign"),
            "gate_split": MemoryDataset(data["gate_split"]),
            "preprocessing_plan": MemoryDataset(data["preprocessing_plan"]),
            "fit_history": MemoryDataset({"data_version": "v1", "run_name": "partial-run"}),
            "lineage": MemoryDataset(LINEAGE),
            "evaluation_summary": AtomicJSONDataset(filepath=str(summary_path)),
            "params:fit.llm_cache_dir": MemoryDataset(data["llm_cache_dir"]),
            "params:evaluate": MemoryDataset({}),
            "params:register": MemoryDataset(params),
        }
    )


def test_a_stale_summary_neither_promotes_a_worse_model_nor_becomes_its_report(
    tiny_training_data, tiny_models, one_step_models, registry, tmp_path
):
    """The defect (`kedro run --pipelines fit,register`): B, a 2-step model, was promoted on the
    evaluation_summary that A, a 10-epoch model, had left on disk."""
    dataset, client = registry
    data = tiny_training_data
    champion_summary = locked_test_summary(data, tiny_models["short"])
    register(dataset, data, tiny_models["short"], FIRST_ANYWAY, summary=champion_summary)
    # model A: fit + evaluate; its summary stays on disk
    summary_path = tmp_path / "08_reporting" / "evaluation_summary.json"
    AtomicJSONDataset(filepath=str(summary_path)).save(locked_test_summary(data, tiny_models["long"]))
    # model B: fit + register, no evaluate
    worse = one_step_models[1]
    catalog = _register_catalog(dataset, data, worse, summary_path, {})
    SequentialRunner().run(create_pipeline(), catalog)
    report = catalog.load("registration_report")

    assert report["promoted"] is False and report["registered_aliases"] == ["challenger"]
    assert champion_version(client) == "1"
    assert report["weights_sha256"] == weights_sha256(worse[0])
    assert report["challenger_gate_dice"] < report["champion_gate_dice"]  # B's own figure, scored now
    tags = client.get_model_version(NAME, "2").tags
    assert tags["test_report"].startswith("missing")
    assert not any(key.startswith("test_organ") or key == "test_set_hash" for key in tags)  # nothing of A's
    # the report's performance is the champion's own locked-test result
    assert report["champion_test_performance"]["organ_dice"] == f"{champion_summary['classes']['organ']['dice']['mean']:.4f}"


def test_registering_the_same_trained_model_twice_creates_one_version(tiny_training_data, tiny_models, registry,
                                                                      tmp_path):  # fmt: skip
    """The defect: a second `make train` with nothing new added a duplicate version every night."""
    dataset, client = registry
    data = tiny_training_data
    summary_path = tmp_path / "evaluation_summary.json"
    AtomicJSONDataset(filepath=str(summary_path)).save(locked_test_summary(data, tiny_models["long"]))
    reports = []
    for _ in range(2):
        catalog = _register_catalog(dataset, data, tiny_models["long"], summary_path, FIRST_ANYWAY)
        SequentialRunner().run(create_pipeline(), catalog)
        reports.append(catalog.load("registration_report"))
    first, second = reports
    assert first["registered"] and first["registered_version"] == "1" and first["registered_aliases"] == ["champion"]
    assert versions(client) == [1] and champion_version(client) == "1"
    assert second["registered"] is False and second["promoted"] is False
    assert second["already_registered_as"] == "1"
    assert second["reason"] == "these weights are already registered as version 1: nothing registered"
    assert second["champion_version_now"] == "1"
    assert second["champion_test_performance"] == first["champion_test_performance"] != {}


def _resplit_with_leakage(data, champion_config) -> tuple[dict, dict]:
    """A re-split of the same patients (a lost split file and another seed) whose gate role holds
    at least one of the champion's development patients: (gate view, development view)."""
    case_patients = {c: data["ingested_cases"][c]().patient_id for c in data["ingested_cases"]}
    for seed in range(1, 200):
        split = make_split(case_patients, SplitConfig.from_params({"seed": seed}))
        if shared_patients(champion_config[RECORD_KEY], split["patients"]["gate"]):
            return role_view(split, ("gate",)), role_view(split, DEVELOPMENT)
    raise AssertionError("no seed re-splits a development patient into the gate role")


def test_a_re_split_that_puts_champion_training_patients_into_the_gate_is_refused(
    tiny_training_data, tiny_models, one_step_models, registry
):
    dataset, client = registry
    data = tiny_training_data
    register(dataset, data, tiny_models["long"], FIRST_ANYWAY)
    gate, development = _resplit_with_leakage(data, tiny_models["long"][1])
    new_patients = [p for role in DEVELOPMENT for p in development["patients"][role]]

    # a challenger trained on the new split: its own record is clean, the champion's is not
    state, config = one_step_models[2]
    retrained = (state, {**config, RECORD_KEY: development_record(new_patients, salt=weights_sha256(state)[:32])})
    with pytest.raises(LeakageError, match=r"of the gate set were development .* of the champion \(version 1\)") as refused:
        register(dataset, data, retrained, gate_split=gate)
    assert "Restore the split (03_primary/split.json) and the key it was made with" in str(refused.value)
    assert "retrain the model on the current split" in str(refused.value)

    # a challenger developed on the original split is refused for its own overlap, before scoring
    with pytest.raises(LeakageError, match="of the challenger"):
        register(dataset, data, one_step_models[2], gate_split=gate)
    assert versions(client) == [1] and champion_version(client) == "1"  # nothing registered


def test_registered_model_loads_as_pyfunc_and_predicts_probabilities(tiny_training_data, tiny_models, registry,
                                                                     monkeypatch, caplog):  # fmt: skip
    import numpy as np

    dataset, _ = registry
    data = tiny_training_data
    with caplog.at_level("WARNING", logger="mlflow"), warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        register(dataset, data, tiny_models["short"], FIRST_ANYWAY)
    assert "CloudPickle" not in caplog.text  # the model is logged as its code file, not pickled
    # nor advised to carry an input example (the signature says what goes in: model_registry.py)
    assert not [w for w in shown if "input example" in str(w.message)], [str(w.message)[:100] for w in shown]
    # a site that forbids unpickling models (MLflow's switch) still loads it: nothing is unpickled
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    patch = data["preprocessing_plan"]["patch_size"]
    out = model.predict(np.zeros((1, 1, *patch), np.float32))
    assert out.shape == (1, 3, *patch)
    assert np.allclose(out.sum(axis=1), 1.0, atol=1e-4)
    # An audit (2026-12-05): one NaN voxel made every probability NaN, silently
    poisoned = np.zeros((1, 1, *patch), np.float32)
    poisoned[0, 0, 0, 0, 0] = np.nan
    with pytest.raises(Exception, match=r"1 non-finite value\(s\)"):
        model.predict(poisoned)
    # ... its requirements named `mvl_pipeline`, which is not on PyPI (an environment MLflow builds
    # would install a stranger's package of that name), and lacked gguf and peft
    requirements = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion/requirements.txt")).read_text()
    names = {line.split("==")[0].strip() for line in requirements.splitlines() if line.strip()}
    assert "mvl_pipeline" not in names and {"torch", "gguf", "peft", "monai"} <= names, names


def test_a_registered_artifact_replaced_after_registration_is_refused_by_the_gate_and_predict(
    tiny_training_data, tiny_models, registry, tmp_path
):
    """An audit (2026-12-05): with a champion's model.safetensors replaced in the artifact store by
    another version's, the gate scored those weights as "the champion" and predict deployed them,
    silently. Both now check the weights against the version's weights_sha256 tag."""
    import shutil

    from mvl_pipeline.commands.predict import load_registered
    from mvl_pipeline.datasets.model_registry import WeightsMismatchError
    from mvl_pipeline.formats.model_bundle import WEIGHTS_FILE, write_weights

    dataset, client = registry
    data = tiny_training_data
    register(dataset, data, tiny_models["short"], FIRST_ANYWAY)
    assert load_registered(f"models:/{NAME}@champion", None)[0][0].keys() == tiny_models["short"][0].keys()
    version = client.get_model_version(NAME, "1")
    # the file in the artifact store itself (a local folder here), as someone with write access
    # to the store could replace it
    location = mlflow.get_logged_model(version.source.rsplit("/", 1)[-1]).artifact_location  # models:/m-...
    in_store = Path(location.removeprefix("file://")) / "artifacts" / "model_dir" / WEIGHTS_FILE
    assert in_store.is_file(), in_store
    other = tmp_path / "other"
    write_weights(other, tiny_models["long"])
    shutil.copyfile(other / WEIGHTS_FILE, in_store)

    with pytest.raises(WeightsMismatchError, match=f"the weights of {NAME} version 1 hash to .* not to the .* weights_sha256"):
        load_registered(f"models:/{NAME}@champion", None)
    from mvl_pipeline.datasets.model_registry import _download_bundle

    _download_bundle.cache_clear()  # a process that had downloaded it before would hold the old copy
    with pytest.raises(WeightsMismatchError):
        dataset.load().champion.load_bundle()


def test_a_fit_history_of_other_weights_is_refused_before_anything_is_registered(tiny_training_data, tiny_models, registry):
    """fit saves its history from its first node and the model from its second: a run cut off
    between them left a new history beside the old model, and register tagged the old model with
    the new fit's data version and run (an audit, 2026-12-07)."""
    dataset, client = registry
    data = tiny_training_data
    other = {"data_version": "v2", "run_name": "cut-off-run", "weights_sha256": weights_sha256(tiny_models["short"][0])}
    with pytest.raises(ValueError, match="fit_history.json is of other weights"):
        decide_registration(tiny_models["long"], dataset.load(), data["ingested_cases"], data["gate_split"],
                            data["preprocessing_plan"], other, LINEAGE, data["llm_cache_dir"], {}, {})  # fmt: skip
    assert versions(client) == []
    mine = other | {"weights_sha256": weights_sha256(tiny_models["long"][0])}
    request, _ = decide_registration(tiny_models["long"], dataset.load(), data["ingested_cases"], data["gate_split"],
                                     data["preprocessing_plan"], mine, LINEAGE, data["llm_cache_dir"], {}, {})  # fmt: skip
    assert request.tags["data_version"] == "v2"
