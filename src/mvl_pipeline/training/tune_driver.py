"""The ablation driver: a Ray Tune ``Tuner`` over the trials' trainings, grid arm x seed
(``training.ablation_trial`` is one trial: a Ray Train run, or on a local Ray with one worker a
training in the trial's own process, ``ablation.local_engine``). The ``ablation`` pipeline's node
is a thin wrapper around :func:`run_ablation`.

Where things go (``ablation.storage_path``, local or a URL Ray can write):

    <storage>/<name>/trials/<arm>-seed<seed>-<arm digest>/   the training's checkpoints + ablation_trial.json
    <storage>/<name>/tune-<grid digest>/                    the Tune experiment (its state)

``<name>`` (``ablation.name: auto``) is a hash of what makes results comparable: the data version,
the plan, the train/validation split, the shared model block, the loop budget and the workers.
Running the same ablation again finds its Tune experiment and RESTORES it
(``Tuner.restore(resume_unfinished=True, resume_errored=True)``): finished trials are kept,
unfinished and errored trials run again, and each of those resumes its training from its last
checkpoint. A trial whose result file exists is never trained again, even in a new Tune
experiment (another grid over the same runs: an extra seed or arm reuses the others).

A local Ray runs up to ``ablation.local_concurrent_trials`` trials at once and shares the
machine's cores out between them (:func:`local_trials`; at batch 2 a training step uses two cores
poorly, so two 1-core trials train more samples a second than one 2-core trial); on a cluster
(``RAY_ADDRESS``) up to ``ablation.max_concurrent_trials`` run at once. A trial that starts a Ray
Train run reserves no CPU itself (its workers and its scoring task hold the resources), only 64 MiB
of memory; one that trains in its own process holds its worker's CPUs (:func:`trial_resources`).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from typing import Any

from mvl_pipeline.core import storage
from mvl_pipeline.core.hashing import json_digest, set_digest
from mvl_pipeline.core.storage import train_storage
from mvl_pipeline.evaluation.ablation import json_safe
from mvl_pipeline.evaluation.leakage import LeakageError
from mvl_pipeline.evaluation.scoring import EvaluateConfig, cases_in
from mvl_pipeline.model import MedVisionLlamaConfig, build_model
from mvl_pipeline.model.presets import apply_preset
from mvl_pipeline.preprocessing.plan import plan_classes
from mvl_pipeline.training import ablation_tracking
from mvl_pipeline.training.ablation_config import AblationConfig
from mvl_pipeline.training.ablation_trial import (
    TrialContext,
    join_url,
    read_result,
    run_trial,
    trial_dir,
    trial_of,
)
from mvl_pipeline.training.config import FitConfig
from mvl_pipeline.training.ray_driver import absolute, connect_ray, mlflow_target, size_workers

logger = logging.getLogger(__name__)

TRIAL_RESOURCES = {"cpu": 0, "memory": 64 * 1024**2}


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def trial_plan(plan: Mapping[str, Any], config: AblationConfig) -> dict[str, Any]:
    """The plan every trial trains and scores under: the preprocessing plan, with the training
    crop (and sliding-window size) set by ``ablation.crop_size`` when given."""
    plan = copy.deepcopy(dict(plan))
    if config.crop_size is not None:
        plan["patch_size"] = [int(v) for v in config.crop_size]
    return plan


def arm_models(model_params: Mapping[str, Any], config: AblationConfig, plan: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each arm's complete model configuration: ``params:model`` with the arm's changes, its preset
    applied, completed from the plan. Everything not named in ``ablation.arm_models`` is shared."""
    return {arm: built.for_plan(plan).to_dict() for arm, built in check_arm_models(model_params, config).items()}


