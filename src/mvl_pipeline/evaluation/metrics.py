"""Segmentation metrics in millimetres, per case and per class, through MONAI.

Empty cases are handled explicitly instead of becoming NaN averages. For each class:

- label and prediction both empty: Dice = Jaccard = NSD = 1, HD95 = 0 (a correct "nothing here");
- exactly one of them empty: Dice = Jaccard = NSD = 0 and HD95 is *undefined* (there is no
  surface to measure from). It is recorded as ``None`` with ``status`` saying why, counted in
  the summary's ``n_undefined``, and left out of the HD95 mean rather than silently averaged.

Distances use the voxel spacing of the grid the arrays live on (anisotropic spacing included).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import (
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
    compute_surface_dice,
    get_confusion_matrix,
)
from monai.metrics.confusion_matrix import compute_confusion_matrix_metric

METRICS = ("dice", "jaccard", "precision", "recall", "specificity", "accuracy", "hd95_mm", "nsd")


def _one_hot(mask: np.ndarray) -> torch.Tensor:
    """Boolean mask (X, Y, Z) -> MONAI's (B=1, C=2, X, Y, Z) layout (background, class)."""
    tensor = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))
    return torch.stack([1.0 - tensor, tensor])[None]


def class_metrics(
    prediction: np.ndarray,
    label: np.ndarray,
    value: int,
    *,
    spacing: Sequence[float],
    nsd_tolerance_mm: float,
) -> dict[str, Any]:
    """All metrics for one class of one case (integer label arrays on the same grid)."""
    pred = prediction == value
    true = label == value
    n_pred, n_true = int(pred.sum()), int(true.sum())
    y_pred, y = _one_hot(pred), _one_hot(true)
    confusion = get_confusion_matrix(y_pred, y, include_background=False)
    specificity = float(compute_confusion_matrix_metric("specificity", confusion).item())
    accuracy = float(compute_confusion_matrix_metric("accuracy", confusion).item())
    row: dict[str, Any] = {
        "voxels_label": n_true,
        "voxels_pred": n_pred,
        "specificity": specificity,
        "accuracy": accuracy,
    }
    if n_true == 0 and n_pred == 0:
        row.update(status="both_empty", dice=1.0, jaccard=1.0, precision=1.0, recall=1.0, hd95_mm=0.0, nsd=1.0)
        return row
    if n_true == 0 or n_pred == 0:
        row.update(
            status="label_empty" if n_true == 0 else "prediction_empty",
            dice=0.0,
            jaccard=0.0,
            precision=0.0 if n_pred else None,
            recall=0.0 if n_true else None,
            hd95_mm=None,
            nsd=0.0,
        )
        return row
    spacing_list = [float(s) for s in spacing]
    row.update(
        status="ok",
        dice=float(compute_dice(y_pred, y, include_background=False).item()),
        jaccard=float(compute_iou(y_pred, y, include_background=False).item()),
        precision=float(compute_confusion_matrix_metric("precision", confusion).item()),
        recall=float(compute_confusion_matrix_metric("sensitivity", confusion).item()),
        hd95_mm=float(
            compute_hausdorff_distance(y_pred, y, include_background=False, percentile=95, spacing=spacing_list).item()
        ),
        nsd=float(
            compute_surface_dice(
                y_pred, y, class_thresholds=[float(nsd_tolerance_mm)], include_background=False, spacing=spacing_list
            ).item()
        ),
    )
    return row


def case_metrics(
    prediction: np.ndarray,
    label: np.ndarray,
    classes: Mapping[int, str],
    *,
    spacing: Sequence[float],
    nsd_tolerance_mm: float,
) -> list[dict[str, Any]]:
    if prediction.shape != label.shape:
        raise ValueError(f"prediction {prediction.shape} and label {label.shape} are not on one grid")
    return [
        {"class_value": int(value), "class_name": name,
         **class_metrics(prediction, label, int(value), spacing=spacing, nsd_tolerance_mm=nsd_tolerance_mm)}
        for value, name in sorted(classes.items())
    ]  # fmt: skip


def bootstrap_ci(values: Sequence[float], *, n_resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return (math.nan, math.nan)
    if data.size == 1:
        return (float(data[0]), float(data[0]))
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(n_resamples, data.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return (float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))


def summarise(rows: Sequence[Mapping[str, Any]], *, seed: int = 0) -> dict[str, Any]:
    """Per class and metric: mean, std, median, 95% bootstrap CI, n and n_undefined."""
    summary: dict[str, Any] = {}
    for name in sorted({r["class_name"] for r in rows}):
        class_rows = [r for r in rows if r["class_name"] == name]
        entry: dict[str, Any] = {"n_cases": len(class_rows),
                                 "status": {s: sum(r["status"] == s for r in class_rows)
                                            for s in sorted({r["status"] for r in class_rows})}}  # fmt: skip
        for metric in METRICS:
            defined = [float(r[metric]) for r in class_rows if r.get(metric) is not None]
            low, high = bootstrap_ci(defined, seed=seed)
            entry[metric] = {
                "mean": float(np.mean(defined)) if defined else None,
                "std": float(np.std(defined, ddof=1)) if len(defined) > 1 else (0.0 if defined else None),
                "median": float(np.median(defined)) if defined else None,
                "ci95": [None if math.isnan(low) else low, None if math.isnan(high) else high],
                "n": len(defined),
                "n_undefined": len(class_rows) - len(defined),
            }
        # Dice over the cases where the class is present in the label: the honest figure for
        # lesions, which "both empty" cases would otherwise inflate.
        present = [float(r["dice"]) for r in class_rows if r["voxels_label"] > 0]
        low, high = bootstrap_ci(present, seed=seed)
        entry["dice_label_present"] = {
            "mean": float(np.mean(present)) if present else None,
            "ci95": [None if math.isnan(low) else low, None if math.isnan(high) else high],
            "n": len(present),
        }
        summary[name] = entry
    return summary
