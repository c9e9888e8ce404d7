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