def check_arm_models(model_params: Mapping[str, Any], config: AblationConfig) -> dict[str, MedVisionLlamaConfig]:
    """Each arm's model block, built: an error names the arm (``ablation.arm_models.none: unknown
    key(s) ['mdoe'] in model.llm``), before the run starts (``run_checks``) and at the grid's start."""
    MedVisionLlamaConfig.from_params(apply_preset(model_params))  # the shared block's own error names it, not an arm
    models = {}
    for arm in config.arms:
        try:
            models[arm] = MedVisionLlamaConfig.from_params(apply_preset(_merge(model_params, config.arm_models[arm])))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"ablation.arm_models.{arm}: {exc}") from exc
    return models


def trial_loop(fit_cfg: FitConfig, config: AblationConfig) -> dict[str, Any]:
    """The ``fit.loop`` every trial trains with: ``ablation.trial`` (budget, peak learning rate)
    over ``fit.loop`` (everything else: schedule shape, batch, augmentation, ...)."""
    return fit_cfg.loop.to_dict() | asdict(config.trial)


def experiment_name(identity: Mapping[str, Any], config: AblationConfig) -> str:
    if config.name != "auto":
        return config.name
    return f"ablation-{identity['data_version']}-{json_digest(identity, length=10)}"


def run_names(models: Mapping[str, Mapping[str, Any]], config: AblationConfig) -> dict[str, dict[int, str]]:
    """The trial's folder (and Ray Train run) name per (arm, seed): the arm, the seed and a hash of
    the arm's model."""
    return {arm: {seed: f"{arm}-seed{seed}-{json_digest(models[arm], length=6)}" for seed in config.seeds} for arm in config.arms}


def check_disjoint(development_split: Mapping[str, Any], test_split: Mapping[str, Any]) -> None:
    """The test patients were never training or validation patients."""
    development = {p for role in ("train", "validation") for p in development_split.get("patients", {}).get(role, [])}
    shared = development & set(test_split.get("patients", {}).get("test", []))
    if shared:
        raise LeakageError(f"{len(shared)} test patient(s) are also development patients: the split is broken")


def build_context(
    *,
    model_input_cases: Mapping[str, Callable[[], Any]],
    ingested_cases: Mapping[str, Callable[[], Any]],
    development_split: Mapping[str, Any],
    test_split: Mapping[str, Any],
    preprocessing_plan: Mapping[str, Any],
    data_version: str,
    lineage: Mapping[str, Any],
    model_params: Mapping[str, Any],
    fit_cfg: FitConfig,
    evaluate_cfg: EvaluateConfig,
    config: AblationConfig,
) -> tuple[TrialContext, str]:
    """Everything the trials share, and the experiment folder (``<storage>/<name>``)."""
    check_disjoint(development_split, test_split)
    plan = trial_plan(preprocessing_plan, config)
    train_ids = sorted(c for c in development_split["train"] if c in model_input_cases)
    val_ids = sorted(c for c in development_split["validation"] if c in model_input_cases)
    if len(train_ids) < fit_cfg.scaling.num_workers or not val_ids:
        raise ValueError(f"{len(train_ids)} training / {len(val_ids)} validation cases: too few for the ablation")
    test_cases = cases_in(ingested_cases, test_split, "test")
    models = arm_models(model_params, config, plan)
    loop = trial_loop(fit_cfg, config)
    identity = {
        "data_version": data_version,
        "plan": json_digest(plan, exclude=("provenance",)),
        "split": set_digest([*train_ids, *("v:" + c for c in val_ids)]),
        "model": json_digest(dict(model_params)),
        "loop": {k: v for k, v in loop.items() if k != "seed"},
        "workers": [fit_cfg.scaling.num_workers, fit_cfg.scaling.use_gpu],
    }
    experiment = join_url(absolute(config.storage_path), experiment_name(identity, config))
    classes = plan_classes(plan)
    context = TrialContext(
        trials_dir=join_url(experiment, "trials"),
        run_names=run_names(models, config),
        model_configs=models,
        loop=loop,
        plan=plan,
        class_names=classes,
        train_ids=train_ids,
        val_ids=val_ids,
        loaders={c: model_input_cases[c] for c in [*train_ids, *val_ids]},
        test_cases=test_cases,
        llm_cache_dir=absolute(fit_cfg.llm_cache_dir),
        scaling=asdict(fit_cfg.scaling),
        max_failures=fit_cfg.max_failures,
        num_to_keep=fit_cfg.num_to_keep,
        storage_timeouts=fit_cfg.storage_timeouts.to_dict(),
        evaluate=evaluate_cfg.to_dict(),
        scoring_id=json_digest([set_digest(c for c, _ in test_cases), evaluate_cfg.to_dict(), classes]),
        mlflow=mlflow_target(),
        score_in_trial=not os.environ.get("RAY_ADDRESS"),
        train_in_trial=False,  # decided when Ray is up (_run_grid: local_engine)
        tags={
            "data_version": data_version,
            "plan_id": str(preprocessing_plan.get("plan_id")),
            "git_commit": str(lineage.get("git_commit")),
            "git_dirty": str(lineage.get("git_dirty")),
            "ablation": experiment_name(identity, config),
        },
    )
    return context, experiment


