"""Evaluate the trained model on the fixed holdout, on the original grid, in millimetres."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from mvl_pipeline.evaluation.metrics import METRICS
from mvl_pipeline.evaluation.plots import plot_learning_curves, plot_overlays, plot_per_case
from mvl_pipeline.evaluation.scoring import EvaluateConfig, cases_in, score_cases
from mvl_pipeline.evaluation.summary import summarise
from mvl_pipeline.model import model_from_weights
from mvl_pipeline.preprocessing.plan import plan_classes

logger = logging.getLogger(__name__)

# the report figures are nodes of this pipeline too (pure functions of the evaluation outputs)
__all__ = ["evaluate_holdout", "metrics_for_mlflow", "plot_learning_curves", "plot_overlays", "plot_per_case"]


def evaluate_holdout(
    trained_model: tuple[dict[str, Any], dict[str, Any]],
    ingested_cases: Mapping[str, Callable[[], Any]],
    data_split: Mapping[str, Any],
    preprocessing_plan: Mapping[str, Any],
    llm_cache_dir: str,
    params: Mapping[str, Any],
) -> tuple[pd.DataFrame, dict[str, Any], list[dict[str, Any]]]:
    """Per-case metrics, their summary, and a few slices for overlay plots."""
    config = EvaluateConfig.from_params(params)
    state, model_config = trained_model
    model = model_from_weights(state, model_config, llm_cache_dir=llm_cache_dir)
    classes = plan_classes(preprocessing_plan)
    rows, overlays = score_cases(
        model, cases_in(ingested_cases, data_split, "test"), preprocessing_plan, classes,
        num_classes=model.cfg.num_classes, params=config, keep_overlays=config.overlay_cases,
        postprocessing=model_config.get("postprocessing"),
    )  # fmt: skip
    per_case = pd.DataFrame(rows)
    summary = {
        "n_holdout_cases": len(data_split["test"]),
        "plan_id": preprocessing_plan.get("plan_id"),
        "nsd_tolerance_mm": config.nsd_tolerance_mm,
        "classes": summarise(rows, seed=config.bootstrap_seed),
    }
    means = [summary["classes"][n]["dice"]["mean"] for n in classes.values() if n in summary["classes"]]
    summary["mean_dice"] = float(np.mean([m for m in means if m is not None])) if means else None
    for name, entry in summary["classes"].items():
        logger.info(
            "holdout %-8s Dice %.3f (95%% CI %.3f-%.3f; %.3f where present, n=%d)  HD95 %s mm  NSD %.3f",
            name, entry["dice"]["mean"], *entry["dice"]["ci95"],
            _or_nan(entry["dice_label_present"]["mean"]), entry["dice_label_present"]["n"],
            "n/a" if entry["hd95_mm"]["mean"] is None else f"{entry['hd95_mm']['mean']:.1f}",
            entry["nsd"]["mean"],
        )  # fmt: skip
    return per_case, summary, overlays


def metrics_for_mlflow(summary: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Flat ``{name: {"value", "step"}}`` for kedro-mlflow's metrics dataset (no case ids)."""
    flat: dict[str, dict[str, float]] = {}
    if summary.get("mean_dice") is not None:
        flat["holdout.mean_dice"] = {"value": float(summary["mean_dice"]), "step": 0}
    for name, entry in summary["classes"].items():
        for metric in (*METRICS, "dice_label_present"):
            value = entry[metric]["mean"]
            if value is not None:
                flat[f"holdout.{name}.{metric}"] = {"value": float(value), "step": 0}
    return flat


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)
