"""Kedro hooks: one run at a time writes the project's data (``RunLockHook``), and each
kedro-mlflow run is tagged with where it comes from, code and data versions (``LineageTagsHook``).
A run's parameters are checked before its first node (``RunLockHook``, ``run_checks``); a run
that fails on what no run has made yet names the pipelines to run first (``MissingInputsHook``).

``RunLockHook`` takes the run lock of the data root (``core.run_lock``; for an ``s3://`` root the
lease object of ``core.s3_lock``, checked before each node) before the first node of a
pipeline that writes data, before kedro-mlflow opens its run (``tryfirst``), and releases it when
the run ends or fails; ``params:run`` says whether a second run waits or refuses. Taking over
from a run that died holding it, it first removes that run's unfinished temporaries
(``core.storage.remove_temporaries``). ``KilledRunHook`` writes the id of the MLflow run that
kedro-mlflow opens into the lock's record, and marks the run of a dead holder KILLED: a run killed
by SIGKILL or the OOM killer ends no MLflow run itself, so it would stay RUNNING for ever. It also
starts the run's heartbeat and closes the experiment's runs that fell silent, for runs killed
where no lock proves it (``core.run_heartbeat``).

kedro-mlflow 2.0.3 starts its run in its own ``before_pipeline_run``; this hook runs after it
(``trylast``) and sets, on that active run, the tags ``git_commit``, ``git_dirty``,
``dvc_data_version`` and ``dvc_data_status`` (see ``mvl_pipeline.datasets.lineage``). Values are
commit ids, booleans and content hashes: no PHI. Pipelines with MLflow disabled (``sample_data``)
have no active run and get nothing.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from kedro.config import MissingConfigException
from kedro.framework.hooks import hook_impl
from kedro.io import DatasetError, MemoryDataset

from mvl_pipeline.core import storage
from mvl_pipeline.core.run_heartbeat import Heartbeat, close_silent_runs
from mvl_pipeline.core.run_lock import RunConfig, RunLock, local_root, lock_path
from mvl_pipeline.core.s3_lock import S3RunLock
from mvl_pipeline.datasets.lineage import LineageDataset
from mvl_pipeline.run_checks import (
    blocks_read,
    file_parameters,
    refuse_invalid_blocks,
    refuse_unknown_parameters,
    run_parameters,
)

logger = logging.getLogger(__name__)

#: The catalog entry that describes the lineage (conf/base/catalog_train.yml).
LINEAGE_DATASET = "lineage"
#: The dataset whose DVC version is "the data version" (written by the ingest pipeline).
DATA_DATASET = "ingested_cases"

LINEAGE_TAGS = ("git_commit", "git_dirty", "dvc_data_version", "dvc_data_status")
#: The parameter block of the run lock (conf/base/parameters_run.yml).
RUN_PARAMS = "params:run"


def writes_data(pipeline: Any, catalog: Any) -> bool:
    """True when a node of ``pipeline`` saves to a dataset that persists (not a MemoryDataset)."""
    for name in pipeline.all_outputs():
        dataset = catalog.get(name) if name in catalog else None
        if dataset is not None and not isinstance(dataset, MemoryDataset):
            return True
    return False


def run_lock(data_root: str, project: Path, config: RunConfig, *, pipeline: str) -> RunLock | S3RunLock:
    """The run lock of ``data_root``: a lease object on S3 for an ``s3://`` root, else a file."""
    fallback = lock_path(data_root, project)
    if str(data_root).startswith(("s3://", "s3a://")):
        return S3RunLock(str(data_root).rstrip("/"), config, pipeline=pipeline, fallback=str(fallback))
    return RunLock(fallback, config, pipeline=pipeline)


