"""Report figures of a model's evaluation: learning curves, per-case box plots, overlays."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


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
        vmin, vmax = item.get("window", (float(np.percentile(image, 1)), float(np.percentile(image, 99))))
        ax.imshow(image, cmap="gray", origin="lower", extent=extent, vmin=vmin, vmax=vmax)
        ax.contour(np.asarray(item["label"]).T, levels=[0.5, 1.5], colors=["lime", "yellow"],
                   origin="lower", extent=extent, linewidths=1.0)  # fmt: skip
        ax.contour(np.asarray(item["prediction"]).T, levels=[0.5, 1.5], colors=["red", "magenta"],
                   origin="lower", extent=extent, linewidths=1.0, linestyles="--")  # fmt: skip
        ax.set_title(f"{item['case_id']}\nlabel solid, prediction dashed", fontsize=8)
        ax.set_axis_off()
    fig.tight_layout()
    return fig
