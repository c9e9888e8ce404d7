"""connect_ray starts a local Ray again when Ray's fixed 30 s raylet registration runs out (seen
once in CI on a loaded machine, right after another run's Ray was SIGKILLed), and raises anything
else at once. The timeout itself cannot be produced on demand, so ray.init is replaced here by a
stand-in that raises Ray's own message; the start of a real local Ray is exercised by every fit
test, and its dashboard (on unless ``fit.ray_dashboard`` is false: it serves the state API Ray
Train's placement-group cleaner polls) by the last test here."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
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
    outcomes: list = []  # per ray.init: None (it starts), an exception it raises, or a stand-in for it

    def init(**kwargs):
        calls["init"] += 1
        assert kwargs["address"] == "local"
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        if outcome is not None:  # a stand-in for what Ray does at that start
            outcome(kwargs)

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


def test_the_state_api_address_is_the_dashboard_port_given_to_ray_and_set_only_while_ray_starts(fake_ray, caplog):
    calls, outcomes = fake_ray
    seen = []
    outcomes += [lambda kwargs: seen.append((kwargs["dashboard_port"], os.environ.get("RAY_API_SERVER_ADDRESS")))]
    with caplog.at_level("INFO", logger=ray_driver.__name__):
        assert ray_driver.connect_ray(FitConfig()) is True
    ((port, address),) = seen
    assert port in ray_driver.DASHBOARD_PORTS and address == f"http://127.0.0.1:{port}"
    assert f"its dashboard at {address} " in caplog.text  # where a user finds it (8265 may be taken)
    assert "RAY_API_SERVER_ADDRESS" not in os.environ  # the driver's own state API calls are its own
    outcomes += [lambda kwargs: seen.append((kwargs["dashboard_port"], os.environ.get("RAY_API_SERVER_ADDRESS")))]
    ray_driver.connect_ray(FitConfig(ray_dashboard=False))
    assert seen[1] == (None, None)  # no dashboard, no state API to point at


def test_a_dashboard_port_taken_by_another_process_while_ray_starts_is_searched_again(fake_ray):
    calls, outcomes = fake_ray
    ports = []
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:

        def taken_meanwhile(kwargs):  # another run's dashboard binds the port first: ours fails to start
            ports.append(kwargs["dashboard_port"])
            other.bind(("127.0.0.1", kwargs["dashboard_port"]))
            other.listen()
            raise Exception("Failed to start a dashboard.")

        outcomes += [taken_meanwhile, lambda kwargs: ports.append(kwargs["dashboard_port"])]
        assert ray_driver.connect_ray(FitConfig()) is True
    assert calls == {"init": 2, "shutdown": 1}
    assert ports[0] != ports[1] and all(p in ray_driver.DASHBOARD_PORTS for p in ports)


def test_a_dashboard_port_taken_and_let_go_again_before_ray_gave_up_is_searched_again(fake_ray):
    calls, outcomes = fake_ray
    ports = []

    def lost_the_race(kwargs):  # as seen with two runs starting at once: the other run had ended since
        ports.append(kwargs["dashboard_port"])
        raise RuntimeError(
            "\n\nThe last 20 lines of /tmp/ray/session_x/logs/dashboard.log (it contains the error message from the "
            "dashboard): \nWARNING http_server_head.py:480 -- Try to use port 8266: [Errno 98] error while attempting "
            f"to bind on address ('127.0.0.1', {kwargs['dashboard_port']}): address already in use\n"
        )

    outcomes += [lost_the_race, lambda kwargs: ports.append(kwargs["dashboard_port"])]
    assert ray_driver.connect_ray(FitConfig()) is True
    assert calls == {"init": 2, "shutdown": 1} and len(ports) == 2


def test_any_other_error_of_ray_init_is_raised_at_once(fake_ray):
    calls, outcomes = fake_ray
    outcomes += [ValueError("num_cpus must be positive")]
    with pytest.raises(ValueError, match="num_cpus"):
        ray_driver.connect_ray(FitConfig())
    assert calls == {"init": 1, "shutdown": 0}


# The dashboard of a real local Ray, started by connect_ray in a process of its own (this test
# process may hold the session's Ray already): which of Ray's processes run below that driver,
# the dashboard URL Ray reports, and whether Ray's state API answers when a process of that Ray
# asks it as Ray Train's placement-group cleaner does (ray.util.state.get_actor, no address given)
# whether an actor of that Ray lives.
PROBE = r"""
import json, os, sys
import ray
from mvl_pipeline.training.config import FitConfig
from mvl_pipeline.training.ray_driver import connect_ray
from tests.support.procs import cmdline, descendants

assert connect_ray(FitConfig.from_params(json.loads(sys.argv[1])))
names = [cmdline(pid).split(" ", 1)[0] for pid in descendants(os.getpid())]


@ray.remote(num_cpus=0)
def ask(actor_id):
    from ray.util.state import get_actor

    try:
        state = get_actor(actor_id, timeout=20)
        return state.state if state else "no such actor"
    except Exception as error:
        return f"{type(error).__name__}: {error}"[:300]


watcher = ray.get(ray.remote(num_cpus=0)(lambda: os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")).remote())
actor = ray.remote(num_cpus=0)(type("Probe", (), {"ping": lambda self: 1})).remote()
assert ray.get(actor.ping.remote()) == 1
answer = ray.get(ask.remote(actor._actor_id.hex()))
print(json.dumps({"url": ray._private.worker.global_worker.node.address_info.get("webui_url"), "processes": names,
                  "state_api": answer, "api_server_env": os.environ.get("RAY_API_SERVER_ADDRESS"),
                  "preemption_watcher": watcher}))
ray.shutdown()
"""
ROOT = Path(__file__).resolve().parents[2]


def _local_ray(fit: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(fit)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=env, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def another_ray():
    """Another Ray on this machine, with its dashboard on Ray's default port if that is free (as a
    `ray start` or another run would leave it)."""
    script = "import ray, signal; ray.init(address='local', num_cpus=1); print('up', flush=True); signal.pause()"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    other = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)  # fmt: skip
    try:
        assert other.stdout.readline().strip() == "up", "the other Ray did not start"
        yield other
    finally:
        os.killpg(other.pid, signal.SIGKILL)
        other.wait(timeout=30)


def test_a_local_ray_serves_its_processes_its_own_state_api_unless_its_dashboard_is_turned_off(another_ray):
    heads = lambda ray_: [p for p in ray_["processes"] if p.startswith("ray-dashboard-")]  # noqa: E731
    default = _local_ray({})
    assert any("raylet" in p for p in default["processes"]), default  # the probe sees the Ray it started
    assert len(heads(default)) >= 5 and default["url"], default  # the dashboard's head modules, its URL
    # Ray Train's placement-group cleaner sees its controller, with another Ray on the machine
    assert default["state_api"] == "ALIVE", default
    assert default["api_server_env"] is None, default  # the driver's own environment is left as it was
    # Ray Train's controller, a process of this Ray, starts no preemption watcher on one machine
    assert default["preemption_watcher"] == "0", default
    off = _local_ray({"ray_dashboard": False})
    assert heads(off) == [] and not off["url"], off
    # what that cleaner gets every second of a run: no answer, or an answer from the other Ray
    assert off["state_api"] != "ALIVE", off
