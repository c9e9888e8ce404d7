"""The ``fit`` node: wiring around the Ray Train driver (``mvl_pipeline.training.ray_driver``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from mvl_pipeline.ingestion.manifest import data_version
from mvl_pipeline.model import MedVisionLlamaConfig
from mvl_pipeline.training import ray_driver
from mvl_pipeline.training.config import FitConfig

logger = logging.getLogger(__name__)


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
    classes = sorted(int(v) for v in labels.values())
    model_cfg = MedVisionLlamaConfig.from_params(model_params).for_classes(classes)
    version = data_version(ingest_manifest)
    weights, state = ray_driver.fit(
        model_input_cases,
        [c for c in data_split["train"] if c in model_input_cases],
        [c for c in data_split["validation"] if c in model_input_cases],
        preprocessing_plan,
        model_cfg,
        FitConfig.from_params(fit_params),
        classes=classes,
        data_version=version,
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
        "class_names": {str(v): k for k, v in labels.items()},
        "num_workers": state["num_workers"],
    }
    logger.info("fit: best validation Dice %.3f at epoch %d", history["best_val_dice"], history["best_epoch"] + 1)
    return weights, history
