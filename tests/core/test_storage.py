"""core.storage against real sockets: every S3 filesystem it makes retries a failed request a
known, bounded number of times with backoff, then raises StorageUnavailableError naming the
endpoint (never the key, the object's path or the credentials); and the temporaries that killed
saves leave are found and removed, nothing else."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

from mvl_pipeline.core import storage
from mvl_pipeline.core.storage import S3_RETRY, StorageUnavailableError
from mvl_pipeline.datasets.drop import DropFolder

KEY, SECRET = "AKIASTORAGETEST00001", "storage-test-secret"
#: botocore's standard mode waits at most 1, 2, 4 ... s between attempts (full jitter)
MAX_BACKOFF_S = sum(2**i for i in range(S3_RETRY["total_max_attempts"] - 1))


def _drop(endpoint: str) -> DropFolder:
    credentials = {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    return DropFolder(filepath="s3://bucket/drop", files=(), storage_options={"credentials": credentials})


@pytest.fixture
def hanging_up_server():
    """A TCP server that reads each request and closes the connection without an answer."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    connections: list[float] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            connections.append(time.monotonic())
            conn.recv(65536)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", connections
    server.close()


def test_s3_filesystems_get_the_explicit_retry_policy_and_fs_args_may_change_it():
    fs, protocol, path = storage.filesystem("s3://bucket/key", {"key": KEY, "secret": SECRET})
    assert (protocol, path) == ("s3", "bucket/key")
    assert fs.config_kwargs["retries"] == {"mode": "standard", "total_max_attempts": 4}
    assert fs.config_kwargs["connect_timeout"] == 10 and fs.retries == storage.S3FS_RETRIES == 1
    custom = {"config_kwargs": {"retries": {"mode": "adaptive", "total_max_attempts": 8}}}
    fs, _, _ = storage.filesystem("s3://bucket/key", {"key": KEY, "secret": SECRET}, custom)
    assert fs.config_kwargs["retries"] == {"mode": "adaptive", "total_max_attempts": 8}
    local, _, _ = storage.filesystem("relative/path")
    assert not hasattr(local, "config_kwargs")


def test_a_store_that_hangs_up_is_retried_a_bounded_number_of_times_then_named(hanging_up_server, caplog):
    endpoint, connections = hanging_up_server
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG, logger="botocore.retries.standard"), pytest.raises(StorageUnavailableError) as failed:
        _drop(endpoint).read_bytes("DOE^JANE/series/1.dcm")
    elapsed = time.monotonic() - started
    retries = [r for r in caplog.records if r.getMessage().startswith("Retry needed, retrying request after delay")]
    attempts = S3_RETRY["total_max_attempts"]
    assert len(retries) == attempts - 1  # botocore's own record of each retry
    # the server saw them (aiohttp itself reconnects once when a fresh connection is reset)
    assert attempts <= len(connections) <= 2 * attempts
    assert elapsed < MAX_BACKOFF_S + 10, f"{elapsed:.1f} s: the backoff is not bounded"
    message = str(failed.value)
    assert message.startswith(f"s3 storage at {endpoint} is unreachable (ConnectionClosedError) after {attempts} attempts")
    for secret in (KEY, SECRET, "DOE^JANE", "1.dcm", "bucket/drop"):
        assert secret not in message
    assert failed.value.__cause__ is None and failed.value.__suppress_context__  # botocore's text quotes the key


def test_a_store_that_is_down_fails_the_listing_naming_the_endpoint_in_bounded_time():
    from mvl_pipeline.datasets.drop import list_drop_files

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    fs, protocol, root = storage.filesystem("s3://bucket/drop", {"key": KEY, "secret": SECRET,
                                                                 "client_kwargs": {"endpoint_url": endpoint}})  # fmt: skip
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError, match=rf"s3 storage at {endpoint} is unreachable \(EndpointConnectionError\)"):
        list_drop_files(fs, protocol, root)  # not "drop folder not found": an outage is no verdict
    assert time.monotonic() - started < 2 * (MAX_BACKOFF_S + 10)  # isdir may cost two requests


