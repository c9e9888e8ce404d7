"""The ``fit`` node: a thin driver around ``TorchTrainer(...).fit()``.

The node hands the workers *loaders* of the model-input cases (not the arrays), the split, the
plan and the configuration; each worker reads its own shard. The run is named from what
determines it (data version, plan, model and loop configuration), so running the same thing
again resumes the existing run from its last checkpoint instead of training from scratch. The
model kept is the checkpoint with the best validation Dice, never the lowest training loss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mvl_pipeline.core.config import known_only
from mvl_pipeline.model import MedVisionLlamaConfig, build_model
from mvl_pipeline.pipelines.ingest.nodes import data_version
from mvl_pipeline.training.loop import MODEL_DIR, STATE_FILE, LoopConfig, train_loop_per_worker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitParams:
    """The ``fit`` block of parameters_train.yml."""

    loop: LoopConfig
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    gpus_per_worker: float = 1.0
    ray_num_cpus: int | None = None  # local Ray only: None = every core of the machine
    run_name: str = "auto"
    storage_path: str = "data/06_models/ray_results"
    llm_cache_dir: str = "data/06_models/llm_cache"
    max_failures: int = 1
    num_to_keep: int = 2
    stream_to_mlflow: bool = True

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> FitParams:
        params = dict(params)
        loop = LoopConfig.from_params(params.pop("loop", {}))
        scaling = known_only(cls, params.pop("scaling", {}), "fit.scaling")
        return cls(loop=loop, **scaling, **known_only(cls, params, "fit parameters"))


def _digest(*objects: Any) -> str:
    text = json.dumps(objects, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def run_name_for(data_ver: str, plan: Mapping[str, Any], model_cfg: Mapping[str, Any], fit: FitParams) -> str:
    """Deterministic: the same data, plan and configuration give the same run (and resume it)."""
    if fit.run_name != "auto":
        return fit.run_name
    identity = {"loop": fit.loop.to_dict(), "workers": fit.num_workers, "gpu": fit.use_gpu}
    identity["loop"].pop("inject_failure", None)
    return f"mvl-{data_ver}-{_digest(plan.get('plan_id', plan), model_cfg, identity)}"


def _absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())


def _connect_ray(fit: FitParams) -> bool:
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
    # address="local": always a new Ray of our own. Without it ray.init() attaches to any Ray
    # already running on the machine (another run's, a notebook's), whose CPUs may be taken.
    ray.init(address="local", num_cpus=fit.ray_num_cpus or os.cpu_count(), log_to_driver=True,
             configure_logging=False)  # fmt: skip
    return True


def _size_workers(fit: FitParams, resources: Mapping[str, float], *, local: bool) -> FitParams:
    """``cpus_per_worker: 0`` = the Ray cluster's CPUs shared by the workers. On a local Ray a
    request it cannot hold fails here, clearly, instead of waiting for CPUs that never come (a
    cluster may still scale up)."""
    cpus = int(resources.get("CPU", 0))
    if fit.cpus_per_worker <= 0:
        fit = replace(fit, cpus_per_worker=max(1, cpus // fit.num_workers))
    needed = fit.cpus_per_worker * fit.num_workers
    if needed > cpus and not local:
        logger.warning("fit needs %d CPUs, the Ray cluster has %d now; waiting for the autoscaler", needed, cpus)
    elif needed > cpus:
        raise ValueError(
            f"fit needs {fit.num_workers} worker(s) x {fit.cpus_per_worker} CPU = {needed} CPUs but the Ray "
            f"cluster has {cpus}: lower fit.scaling.num_workers / cpus_per_worker (or raise fit.ray_num_cpus)"
        )
    if fit.use_gpu and fit.gpus_per_worker * fit.num_workers > resources.get("GPU", 0):
        logger.warning("the Ray cluster has %s GPU(s) now; waiting for the autoscaler", resources.get("GPU", 0))
    return fit


def _mlflow_target() -> dict[str, str] | None:
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


def _read_best(result: Any) -> tuple[str, dict[str, Any]]:
    """Directory of the checkpoint with the best validation Dice, and its metrics."""
    candidates = [(ckpt, metrics) for ckpt, metrics in (result.best_checkpoints or []) if metrics]
    if not candidates:
        if result.checkpoint is None:
            raise RuntimeError("training reported no checkpoint")
        return result.checkpoint.path, dict(result.metrics or {})
    checkpoint, metrics = max(candidates, key=lambda item: float(item[1].get("val_dice", -1.0)))
    return checkpoint.path, dict(metrics)


def fit_model(
    model_input_cases: Mapping[str, Callable[[], Any]],
    data_split: Mapping[str, Any],
    preprocessing_plan: Mapping[str, Any],
    ingest_manifest: Mapping[str, Any],
    model_params: Mapping[str, Any],
    fit_params: Mapping[str, Any],
    labels: Mapping[str, int],
) -> tuple[tuple[dict[str, Any], dict[str, Any]], dict[str, Any]]:
    """Train on Ray; return the best model (weights + config) and the training history."""
    import ray.train
    from ray.train.torch import TorchTrainer

    fit = FitParams.from_params(fit_params)
    classes = sorted(int(v) for v in labels.values())
    model_dict = dict(model_params)
    wanted = 1 if model_dict.get("num_classes") == 1 and len(classes) == 1 else max(classes) + 1
    if model_dict.get("num_classes") != wanted:
        logger.info("model.num_classes set to %d from the label map", wanted)
        model_dict["num_classes"] = wanted
    model_cfg = MedVisionLlamaConfig.from_params(model_dict)
    train_ids = [c for c in data_split["train"] if c in model_input_cases]
    val_ids = [c for c in data_split["validation"] if c in model_input_cases]
    if len(train_ids) < fit.num_workers:
        raise ValueError(f"{len(train_ids)} training cases for {fit.num_workers} workers: lower fit.scaling.num_workers")
    if not val_ids:
        raise ValueError("the validation split is empty: the best checkpoint is chosen on validation Dice")

    # Build once here: a configuration error fails before Ray starts, and the frozen LLM layer
    # is converted into the cache once instead of by every worker.
    build_model(model_cfg, device="cpu", llm_cache_dir=_absolute(fit.llm_cache_dir))
    version = data_version(ingest_manifest)
    name = run_name_for(version, preprocessing_plan, model_cfg.to_dict(), fit)
    storage = _absolute(fit.storage_path)
    config = {
        "loop": fit.loop.to_dict(),
        "model": model_cfg.to_dict(),
        "plan": dict(preprocessing_plan),
        "classes": classes,
        "train_ids": train_ids,
        "val_ids": val_ids,
        "loaders": {c: model_input_cases[c] for c in train_ids + val_ids},
        "llm_cache_dir": _absolute(fit.llm_cache_dir),
        "mlflow": _mlflow_target() if fit.stream_to_mlflow else None,
        "failure_marker": os.path.join(storage, name, ".injected_failure") if "://" not in storage else None,
    }
    started_ray = _connect_ray(fit)
    try:
        fit = _size_workers(fit, ray.cluster_resources(), local=started_ray and not os.environ.get("RAY_ADDRESS"))
        config["cpus_per_worker"] = fit.cpus_per_worker
        logger.info(
            "fit: run %s, %d training / %d validation cases, %d worker(s) x %d CPU%s, data version %s",
            name, len(train_ids), len(val_ids), fit.num_workers, fit.cpus_per_worker,
            " + GPU" if fit.use_gpu else "", version,
        )  # fmt: skip
        resources = {"CPU": fit.cpus_per_worker} | ({"GPU": fit.gpus_per_worker} if fit.use_gpu else {})
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(
                num_workers=fit.num_workers, use_gpu=fit.use_gpu, resources_per_worker=resources
            ),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=storage,
                failure_config=ray.train.FailureConfig(max_failures=fit.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=fit.num_to_keep,
                    checkpoint_score_attribute="val_dice",
                    checkpoint_score_order="max",
                ),
            ),
        )
        result = trainer.fit()
        best_dir, best_metrics = _read_best(result)
        last_dir = result.checkpoint.path if result.checkpoint is not None else best_dir
        weights = _read_model_dir(Path(best_dir) / MODEL_DIR)
        state = json.loads((Path(last_dir) / STATE_FILE).read_text(encoding="utf-8"))
    finally:
        if started_ray:
            ray.shutdown()
    history = {
        "run_name": name,
        "data_version": version,
        "plan_id": preprocessing_plan.get("plan_id"),
        "best_epoch": int(best_metrics.get("epoch", -1)),
        "best_val_dice": float(best_metrics.get("val_dice", float("nan"))),
        "epochs": state["history"],
        "resumed_after_epochs": state.get("resumed_after_epochs", []),
        "global_step": state.get("global_step"),
        "loop_started_unix": state.get("loop_started_unix"),
        "classes": classes,
        "class_names": {str(v): k for k, v in labels.items()},
        "num_workers": fit.num_workers,
    }
    logger.info("fit: best validation Dice %.3f at epoch %d", history["best_val_dice"], history["best_epoch"] + 1)
    return weights, history


def _read_model_dir(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Weights + config of a saved model, in the form ``TorchWeightsDataset`` saves."""
    from safetensors.torch import load_file

    state = load_file(str(directory / "model.safetensors"))
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    return state, config
