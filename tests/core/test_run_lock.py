"""The run lock (core.run_lock) against another real process: a second run refuses or waits
(bounded, naming the holder by PID, host, pipeline and start time, never a path); a holder killed
with SIGKILL leaves no lock, only its record, which the next run reports. And the Kedro hook takes
it only for pipelines that write data."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Pipeline, node

from mvl_pipeline.core.run_lock import RunConfig, RunLock, RunLockedError, lock_path
from mvl_pipeline.datasets.json_file import AtomicJSONDataset
from mvl_pipeline.hooks import KilledRunHook, RunLockHook, writes_data

HOLDER = """
import sys, time
from mvl_pipeline.core.run_lock import RunConfig, RunLock
lock = RunLock(sys.argv[1], RunConfig(), pipeline="train")
lock.acquire()
for note in sys.argv[3:]:  # as KilledRunHook notes the MLflow run id (a longer one first)
    lock.note(mlflow_run_id=note)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
lock.release()
"""


@pytest.fixture
def holder(tmp_path):
    """``holder(seconds)``: another process that takes the lock at tmp_path/.run.lock."""
    started = []

    def start(seconds: float, *notes: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / ".run.lock"), str(seconds), *notes],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        started.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def lock_at(tmp_path: Path, **config) -> RunLock:
    return RunLock(tmp_path / ".run.lock", RunConfig.from_params(config), pipeline="ingest")


def test_the_run_block_is_validated():
    assert RunConfig() == RunConfig(lock="wait", lock_timeout_s=3600.0)
    with pytest.raises(ValueError, match=r"run.lock must be one of \('wait', 'refuse'\), got 'skip'"):
        RunConfig.from_params({"lock": "skip"})
    with pytest.raises(ValueError, match="run.lock_timeout_s must be > 0"):
        RunConfig.from_params({"lock_timeout_s": 0})


def test_the_lock_lives_in_a_local_data_root_and_is_keyed_by_a_remote_one(tmp_path):
    assert lock_path("data", tmp_path) == tmp_path / "data" / ".run.lock"
    assert lock_path(str(tmp_path / "elsewhere"), "/project") == tmp_path / "elsewhere" / ".run.lock"
    remote = lock_path("s3://bucket/mvl", tmp_path)
    assert remote.parent == tmp_path / "data" and remote.name.startswith(".run-")
    assert remote != lock_path("s3://bucket/other", tmp_path) and remote == lock_path("s3://bucket/mvl/", tmp_path)


def test_a_second_run_refuses_naming_the_holder_without_a_path(tmp_path, holder):
    other = holder(30)
    with pytest.raises(RunLockedError) as refused:
        lock_at(tmp_path, lock="refuse").acquire()
    message = str(refused.value)
    assert f"PID {other.pid} on host " in message and "pipeline 'train'" in message and "started 20" in message
    assert "run.lock is 'refuse'" in message and str(tmp_path) not in message and ".run.lock" not in message
    assert refused.value.__context__ is None  # filelock's own error (it names the path) is not chained


def test_a_waiting_run_gives_up_after_its_timeout(tmp_path, holder):
    other = holder(30)
    started = time.monotonic()
    with pytest.raises(RunLockedError, match=rf"gave up after waiting 1 s .* held by PID {other.pid} on host "):
        lock_at(tmp_path, lock="wait", lock_timeout_s=1).acquire()
    assert 1.0 <= time.monotonic() - started < 10


def test_a_waiting_run_says_whom_it_waits_for_and_goes_on_when_the_holder_ends(tmp_path, holder, caplog):
    other = holder(1.5)
    lock = lock_at(tmp_path, lock="wait", lock_timeout_s=60)
    with caplog.at_level(logging.INFO, logger="mvl_pipeline.core.run_lock"):
        lock.acquire()
    assert other.wait(timeout=10) == 0
    waiting = [r.getMessage() for r in caplog.records if "waiting up to 60 s" in r.getMessage()]
    assert len(waiting) == 1 and f"PID {other.pid} on host " in waiting[0]
    assert lock.left_behind is None  # released cleanly: no stale record
    assert json.loads((tmp_path / ".run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / ".run.lock").read_text() == ""


def test_a_holder_killed_with_sigkill_releases_the_lock_and_leaves_its_record(tmp_path, holder, caplog):
    other = holder(60)
    other.send_signal(signal.SIGKILL)
    other.wait()
    lock = lock_at(tmp_path, lock="refuse")  # refuse: it must not even have to wait
    with caplog.at_level(logging.WARNING, logger="mvl_pipeline.core.run_lock"):
        lock.acquire()
    assert lock.left_behind["pid"] == other.pid
    assert any(f"recovered the run lock left by PID {other.pid}" in r.getMessage() for r in caplog.records)
    lock.release()


def test_a_holder_killed_after_noting_its_mlflow_run_leaves_a_whole_record_naming_it(tmp_path, holder):
    other = holder(60, "a-longer-id-noted-first", "run-a")
    other.send_signal(signal.SIGKILL)
    other.wait()
    lock = lock_at(tmp_path, lock="refuse")
    lock.acquire()
    assert (lock.left_behind["pid"], lock.left_behind["mlflow_run_id"]) == (other.pid, "run-a")
    lock.note(mlflow_run_id="run-b")
    assert json.loads((tmp_path / ".run.lock").read_text()) | {"started": None} == {
        "pid": os.getpid(), "host": socket.gethostname(), "pipeline": "ingest", "started": None, "mlflow_run_id": "run-b"}
    lock.release()
    lock.note(mlflow_run_id="run-c")  # not held: nothing written
    assert (tmp_path / ".run.lock").read_text() == ""


def _pipeline(output: str) -> Pipeline:
    return Pipeline([node(lambda: {"a": 1}, inputs=None, outputs=output, name="make_node")])


class _Context:
    def __init__(self, root: Path, data_root: str = "data") -> None:
        self.project_path = root
        self.config_loader = {"globals": {"data_root": data_root}}


def test_the_hook_locks_only_runs_that_write_data_and_releases_on_success_and_failure(tmp_path):
    catalog = DataCatalog({
        "doc": AtomicJSONDataset(filepath=str(tmp_path / "data" / "doc.json")),
        "scratch": MemoryDataset(),
        "params:run": MemoryDataset({"lock": "refuse"}),
    })  # fmt: skip
    assert writes_data(_pipeline("doc"), catalog) and not writes_data(_pipeline("scratch"), catalog)
    assert not writes_data(_pipeline("not_in_catalog"), catalog)  # a default MemoryDataset
    hook, second = RunLockHook(), RunLockHook()
    for h in (hook, second):
        h.after_context_created(_Context(tmp_path))
    params = {"pipeline_names": ["ingest"], "project_path": str(tmp_path)}

    hook.before_pipeline_run(params, _pipeline("scratch"), catalog)
    assert not (tmp_path / "data" / ".run.lock").exists()  # writes nothing: no lock
    hook.before_pipeline_run(params, _pipeline("doc"), catalog)
    record = json.loads((tmp_path / "data" / ".run.lock").read_text())
    assert (record["pid"], record["pipeline"]) == (os.getpid(), "ingest")
    with pytest.raises(RunLockedError, match="run.lock is 'refuse'"):  # params:run says refuse
        second.before_pipeline_run(params, _pipeline("doc"), catalog)
    hook.after_pipeline_run()
    second.before_pipeline_run(params, _pipeline("doc"), catalog)  # free again
    second.on_pipeline_error()  # a failed run releases it too
    hook.before_pipeline_run(params, _pipeline("doc"), catalog)
    hook.after_pipeline_run()
    assert (tmp_path / "data" / ".run.lock").read_text() == ""


def test_two_machines_writing_one_s3_data_root_never_hold_its_lock_at_once(tmp_path, s3_bucket, monkeypatch):
    """Two clones of the project (a laptop and a pod) with one ``s3://`` data root: the second run
    refuses. Until 2026-12-05 the lock of a remote root was a file in each clone's data/ folder,
    so both runs took it and wrote the same S3 layers at once."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket["endpoint_url"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    root = f"s3://{s3_bucket['bucket']}/mvl/"
    catalog = DataCatalog({
        "doc": AtomicJSONDataset(filepath=str(tmp_path / "scratch.json")),
        "params:run": MemoryDataset({"lock": "refuse"}),
    })  # fmt: skip
    laptop, pod = RunLockHook(), RunLockHook()
    laptop.after_context_created(_Context(tmp_path / "laptop", data_root=root))
    pod.after_context_created(_Context(tmp_path / "pod", data_root=root))
    params = {"pipeline_names": ["ingest"]}
    laptop.before_pipeline_run(params, _pipeline("doc"), catalog)
    try:
        with pytest.raises(RunLockedError, match=f"PID {os.getpid()} on host"):
            pod.before_pipeline_run(params, _pipeline("doc"), catalog)
    finally:
        laptop.after_pipeline_run()
    pod.before_pipeline_run(params, _pipeline("doc"), catalog)  # free once the first run ended
    pod.before_node_run()  # the lease is held: the run goes on
    pod.after_pipeline_run()


