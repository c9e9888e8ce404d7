"""Epoch metrics reach MLflow from a background thread (``training.metric_stream``): a hung MLflow
server (a real ``mlflow server`` SIGSTOPped: it takes connections and never answers) does not hold
up training, and every epoch ends up in the run once the server answers again.

With the client's timeout at 60 s and no retries, a loop that logged in line would wait 60 s on
the first epoch after the stop and then lose that epoch: both are checked against."""

from __future__ import annotations

import logging
import time

import pytest
from mlflow.tracking import MlflowClient

from mvl_pipeline.training import metric_stream
from mvl_pipeline.training.loop import run_training
from mvl_pipeline.training.metric_stream import MetricStream, log_missing_epochs
from mvl_pipeline.training.session import Session
from tests.support.mlflow_server import Server
from tests.training.test_loop import training_config

CLIENT_TIMEOUT_S = 60


def _run(uri: str) -> dict[str, str]:
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("stream-test")
    return {"tracking_uri": uri, "run_id": client.create_run(experiment).info.run_id}


def _steps(target: dict[str, str]) -> list[int]:
    history = MlflowClient(tracking_uri=target["tracking_uri"]).get_metric_history(target["run_id"], "fit.train_loss")
    return sorted(m.step for m in history)


class SignallingSession(Session):
    """The plain session; calls ``on_report[epoch]()`` when the loop reports that epoch."""

    def __init__(self, on_report: dict[int, callable]) -> None:
        self.on_report = on_report

    def report(self, metrics, checkpoint_dir) -> None:
        del checkpoint_dir
        action = self.on_report.get(int(metrics["epoch"]))
        if action is not None:
            action()


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", str(CLIENT_TIMEOUT_S))
    running = Server(tmp_path / "mlflow")
    (tmp_path / "mlflow").mkdir()
    running.start()
    yield running
    running.kill()


def test_every_epoch_is_streamed_to_a_run_and_nothing_is_missing_afterwards(tmp_path):
    target = _run(f"sqlite:///{tmp_path / 'mlflow.db'}")
    state = run_training({**training_config(tmp_path, epochs=3), "mlflow": target}, Session())
    assert _steps(target) == [0, 1, 2]
    assert log_missing_epochs(MlflowClient(tracking_uri=target["tracking_uri"]), target["run_id"], state["history"]) == 0
    assert _steps(target) == [0, 1, 2]  # nothing logged twice


def test_a_worker_restarted_after_streaming_an_epoch_does_not_log_it_twice(tmp_path):
    """An audit (2026-12-04): a worker that streamed epoch 4 and died before its checkpoint
    retrained epoch 4 after the restart and streamed it again: the run held step 4 twice."""
    target = _run(f"sqlite:///{tmp_path / 'mlflow.db'}")
    first = MetricStream(target)
    for epoch in range(5):
        first.put({"train_loss": 1.0 / (epoch + 1), "lr": 0.001}, epoch)
    first.close()
    restarted = MetricStream(target)  # resumed from the checkpoint after epoch 3
    for epoch in range(4, 7):
        restarted.put({"train_loss": 9.0, "lr": 0.001}, epoch)
    restarted.close()
    assert _steps(target) == [0, 1, 2, 3, 4, 5, 6]  # each epoch once
    history = MlflowClient(tracking_uri=target["tracking_uri"]).get_metric_history(target["run_id"], "fit.train_loss")
    assert {m.step: m.value for m in history}[4] == pytest.approx(0.2)  # the first value stays


def test_without_a_run_the_stream_does_nothing():
    stream = MetricStream(None)
    stream.put({"train_loss": 1.0}, 0)
    assert stream.close() == {"queued": 0, "logged": 0, "not_logged": 0}


@pytest.mark.slow
def test_a_server_hung_mid_training_holds_up_no_epoch_and_gets_every_epoch_when_it_answers(server, tmp_path):
    target = _run(server.uri)
    # stopped once epoch 0 is reported, continued once epoch 3 is: epochs 1-3 train meanwhile
    session = SignallingSession({0: server.stop, 3: server.resume})
    started = time.monotonic()
    state = run_training({**training_config(tmp_path, epochs=5), "mlflow": target}, session)
    took = time.monotonic() - started
    assert [e["epoch"] for e in state["history"]] == [0, 1, 2, 3, 4]
    assert took < CLIENT_TIMEOUT_S, f"training waited for the hung server ({took:.0f} s)"
    assert _steps(target) == [0, 1, 2, 3, 4]  # the queued epochs were logged once it answered, each once


@pytest.mark.slow
def test_a_server_hung_to_the_end_costs_the_drain_wait_only_and_the_history_fills_the_run_after(
    server, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(metric_stream, "DRAIN_S", 3.0)
    target = _run(server.uri)
    server.stop()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="mvl_pipeline.training.metric_stream"):
        state = run_training({**training_config(tmp_path, epochs=3), "mlflow": target}, Session())
    took = time.monotonic() - started
    assert took < CLIENT_TIMEOUT_S, f"training waited for the hung server ({took:.0f} s)"
    assert "MLflow took 0 of 3 epochs' metrics" in caplog.text
    server.resume()
    # epoch 0's request was in flight at the stop: the server answers it now; the stream, given
    # up on, logs nothing after it
    deadline = time.monotonic() + 30
    while _steps(target) != [0] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _steps(target) == [0]
    client = MlflowClient(tracking_uri=server.uri)
    assert log_missing_epochs(client, target["run_id"], state["history"]) == 2
    time.sleep(1)
    assert _steps(target) == [0, 1, 2]