def trains_in_trial(context: TrialContext, config: AblationConfig, fit_cfg: FitConfig, *, local: bool) -> bool:
    """Whether a trial trains in its own Tune process (``trial_session``) rather than as a Ray Train
    run: on a local Ray, with ``ablation.local_engine: tune``, one worker and a local experiment
    folder (a Ray Train run is what spreads a trial over workers and stores to object stores)."""
    _, protocol, _ = storage.filesystem(context.trials_dir)
    return local and config.local_engine == "tune" and fit_cfg.scaling.num_workers == 1 and protocol == "file"


def trial_resources(context: TrialContext) -> dict[str, float]:
    """What a trial reserves: a trial that trains in its process holds its worker's CPUs (and GPUs);
    one that starts a Ray Train run holds none (its workers and its scoring task hold them)."""
    if not context.train_in_trial:
        return dict(TRIAL_RESOURCES)
    scaling = context.scaling
    gpus = {"gpu": scaling["gpus_per_worker"]} if scaling["use_gpu"] else {}
    return {**TRIAL_RESOURCES, "cpu": scaling["cpus_per_worker"], **gpus}


def local_trials(config: AblationConfig, fit_cfg: FitConfig, cpus: int) -> int:
    """How many trials a local Ray of ``cpus`` CPUs runs at once: ``local_concurrent_trials``,
    fewer where the cores do not give every worker of every trial at least one (or the
    ``cpus_per_worker`` asked for)."""
    per_trial = fit_cfg.scaling.num_workers * max(1, fit_cfg.scaling.cpus_per_worker)
    return max(1, min(config.local_concurrent_trials, cpus // per_trial))


def trial_order(models: Mapping[str, Mapping[str, Any]], arms: Sequence[str], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """The order the grid starts its trials in: every seed of the CNN arms first, then the other
    arms seed by seed (an interrupted grid has whole seeds of them done first). With trials side
    by side the longest first keeps the grid from ending on one long trial with the other cores
    idle: on 2 cores a CNN trial took 16-20 min, a ViT trial 5.5-10.5 (the 2450-step grid on its
    second split, 2026-12-06); list-scheduled on 2 slots (simulated), those trial times end the
    grid at 87.1 min in this order, 89.7 with one CNN trial at the head of each seed (the order
    until 2026-12-06)."""
    cnn = [arm for arm in arms if models[arm].get("preset") == "cnn"]
    others = [arm for arm in arms if arm not in cnn]
    return [{"arm": a, "seed": s} for a in cnn for s in seeds] + [{"arm": a, "seed": s} for s in seeds for a in others]


def tune_name(context: TrialContext, config: AblationConfig, concurrent: int) -> str:
    """The Tune experiment of this grid, this many trials at once and this scoring (test cases,
    evaluate settings: ``scoring_id``). A Tune experiment whose trials have all ended is restored
    with nothing to run, so a grid to be scored otherwise needs its own: with the scoring left out,
    a changed ``evaluate`` setting re-ran nothing and every later run failed ("left no result").
    A trial that trains in its process also names what it reserves (:func:`trial_resources`):
    a restored experiment keeps each trial's resources as they were."""
    grid = sorted(context.run_names[a][s] for a in config.arms for s in config.seeds)
    held = [sorted(trial_resources(context).items())] if context.train_in_trial else []
    return f"tune-{json_digest([grid, concurrent, context.scoring_id, *held], length=10)}"


def _tuner(context: TrialContext, experiment: str, config: AblationConfig, *, concurrent: int) -> Any:
    """A new Tuner over the grid, or the one of an earlier run of the same grid (and the same
    number of trials at once, which Tune keeps in its state), restored."""
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), trial_resources(context))
    name = tune_name(context, config, concurrent)
    storage_path, filesystem, path = tune_storage(experiment, name, context.storage_timeouts)
    if tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        logger.info("ablation: restoring the Tune experiment %s (unfinished and errored trials run again)", name)
        return tune.Tuner.restore(
            path, trainable=trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=filesystem
        )
    return tune.Tuner(
        trainable,
        # one grid over the trials, in the order they start (Tune orders a grid over several keys itself)
        param_space={"trial": tune.grid_search(trial_order(context.model_configs, config.arms, config.seeds))},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=filesystem, verbose=1,
            # a trial that trains in its process is restarted by Tune (from its last checkpoint) as
            # Ray Train restarts its workers (fit.max_failures)
            failure_config=tune.FailureConfig(max_failures=context.max_failures if context.train_in_trial else 0),
        ),  # fmt: skip
    )


