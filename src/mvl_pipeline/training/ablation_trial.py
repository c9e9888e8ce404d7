"""One trial of the ablation, as Ray Tune runs it: one training of the project's loop for one
(arm, seed), then its best checkpoint scored on the test cases.

The trial trains the loop of the ``fit`` pipeline (``training.loop``) with the arm's model
configuration and the trial's seed, which fixes the initial weights (tensor by tensor,
``model/init.py``), the ``shuffled``/``random`` layer draw and the training patches (drawn from
``default_rng([seed, rank, epoch])``); the loop budget, the optimiser and its schedule are the
same for every arm. On a cluster (or with several workers) the trial is a Ray Train run
(``train_loop_per_worker``); on a local Ray a trial of one worker trains in the trial's own
process (``ablation.local_engine: tune``, ``trial_session``: the same steps, without the
processes of a Ray Train run). Either way its checkpoints have a fixed place inside the
experiment folder, so a trial that is started again (after an interruption) resumes from the last
checkpoint, and a finished training trains nothing. The checkpoint with the best validation Dice
is scored on the test cases on their original grid (``evaluation.scoring``; the raw network: no
post-processing is decided here), on a cluster in a Ray task holding the workers' CPUs; the
per-case rows, the history and the figures go to ``ablation_trial.json`` in the trial's folder
(written last, atomically: a trial whose file exists is done, and is not run again).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvl_pipeline.core import storage
from mvl_pipeline.training import ablation_tracking
from mvl_pipeline.training.loop import (
    MODEL_DIR,
    STATE_FILE,
    configure_worker_logging,
    run_training,
    train_loop_per_worker,
)
from mvl_pipeline.training.trial_session import TrialSession

logger = logging.getLogger(__name__)

RESULT_FILE = "ablation_trial.json"

#: a trained trial: the best checkpoint's weights (parameters, buffers) and metrics, the last one's state
TrainedRun = tuple[tuple[dict[str, Any], dict[str, Any]], dict[str, Any], dict[str, Any]]


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one ablation shares (bound once with ``tune.with_parameters``)."""

    trials_dir: str  # absolute: one folder per trial (its checkpoints or its Ray Train run, its result)
    run_names: Mapping[str, Mapping[int, str]]  # arm -> seed -> the trial's folder (and Ray Train run) name
    model_configs: Mapping[str, Mapping[str, Any]]  # arm -> MedVisionLlamaConfig.to_dict()
    loop: Mapping[str, Any]  # fit.loop with the ablation's budget (seed set per trial)
    plan: Mapping[str, Any]
    class_names: Mapping[int, str]
    train_ids: Sequence[str]
    val_ids: Sequence[str]
    loaders: Mapping[str, Callable[[], Any]]  # model-input cases (train + validation)
    test_cases: Sequence[tuple[str, Callable[[], Any]]]  # original (ingested) test cases
    llm_cache_dir: str
    scaling: Mapping[str, Any]  # fit.scaling, sized
    max_failures: int
    num_to_keep: int
    storage_timeouts: Mapping[str, float]  # fit.storage_timeouts (checkpoints and Tune state on S3)
    evaluate: Mapping[str, Any]
    scoring_id: str  # test cases + evaluate settings: a stored result scored otherwise is redone
    mlflow: Mapping[str, str] | None  # the parent run
    score_in_trial: bool  # local Ray: score in the trial's process; a cluster: in a task with CPUs
    train_in_trial: bool  # local Ray, 1 worker, ablation.local_engine tune: train in the trial's process
    tags: Mapping[str, Any]  # data_version, plan_id, git_commit, git_dirty, ablation


