"""Epoch metrics to MLflow without ever making training wait for MLflow.

The training loop (rank 0) hands each epoch's figures to a ``MetricStream``; a background thread
logs them to the MLflow run the driver opened (``fit.<name>`` at step = epoch). An MLflow server
that is down or hung (it accepts the connection and never answers: MLflow's client then waits
``MLFLOW_HTTP_REQUEST_TIMEOUT``, 120 s by default, on each of up to 8 attempts, about 20 min per
call) therefore holds up only that thread: the loop trains on at its own pace, the epochs queue,
and they are logged when the server answers again. When training ends the stream waits at most
``drain_s`` for what is still queued, then says how many epochs it could not log and returns.
Whoever closes the run afterwards calls ``log_missing_epochs`` with the run's whole history, so
an epoch the stream could not log (or one trained by an earlier, interrupted invocation) is
logged once, then.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

logger = logging.getLogger(__name__)

DRAIN_S = 15.0  # at the end of training: how long the loop waits for the queued epochs
KEY_METRIC = "fit.train_loss"  # every epoch has it: its steps say which epochs a run holds
BATCH = 900  # MLflow takes at most 1000 metrics per log_batch


def mlflow_client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def epoch_metrics(entry: Mapping[str, Any], stamp_ms: int) -> list[Any]:
    """One history entry as MLflow metrics ``fit.<name>`` at step = its epoch (finite numbers only)."""
    from mlflow.entities import Metric

    step = int(entry.get("epoch", 0))
    return [
        Metric(f"fit.{k}", float(v), stamp_ms, step)
        for k, v in entry.items()
        if k != "epoch" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    ]


def log_metrics(client: Any, run_id: str, metrics: Sequence[Any]) -> None:
    for start in range(0, len(metrics), BATCH):
        client.log_batch(run_id, metrics=list(metrics[start : start + BATCH]))


def log_missing_epochs(client: Any, run_id: str, history: Sequence[Mapping[str, Any]]) -> int:
    """Log the epochs of ``history`` that the run does not hold yet; how many were logged."""
    held = {m.step for m in client.get_metric_history(run_id, KEY_METRIC)}
    missing = [entry for entry in history if int(entry.get("epoch", 0)) not in held]
    stamp = int(time.time() * 1000)
    log_metrics(client, run_id, [m for entry in missing for m in epoch_metrics(entry, stamp)])
    return len(missing)


class MetricStream:
    """Log epoch metrics to ``target`` (``{"tracking_uri", "run_id"}``) from a background thread.
    Without a target (no MLflow run) every call does nothing."""

    def __init__(self, target: Mapping[str, str] | None, *, drain_s: float | None = None) -> None:
        self._target = dict(target) if target and target.get("run_id") else None
        self._drain_s = float(DRAIN_S if drain_s is None else drain_s)
        self._queue: queue.SimpleQueue[tuple[dict[str, Any], int] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._put = self._done = self._failed = 0
        self._given_up = threading.Event()  # close() stopped waiting: log nothing more (the history will)
        self._thread: threading.Thread | None = None
        if self._target is not None:
            self._thread = threading.Thread(target=self._run, name="mlflow-metric-stream", daemon=True)
            self._thread.start()

    def put(self, metrics: Mapping[str, Any], epoch: int) -> None:
        """Queue one epoch's figures; never blocks."""
        if self._thread is None:
            return
        with self._lock:
            self._put += 1
        self._queue.put(({**metrics, "epoch": int(epoch)}, int(time.time() * 1000)))

    def _run(self) -> None:
        client = mlflow_client(self._target["tracking_uri"])
        held: set[int] | None = None  # the epochs the run holds already (a resumed run streamed them)
        while (item := self._queue.get()) is not None and not self._given_up.is_set():
            entry, stamp = item
            try:
                if held is None:
                    held = {m.step for m in client.get_metric_history(self._target["run_id"], KEY_METRIC)}
                if int(entry["epoch"]) in held:  # retrained after a restart: the run keeps one value
                    continue
                log_metrics(client, self._target["run_id"], epoch_metrics(entry, stamp))
            except Exception as exc:  # noqa: BLE001 - tracking must never stop training
                with self._lock:
                    self._failed += 1
                    first = self._failed == 1
                if first:  # once: a server that is down fails every epoch alike
                    logger.warning("could not stream metrics to MLflow (%s): training goes on", type(exc).__name__)
            finally:
                with self._lock:
                    self._done += 1

    def close(self) -> dict[str, int]:
        """Wait up to ``drain_s`` for the queued epochs; what was queued, logged and not logged."""
        if self._thread is None:
            return {"queued": 0, "logged": 0, "not_logged": 0}
        self._queue.put(None)
        self._thread.join(self._drain_s)
        self._given_up.set()
        with self._lock:
            counts = {"queued": self._put, "logged": self._done - self._failed, "not_logged": self._put - self._done + self._failed}
        if counts["not_logged"]:
            logger.warning(
                "MLflow took %d of %d epochs' metrics (waited %.0f s at the end): the rest are logged "
                "when the run is closed, from the history", counts["logged"], counts["queued"], self._drain_s,
            )  # fmt: skip
        return counts
