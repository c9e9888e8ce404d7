"""Fixtures shared by the whole suite: a real S3 endpoint (moto_server on 127.0.0.1), paths."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Local-only defaults for every test process (and the Ray workers it starts).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# `make test` runs two test processes on the machine's cores (pytest-xdist). Each would otherwise
# give torch every core, in itself and in the runs it starts, and two processes of 2 threads each
# on 2 cores ran a model's training steps 5x slower than two of 1 thread (OpenMP's threads spin
# while they wait for each other). So each test process, and everything it starts (kedro runs,
# Ray workers: Ray keeps an OMP_NUM_THREADS set before it), gets its share of the cores, unless
# OMP_NUM_THREADS was set already. Set here, before torch is imported in this process.
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if XDIST_WORKERS > 1:
    # "0": the share below is ours (tests/test_test_harness.py checks it); "1": the caller's
    os.environ.setdefault("MVL_TESTS_OMP_GIVEN", "1" if "OMP_NUM_THREADS" in os.environ else "0")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // XDIST_WORKERS)))

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def project_root() -> Path:
    return PROJECT_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (read-only). Missing means a broken checkout: fail, never skip."""
    if not (SHARED_DATA / "pyradiomics").is_dir():
        pytest.fail(f"real test data not found at {SHARED_DATA}: tests need ../shared/data")
    return SHARED_DATA


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (real HTTP; ``mock_aws`` does not work with s3fs)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ["AWS_ACCESS_KEY_ID"] = "testing"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> dict:
    """A fresh bucket on the moto server: ``{"bucket", "endpoint_url", "credentials"}``.

    ``credentials`` is what a catalog entry would get from conf/local/credentials.yml.
    """
    import boto3

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=bucket)
    credentials = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"},
    }
    return {"bucket": bucket, "endpoint_url": s3_endpoint, "credentials": credentials}


@pytest.fixture(scope="session")
def llm_cache_dir(tmp_path_factory) -> str:
    """One cache of converted LLM layers for the whole session (the GGUF conversion takes ~15 s)."""
    return str(tmp_path_factory.mktemp("llm-cache"))


@pytest.fixture(scope="session")
def project_copy(tmp_path_factory, llm_cache_dir):
    """Factory: ``make(name) -> root`` of a fresh copy of the project's source tree.

    The copy holds the files git tracks or would track (``git ls-files --cached --others
    --exclude-standard``: no data, no conf/local, no MLflow store), sits beside a link named
    ``shared`` to ``../shared`` (so ``<copy>/../shared/data`` resolves as in the checkout), and has
    a new pseudonymisation key in its conf/local/credentials.yml. For tests that run Kedro, DVC
    or kedro-viz on a whole project without touching the checkout.

    ``make(name, share_llm_cache=True)``: the copy's data/06_models/llm_cache (the default cache of
    converted LLM layers of `kedro run` and of the predict command) is a link to the session's
    ``llm_cache_dir``, so the packaged layer is converted once per session instead of once per
    copy (~15 s on 2 cores each). The conversion itself is tested in
    tests/model/test_model_llm_layer.py.
    """
    import shutil
    import subprocess
    import sys

    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT_ROOT, capture_output=True, check=True,
    ).stdout.decode()  # fmt: skip
    files = [name for name in listing.split("\0") if name and (PROJECT_ROOT / name).is_file()]

    def make(name: str, *, share_llm_cache: bool = False) -> Path:
        base = tmp_path_factory.mktemp(name)
        root = base / "project"
        for relpath in files:
            target = root / relpath
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / relpath, target)
        if share_llm_cache:
            (root / "data" / "06_models" / "llm_cache").symlink_to(llm_cache_dir, target_is_directory=True)
        if SHARED_DATA.parent.is_dir():
            (base / "shared").symlink_to(SHARED_DATA.parent, target_is_directory=True)
        subprocess.run(
            [sys.executable, "-m", "mvl_pipeline.commands.secrets", "ensure-key", "conf/local/credentials.yml"],
            cwd=root, check=True, capture_output=True,
        )  # fmt: skip
        return root

    return make
