"""The scenario starts each Ray node until it is ready: ``ray start`` exits when its raylet has not
registered with the GCS within a fixed 30 s, which happened in CI on 2 busy cores. These tests run
real processes through ``scenarios.retrain.start_ready`` (a small Python script stands in for
``ray start``: it fails on its first start(s), then comes up)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from scenarios.retrain import Service, start_ready

NODE = """
import os, sys, time
from pathlib import Path
state = Path(sys.argv[1])
starts = int(state.read_text()) + 1 if state.exists() else 1
state.write_text(str(starts))
if starts <= int(sys.argv[2]):
    print("The current node timed out during startup.", flush=True)
    sys.exit(1)
Path(sys.argv[1] + ".ready").write_text(str(os.getpid()))
time.sleep(600)
"""


def node(tmp_path: Path, failures: int) -> tuple[list[Service], Path, Callable[[], Service]]:
    services: list[Service] = []
    state = tmp_path / "starts"

    def start() -> Service:
        service = Service("node", [sys.executable, "-c", NODE, str(state), str(failures)], tmp_path, os.environ)
        services.append(service)
        return service

    return services, state, start


def test_a_node_that_fails_its_first_start_is_started_again(tmp_path):
    services, state, start = node(tmp_path, failures=1)
    ready = Path(f"{state}.ready")
    service = start_ready(start, ready.exists, "the test node", timeout=30)
    try:
        assert state.read_text() == "2" and len(services) == 2
        assert services[0].proc.poll() == 1 and service.proc.poll() is None
        assert int(ready.read_text()) == service.proc.pid
        assert "timed out during startup" in service.log.read_text()  # the failed start stays in the log
    finally:
        service.stop()
    assert service.proc.poll() is not None


def test_a_node_that_never_comes_up_is_an_error_after_the_stated_attempts(tmp_path):
    services, state, start = node(tmp_path, failures=99)
    with pytest.raises(RuntimeError, match=r"the test node did not start in 3 attempts; see .*node\.log"):
        start_ready(start, lambda: False, "the test node", attempts=3, timeout=30)
    assert state.read_text() == "3" and all(s.proc.poll() == 1 for s in services)


def test_a_node_that_runs_but_is_never_ready_is_stopped_before_the_next_start(tmp_path):
    services, state, start = node(tmp_path, failures=0)
    with pytest.raises(RuntimeError, match="did not start in 2 attempts"):
        start_ready(start, lambda: False, "the test node", attempts=2, timeout=2)
    assert len(services) == 2
    assert all(s.proc.poll() is not None for s in services)  # stopped (SIGTERM), not left running
