"""Evaluate the trained model on the fixed holdout, on the original grid, in millimetres."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from mvl_pipeline.core.hashing import set_digest
from mvl_pipeline.evaluation.leakage import check_no_leakage, check_plan
from mvl_pipeline.evaluation.metric_names import METRICS
from mvl_pipeline.evaluation.plots import plot_learning_curves, plot_overlays, plot_per_case
from mvl_pipeline.formats.model_bundle import weights_sha256
from mvl_pipeline.preprocessing.plan import plan_classes

# torch and MONAI are imported by the node that runs, not here (see pipelines/fit/nodes.py)

logger = logging.getLogger(__name__)

# the report figures are nodes of this pipeline too (pure functions of the evaluation outputs)
__all__ = ["evaluate_holdout", "metrics_for_mlflow", "plot_learning_curves", "plot_overlays", "plot_per_case"]


def evaluate_holdout(
    trained_model: tuple[dict[str, Any], dict[str, Any]],
    ingested_cases: Mapping[str, Callable[[], Any]],
    test_split: Mapping[str, Any],
    preprocessing_plan: Mapping[str, Any],
    llm_cache_dir: str,
    params: Mapping[str, Any],
) -> tuple[pd.DataFrame, dict[str, Any], list[dict[str, Any]]]:
    """Per-case metrics, their summary, and a few slices for overlay plots."""
    from mvl_pipeline.evaluation.scoring import EvaluateConfig, cases_in, score_cases
    from mvl_pipeline.evaluation.summary import summarise
    from mvl_pipeline.model import model_from_weights

    config = EvaluateConfig.from_params(params)
    state, model_config = trained_model
    check_no_leakage(
        model_config, test_split.get("patients", {}).get("test", []), role="test", model="trained model",
        key_id=test_split.get("key_id"), cases=test_split.get("test", []),
    )  # fmt: skip
    check_plan(model_config, preprocessing_plan, model="trained model")
    model = model_from_weights(state, model_config, llm_cache_dir=llm_cache_dir)
    classes = plan_classes(preprocessing_plan)
    rows, overlays = score_cases(
        model, cases_in(ingested_cases, test_split, "test"), preprocessing_plan, classes,
        num_classes=model.cfg.num_classes, params=config, keep_overlays=config.overlay_cases,
        postprocessing=model_config.get("postprocessing"),
    )  # fmt: skip
    per_case = pd.DataFrame(rows)
    summary = {
        "role": "test",
        "n_cases": len(test_split["test"]),
        "n_patients": len({str(r.get("patient_id") or r["case_id"]) for r in rows}),  # those scored
        "test_set_hash": set_digest(test_split["test"]),
        "weights_sha256": weights_sha256(state),
        "plan_id": preprocessing_plan.get("plan_id"),
        "nsd_tolerance_mm": config.nsd_tolerance_mm,
        "classes": summarise(rows, seed=config.bootstrap_seed),
    }
    # The headline: Dice where the label holds the class, averaged over the classes. The plain
    # per-class "dice" counts a case where label and prediction both lack the class as 1, which
    # lifts a model that misses a rare class in its few cases; kept beside it as "mean_dice_all_cases".
    present = [summary["classes"][n]["dice_label_present"]["mean"] for n in classes.values() if n in summary["classes"]]
    plain = [summary["classes"][n]["dice"]["mean"] for n in classes.values() if n in summary["classes"]]
    summary["mean_dice"] = _mean(present)
    summary["mean_dice_all_cases"] = _mean(plain)
    for name, entry in summary["classes"].items():
        logger.info(
            "test %-10s Dice where present %s (%s, %d patients; %s counting both-empty cases as 1)  HD95 %s mm "
            "(%d worst case)  NSD %s  false positives %s of %d cases without it",
            name, _num(entry["dice_label_present"]["mean"]), _ci(entry["dice_label_present"]), entry["n_patients"],
            _num(entry["dice"]["mean"]), _num(entry["hd95_mm"]["mean"], 1), entry["hd95_worst_case_cases"],
            _num(entry["nsd"]["mean"]), _num(entry["false_positive_rate"]), entry["n_cases_label_absent"],
        )  # fmt: skip
    return per_case, summary, overlays


def metrics_for_mlflow(summary: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Flat ``{name: {"value", "step"}}`` for kedro-mlflow's metrics dataset (no case ids)."""
    flat: dict[str, dict[str, float]] = {}
    for key in ("mean_dice", "mean_dice_all_cases"):
        if summary.get(key) is not None:
            flat[f"holdout.{key}"] = {"value": float(summary[key]), "step": 0}
    for name, entry in summary["classes"].items():
        for metric in (*METRICS, "dice_label_present"):
            value = entry[metric]["mean"]
            if value is not None:
                flat[f"holdout.{name}.{metric}"] = {"value": float(value), "step": 0}
        if entry.get("false_positive_rate") is not None:
            flat[f"holdout.{name}.false_positive_rate"] = {"value": float(entry["false_positive_rate"]), "step": 0}
    return flat


def _mean(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(entry: Mapping[str, Any]) -> str:
    ci = entry.get("ci95")
    return "no interval: fewer than 3 patients" if ci is None else f"95% CI {ci[0]:.3f}-{ci[1]:.3f}"