class RunLockHook:
    """Hold the data root's run lock for the whole of a run that writes data (module doc)."""

    def __init__(self) -> None:
        self._project_path: Path | None = None
        self._data_root = "data"
        self._lock: RunLock | S3RunLock | None = None
        self._config = RunConfig()
        self._parameters: dict[str, Any] = {}
        self._run_parameters: dict[str, Any] = {}

    @hook_impl(tryfirst=True)  # before kedro-mlflow, which reads no mlflow.yml from a missing environment
    def after_context_created(self, context: Any) -> None:
        self._project_path = Path(context.project_path)
        try:
            globals_ = context.config_loader["globals"]
        except MissingConfigException as exc:
            # `kedro run --env mds` (a typo) used to fail in kedro-mlflow, which then fell back to a
            # ./mlruns file store: MLflow's refusal of file stores named the wrong cause
            conf = Path(context.config_loader.conf_source)
            known = sorted(p.name for p in conf.iterdir() if p.is_dir() and p.name != "base") if conf.is_dir() else []
            raise MissingConfigException(f"{exc} (Kedro environment {context.env!r}; the environments here: {', '.join(known)})") from exc
        self._data_root = str(globals_.get("data_root", "data"))
        self._parameters = file_parameters(context.config_loader)
        self._run_parameters = run_parameters(context.config_loader)

    @hook_impl(tryfirst=True)  # before kedro-mlflow opens a run that a refused run would leave open
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        runtime = run_params.get("runtime_params") or {}
        refuse_unknown_parameters(runtime, self._parameters)
        refuse_invalid_blocks(runtime, self._run_parameters, read=blocks_read(pipeline))
        self._config = config = RunConfig.from_params(catalog.load(RUN_PARAMS) if RUN_PARAMS in catalog else {})
        if not writes_data(pipeline, catalog):
            return
        project = self._project_path or Path(run_params.get("project_path") or ".")
        name = ",".join(run_params.get("pipeline_names") or ["__default__"])
        self._lock = run_lock(self._data_root, project, config, pipeline=name)
        self._lock.acquire()
        root = local_root(self._data_root, project)
        if self._lock.left_behind is not None and root is not None:
            # the run that died holding the lock may have been killed mid-save
            removed = storage.remove_temporaries(str(root))
            logger.info("removed %d temporary file(s) or folder(s) of interrupted saves", removed)

    @hook_impl
    def before_node_run(self) -> None:
        if self._lock is not None:
            self._lock.check()  # a lost S3 lease: stop before writing more

    @hook_impl(trylast=True)
    def after_pipeline_run(self) -> None:
        self._release()

    @hook_impl(trylast=True)
    def on_pipeline_error(self) -> None:
        self._release()

    @property
    def config(self) -> RunConfig:
        """This run's ``run`` block (read once, for every run: the heartbeat needs it too)."""
        return self._config

    @property
    def lock(self) -> RunLock | S3RunLock | None:
        """The run lock this run holds (None outside a run that writes data)."""
        return self._lock

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


class KilledRunHook:
    """After kedro-mlflow has opened this run's MLflow run (``trylast``): start its heartbeat and
    mark KILLED the experiment's runs silent for ``run.stale_after_s`` (``core.run_heartbeat``);
    note its id in the run lock's record, and close the MLflow run of the run that died holding
    the lock (KILLED), if the record names one that is still RUNNING on this tracking server."""

    def __init__(self, locks: RunLockHook) -> None:
        self._locks = locks
        self._heartbeat: Heartbeat | None = None
        self._closer: threading.Thread | None = None

    @hook_impl(trylast=True)
    def before_pipeline_run(self) -> None:
        import mlflow

        run = mlflow.active_run()
        if run is None:  # MLflow disabled for this pipeline (sample_data)
            return
        config = self._locks.config
        client = mlflow.MlflowClient()
        self._heartbeat = Heartbeat(client, run.info.run_id, config.heartbeat_s).start()
        # in the background: a run that looks silent is closed only if its heartbeat has not moved two
        # beats later (another machine's clock may run ahead), and this run need not wait for that
        self._closer = threading.Thread(
            target=close_silent_runs, args=(client, run.info.experiment_id), name="mlflow-close-silent-runs",
            kwargs={"stale_after_s": config.stale_after_s, "exclude": run.info.run_id,
                    "confirm_after_s": 2 * config.heartbeat_s}, daemon=True,
        )  # fmt: skip
        self._closer.start()
        lock = self._locks.lock
        if lock is None:
            return
        lock.note(mlflow_run_id=run.info.run_id)
        dead = (lock.left_behind or {}).get("mlflow_run_id")
        if not dead or dead == run.info.run_id:
            return
        try:
            if client.get_run(dead).info.status == "RUNNING":
                client.set_terminated(dead, status="KILLED")
                logger.info("MLflow run %s of the run that died holding the run lock marked KILLED", dead)
        except Exception as error:  # noqa: BLE001 - bookkeeping must never stop a run
            logger.warning("the MLflow run %s of the run that died holding the run lock was not closed (%s)",
                           dead, type(error).__name__)  # fmt: skip

    @hook_impl(tryfirst=True)  # before kedro-mlflow ends the run: no beat after it
    def after_pipeline_run(self) -> None:
        self._stop()

    @hook_impl(tryfirst=True)
    def on_pipeline_error(self) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self._closer is not None:  # bounded: two heartbeats and a few calls
            self._closer.join(2 * self._locks.config.heartbeat_s + 60)
            self._closer = None


