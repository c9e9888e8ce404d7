"""The ``fit`` node: wiring around the Ray Train driver (``mvl_pipeline.training.ray_driver``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from mvl_pipeline.evaluation.leakage import PLAN_KEY, RECORD_KEY, development_record
from mvl_pipeline.formats.model_bundle import weights_sha256
from mvl_pipeline.ingestion.manifest import data_version
from mvl_pipeline.preprocessing.plan import plan_classes

# torch, MONAI and Ray are imported by the node that runs, not here: building every pipeline
# (`kedro viz`, the `train` pipeline before its first node) then imports none of them
# (all pipelines 14 s -> 4 s on 2 cores; tests/test_pipeline_imports.py)
if TYPE_CHECKING:
    from mvl_pipeline.model import MedVisionLlamaConfig
    from mvl_pipeline.training.ray_driver import InitWeights

logger = logging.getLogger(__name__)


def fit_model(
    model_input_cases: Mapping[str, Callable[[], Any]],
    development_split: Mapping[str, Any],
    preprocessing_plan: Mapping[str, Any],
    ingest_manifest: Mapping[str, Any],
    registry_before: Any,
    model_params: Mapping[str, Any],
    fit_params: Mapping[str, Any],
) -> tuple[tuple[dict[str, Any], dict[str, Any]], dict[str, Any]]:
    """Train on Ray; return the best model (weights + config) and the training history."""
    from mvl_pipeline.model import MedVisionLlamaConfig
    from mvl_pipeline.training import ray_driver
    from mvl_pipeline.training.config import FitConfig

    names = plan_classes(preprocessing_plan)
    classes = sorted(names)
    model_cfg = MedVisionLlamaConfig.from_params(model_params).for_plan(preprocessing_plan)
    version = data_version(ingest_manifest)
    fit_cfg = FitConfig.from_params(fit_params)
    start = champion_start(registry_before, model_cfg, preprocessing_plan) if fit_cfg.init == "champion" else None
    weights, state = ray_driver.fit(
        model_input_cases,
        [c for c in development_split["train"] if c in model_input_cases],
        [c for c in development_split["validation"] if c in model_input_cases],
        preprocessing_plan,
        model_cfg,
        fit_cfg,
        classes=classes,
        data_version=version,
        init=start,
    )
    history = {
        "run_name": state["run_name"],
        "data_version": version,
        "plan_id": preprocessing_plan.get("plan_id"),
        "best_epoch": state["best_epoch"],
        "best_val_dice": state["best_val_dice"],
        "epochs": state["history"],
        "resumed_after_epochs": state.get("resumed_after_epochs", []),
        "global_step": state.get("global_step"),
        "loop_started_unix": state.get("loop_started_unix"),
        "classes": classes,
        "class_names": {str(v): name for v, name in names.items()},
        "num_workers": state["num_workers"],
        "init": state["init"],
        "weights_sha256": weights_sha256(weights[0]),  # which weights this history is of (register checks)
    }
    logger.info("fit: best validation Dice %.3f at epoch %d", history["best_val_dice"], history["best_epoch"] + 1)
    return weights, history


def plan_geometry(plan: Mapping[str, Any]) -> dict[str, Any]:
    """What a model's weights are tied to in a plan: grid, crop, tokens, orientation, labels and
    channels, and each channel's normalisation scheme. Not the intensity statistics (a grown CT
    drop moves its pooled percentiles a little at every retrain) nor the plan's id and provenance."""
    geometry = {k: v for k, v in plan.items() if k not in ("plan_id", "provenance", "normalization")}
    geometry["normalization"] = {m: (n or {}).get("scheme") for m, n in (plan.get("normalization") or {}).items()}
    return geometry


def champion_start(registry: Any, model_cfg: MedVisionLlamaConfig, plan: Mapping[str, Any]) -> InitWeights | None:
    """The champion's weights to start from, or None (scratch) with the reason logged: no
    champion, or a plan of another geometry (``ray_driver.fit`` checks the architecture)."""
    champion = getattr(registry, "champion", None)
    if champion is None:
        logger.info("fit.init champion: no champion registered yet: training from scratch")
        return None
    (state, config), champion_plan = champion.load_bundle()
    ours, theirs = plan_geometry(plan), plan_geometry(champion_plan)
    differ = sorted(k for k in {*ours, *theirs} if ours.get(k) != theirs.get(k))
    if differ:
        logger.warning("fit.init champion: version %s was trained on plan %s, this run's plan %s differs in %s: "
                       "training from scratch", champion.version, champion_plan.get("plan_id"), plan.get("plan_id"),
                       ", ".join(differ))  # fmt: skip
        return None
    sha256 = weights_sha256(state)
    logger.info("fit.init champion: starting from version %s (weights %s)", champion.version, sha256[:12])
    llm = (config.get("llm_reference") or {}).get("sha256")
    from mvl_pipeline.training.ray_driver import InitWeights

    return InitWeights(version=str(champion.version), sha256=sha256, state=state, llm_sha256=llm)


def decide_postprocessing(
    fitted_model: tuple[dict[str, Any], dict[str, Any]],
    ingested_cases: Mapping[str, Callable[[], Any]],
    development_split: Mapping[str, Any],
    preprocessing_plan: Mapping[str, Any],
    llm_cache_dir: str,
    evaluate_params: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trained model with its post-processing decision (nnU-Net: keep the largest component
    of a class only where that raised validation Dice), decided on the validation cases."""
    from mvl_pipeline.evaluation.scoring import EvaluateConfig, cases_in, decide_postprocessing_on
    from mvl_pipeline.model import model_from_weights

    state, config = fitted_model
    model = model_from_weights(state, config, llm_cache_dir=llm_cache_dir)
    decision = decide_postprocessing_on(
        model, cases_in(ingested_cases, development_split, "validation"), preprocessing_plan,
        plan_classes(preprocessing_plan), params=EvaluateConfig.from_params(evaluate_params),
    )  # fmt: skip
    development = [p for role in ("train", "validation") for p in development_split.get("patients", {}).get(role, [])]
    record = development_record(
        development, salt=weights_sha256(state)[:32], key_id=development_split.get("key_id"),
        cases=[c for role in ("train", "validation") for c in development_split.get(role, [])],
    )  # fmt: skip
    return state, {**config, "postprocessing": decision, RECORD_KEY: record, PLAN_KEY: preprocessing_plan.get("plan_id")}
