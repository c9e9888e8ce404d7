"""Summaries of per-case metric rows: mean, spread and bootstrap confidence intervals per class."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mvl_pipeline.evaluation.metrics import METRICS


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