def tune_storage(experiment: str, name: str, timeouts: Mapping[str, float] | None = None) -> tuple[str, Any | None, str]:
    """``(storage_path, storage_filesystem, experiment path)`` of the Tune experiment ``name``
    under ``experiment``: on S3 the bounded filesystem every Ray Train run here uses
    (``core.storage.train_storage``: endpoint from AWS_ENDPOINT_URL, retries, timeouts), with
    the paths it takes (no scheme); elsewhere Ray's own choice."""
    storage_path, filesystem = train_storage(experiment, timeouts)
    return storage_path, filesystem, join_url(storage_path, name)


def run_ablation(context: TrialContext, experiment: str, fit_cfg: FitConfig, config: AblationConfig) -> list[dict[str, Any]]:
    """Run (or resume) the grid; return every trial's stored result, in grid order (seed, arm).
    A grid whose every trial already stored its result (scored as this run would) trains nothing
    and starts no Ray: the results are read back as they are."""
    started_at = time.time()
    if all(_stored_result(context, arm, seed) is not None for seed in config.seeds for arm in config.arms):
        logger.info("ablation: every trial was finished by an earlier run of the ablation: nothing to train")
    else:
        _run_grid(context, experiment, fit_cfg, config)
    trials = []
    for seed in config.seeds:
        for arm in config.arms:
            document = _stored_result(context, arm, seed)
            if document is None:
                raise RuntimeError(f"ablation trial {arm}/seed {seed} left no result in {trial_dir(context, arm, seed)}")
            trials.append(document)
    ablation_tracking.adopt_earlier_trials(context.mlflow, trials, context.tags)
    earlier = sum(float(t.get("finished_unix", 0.0)) < started_at for t in trials)
    logger.info("ablation: %d trials, %d of them finished by an earlier run of the ablation", len(trials), earlier)
    return trials


def _stored_result(context: TrialContext, arm: str, seed: int) -> dict[str, Any] | None:
    """The trial's stored result when it was scored as this run scores (same test cases and
    metrics: ``scoring_id``), else None."""
    document = read_result(trial_dir(context, arm, seed))
    return document if document is not None and document.get("scoring_id") == context.scoring_id else None


