"""The Ray Train driver: connect to Ray, size the workers, run ``TorchTrainer(...).fit()``, and
read the best checkpoint back. The ``fit`` node is a thin wrapper around :func:`fit`.

The workers get *loaders* of the model-input cases (not the arrays), the split, the plan and the
configuration; each reads its own shard (``training.loop``). The run is named from what
determines it (data version, plan, model and loop configuration), so running the same thing
again resumes the existing run from its last checkpoint instead of training from scratch. The
model kept is the checkpoint with the best validation Dice, never the lowest training loss.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mvl_pipeline.core.hashing import json_digest
from mvl_pipeline.core.parallel import resolve_workers
from mvl_pipeline.core.storage import train_storage, train_storage_outage
from mvl_pipeline.formats.model_bundle import read_weights
from mvl_pipeline.model import MedVisionLlamaConfig, build_model
from mvl_pipeline.training import metric_stream
from mvl_pipeline.training.config import FitConfig
from mvl_pipeline.training.loop import MODEL_DIR, STATE_FILE, train_loop_per_worker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InitWeights:
    """Weights a run starts from instead of a fresh initialisation (``fit.init: champion``)."""

    version: str
    sha256: str
    state: Mapping[str, Any] = field(repr=False)
    llm_sha256: str | None = None  # the frozen LLM layer it was trained with (None: no layer)


def same_architecture(model: Any, state: Mapping[str, Any]) -> bool:
    """``state`` (saved weights: every tensor but the frozen LLM layer's) fits ``model`` exactly."""
    frozen = set(getattr(model, "frozen_llm_state_names", list)())
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in frozen}
    return wanted == {k: tuple(v.shape) for k, v in state.items()}


def run_name_for(data_ver: str, plan: Mapping[str, Any], model_cfg: Mapping[str, Any], fit: FitConfig,
                 init_sha256: str | None = None) -> str:  # fmt: skip
    """Deterministic: the same data, plan, configuration and starting weights give the same run
    (and resume it)."""
    if fit.run_name != "auto":
        return fit.run_name
    identity = {"loop": fit.loop.to_dict(), "workers": fit.scaling.num_workers, "gpu": fit.scaling.use_gpu}
    if init_sha256:
        identity["init"] = init_sha256
    return f"mvl-{data_ver}-{json_digest([plan.get('plan_id', plan), model_cfg, identity], length=10)}"


def absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())


LOCAL_RAY_ATTEMPTS = 3  # starts of a local Ray before its start-up timeout is raised
#: How Ray reports that its dashboard could not bind its port (the tail of dashboard.log in the
#: error of ray.init, or Ray's own check before it starts).
PORT_IN_USE = re.compile(r"address already in use|already occupied|errno 98", re.IGNORECASE)
DASHBOARD_PORTS = range(8265, 8315)  # Ray's own search for a local dashboard's port: 8265 and the 49 after it


