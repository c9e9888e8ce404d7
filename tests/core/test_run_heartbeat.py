"""Heartbeats of MLflow runs (core.run_heartbeat), against real processes and a real sqlite
tracking store: a run SIGKILLed falls silent and the next run marks it KILLED, while a live run
that keeps beating, a run of another tool (no heartbeat), a finished run and the caller's own
run are left alone. The Kedro hook starts the heartbeat and stops it when the run ends."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Pipeline, node

from mvl_pipeline.core.run_heartbeat import HEARTBEAT_TAG, Heartbeat, close_silent_runs
from mvl_pipeline.core.run_lock import RunConfig
from mvl_pipeline.hooks import KilledRunHook, RunLockHook

BEATER = """
import sys, time
import mlflow
from mvl_pipeline.core.run_heartbeat import Heartbeat
client = mlflow.MlflowClient(tracking_uri=sys.argv[1])
run = client.create_run(sys.argv[2])
Heartbeat(client, run.info.run_id, float(sys.argv[3])).start()
print(run.info.run_id, flush=True)
time.sleep(600)
"""


@pytest.fixture
def tracking(tmp_path):
    import mlflow

    before = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    client.get_experiment_by_name("Default")  # creates the schema before the beaters share it
    yield uri, client
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(before)


def _beat_of(client, run_id: str) -> int | None:
    value = client.get_run(run_id).data.tags.get(HEARTBEAT_TAG)
    return None if value is None else int(value)


def _until(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_the_run_block_validates_the_heartbeat():
    assert RunConfig().heartbeat_s == 60.0 and RunConfig().stale_after_s == 900.0
    with pytest.raises(ValueError, match="run.heartbeat_s must be > 0"):
        RunConfig.from_params({"heartbeat_s": 0})
    with pytest.raises(ValueError, match=r"run.stale_after_s must be at least 3 heartbeats \(180 s\), got 120"):
        RunConfig.from_params({"stale_after_s": 120})


def test_a_run_killed_with_sigkill_falls_silent_and_the_next_run_marks_it_killed_while_a_live_one_beats_on(
    tracking, caplog
):
    uri, client = tracking
    experiment = client.create_experiment("retraining")
    procs = [subprocess.Popen([sys.executable, "-c", BEATER, uri, experiment, "0.5"], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    try:
        killed, live = (proc.stdout.readline().strip() for proc in procs)
        _until(lambda: _beat_of(client, killed) is not None and _beat_of(client, live) is not None, "both heartbeats")
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        last = _beat_of(client, killed)
        other_tool = client.create_run(experiment).info.run_id  # RUNNING, never beats: not ours to judge
        finished = client.create_run(experiment).info.run_id
        client.set_tag(finished, HEARTBEAT_TAG, str(last))
        client.set_terminated(finished, status="FINISHED")
        own = client.create_run(experiment).info.run_id
        client.set_tag(own, HEARTBEAT_TAG, str(last))
        _until(lambda: time.time() - last > 3.0, "3 s of silence")
        live_before = _beat_of(client, live)

        with caplog.at_level(logging.INFO, logger="mvl_pipeline.core.run_heartbeat"):
            assert close_silent_runs(client, experiment, stale_after_s=2.0, exclude=own) == [killed]
        assert _beat_of(client, killed) == last  # the killed process beat no more
        status = {run_id: client.get_run(run_id).info.status for run_id in (killed, live, other_tool, finished, own)}
        assert status == {killed: "KILLED", live: "RUNNING", other_tool: "RUNNING", finished: "FINISHED", own: "RUNNING"}
        assert f"MLflow run {killed}: no heartbeat for" in caplog.text and "marked KILLED" in caplog.text
        _until(lambda: _beat_of(client, live) > live_before, "the live run's next heartbeat", timeout_s=10)
        assert close_silent_runs(client, experiment, stale_after_s=2.0, exclude=own) == []  # once
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_a_tracking_server_that_is_down_costs_one_warning_and_never_the_run(monkeypatch, caplog):
    import socket

    import mlflow

    with socket.socket() as probe:  # a port nothing listens on: connection refused, as a stopped server
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = mlflow.MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
    with caplog.at_level(logging.WARNING, logger="mvl_pipeline.core.run_heartbeat"):
        beat = Heartbeat(client, "5e629f0965424e5d", 0.05).start()
        _until(lambda: "was not recorded" in caplog.text, "the warning", timeout_s=30)
        time.sleep(0.3)  # more failed beats
        beat.stop()
        assert close_silent_runs(client, "1", stale_after_s=1.0) == []
    assert caplog.text.count("the heartbeat of MLflow run 5e629f0965424e5d was not recorded") == 1
    assert "the silent runs of MLflow experiment 1 were not checked" in caplog.text


def test_the_hook_beats_for_the_active_run_closes_silent_ones_and_stops_at_the_end(tracking):
    import mlflow

    _, client = tracking
    experiment = client.create_experiment("runs")
    silent = client.create_run(experiment).info.run_id
    client.set_tag(silent, HEARTBEAT_TAG, str(int(time.time()) - 3600))  # died an hour ago
    catalog = DataCatalog({"params:run": MemoryDataset({"heartbeat_s": 0.2, "stale_after_s": 600})})
    locks = RunLockHook()  # reads the run block, as kedro calls it first (tryfirst)
    locks.before_pipeline_run({"pipeline_names": ["report"]}, Pipeline([node(lambda: 1, None, "shown")]), catalog)
    assert locks.lock is None and locks.config.heartbeat_s == 0.2  # writes nothing: no lock, still a heartbeat
    hook = KilledRunHook(locks)
    with mlflow.start_run(experiment_id=experiment) as run:
        hook.before_pipeline_run()
        _until(lambda: _beat_of(client, run.info.run_id) is not None, "the first heartbeat", timeout_s=10)
        # closed in the background, once its heartbeat has stayed still for two more beats
        _until(lambda: client.get_run(silent).info.status == "KILLED", "the silent run closed", timeout_s=10)
        hook.after_pipeline_run()
        stopped = _beat_of(client, run.info.run_id)
        time.sleep(1.5)  # several intervals: no beat after the run ended
        assert _beat_of(client, run.info.run_id) == stopped
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


SKEWED_BEATER = """
import sys, time
import mlflow
from mvl_pipeline.core.run_heartbeat import HEARTBEAT_TAG
client = mlflow.MlflowClient(tracking_uri=sys.argv[1])
run = client.create_run(sys.argv[2])
print(run.info.run_id, flush=True)
while True:  # a pod whose clock runs 20 min behind the checking one's
    client.set_tag(run.info.run_id, HEARTBEAT_TAG, str(int(time.time()) - 1200))
    time.sleep(float(sys.argv[3]))