def join_url(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or a URL Ray and fsspec take (``storage.join`` would
    fold the ``//`` of ``s3://``)."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def trial_dir(context: TrialContext, arm: str, seed: int) -> str:
    return join_url(context.trials_dir, context.run_names[arm][seed])


def read_result(directory: str, **storage_options: Any) -> dict[str, Any] | None:
    """The stored result of a finished trial, or None."""
    fs, _, path = storage.filesystem(join_url(directory, RESULT_FILE), storage_options or None)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def write_result(directory: str, document: Mapping[str, Any], **storage_options: Any) -> None:
    """Store a finished trial's result, atomically (a reader sees no file or the whole file)."""
    fs, protocol, path = storage.filesystem(join_url(directory, RESULT_FILE), storage_options or None)
    payload = json.dumps(document, indent=1, sort_keys=True, default=_plain).encode("utf-8")
    storage.write_bytes_atomic(fs, protocol, path, payload)


def model_config_for(context: TrialContext, arm: str, seed: int) -> dict[str, Any]:
    """The arm's model with the trial's seed for the ``shuffled`` / ``random`` layer draw."""
    model = json.loads(json.dumps(context.model_configs[arm]))
    model["llm"]["random_seed"] = int(seed)
    return model


def train_config(context: TrialContext, arm: str, seed: int, child: Mapping[str, str] | None) -> dict[str, Any]:
    """``train_loop_per_worker``'s config: the arm's model, the trial's seed, the shared rest."""
    return {
        "loop": {**context.loop, "seed": int(seed)},
        "model": model_config_for(context, arm, seed),
        "plan": dict(context.plan),
        "classes": sorted(int(c) for c in context.class_names),
        "train_ids": list(context.train_ids),
        "val_ids": list(context.val_ids),
        "loaders": dict(context.loaders),
        "llm_cache_dir": context.llm_cache_dir,
        "cpus_per_worker": int(context.scaling["cpus_per_worker"]),
        "mlflow": child,
    }


def score_weights(
    weights: tuple[dict[str, Any], dict[str, Any]],
    cases: Sequence[tuple[str, Callable[[], Any]]],
    plan: Mapping[str, Any],
    class_names: Mapping[int, str],
    evaluate: Mapping[str, Any],
    llm_cache_dir: str,
    threads: int,
) -> list[dict[str, Any]]:
    """Per-case, per-class rows of a model on ``cases`` (original grid, no post-processing)."""
    import torch

    from mvl_pipeline.evaluation.scoring import EvaluateConfig, score_cases
    from mvl_pipeline.model import model_from_weights

    torch.set_num_threads(max(1, int(threads)))
    model = model_from_weights(*weights, llm_cache_dir=llm_cache_dir)
    rows, _ = score_cases(
        model, cases, plan, {int(k): v for k, v in class_names.items()},
        num_classes=model.cfg.num_classes, params=EvaluateConfig.from_params(dict(evaluate)),
    )  # fmt: skip
    return rows


def _fit(context: TrialContext, arm: str, seed: int, child: Mapping[str, str] | None) -> Any:
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    scaling = context.scaling
    storage_path, storage_filesystem = storage.train_storage(context.trials_dir, context.storage_timeouts)  # as fit's
    resources = {"CPU": scaling["cpus_per_worker"]} | ({"GPU": scaling["gpus_per_worker"]} if scaling["use_gpu"] else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=train_config(context, arm, seed, child),
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling["num_workers"], use_gpu=scaling["use_gpu"], resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=context.run_names[arm][seed],
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=context.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=context.num_to_keep, checkpoint_score_attribute="val_dice", checkpoint_score_order="max"
            ),
            callbacks=[TuneReportCallback()],
        ),
    )
    return trainer.fit()


def _fit_in_trial(context: TrialContext, arm: str, seed: int, child: Mapping[str, str] | None) -> TrainedRun:
    """Train in this process (the Tune trial's), checkpoints in the trial's folder
    (``trial_session``); a trial started again resumes from its latest checkpoint."""
    from mvl_pipeline.formats.model_bundle import read_weights

    directory = Path(trial_dir(context, arm, seed))
    session = TrialSession(directory, context.num_to_keep, use_gpu=bool(context.scaling["use_gpu"]))
    configure_worker_logging()
    # the epoch lines, as a Ray Train worker prints them; not the scoring's line per test case
    logging.getLogger("mvl_pipeline.evaluation.scoring").setLevel(logging.WARNING)
    if session.latest() is None and any(directory.glob("checkpoint_*")):
        logger.warning(
            "ablation trial %s seed %d: its checkpoints so far are a Ray Train run's (ablation.local_engine: "
            "ray_train); training in the trial's process starts it again from its first epoch (set "
            "ablation.local_engine: ray_train to resume that run instead)", arm, seed,
        )  # fmt: skip
    state = run_training(train_config(context, arm, seed, child), session)
    best = session.best()
    if best is None:
        raise RuntimeError("the trial's training reported no checkpoint")
    return read_weights(best.path / MODEL_DIR), dict(best.metrics), state