def _bindable(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


def free_dashboard_port() -> int:
    """The first port of :data:`DASHBOARD_PORTS` free now (as Ray searches)."""
    port = next((p for p in DASHBOARD_PORTS if _bindable(p)), None)
    if port is None:
        raise RuntimeError(f"no free port for Ray's dashboard in {DASHBOARD_PORTS.start}-{DASHBOARD_PORTS.stop - 1}")
    return port


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """``values`` in os.environ inside the block only (processes started in it inherit them)."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def connect_ray(fit: FitConfig) -> bool:
    """Use the cluster in RAY_ADDRESS (``--env cluster``), else start a local Ray sized to the
    machine. Returns True if this call started Ray (and should stop it)."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return True
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # token auth is for shared clusters
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # The controller polls its workers every 2 s by default: on one machine that is seconds of
    # idle start-up and wind-down per run (measured ~3 s of a trivial fit's 14 s).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    # Ray starts its workers at niceness 15, below its own daemons, the driver and everything
    # else on the machine: on a laptop the training worker then loses the cores it was given
    # (bench_fit measured the epochs 1.14x slower than a plain loop at 15).
    os.environ.setdefault("RAY_worker_niceness", "0")
    # Ray Train's preemption watcher (an actor that polls for nodes being preempted: spot nodes of
    # a cluster) has nothing to watch on one machine, and its start made Ray's core worker log an
    # error line in every fit ("E ... Actor with class name: 'PreemptionWatcher' ... has
    # constructor arguments in the object store and max_restarts > 0").
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # address="local": always a new Ray of our own. Without it ray.init() attaches to any Ray
    # already running on the machine (another run's, a notebook's), whose CPUs may be taken.
    # Ray gives its raylet a fixed 30 s to register (ray/_private/node.py); on a loaded machine
    # that can pass (seen once in CI, just after another run's Ray was SIGKILLed): start again.
    # Ray's processes ask Ray's state API for their own Ray without saying which: Ray Train's
    # placement-group cleaner every second, whether the run's controller lives. With another Ray on
    # the machine (a `ray start`, another run's) that question goes to the other Ray, or fails on
    # "multiple active Ray instances", and the cleaner gives up. So the dashboard (which serves the
    # state API) gets its port here, and every process of this Ray inherits its address
    # (RAY_API_SERVER_ADDRESS, read first by Ray's state API client); this process keeps its own.
    # Ray's own search would move on to the next port if another process bound this one first
    # (two runs starting at once); with the port given, that start fails, and is made again.
    for attempt in range(1, LOCAL_RAY_ATTEMPTS + 1):
        port = free_dashboard_port() if fit.ray_dashboard else None
        api_server = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"} if port else {}
        try:
            with _environment(**api_server):
                ray.init(address="local", num_cpus=resolve_workers(fit.ray_num_cpus), log_to_driver=True,
                         configure_logging=False, include_dashboard=fit.ray_dashboard, dashboard_port=port)  # fmt: skip
            break
        except Exception as error:
            # bound by another process since free_dashboard_port: it may hold it still, or have let
            # it go again by the time Ray gives up waiting for its dashboard (about a minute)
            taken = port is not None and (not _bindable(port) or PORT_IN_USE.search(str(error)) is not None)
            if not (taken or "timed out during startup" in str(error)) or attempt == LOCAL_RAY_ATTEMPTS:
                raise
            logger.warning("the local Ray did not start (%s): starting it again, attempt %d of %d",
                           error, attempt + 1, LOCAL_RAY_ATTEMPTS)  # fmt: skip
            ray.shutdown()
    if port:
        logger.info("local Ray started: its dashboard at http://127.0.0.1:%d while this run lasts", port)
    return True


def size_workers(fit: FitConfig, resources: Mapping[str, float], *, local: bool) -> FitConfig:
    """``cpus_per_worker: 0`` = the Ray cluster's CPUs shared by the workers. On a local Ray a
    request it cannot hold fails here, clearly, instead of waiting for CPUs that never come (a
    cluster may still scale up)."""
    cpus = int(resources.get("CPU", 0))
    scaling = fit.scaling
    if scaling.cpus_per_worker <= 0:
        scaling = replace(scaling, cpus_per_worker=max(1, cpus // scaling.num_workers))
        fit = replace(fit, scaling=scaling)
    needed = scaling.cpus_per_worker * scaling.num_workers
    if needed > cpus and not local:
        logger.warning("fit needs %d CPUs, the Ray cluster has %d now; waiting for the autoscaler", needed, cpus)
    elif needed > cpus:
        raise ValueError(
            f"fit needs {scaling.num_workers} worker(s) x {scaling.cpus_per_worker} CPU = {needed} CPUs but the Ray "
            f"cluster has {cpus}: lower fit.scaling.num_workers / cpus_per_worker (or raise fit.ray_num_cpus)"
        )
    if scaling.use_gpu and scaling.gpus_per_worker * scaling.num_workers > resources.get("GPU", 0):
        logger.warning("the Ray cluster has %s GPU(s) now; waiting for the autoscaler", resources.get("GPU", 0))
    return fit


def mlflow_target() -> dict[str, str] | None:
    try:
        import mlflow
    except ImportError:  # pragma: no cover - mlflow is a dependency
        return None
    run = mlflow.active_run()
    if run is None:
        return None
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return {"run_id": run.info.run_id, "tracking_uri": uri}


def _log_missing_epochs(target: Mapping[str, str] | None, history: Sequence[Mapping[str, Any]]) -> None:
    """Give the driver's MLflow run the epochs the workers' stream did not log (MLflow did not
    answer while they trained, or an interrupted invocation trained them)."""
    if not target:
        return
    try:
        added = metric_stream.log_missing_epochs(metric_stream.mlflow_client(target["tracking_uri"]), target["run_id"], history)
    except Exception as exc:  # noqa: BLE001 - the model is trained: tracking must not lose it
        logger.warning("could not log the training curve to MLflow (%s)", type(exc).__name__)
        return
    if added:
        logger.info("fit: %d epoch(s) the stream had not logged were logged to MLflow from the history", added)


def read_best(result: Any) -> tuple[Any, dict[str, Any]]:
    """The checkpoint with the best validation Dice, and its metrics."""
    candidates = [(ckpt, metrics) for ckpt, metrics in (result.best_checkpoints or []) if metrics]
    if not candidates:
        if result.checkpoint is None:
            raise RuntimeError("training reported no checkpoint")
        return result.checkpoint, dict(result.metrics or {})
    checkpoint, metrics = max(candidates, key=lambda item: float(item[1].get("val_dice", -1.0)))
    return checkpoint, dict(metrics)


def fit(
    loaders: Mapping[str, Callable[[], Any]],
    train_ids: Sequence[str],
    val_ids: Sequence[str],
    plan: Mapping[str, Any],
    model_cfg: MedVisionLlamaConfig,
    fit_cfg: FitConfig,
    *,
    classes: Sequence[int],
    data_version: str,
    init: InitWeights | None = None,
) -> tuple[tuple[dict[str, Any], dict[str, Any]], dict[str, Any]]:
    """Train on Ray; return the best model ``(state_dict, config)`` and the training state
    (history, best epoch and Dice, resumes, global step) with the run's name."""
    import ray.train
    from ray.train.torch import TorchTrainer

    scaling = fit_cfg.scaling
    if len(train_ids) < scaling.num_workers:
        raise ValueError(f"{len(train_ids)} training cases for {scaling.num_workers} workers: lower fit.scaling.num_workers")
    if not val_ids:
        raise ValueError("the validation split is empty: the best checkpoint is chosen on validation Dice")
    cache = absolute(fit_cfg.llm_cache_dir)
    # Build once here: a configuration error fails before Ray starts, and the frozen LLM layer
    # is converted into the cache once instead of by every worker.
    model = build_model(model_cfg, device="cpu", llm_cache_dir=cache)
    reference = getattr(model, "llm_reference", None)
    if init is not None and (reference.sha256 if reference else None) != init.llm_sha256:
        logger.warning("fit.init champion: version %s was trained with another frozen LLM layer: training from scratch", init.version)
        init = None
    if init is not None and not same_architecture(model, init.state):
        logger.warning("fit.init champion: version %s has another architecture than model.*: training from scratch", init.version)
        init = None
    if init is not None:
        fit_cfg = replace(fit_cfg, loop=replace(fit_cfg.loop, epochs=fit_cfg.champion_epochs))
    name = run_name_for(data_version, plan, model_cfg.to_dict(), fit_cfg, init.sha256 if init else None)
    storage = absolute(fit_cfg.storage_path)
    config = {
        "loop": fit_cfg.loop.to_dict(),
        "model": model_cfg.to_dict(),
        "plan": dict(plan),
        "classes": list(classes),
        "train_ids": list(train_ids),
        "val_ids": list(val_ids),
        "loaders": {c: loaders[c] for c in [*train_ids, *val_ids]},
        "llm_cache_dir": cache,
        "mlflow": mlflow_target() if fit_cfg.stream_to_mlflow else None,
        "init_weights": dict(init.state) if init is not None else None,
    }
    started_ray = connect_ray(fit_cfg)
    try:
        fit_cfg = size_workers(fit_cfg, ray.cluster_resources(), local=started_ray and not os.environ.get("RAY_ADDRESS"))
        scaling = fit_cfg.scaling
        config["cpus_per_worker"] = scaling.cpus_per_worker
        logger.info(
            "fit: run %s, %d training / %d validation cases, %d worker(s) x %d CPU%s, data version %s",
            name, len(train_ids), len(val_ids), scaling.num_workers, scaling.cpus_per_worker,
            " + GPU" if scaling.use_gpu else "", data_version,
        )  # fmt: skip
        resources = {"CPU": scaling.cpus_per_worker} | ({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})
        storage_path, storage_filesystem = train_storage(storage, fit_cfg.storage_timeouts.to_dict())
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(
                num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources
            ),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=storage_path,
                storage_filesystem=storage_filesystem,
                failure_config=ray.train.FailureConfig(max_failures=fit_cfg.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=fit_cfg.num_to_keep,
                    checkpoint_score_attribute="val_dice",
                    checkpoint_score_order="max",
                ),
            ),
        )
        try:
            result = trainer.fit()
        except Exception as exc:
            outage = train_storage_outage(storage, exc)
            if outage is None:
                raise
            raise outage from None  # Ray's text quotes object keys: the message above says what to do
        best, best_metrics = read_best(result)
        # as_directory(): a local path as it is, a checkpoint on S3 (or any remote storage) downloaded
        with best.as_directory() as best_dir:
            weights = read_weights(Path(best_dir) / MODEL_DIR)
        with (result.checkpoint or best).as_directory() as last_dir:
            state = json.loads((Path(last_dir) / STATE_FILE).read_text(encoding="utf-8"))
    finally:
        if started_ray:
            ray.shutdown()
    _log_missing_epochs(config["mlflow"], state.get("history", []))
    state.update(
        run_name=name,
        best_epoch=int(best_metrics.get("epoch", -1)),
        best_val_dice=float(best_metrics.get("val_dice", float("nan"))),
        num_workers=scaling.num_workers,
        init={"from": "champion", "version": init.version, "weights_sha256": init.sha256, "epochs": fit_cfg.loop.epochs}
        if init is not None else {"from": "scratch", "epochs": fit_cfg.loop.epochs},
    )
    return weights, state