"""


def test_a_live_run_on_a_machine_whose_clock_differs_is_never_closed_a_silent_one_is(tracking, caplog):
    """An audit (2026-12-04): a pod whose clock ran 20 min ahead marked a live run KILLED (its
    last heartbeat 0 s old). A run is closed only if its heartbeat has not moved after a wait."""
    uri, client = tracking
    experiment = client.create_experiment("skew")
    live_proc = subprocess.Popen([sys.executable, "-c", SKEWED_BEATER, uri, experiment, "0.3"], stdout=subprocess.PIPE, text=True)
    dead_proc = subprocess.Popen([sys.executable, "-c", SKEWED_BEATER, uri, experiment, "0.3"], stdout=subprocess.PIPE, text=True)
    try:
        live, dead = live_proc.stdout.readline().strip(), dead_proc.stdout.readline().strip()
        _until(lambda: _beat_of(client, live) is not None and _beat_of(client, dead) is not None, "both heartbeats")
        dead_proc.send_signal(signal.SIGKILL)
        dead_proc.wait()
        # by this machine's clock both look silent for 20 min; without the confirmation both were closed
        with caplog.at_level(logging.INFO, logger="mvl_pipeline.core.run_heartbeat"):
            assert close_silent_runs(client, experiment, stale_after_s=900, confirm_after_s=2.0) == [dead]
        assert {r: client.get_run(r).info.status for r in (live, dead)} == {live: "RUNNING", dead: "KILLED"}
        assert f"MLflow run {live} looked silent for 20 min by this machine's clock, but its heartbeat moved" in caplog.text
    finally:
        for proc in (live_proc, dead_proc):
            proc.kill()
            proc.wait()