def _run_grid(context: TrialContext, experiment: str, fit_cfg: FitConfig, config: AblationConfig) -> None:
    """The Tune grid on Ray (started here when no cluster is named), new or restored."""
    import ray

    for arm, model in context.model_configs.items():
        # build each arm once before Ray starts: a configuration error fails here, and the frozen
        # LLM layer is converted into the cache once instead of by every trial
        build_model(MedVisionLlamaConfig.from_params(model), device="cpu", llm_cache_dir=context.llm_cache_dir)
        logger.info("ablation arm %s: model built", arm)
    started = connect_ray(fit_cfg)
    local = not os.environ.get("RAY_ADDRESS")
    try:
        resources = dict(ray.cluster_resources())
        if local:  # the cores shared out between the trials that run at once
            concurrent = local_trials(config, fit_cfg, int(resources.get("CPU", 0)))
            resources["CPU"] = int(resources.get("CPU", 0)) // concurrent
        else:
            concurrent = config.max_concurrent_trials
        sized = size_workers(fit_cfg, resources, local=local)
        context = replace(context, scaling=asdict(sized.scaling), train_in_trial=trains_in_trial(context, config, sized, local=local))
        total = len(config.arms) * len(config.seeds)
        logger.info(
            "ablation %s: %d arms x %d seeds = %d trials, %d at a time, %d worker(s) x %d CPU each, %d test cases; %s",
            experiment, len(config.arms), len(config.seeds), total, concurrent,
            sized.scaling.num_workers, sized.scaling.cpus_per_worker, len(context.test_cases),
            "each trial trains in its Tune process" if context.train_in_trial else "each trial a Ray Train run",
        )  # fmt: skip
        grid = _tuner(context, experiment, config, concurrent=concurrent).fit()
        failed = ["{}/seed {}: {}: {}".format(*trial_of(r.config), type(r.error).__name__, r.error) for r in grid if r.error]
        if failed:
            raise RuntimeError("ablation trials failed (run the ablation again to resume them):\n" + "\n".join(failed))
    finally:
        if started:
            ray.shutdown()


def results_rows(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (arm, seed, case, class): the trial's test rows with its arm and seed."""
    return [{"arm": t["arm"], "seed": int(t["seed"]), "run_name": t["run_name"], **row} for t in trials for row in t["rows"]]


def trained_at(trials: list[dict[str, Any]], current: str) -> dict[str, Any]:
    """The git commit(s) that trained the trials (``git_commit``, comma-separated when several;
    "unrecorded" for trials stored before 2026-12-05) and the one summarising them. A rerun reuses
    the finished trials of an identical design whatever the code's commit: the report names the
    commits that trained them, not the one that read them back."""
    commits = sorted({str(t.get("trained_at_commit") or "unrecorded") for t in trials})
    if commits != [current]:
        logger.warning("ablation: the trials were trained at git commit(s) %s, not at this run's %s: the report "
                       "names theirs", ", ".join(commits), current)  # fmt: skip
    dirty = sorted({str(t.get("trained_at_dirty")) for t in trials if t.get("trained_at_dirty") is not None})
    return {"git_commit": ", ".join(commits), "git_dirty": ", ".join(dirty) or "unrecorded", "summarised_at_commit": current}


def histories(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """``{arm: {seed: {"history", "best_epoch", "best_val_dice", "test_metrics"}}}`` (no case ids)."""
    out: dict[str, Any] = {}
    for t in trials:
        out.setdefault(t["arm"], {})[str(t["seed"])] = {
            "history": t["history"], "best_epoch": t["best_epoch"], "best_val_dice": t["best_val_dice"],
            "test_metrics": t["test_metrics"], "run_name": t["run_name"], "wall_s": t.get("wall_s"),
            "train_wall_s": t.get("train_wall_s"), "score_wall_s": t.get("score_wall_s"),
            "resumed_after_epochs": t.get("resumed_after_epochs", []),
        }  # fmt: skip
    return json_safe(out)
