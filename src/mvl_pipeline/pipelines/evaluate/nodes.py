"""Evaluate the trained model on the fixed holdout, on the original grid, in millimetres."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mvl_pipeline.evaluation.metrics import METRICS  # noqa: E402
from mvl_pipeline.evaluation.scoring import EvaluateConfig, cases_in, score_cases  # noqa: E402
from mvl_pipeline.evaluation.summary import summarise  # noqa: E402
from mvl_pipeline.model import model_from_weights  # noqa: E402

logger = logging.getLogger(__name__)


def evaluate_holdout(
    trained_model: tuple[dict[str, Any], dict[str, Any]],
    ingested_cases: Mapping[str, Callable[[], Any]],
    data_split: Mapping[str, Any],
    preprocessing_plan: Mapping[str, Any],
    labels: Mapping[str, int],
    llm_cache_dir: str,
    params: Mapping[str, Any],
) -> tuple[pd.DataFrame, dict[str, Any], list[dict[str, Any]]]:
    """Per-case metrics, their summary, and a few slices for overlay plots."""
    config = EvaluateConfig.from_params(params)
    state, model_config = trained_model
    model = model_from_weights(state, model_config, llm_cache_dir=llm_cache_dir)
    classes = {int(v): str(k) for k, v in labels.items()}
    rows, overlays = score_cases(
        model, cases_in(ingested_cases, data_split, "test"), preprocessing_plan, classes,
        num_classes=model.cfg.num_classes, params=config, keep_overlays=config.overlay_cases,
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


def plot_learning_curves(fit_history: Mapping[str, Any]) -> plt.Figure:
    epochs = fit_history["epochs"]
    x = [e["epoch"] + 1 for e in epochs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(x, [e["train_loss"] for e in epochs], marker="o")
    left.set(xlabel="epoch", ylabel="training loss (Dice + CE)", title="Training loss")
    validated = [e for e in epochs if "val_dice" in e]  # validation runs every val_every epochs
    vx = [e["epoch"] + 1 for e in validated]
    right.plot(vx, [e["val_dice"] for e in validated], marker="o", label="mean")
    names = fit_history.get("class_names", {})
    for key in sorted(k for k in epochs[-1] if k.startswith("val_dice_")):
        label = names.get(key[9:], f"class {key[9:]}")
        right.plot(vx, [e.get(key, np.nan) for e in validated], linestyle="--", label=label)
    best = fit_history.get("best_epoch", -1)
    if best >= 0:
        right.axvline(best + 1, color="grey", linestyle=":", label="best checkpoint")
    right.set(xlabel="epoch", ylabel="validation Dice", ylim=(0, 1), title="Validation Dice")
    right.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def plot_per_case(per_case: pd.DataFrame) -> plt.Figure:
    names = sorted(per_case["class_name"].unique())
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].boxplot([per_case.loc[per_case.class_name == n, "dice"] for n in names], tick_labels=names)
    axes[0].set(ylabel="Dice", ylim=(0, 1.02), title="Holdout Dice per case")
    hd = [per_case.loc[(per_case.class_name == n) & per_case.hd95_mm.notna(), "hd95_mm"] for n in names]
    axes[1].boxplot(hd, tick_labels=names)
    axes[1].set(ylabel="HD95 (mm)", title="Holdout HD95 per case (defined cases)")
    fig.tight_layout()
    return fig


def plot_overlays(overlays: list[Mapping[str, Any]]) -> plt.Figure:
    n = max(1, len(overlays))
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 4), squeeze=False)
    for ax, item in zip(axes[0], overlays, strict=False):
        image = np.asarray(item["image"]).T  # rows = j, columns = i
        sx, sy = item["spacing"]
        extent = (0, image.shape[1] * sx, 0, image.shape[0] * sy)
        ax.imshow(image, cmap="gray", origin="lower", extent=extent, vmin=-200, vmax=300)
        ax.contour(np.asarray(item["label"]).T, levels=[0.5, 1.5], colors=["lime", "yellow"],
                   origin="lower", extent=extent, linewidths=1.0)  # fmt: skip
        ax.contour(np.asarray(item["prediction"]).T, levels=[0.5, 1.5], colors=["red", "magenta"],
                   origin="lower", extent=extent, linewidths=1.0, linestyles="--")  # fmt: skip
        ax.set_title(f"{item['case_id']}\nlabel solid, prediction dashed", fontsize=8)
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)
