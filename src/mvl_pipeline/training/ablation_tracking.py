"""MLflow for the ablation: the pipeline's kedro-mlflow run is the parent, each trial a child run.

A trial opens its child (``mlflow.parentRunId`` = the parent) when it starts training, tagged
with the arm, the seed, the data version, the plan id and the git commit; the training loop
streams its epoch metrics (``fit.*``) into it and the trial logs its test metrics at the end. A
trial that finished in an earlier, interrupted invocation of the ablation is not trained again:
the new parent gets a child carrying that trial's stored metrics, tagged ``resumed_from_run``
with the run that did the work, so every parent run holds the whole grid. A child left RUNNING
by a killed trial is marked KILLED when its trial starts again; the child of a trial killed after
it stored its result but before its run was closed is completed (metrics, curve, FINISHED) when a
later invocation adopts that result. Tags and metrics hold arm names, seeds, hashes and figures
only: no case or patient identifier (no PHI) reaches MLflow.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mvl_pipeline.core import storage
from mvl_pipeline.evaluation.gate import per_case
from mvl_pipeline.training.metric_stream import (
    epoch_metrics,
    log_metrics,
    log_missing_epochs,
    mlflow_client,
)

logger = logging.getLogger(__name__)

CHILD_MARKER = "mlflow_child.json"
RESUMED_TAG = "resumed_from_run"


def trial_metrics(rows: Sequence[Mapping[str, Any]], class_names: Mapping[int, str]) -> dict[str, float]:
    """A trial's test figures: each endpoint over the classes present, averaged per patient then
    over patients (``test.dice`` ...), and the plain mean per class (``test.<class>.dice``)."""
    cases = list(per_case(rows).values())
    metrics: dict[str, float] = {}
    for metric in ("dice", "hd95_mm", "nsd"):
        by_patient: dict[str, list[float]] = {}
        for case in cases:
            if case[metric] is not None:
                by_patient.setdefault(case["patient_id"], []).append(case[metric])
        if by_patient:
            metrics[f"test.{metric}"] = float(np.mean([np.mean(v) for v in by_patient.values()]))
        for value, name in class_names.items():
            values = [float(r[metric]) for r in rows if int(r["class_value"]) == int(value) and r.get(metric) is not None]
            if values:
                metrics[f"test.{name}.{metric}"] = float(np.mean(values))
    return metrics


def _close_stale_child(client: Any, marker: Path) -> None:
    """Mark the child of a trial killed mid-run (its marker left behind) as KILLED."""
    try:
        stale = json.loads(marker.read_text(encoding="utf-8"))["run_id"]
        if client.get_run(stale).info.status == "RUNNING":
            client.set_terminated(stale, status="KILLED")
            logger.info("MLflow run %s of an interrupted trial marked KILLED", stale)
    except Exception as exc:  # noqa: BLE001 - bookkeeping must never stop a trial
        logger.warning("could not close the MLflow run of an interrupted trial: %s", type(exc).__name__)


def start_child(parent: Mapping[str, str] | None, tags: Mapping[str, Any], marker_dir: str | None) -> str | None:
    """Open the trial's child run under ``parent``; its id (None without a parent run)."""
    if not parent:
        return None
    client = mlflow_client(parent["tracking_uri"])
    marker = Path(marker_dir) / CHILD_MARKER if marker_dir and "://" not in marker_dir else None
    if marker is not None and marker.is_file():
        _close_stale_child(client, marker)
    experiment = client.get_run(parent["run_id"]).info.experiment_id
    run_tags = {str(k): str(v) for k, v in tags.items()}
    run_tags |= {"mlflow.parentRunId": parent["run_id"], "mlflow.runName": f"{tags['arm']}-seed{tags['seed']}"}
    run = client.create_run(experiment, tags=run_tags)
    if marker is not None:
        # whole or absent: a truncated marker left a killed trial's child run RUNNING for good
        storage.write_bytes_atomic(None, "file", str(marker), json.dumps({"run_id": run.info.run_id}).encode("utf-8"))
    return run.info.run_id


def _log(client: Any, run_id: str, metrics: Mapping[str, float], history: Sequence[Mapping[str, Any]]) -> None:
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    batch = [Metric(k, float(v), stamp, 0) for k, v in metrics.items()]
    log_metrics(client, run_id, batch + [m for entry in history for m in epoch_metrics(entry, stamp)])


def finish_child(
    parent: Mapping[str, str] | None, run_id: str | None, metrics: Mapping[str, float],
    history: Sequence[Mapping[str, Any]] = (),
) -> None:
    """Log the trial's final figures and close its child run (FINISHED). The epochs of
    ``history`` the run does not hold yet (trained by an interrupted invocation before this one
    resumed from their checkpoint, possibly every epoch, or not streamed while MLflow did not
    answer) are logged too, so each child holds the trial's whole curve."""
    if not parent or not run_id:
        return
    _close(mlflow_client(parent["tracking_uri"]), run_id, metrics, history)


def _close(client: Any, run_id: str, metrics: Mapping[str, float], history: Sequence[Mapping[str, Any]]) -> None:
    """Log ``metrics`` and the epochs of ``history`` the run lacks, then mark it FINISHED."""
    _log(client, run_id, metrics, [])
    log_missing_epochs(client, run_id, history)
    client.set_terminated(run_id, status="FINISHED")


def _complete_cut_child(client: Any, trial: Mapping[str, Any]) -> None:
    """Close the child run of a trial that stored its result but was killed before its run was
    closed (left RUNNING): the figures it lacks are logged and it is marked FINISHED, since the
    trial itself finished."""
    run_id = trial.get("child_run_id")
    if not run_id:
        return
    try:
        run = client.get_run(run_id)
        if run.info.status != "RUNNING":
            return
        missing = {k: v for k, v in trial["test_metrics"].items() if k not in run.data.metrics}
        _close(client, run_id, missing, trial["history"])
        logger.info("MLflow run %s of a trial stopped after storing its result: completed", run_id)
    except Exception as exc:  # noqa: BLE001 - bookkeeping must never stop the ablation
        logger.warning("could not close the MLflow run of an earlier trial: %s", type(exc).__name__)


def adopt_earlier_trials(parent: Mapping[str, str] | None, trials: Sequence[Mapping[str, Any]], tags: Mapping[str, Any]) -> int:
    """Give ``parent`` a child for each trial that a previous invocation ran (its stored test
    metrics and epoch history), tagged ``resumed_from_run``; returns how many were added. That
    invocation's own child of the trial is completed first if it was left RUNNING."""
    if not parent:
        return 0
    client = mlflow_client(parent["tracking_uri"])
    experiment = client.get_run(parent["run_id"]).info.experiment_id
    added = 0
    for trial in trials:
        if trial.get("parent_run_id") == parent["run_id"]:
            continue
        _complete_cut_child(client, trial)
        run_tags = {str(k): str(v) for k, v in tags.items()} | {
            # the code that trained it, not the one adopting it (a rerun after a commit reuses trials)
            "git_commit": str(trial.get("trained_at_commit") or "unrecorded"),
            "git_dirty": str(trial.get("trained_at_dirty") or "unrecorded"),
            "arm": trial["arm"], "seed": str(trial["seed"]), RESUMED_TAG: str(trial.get("child_run_id")),
            "mlflow.parentRunId": parent["run_id"], "mlflow.runName": f"{trial['arm']}-seed{trial['seed']}",
        }  # fmt: skip
        run = client.create_run(experiment, tags=run_tags)
        _log(client, run.info.run_id, trial["test_metrics"], trial["history"])
        client.set_terminated(run.info.run_id, status="FINISHED")
        added += 1
    return added