def _read_checkpoints(result: Any) -> TrainedRun:
    """The best checkpoint's weights and metrics, and the last checkpoint's trainer state."""
    from mvl_pipeline.formats.model_bundle import read_weights

    if result.checkpoint is None:
        raise RuntimeError(f"the trial's training reported no checkpoint ({result.error})")
    best = result.get_best_checkpoint("val_dice", "max") or result.checkpoint
    best_metrics = next((m for c, m in (result.best_checkpoints or []) if c.path == best.path), result.metrics or {})
    with best.as_directory() as directory:
        weights = read_weights(Path(directory) / MODEL_DIR)
    with result.checkpoint.as_directory() as directory:
        state = json.loads((Path(directory) / STATE_FILE).read_text(encoding="utf-8"))
    return weights, dict(best_metrics), state


def trial_of(config: Mapping[str, Any]) -> tuple[str, int]:
    """``(arm, seed)`` of a Tune trial's config: ``{"trial": {"arm", "seed"}}`` (one grid over the
    trials, since 2026-12-06), or ``{"arm", "seed"}`` in a Tune experiment started before it and
    restored as it was."""
    spec = config.get("trial", config)
    return str(spec["arm"]), int(spec["seed"])


def run_trial(config: Mapping[str, Any], context: TrialContext) -> None:
    """The Tune trainable: train (or resume) the trial's run, score it, store and report."""
    import ray
    import ray.tune
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    arm, seed = trial_of(config)
    directory = trial_dir(context, arm, seed)
    done = read_result(directory)
    if done is not None and done.get("scoring_id") == context.scoring_id:
        logger.info("ablation trial %s seed %d: done in an earlier run, not run again", arm, seed)
        ray.tune.report({"arm": arm, "seed": seed, **done["test_metrics"], "reused": 1})
        return
    tags = {**context.tags, "arm": arm, "seed": seed}
    child_id = ablation_tracking.start_child(context.mlflow, tags, directory)
    child = {**context.mlflow, "run_id": child_id} if context.mlflow and child_id else None
    started = time.time()
    if context.train_in_trial:
        weights, best_metrics, state = _fit_in_trial(context, arm, seed, child)
    else:
        weights, best_metrics, state = _read_checkpoints(_fit(context, arm, seed, child))
    trained = time.time()
    threads = int(context.scaling["cpus_per_worker"]) * int(context.scaling["num_workers"])
    arguments = (weights, list(context.test_cases), dict(context.plan), dict(context.class_names),
                 dict(context.evaluate), context.llm_cache_dir, threads)  # fmt: skip
    if context.score_in_trial:
        # one machine: the training has given the cores back; a task of its own would
        # start (and import torch in) a new process per trial (~10-30 s on 2 cores)
        rows = score_weights(*arguments)
    else:
        # a cluster: a task holding the workers' CPUs, out of the trial's placement group (which
        # reserves no CPU)
        scorer = ray.remote(score_weights).options(
            num_cpus=threads, num_gpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None)
        )
        rows = ray.get(scorer.remote(*arguments))
    metrics = ablation_tracking.trial_metrics(rows, context.class_names)
    metrics |= {"best_val_dice": float(best_metrics.get("val_dice", float("nan"))),
                "best_epoch": float(best_metrics.get("epoch", -1))}  # fmt: skip
    document = {
        "arm": arm,
        "seed": seed,
        "run_name": context.run_names[arm][seed],
        "scoring_id": context.scoring_id,
        # re-scored (another scoring_id): the Ray run was finished by the code that stored it
        "trained_at_commit": done.get("trained_at_commit") if done else context.tags.get("git_commit"),
        "trained_at_dirty": done.get("trained_at_dirty") if done else context.tags.get("git_dirty"),
        "model": model_config_for(context, arm, seed),
        "loop": {**context.loop, "seed": seed},
        "best_epoch": int(best_metrics.get("epoch", -1)),
        "best_val_dice": float(best_metrics.get("val_dice", float("nan"))),
        "history": state["history"],
        "resumed_after_epochs": state.get("resumed_after_epochs", []),
        "test_metrics": metrics,
        "rows": rows,
        "parent_run_id": (context.mlflow or {}).get("run_id"),
        "child_run_id": child_id,
        "train_wall_s": trained - started,
        "score_wall_s": time.time() - trained,
        "wall_s": time.time() - started,
        "finished_unix": time.time(),
    }
    write_result(directory, document)
    ablation_tracking.finish_child(context.mlflow, child_id, metrics, state["history"])
    logger.info("ablation trial %s seed %d: test Dice %.4f (pid %d)", arm, seed, metrics.get("test.dice", float("nan")), os.getpid())
    ray.tune.report({"arm": arm, "seed": seed, **metrics, "reused": 0})


def _plain(value: Any) -> Any:
    """numpy scalars in score rows -> Python numbers (json.dumps' default hook)."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
