"""The run lock of an s3:// data root (core.s3_lock) against other real processes on a real S3
endpoint (moto_server over HTTP): a second run refuses or waits, naming the holder by PID, host,
pipeline and start time, never a bucket or a path; a holder killed with SIGKILL stops renewing its
lease and the next run takes it over once it lapses (on the store's clock), learning its MLflow run
id; a holder frozen with SIGSTOP past the lease finds it taken over when it wakes, and stops before
its next node; an unreachable store stops the run naming the endpoint only."""

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

import boto3
import pytest

from mvl_pipeline.core.run_lock import RunConfig, RunLock, RunLockedError
from mvl_pipeline.core.s3_lock import RunLockLostError, S3RunLock
from mvl_pipeline.core.storage import StorageUnavailableError
from mvl_pipeline.hooks import run_lock

HOLDER = """
import json, sys, time
from mvl_pipeline.core.run_lock import RunConfig
from mvl_pipeline.core.s3_lock import S3RunLock
config = RunConfig.from_params(json.loads(sys.argv[2]))
lock = S3RunLock(sys.argv[1], config, pipeline="train", fallback="/nonexistent/.run.lock")
lock.acquire()
for note in sys.argv[4:]:
    lock.note(mlflow_run_id=note)
print("held", flush=True)
deadline = time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    time.sleep(0.1)
    try:
        lock.check()
    except Exception as error:
        print("lost:", error, flush=True)
        sys.exit(3)
lock.release()
print("released", flush=True)
"""

FAST = {"heartbeat_s": 0.5, "stale_after_s": 3.0}


@pytest.fixture
def root(s3_bucket, monkeypatch) -> str:
    """An s3:// data root on the moto server, reachable by this process and its children."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket["endpoint_url"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return f"s3://{s3_bucket['bucket']}/hospital-a/mvl"


@pytest.fixture
def holder(root):
    """``holder(seconds, config, *notes)``: another process holding the lease of ``root``."""
    started = []

    def start(seconds: float, config: dict, *notes: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, root, json.dumps(config), str(seconds), *notes],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
        started.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait()


def lease(root: str, **config) -> S3RunLock:
    return S3RunLock(root, RunConfig.from_params({**FAST, **config}), pipeline="ingest", fallback="/nonexistent/.l")


def stored(s3_bucket) -> dict | None:
    client = boto3.client("s3", endpoint_url=s3_bucket["endpoint_url"], region_name="us-east-1")
    try:
        body = client.get_object(Bucket=s3_bucket["bucket"], Key="hospital-a/mvl/.run.lock")["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
    return json.loads(body)


def test_an_s3_data_root_gets_a_lease_on_the_store_and_a_local_one_a_file(root, tmp_path):
    assert isinstance(run_lock(root + "/", tmp_path, RunConfig(), pipeline="fit"), S3RunLock)
    assert isinstance(run_lock("data", tmp_path, RunConfig(), pipeline="fit"), RunLock)
    lock = run_lock(root + "/", tmp_path, RunConfig(), pipeline="fit")
    assert (lock.bucket, lock.key) == (root.split("/")[2], "hospital-a/mvl/.run.lock")


def test_a_second_run_on_another_machine_refuses_naming_the_holder_without_a_bucket_or_path(root, holder, s3_bucket):
    other = holder(30, FAST)
    record = stored(s3_bucket)
    assert record["pid"] == other.pid and record["pipeline"] == "train"
    with pytest.raises(RunLockedError) as refused:
        lease(root, lock="refuse").acquire()
    message = str(refused.value)
    assert f"PID {other.pid} on host {socket.gethostname()}" in message and "'train'" in message
    assert s3_bucket["bucket"] not in message and "hospital-a" not in message
    assert other.poll() is None  # the holder still holds it: refusing took nothing


def test_a_live_holder_keeps_its_lease_past_stale_after_s_and_a_waiting_run_goes_on_when_it_releases(
    root, holder, s3_bucket, caplog
):
    other = holder(6, FAST)  # twice the lease: it lives only because it renews
    waiting = lease(root, lock="wait", lock_timeout_s=60)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="mvl_pipeline.core.s3_lock"):
        waiting.acquire()
    assert other.wait(timeout=30) == 0 and other.stdout.read().strip() == "released"  # never lost its lease
    assert time.monotonic() - started > 4.5  # it waited for the release, not for a lapse
    assert waiting.left_behind is None and "recovered" not in caplog.text
    assert stored(s3_bucket)["pid"] == os.getpid()
    waiting.release()
    assert stored(s3_bucket) is None  # a cleanly ended run leaves no lease


def test_a_waiting_run_gives_up_after_its_timeout(root, holder):
    holder(30, FAST)
    started = time.monotonic()
    with pytest.raises(RunLockedError, match=r"gave up after waiting 2 s \(run.lock_timeout_s\) for the run lock held by PID"):
        lease(root, lock="wait", lock_timeout_s=2).acquire()
    assert time.monotonic() - started < 10


def test_a_holder_killed_with_sigkill_leaves_a_lease_that_the_next_run_takes_over_once_it_lapses(
    root, holder, s3_bucket, caplog
):
    other = holder(60, FAST, "0" * 32)  # it noted its MLflow run, as KilledRunHook does
    other.kill()
    other.wait()
    killed = time.monotonic()
    nxt = lease(root, lock="wait", lock_timeout_s=60)
    with caplog.at_level(logging.WARNING, logger="mvl_pipeline.core.s3_lock"):
        nxt.acquire()
    waited = time.monotonic() - killed
    assert 2.0 <= waited < 15, waited  # the lease (3 s, on the store's 1-s clock) lapsed first
    assert nxt.left_behind["pid"] == other.pid and nxt.left_behind["mlflow_run_id"] == "0" * 32
    assert f"recovered the run lock left by PID {other.pid}" in caplog.text
    assert stored(s3_bucket)["pid"] == os.getpid()
    nxt.release()


def test_a_holder_frozen_past_its_lease_finds_it_taken_over_when_it_wakes_and_stops(root, holder, s3_bucket):
    other = holder(60, FAST)
    os.killpg(other.pid, signal.SIGSTOP)  # a frozen VM, a long GC pause: no renewal
    try:
        nxt = lease(root, lock="wait", lock_timeout_s=60)
        nxt.acquire()
        assert nxt.left_behind["pid"] == other.pid
    finally:
        os.killpg(other.pid, signal.SIGCONT)
    assert other.wait(timeout=30) == 3
    assert "lost: this run lost the run lock of its data root: another run took its lease over" in other.stdout.read()
    time.sleep(1.5)  # the woken holder wrote nothing over the new lease
    assert stored(s3_bucket)["pid"] == os.getpid()
    nxt.check()
    nxt.release()
    assert stored(s3_bucket) is None


def test_the_lease_survives_the_holders_own_renewals_and_notes(root, s3_bucket):
    lock = lease(root)
    lock.acquire()
    lock.note(mlflow_run_id="a" * 32)
    time.sleep(4)  # more than stale_after_s: renewed eight times
    lock.check()
    assert stored(s3_bucket)["mlflow_run_id"] == "a" * 32
    with pytest.raises(RunLockedError):
        lease(root, lock="refuse").acquire()
    lock.release()


def test_an_unreachable_store_stops_the_run_naming_the_endpoint_only(monkeypatch):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(StorageUnavailableError) as stopped:
        lease("s3://hospital-bucket/patient-folder/mvl").acquire()
    message = str(stopped.value)
    assert f"s3 storage at http://127.0.0.1:{port} is unreachable" in message
    assert "hospital-bucket" not in message and "patient-folder" not in message


class NoConditionalWrites:
    """A store that answers NotImplemented to a conditional write (some S3-compatible stores)."""

    class meta:  # noqa: N801 - boto3's attribute name
        endpoint_url = "http://store.invalid"

    def put_object(self, **kwargs):
        from botocore.exceptions import ClientError

        raise ClientError({"Error": {"Code": "NotImplemented", "Message": "If-None-Match"}}, "PutObject")


class IgnoresConditions(NoConditionalWrites):
    """A store that accepts the headers and ignores them: every create succeeds."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put_object(self, *, Bucket, Key, Body, **condition):  # noqa: N803 - boto3's names
        self.objects[Key] = Body
        return {"ETag": f'"{len(self.objects)}"'}

    def delete_object(self, *, Bucket, Key, **condition):  # noqa: N803
        self.objects.pop(Key, None)