def test_remove_temporaries_removes_what_killed_saves_leave_and_nothing_else(tmp_path):
    hexid = "0123456789abcdef0123456789abcdef"
    keep = [tmp_path / "cases/case-1/_COMPLETE", tmp_path / "manifest.json", tmp_path / ".run.lock",
            tmp_path / "cases/.hidden", tmp_path / "cases/.case-2.tmp-notahexid"]  # fmt: skip
    gone = [tmp_path / f"cases/.case-2.tmp-{hexid}/image.nii.gz", tmp_path / f"cases/.case-3.old-{hexid}/case.json",
            tmp_path / f".manifest.json.tmp-{hexid}"]  # fmt: skip
    for path in keep + gone:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert storage.remove_temporaries(str(tmp_path)) == 3
    assert all(p.exists() for p in keep)
    assert not (tmp_path / f"cases/.case-2.tmp-{hexid}").exists() and not (tmp_path / f".manifest.json.tmp-{hexid}").exists()
    assert not (tmp_path / f"cases/.case-3.old-{hexid}").exists()


# -- Ray Train's checkpoint storage -----------------------------------------------------------
def test_checkpoints_on_s3_get_a_bounded_pyarrow_filesystem_at_the_configured_endpoint(monkeypatch):
    from pyarrow import fs as arrow_fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    path, fs = storage.train_storage("s3://bucket/ray-results")
    assert path == "bucket/ray-results" and isinstance(fs, arrow_fs.S3FileSystem)
    started = time.monotonic()
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):  # nothing listens on port 9: refused, 4 attempts
        fs.get_file_info("bucket/ray-results/x")
    assert time.monotonic() - started < 30
    assert storage.train_storage("/data/06_models/ray_results") == ("/data/06_models/ray_results", None)


def test_a_checkpoint_store_that_hangs_fails_each_request_after_fit_storage_timeouts(monkeypatch):
    """A server that accepts connections and never answers (the kernel's backlog of a socket no
    one reads): each of the 4 attempts waits ``read_timeout`` (from ``fit.storage_timeouts``),
    then the request fails with the error ``train_storage_outage`` names as an outage."""
    from mvl_pipeline.training.config import FitConfig

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        timeouts = FitConfig.from_params({"storage_timeouts": {"connect_timeout": 1, "read_timeout": 1}}).storage_timeouts
        _, fs = storage.train_storage("s3://bucket/ray-results", timeouts.to_dict())
        started = time.monotonic()
        with pytest.raises(OSError, match="curlCode: 28, Timeout was reached") as failure:
            fs.get_file_info("bucket/ray-results/x")
        waited = time.monotonic() - started
        assert 4 * 1.0 <= waited < 4 * 1.0 + 7 + 10  # 4 attempts of 1 s, backoff at most 1 + 2 + 4 s
        named = storage.train_storage_outage("s3://bucket/ray-results", RuntimeError(str(failure.value)))
        assert named is not None and "is unreachable (Timeout: no answer within fit.storage_timeouts)" in str(named)
    finally:
        server.close()
    defaults = FitConfig.from_params({}).storage_timeouts.to_dict()
    assert defaults == {"connect_timeout": 10.0, "read_timeout": 60.0}  # the same as every other S3 client
    with pytest.raises(ValueError, match="fit.storage_timeouts must be > 0 s"):
        FitConfig.from_params({"storage_timeouts": {"read_timeout": 0}})


def test_a_checkpoint_store_that_is_down_is_named_and_any_other_training_failure_passes(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://user:pw@10.1.2.3:9000/")
    key = "ray-results/mvl-abc/checkpoint_2026-11-30"
    ray_text = RuntimeError(
        f"Training failed due to worker errors:\nOSError: When getting information for key '{key}' in bucket 'b': "
        "AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Could not connect to server"
    )  # fmt: skip
    error = storage.train_storage_outage("s3://b/ray-results", ray_text)
    assert isinstance(error, StorageUnavailableError)
    message = str(error)
    assert message.startswith("s3 storage at http://10.1.2.3:9000 is unreachable (NETWORK_CONNECTION) while checkpointing")
    assert f"after {S3_RETRY['total_max_attempts']} attempts" in message
    assert key not in message and "pw" not in message
    try:  # found in the chain too
        raise ValueError("worker group failed") from ray_text
    except ValueError as wrapped:
        found = storage.train_storage_outage("s3://b/ray-results", wrapped)
        assert isinstance(found, StorageUnavailableError) and str(found) == message
    assert storage.train_storage_outage("s3://b/ray-results", RuntimeError("CUDA out of memory")) is None
    assert storage.train_storage_outage("/local/ray_results", ray_text) is None
