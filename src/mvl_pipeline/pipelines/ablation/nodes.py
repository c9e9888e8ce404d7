"""The ``ablation`` nodes: a thin driver around the Tune grid (``training.tune_driver``), the
statistics (``evaluation.ablation``) and the report (``evaluation.ablation_report``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd

from mvl_pipeline.evaluation import ablation
from mvl_pipeline.evaluation.ablation_report import forest_plot, learning_curves, render_report
from mvl_pipeline.ingestion.manifest import data_version
from mvl_pipeline.training.ablation_config import AblationConfig

# torch, MONAI and Ray are imported by the node that runs, not here (see pipelines/fit/nodes.py)

logger = logging.getLogger(__name__)

# the figures are nodes too (pure functions of the summary and the histories)
__all__ = ["ablation_metrics", "forest_plot", "learning_curves", "render_report", "run_ablation", "summarise_ablation"]


def run_ablation(
    model_input_cases: Mapping[str, Callable[[], Any]],
    ingested_cases: Mapping[str, Callable[[], Any]],
    development_split: Mapping[str, Any],
    test_split: Mapping[str, Any],
    preprocessing_plan: Mapping[str, Any],
    ingest_manifest: Mapping[str, Any],
    lineage: Mapping[str, Any],
    model_params: Mapping[str, Any],
    fit_params: Mapping[str, Any],
    evaluate_params: Mapping[str, Any],
    ablation_params: Mapping[str, Any],
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Train and score the grid (resuming an interrupted one); return one row per (arm, seed,
    case, class) and the trials' histories with the design they ran under."""
    from mvl_pipeline.evaluation.scoring import EvaluateConfig
    from mvl_pipeline.training import tune_driver
    from mvl_pipeline.training.config import FitConfig

    config = AblationConfig.from_params(ablation_params)
    fit_cfg = FitConfig.from_params(fit_params)
    context, experiment = tune_driver.build_context(
        model_input_cases=model_input_cases, ingested_cases=ingested_cases, development_split=development_split,
        test_split=test_split, preprocessing_plan=preprocessing_plan, data_version=data_version(ingest_manifest),
        lineage=lineage, model_params=model_params, fit_cfg=fit_cfg,
        evaluate_cfg=EvaluateConfig.from_params(evaluate_params), config=config,
    )  # fmt: skip
    trials = tune_driver.run_ablation(context, experiment, fit_cfg, config)
    design = {
        "experiment": context.tags["ablation"],
        "data_version": context.tags["data_version"],
        "plan_id": context.tags["plan_id"],
        **tune_driver.trained_at(trials, context.tags["git_commit"]),
        "arms": list(config.arms),
        "seeds": list(config.seeds),
        "reference": config.reference,
        "trial": config.trial.to_dict(),
        "crop_size": list(context.plan["patch_size"]),
        "n_train_cases": len(context.train_ids),
        "n_validation_cases": len(context.val_ids),
    }
    return pd.DataFrame(tune_driver.results_rows(trials)), {"design": design, "arms": tune_driver.histories(trials)}


def summarise_ablation(
    ablation_results: pd.DataFrame, ablation_histories: Mapping[str, Any], ablation_params: Mapping[str, Any]
) -> dict[str, Any]:
    """The pre-registered statistics of the results, with the design and the training curves' plateau."""
    config = AblationConfig.from_params(ablation_params)
    design = dict(ablation_histories["design"])
    if list(design["arms"]) != list(config.arms) or list(design["seeds"]) != list(config.seeds):
        raise ValueError("the ablation results were made for other arms or seeds than params:ablation names")
    stats = ablation.summarise_ablation(
        ablation_results, arms=config.arms, seeds=config.seeds, reference=config.reference, plan=config.statistics
    )
    design |= {
        "statistics": config.statistics.to_dict(),
        "n_test_cases": int(ablation_results["case_id"].nunique()),
        "n_test_patients": int(ablation_results["patient_id"].nunique()),
    }
    trials = ablation_histories["arms"]
    training = {
        arm: {str(seed): {"best_val_dice": trials[arm][str(seed)]["best_val_dice"],
                          "plateau": ablation.plateau(trials[arm][str(seed)]["history"]),
                          # steps the loop skipped for a non-finite gradient (then arms differ in steps)
                          "skipped_steps": sum(int(h.get("skipped_steps", 0)) for h in trials[arm][str(seed)]["history"])}
              for seed in config.seeds}
        for arm in config.arms
    }  # fmt: skip
    summary = ablation.json_safe({"design": design, **stats, "training": training})
    primary = config.statistics.primary_endpoint
    for arm, entry in summary["comparisons"][primary].items():
        logger.info("ablation %s vs %s: %s %+.4f (CI %s), Holm p %s -> %s", arm, config.reference, primary,
                    entry["mean_difference"] or 0.0, entry["ci"], entry["p_adjusted"], entry["verdict"])  # fmt: skip
    return summary


def ablation_metrics(ablation_summary: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Flat ``{name: {"value", "step"}}`` for the parent MLflow run (arm names and figures only;
    kedro-mlflow prefixes the dataset name: ``ablation_metrics.<arm>.dice``)."""
    flat: dict[str, dict[str, float]] = {}
    for arm, endpoints in ablation_summary["arms"].items():
        for metric, entry in endpoints.items():
            if entry["mean"] is not None:
                flat[f"{arm}.{metric}"] = {"value": float(entry["mean"]), "step": 0}
    for metric, family in ablation_summary["comparisons"].items():
        for arm, entry in family.items():
            for key in ("mean_difference", "p_adjusted", "minimum_detectable_difference"):
                if entry.get(key) is not None:
                    flat[f"{arm}.{metric}.{key}"] = {"value": float(entry[key]), "step": 0}
    return flat
