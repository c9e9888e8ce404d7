"""A trial's MLflow child run holds its whole training curve, also when the trial resumed from a
checkpoint that an interrupted invocation wrote (whose epochs were streamed to that run's child)."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from mvl_pipeline.training import ablation_tracking
from mvl_pipeline.training.metric_stream import MetricStream


def _parent(tmp_path) -> dict[str, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("ablation-test")
    return {"tracking_uri": uri, "run_id": client.create_run(experiment).info.run_id}


def _history(epochs: range) -> list[dict[str, float]]:
    return [{"epoch": e, "train_loss": 1.0 / (e + 1), "lr": 0.001} for e in epochs]


def _steps(parent, run_id: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(tracking_uri=parent["tracking_uri"]).get_metric_history(run_id, "fit.train_loss"))


def test_a_resumed_trial_child_gets_the_epochs_trained_before_the_resume_once_each(tmp_path):
    parent = _parent(tmp_path)
    run_id = ablation_tracking.start_child(parent, {"arm": "none", "seed": 0}, str(tmp_path / "trial"))
    stream = MetricStream({**parent, "run_id": run_id})
    for entry in _history(range(3, 5)):  # this invocation trained epochs 3-4, streamed as it went
        stream.put(entry, entry["epoch"])
    assert stream.close() == {"queued": 2, "logged": 2, "not_logged": 0}
    ablation_tracking.finish_child(parent, run_id, {"test.dice": 0.8}, _history(range(5)))
    assert _steps(parent, run_id) == [0, 1, 2, 3, 4]
    run = MlflowClient(tracking_uri=parent["tracking_uri"]).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["test.dice"] == 0.8


def test_a_trial_resumed_after_its_last_epoch_still_has_its_curve(tmp_path):
    parent = _parent(tmp_path)
    run_id = ablation_tracking.start_child(parent, {"arm": "none", "seed": 1}, str(tmp_path / "trial"))
    ablation_tracking.finish_child(parent, run_id, {"test.dice": 0.7}, _history(range(2)))  # nothing left to train
    assert _steps(parent, run_id) == [0, 1]


def test_the_child_of_a_trial_killed_between_storing_its_result_and_closing_its_run_is_completed_on_adoption(tmp_path):
    killed = _parent(tmp_path)
    client = MlflowClient(tracking_uri=killed["tracking_uri"])
    run_id = ablation_tracking.start_child(killed, {"arm": "none", "seed": 0}, str(tmp_path / "trial"))
    stream = MetricStream({**killed, "run_id": run_id})
    for entry in _history(range(2)):  # streamed while it trained; the process died before finish_child
        stream.put(entry, entry["epoch"])
    assert stream.close()["logged"] == 2
    stored = {"arm": "none", "seed": 0, "parent_run_id": killed["run_id"], "child_run_id": run_id,
              "test_metrics": {"test.dice": 0.75, "best_val_dice": 0.7}, "history": _history(range(3))}  # fmt: skip
    experiment = client.get_run(killed["run_id"]).info.experiment_id
    for _ in range(2):  # the resumed run, then a later one: the cut run is completed once
        resumed = {**killed, "run_id": client.create_run(experiment).info.run_id}
        assert ablation_tracking.adopt_earlier_trials(resumed, [stored], {"ablation": "a"}) == 1
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.metrics["test.dice"] == 0.75
        assert _steps(killed, run_id) == [0, 1, 2]
        assert len(client.get_metric_history(run_id, "test.dice")) == 1
        adopted = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{resumed['run_id']}'")
        assert [r.data.tags["resumed_from_run"] for r in adopted] == [run_id]


def test_an_adopted_trial_child_names_the_commit_that_trained_it_not_the_one_adopting_it(tmp_path):
    """An audit (2026-12-05): a rerun after a commit reused every finished trial, and the new
    children it made for them carried the new commit."""
    earlier = _parent(tmp_path)
    client = MlflowClient(tracking_uri=earlier["tracking_uri"])
    stored = {"arm": "none", "seed": 0, "parent_run_id": earlier["run_id"], "child_run_id": None,
              "trained_at_commit": "a" * 40, "trained_at_dirty": "False",
              "test_metrics": {"test.dice": 0.75}, "history": _history(range(2))}  # fmt: skip
    experiment = client.get_run(earlier["run_id"]).info.experiment_id
    later = {**earlier, "run_id": client.create_run(experiment).info.run_id}
    assert ablation_tracking.adopt_earlier_trials(later, [stored, {**stored, "seed": 1, "trained_at_commit": None}],
                                                  {"git_commit": "b" * 40, "git_dirty": "True"}) == 2  # fmt: skip
    adopted = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{later['run_id']}'")
    tags = {r.data.tags["seed"]: (r.data.tags["git_commit"], r.data.tags["git_dirty"]) for r in adopted}
    assert tags == {"0": ("a" * 40, "False"), "1": ("unrecorded", "False")}