def _writers(skip: set[str]) -> tuple[dict[str, str], list[str]]:
    """Each dataset a pipeline writes -> the smallest pipeline that writes it, and the pipelines in
    the order they must run (each package under pipelines/ imported now: Kedro imports only those a
    run asks for)."""
    import graphlib
    import importlib.resources

    pipelines = {}
    for folder in importlib.resources.files("mvl_pipeline.pipelines").iterdir():
        if folder.name not in skip and folder.joinpath("pipeline.py").is_file():
            pipelines[folder.name] = importlib.import_module(f"mvl_pipeline.pipelines.{folder.name}.pipeline").create_pipeline()
    found: dict[str, tuple[int, str]] = {}
    for name, pipeline in pipelines.items():
        for dataset in pipeline.all_outputs():
            found[dataset] = min(found.get(dataset, (len(pipeline.nodes), name)), (len(pipeline.nodes), name))
    writers = {dataset: name for dataset, (_, name) in found.items()}
    needs = {name: {writers[d] for d in p.inputs() if d in writers} - {name} for name, p in pipelines.items()}
    return writers, list(graphlib.TopologicalSorter(needs).static_order())


#: How long a failed run may spend finding what it lacked (a slow remote store: no hint, no wait).
HINT_TIMEOUT_S = 10.0


class MissingInputsHook:
    """``kedro run --pipelines evaluate`` before any training failed with "Did not find any versions
    for TorchWeightsDataset(...)": when a run fails on a dataset, the inputs it reads that another
    pipeline writes and that are not there yet are named with those pipelines, in the order to run
    them. Looked up only then, for at most ``HINT_TIMEOUT_S``, and not in a storage outage."""

    @hook_impl
    def on_pipeline_error(self, error: Exception, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        cause: BaseException | None = error
        while cause is not None:
            if isinstance(cause, storage.StorageUnavailableError):
                return  # the store did not answer: asking it again would only delay the error
            cause = cause.__cause__ or cause.__context__
        if not isinstance(error, DatasetError):
            return
        found: dict[str, Any] = {}

        def look() -> None:
            try:
                writers, order = _writers(set(run_params.get("pipeline_names") or ()))
                absent = [n for n in sorted(pipeline.inputs()) if n in writers and not catalog.exists(n)]
                found.update(writers=writers, order=order, absent=absent)
            except Exception as problem:  # noqa: BLE001 - a hint must never hide the run's own error
                logger.debug("inputs not checked (%s)", type(problem).__name__)

        thread = threading.Thread(target=look, name="mvl-missing-inputs", daemon=True)
        thread.start()
        thread.join(HINT_TIMEOUT_S)
        if "absent" not in found:
            return
        writers, absent = found["writers"], found["absent"]
        first = [f"`kedro run --pipelines {name}` ({', '.join(d for d in absent if writers[d] == name)})"
                 for name in found["order"] if name in {writers[d] for d in absent}]  # fmt: skip
        if first:
            logger.error("this run reads what no run has made yet. Run first, in this order: %s; or `kedro run "
                         "--pipelines train` for the whole chain.", ", then ".join(first))  # fmt: skip


def lineage_tags(lineage: dict[str, Any], *, produces_data: bool) -> dict[str, str]:
    """MLflow tag values (strings, as the register stage writes them on model versions).

    A run that itself writes the ingested cases (``ingest``, ``train``) reads no recorded
    version: what it trains on is produced during the run, so its version is not known yet.
    """
    lineage = dict(lineage)
    if produces_data:
        lineage.update(dvc_data_version=None, dvc_data_status="being_produced")
    return {key: str(lineage.get(key)) for key in LINEAGE_TAGS}


class LineageTagsHook:
    @hook_impl(trylast=True)  # after kedro-mlflow's before_pipeline_run has started the run
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        import mlflow

        run = mlflow.active_run()
        if run is None:
            return
        try:
            if LINEAGE_DATASET in catalog:
                lineage = catalog.load(LINEAGE_DATASET)
            else:
                lineage = LineageDataset(project_path=run_params.get("project_path") or ".").load()
        except Exception as error:  # noqa: BLE001 - provenance must never stop a training run
            logger.warning("lineage unavailable (%s): MLflow run not tagged", type(error).__name__)
            return
        tags = lineage_tags(lineage, produces_data=DATA_DATASET in pipeline.all_outputs())
        mlflow.set_tags(tags)
        logger.info(
            "MLflow run %s tagged: git_commit=%s git_dirty=%s dvc_data_version=%s (%s)",
            run.info.run_id, tags["git_commit"], tags["git_dirty"], tags["dvc_data_version"],
            tags["dvc_data_status"],
        )  # fmt: skip

    @hook_impl
    def after_node_run(self, node: Any, outputs: dict[str, Any]) -> None:
        """Tag the run with the content version of the data ``fit`` trained on (the ingest
        manifest's hash), the plan and the Ray run: set even when DVC recorded no version."""
        import mlflow

        history = outputs.get("fit_history")
        if mlflow.active_run() is None or not isinstance(history, dict):
            return
        mlflow.set_tags(
            {
                "data_version": str(history.get("data_version")),
                "plan_id": str(history.get("plan_id")),
                "fit_run": str(history.get("run_name")),
            }
        )
