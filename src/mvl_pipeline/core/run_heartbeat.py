"""MLflow runs that died without ending: a heartbeat on every run, and the next run closes the silent ones.

A ``kedro run`` killed by SIGKILL, the OOM killer or a deleted pod ends no MLflow run, so its run
would stay RUNNING for ever. On a local data root the run lock proves the death at once
(``core.run_lock``, ``hooks.KilledRunHook``). Where no lock can (a remote ``s3://`` data root, a
RayJob on a fresh pod every time) the proof is silence:

- every run with an MLflow run sets the tag ``mvl.heartbeat_unix`` (Unix seconds) on it when it
  starts and every ``run.heartbeat_s`` after, from a daemon thread (``Heartbeat``);
- the next run of the experiment marks KILLED each RUNNING run whose last heartbeat is older than
  ``run.stale_after_s`` (``close_silent_runs``). Runs without the tag (older runs, other tools,
  the trials' child runs, which their own resume closes) are left alone.

A run that looks silent by this machine's clock is marked KILLED only if its tag has not
changed after ``confirm_after_s`` more (the hook waits two heartbeats, in the background): clocks of
different machines differ, and a pod whose clock runs 20 min ahead took every live run for dead
(an audit, 2026-12-04). A live run whose heartbeats could not reach the tracking server for that
long (a server down that long) may still be marked KILLED; when it ends, kedro-mlflow sets its
final status as usual. Tag values are times: no PHI. Both take an ``MlflowClient`` (``mlflow`` is
not imported here), and neither ever stops a run: errors become one warning.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)

HEARTBEAT_TAG = "mvl.heartbeat_unix"


class Heartbeat:
    """Set ``HEARTBEAT_TAG`` on ``run_id`` now and every ``interval_s`` until ``stop()``."""

    def __init__(self, client: Any, run_id: str, interval_s: float) -> None:
        self._client, self._run_id, self._interval = client, run_id, float(interval_s)
        self._stop = threading.Event()
        self._warned = False
        self._thread = threading.Thread(target=self._loop, name="mlflow-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        """Beat at once and then every ``interval_s``, all from the thread: a tracking server that
        hangs holds up the heartbeat, never the run."""
        self._thread.start()
        return self

    def beat(self) -> None:
        try:
            self._client.set_tag(self._run_id, HEARTBEAT_TAG, str(int(time.time())))
        except Exception as error:  # noqa: BLE001 - a heartbeat must never stop a run
            if not self._warned:
                logger.warning("the heartbeat of MLflow run %s was not recorded (%s); retrying every %.0f s",
                               self._run_id, type(error).__name__, self._interval)  # fmt: skip
                self._warned = True

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.beat()
            self._stop.wait(self._interval)

    def stop(self, timeout_s: float = 1.0) -> None:
        """No beat after this returns, unless one is blocked on the server (then it ends by itself)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)


def close_silent_runs(
    client: Any,
    experiment_id: str,
    *,
    stale_after_s: float,
    exclude: str = "",
    confirm_after_s: float = 0.0,
) -> list[str]:
    """Mark KILLED every RUNNING run of the experiment whose heartbeat is older than
    ``stale_after_s`` by this machine's clock and, with ``confirm_after_s``, still the same that
    long after (a run whose tag moved is alive: another clock); the ids so marked (never
    ``exclude``, this run's own)."""
    now = time.time()
    closed: list[str] = []
    try:
        running = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
        silent: dict[str, str] = {}
        for run in running:
            last = run.data.tags.get(HEARTBEAT_TAG)
            if run.info.run_id == exclude or last is None or not last.isdigit():
                continue
            if now - int(last) > stale_after_s:
                silent[run.info.run_id] = last
        if silent and confirm_after_s > 0:
            time.sleep(confirm_after_s)
        for run_id, last in silent.items():
            if confirm_after_s > 0:
                current = client.get_run(run_id)
                if current.info.status != "RUNNING":
                    continue
                moved = current.data.tags.get(HEARTBEAT_TAG)
                if moved != last:
                    logger.warning("MLflow run %s looked silent for %s by this machine's clock, but its heartbeat "
                                   "moved: it is alive, and the two machines' clocks differ by about that much",
                                   run_id, _duration(now - int(last)))  # fmt: skip
                    continue
            client.set_terminated(run_id, status="KILLED")
            closed.append(run_id)
            logger.info("MLflow run %s: no heartbeat for %s (run.stale_after_s %.0f s), marked KILLED",
                        run_id, _duration(now - int(last)), stale_after_s)  # fmt: skip
    except Exception as error:  # noqa: BLE001 - bookkeeping must never stop a run
        logger.warning("the silent runs of MLflow experiment %s were not checked (%s)", experiment_id, type(error).__name__)
    return closed


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
