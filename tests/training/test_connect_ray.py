"""connect_ray starts a local Ray again when Ray's fixed 30 s raylet registration runs out (seen
once in CI on a loaded machine, right after another run's Ray was SIGKILLed), and raises anything
else at once. The timeout itself cannot be produced on demand, so ray.init is replaced here by a
stand-in that raises Ray's own message; the start of a real local Ray is exercised by every fit
test, and its dashboard (on unless ``fit.ray_dashboard`` is false: it serves the state API Ray
Train's placement-group cleaner polls) by the last test here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray

from mvl_pipeline.training import ray_driver
from mvl_pipeline.training.config import FitConfig

TIMEOUT = ("The current node timed out during startup. This could happen because some of the raylet failed "
           "to startup or the GCS has become overloaded.")  # fmt: skip


@pytest.fixture
def fake_ray(monkeypatch):
    calls = {"init": 0, "shutdown": 0}
    outcomes: list[Exception | None] = []

    def init(**kwargs):
        calls["init"] += 1
        assert kwargs["address"] == "local"
        error = outcomes.pop(0)
        if error is not None:
            raise error

    def shutdown():
        calls["shutdown"] += 1

    monkeypatch.setattr(os, "environ", dict(os.environ))  # connect_ray's setdefaults stay in this test
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", shutdown)
    return calls, outcomes


def test_a_local_ray_that_timed_out_at_start_is_started_again(fake_ray, caplog):
    calls, outcomes = fake_ray
    outcomes += [Exception(TIMEOUT), None]
    assert ray_driver.connect_ray(FitConfig()) is True
    assert calls == {"init": 2, "shutdown": 1}
    assert "starting it again, attempt 2 of 3" in caplog.text


def test_the_start_up_timeout_is_raised_after_the_last_attempt(fake_ray):
    calls, outcomes = fake_ray
    outcomes += [Exception(TIMEOUT)] * ray_driver.LOCAL_RAY_ATTEMPTS
    with pytest.raises(Exception, match="timed out during startup"):
        ray_driver.connect_ray(FitConfig())
    assert calls["init"] == ray_driver.LOCAL_RAY_ATTEMPTS


def test_any_other_error_of_ray_init_is_raised_at_once(fake_ray):
    calls, outcomes = fake_ray
    outcomes += [ValueError("num_cpus must be positive")]
    with pytest.raises(ValueError, match="num_cpus"):
        ray_driver.connect_ray(FitConfig())
    assert calls == {"init": 1, "shutdown": 0}


# The dashboard of a real local Ray, started by connect_ray in a process of its own (this test
# process may hold the session's Ray already): which of Ray's processes run below that driver,
# the dashboard URL Ray reports, and whether Ray's state API answers, asked as Ray Train's
# placement-group cleaner asks it (ray.util.state.get_actor; here for an actor of this Ray, by its
# GCS address: other Rays may run on the machine).
PROBE = r"""
import json, os, sys
import ray
from ray.util.state import get_actor
from mvl_pipeline.training.config import FitConfig
from mvl_pipeline.training.ray_driver import connect_ray
from tests.support.procs import cmdline, descendants

assert connect_ray(FitConfig.from_params(json.loads(sys.argv[1])))
names = [cmdline(pid).split(" ", 1)[0] for pid in descendants(os.getpid())]
actor = ray.remote(num_cpus=0)(type("Probe", (), {"ping": lambda self: 1})).remote()
assert ray.get(actor.ping.remote()) == 1
try:
    state = get_actor(actor._actor_id.hex(), address=ray.get_runtime_context().gcs_address, timeout=20)
    answer = state.state if state else "no such actor"
except Exception as error:
    answer = f"{type(error).__name__}: {error}"[:300]
print(json.dumps({"url": ray._private.worker.global_worker.node.address_info.get("webui_url"), "processes": names,
                  "state_api": answer}))
ray.shutdown()
"""
ROOT = Path(__file__).resolve().parents[2]


def _local_ray(fit: dict) -> dict:
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(fit)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=env, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_local_ray_starts_the_state_api_ray_train_polls_unless_its_dashboard_is_turned_off():
    heads = lambda ray_: [p for p in ray_["processes"] if p.startswith("ray-dashboard-")]  # noqa: E731
    default = _local_ray({})
    assert any("raylet" in p for p in default["processes"]), default  # the probe sees the Ray it started
    assert len(heads(default)) >= 5 and default["url"], default  # the dashboard's head modules, its URL
    assert default["state_api"] == "ALIVE", default  # Ray Train's placement-group cleaner sees its controller
    off = _local_ray({"ray_dashboard": False})
    assert heads(off) == [] and not off["url"], off
    # what that cleaner gets every second of a run: no answer (ServerUnavailable), or, with another
    # Ray's dashboard on the default port, an answer from that Ray, which knows no such actor
    assert off["state_api"] != "ALIVE", off