@pytest.fixture
def tracking(tmp_path):
    """A sqlite MLflow as kedro-mlflow sets it up (the global tracking URI), restored after."""
    import mlflow

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    yield mlflow.MlflowClient()
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(before)


def test_the_mlflow_run_of_a_holder_killed_with_sigkill_is_marked_killed_by_the_next_run(tmp_path, holder, tracking, caplog):
    import mlflow

    experiment = tracking.create_experiment("runs")
    dead, finished = (tracking.create_run(experiment).info.run_id for _ in range(2))
    tracking.set_terminated(finished, status="FINISHED")
    catalog = DataCatalog({"doc": AtomicJSONDataset(filepath=str(tmp_path / "data" / "doc.json"))})
    params = {"pipeline_names": ["fit"], "project_path": str(tmp_path)}
    for left, expected in ((dead, "KILLED"), (finished, "FINISHED"), ("not-on-this-server", None)):
        other = holder(60, left)  # a run that had opened its MLflow run, then was killed
        other.send_signal(signal.SIGKILL)
        other.wait()
        locks = RunLockHook()
        locks.after_context_created(_Context(tmp_path, data_root=str(tmp_path)))  # the holder's lock
        locks.before_pipeline_run(params, _pipeline("doc"), catalog)
        assert locks.lock.left_behind["mlflow_run_id"] == left
        with mlflow.start_run(experiment_id=experiment) as run, caplog.at_level(logging.INFO, logger="mvl_pipeline.hooks"):
            caplog.clear()
            killed = KilledRunHook(locks)
            killed.before_pipeline_run()
            assert json.loads((tmp_path / ".run.lock").read_text())["mlflow_run_id"] == run.info.run_id
            assert tracking.get_run(run.info.run_id).info.status == "RUNNING"  # its own run is left to kedro-mlflow
            killed.after_pipeline_run()  # its heartbeat stops
        locks.after_pipeline_run()
        messages = " ".join(r.getMessage() for r in caplog.records)
        if expected is None:  # another tracking server's run: said, and the run goes on
            assert f"the MLflow run {left} of the run that died holding the run lock was not closed" in messages
        else:
            assert tracking.get_run(left).info.status == expected
            assert (f"MLflow run {left} of the run that died holding the run lock marked KILLED" in messages) == (expected == "KILLED")