@pytest.mark.parametrize("store", [NoConditionalWrites, IgnoresConditions])
def test_a_store_without_conditional_writes_gets_the_per_machine_file_lock_with_a_warning(tmp_path, caplog, store):
    path = tmp_path / ".run.lock"
    client = store()
    lock = S3RunLock("s3://b/mvl", RunConfig(), pipeline="fit", fallback=str(path), client=client)
    with caplog.at_level(logging.WARNING, logger="mvl_pipeline.core.s3_lock"):
        lock.acquire()
    assert "no conditional writes" in caplog.text and "this machine's runs only" in caplog.text
    with pytest.raises(RunLockedError):
        RunLock(Path(path), RunConfig(lock="refuse"), pipeline="other").acquire()
    assert not getattr(client, "objects", {})  # no lease object left that would fool the next run
    lock.release()
    RunLock(Path(path), RunConfig(lock="refuse"), pipeline="other").acquire()


def test_a_holder_whose_lease_was_taken_over_stops_and_never_deletes_the_new_holders_lease(root, s3_bucket):
    lock = lease(root)
    lock.acquire()
    client = boto3.client("s3", endpoint_url=s3_bucket["endpoint_url"], region_name="us-east-1")
    other = {"pid": 1, "host": "pod-b", "pipeline": "fit", "started": "2026-12-05T00:00:00+00:00"}
    client.put_object(Bucket=s3_bucket["bucket"], Key="hospital-a/mvl/.run.lock", Body=json.dumps(other).encode())
    time.sleep(1.5)  # its next renewal finds another ETag
    with pytest.raises(RunLockLostError, match="another run took its lease over; run it again"):
        lock.check()
    lock.release()
    assert stored(s3_bucket) == other
