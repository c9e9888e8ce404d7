"""Summaries of per-case metric rows: means with confidence intervals over PATIENTS.

Cases of one patient (follow-ups) are not independent: every interval resamples patients, not
cases. A metric's values are first averaged per patient; the mean of those patient means is the
figure, and its 95% interval is scipy's BCa bootstrap over patients (the percentile method
under-covers with few patients; BCa corrects bias and skew; where BCa is undefined, the
percentile interval, and ``ci_method`` says which). With fewer than three patients no
interval is given (``ci95: null``, ``ci_method`` says why): an interval of zero width at n = 1
would claim a certainty that is not there.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from mvl_pipeline.evaluation.metric_names import METRICS

MIN_PATIENTS_FOR_CI = 3
#: Summarised over the cases whose label holds the class only: where neither label nor prediction
#: holds it they score as perfect (HD95 0 mm, NSD 1 ...), which lifts a model that misses a rare
#: class in its few cases. A prediction where the label lacks the class is the false-positive rate.
#: "dice" keeps every case (its where-present figure is ``dice_label_present``); specificity and
#: accuracy count true negatives, so every case too.
LABEL_PRESENT_METRICS = frozenset({"jaccard", "precision", "recall", "hd95_mm", "nsd"})


def patient_means(values: Sequence[float], patients: Sequence[str]) -> np.ndarray:
    """The mean of ``values`` per patient (in patient order)."""
    grouped: dict[str, list[float]] = {}
    for value, patient in zip(values, patients, strict=True):
        grouped.setdefault(str(patient), []).append(float(value))
    return np.array([np.mean(grouped[p]) for p in sorted(grouped)], dtype=np.float64)


class Interval(tuple):
    """``(low, high)``, with ``method``: the bootstrap the interval came from ("BCa", or
    "percentile" where BCa is undefined), so that a report names the one it used."""

    method: str

    def __new__(cls, low: float, high: float, method: str) -> Interval:
        interval = super().__new__(cls, (low, high))
        interval.method = method
        return interval

    def __getnewargs__(self) -> tuple[float, float, str]:  # pickle and deepcopy pass all three
        return (self[0], self[1], self.method)

    def describe(self) -> str:
        """The method in words, for a report's ``ci_method``."""
        return f"{self.method} bootstrap over patients" if self.method in ("BCa", "percentile") else self.method


def bootstrap_ci(
    values: Sequence[float], *, n_resamples: int = 5000, seed: int = 0, level: float = 0.95
) -> Interval | None:
    """BCa bootstrap interval of the mean of ``values`` (one value per independent unit); None
    for fewer than :data:`MIN_PATIENTS_FOR_CI` values. Where BCa is undefined (a skewed tiny
    sample) the percentile interval, and ``method`` says so."""
    data = np.asarray(values, dtype=np.float64)
    if data.size < MIN_PATIENTS_FOR_CI:
        return None
    if np.allclose(data, data[0]):
        return Interval(float(data[0]), float(data[0]), "none (all values equal)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BCa warns on near-degenerate data; the fallback follows
        result = stats.bootstrap(
            (data,), np.mean, n_resamples=n_resamples, confidence_level=level, method="BCa",
            random_state=np.random.default_rng(seed),
        )  # fmt: skip
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    if not (math.isnan(low) or math.isnan(high)):
        return Interval(low, high, "BCa")
    with warnings.catch_warnings():  # BCa undefined (e.g. a skewed tiny sample)
        warnings.simplefilter("ignore")
        result = stats.bootstrap(
            (data,), np.mean, n_resamples=n_resamples, confidence_level=level, method="percentile",
            random_state=np.random.default_rng(seed),
        )  # fmt: skip
    return Interval(float(result.confidence_interval.low), float(result.confidence_interval.high), "percentile")


def describe(values: Sequence[float], patients: Sequence[str], *, seed: int = 0) -> dict[str, Any]:
    """Mean over patients, its BCa interval over patients, and the counts behind them."""
    if not values:
        return {"mean": None, "std": None, "median": None, "ci95": None, "n": 0, "n_patients": 0, "ci_method": None}
    means = patient_means(values, patients)
    interval = bootstrap_ci(means, seed=seed)
    return {
        "mean": float(means.mean()),
        "std": float(means.std(ddof=1)) if means.size > 1 else None,
        "median": float(np.median(means)),
        "ci95": None if interval is None else [interval[0], interval[1]],
        "n": len(values),
        "n_patients": int(means.size),
        "ci_method": f"none (fewer than {MIN_PATIENTS_FOR_CI} patients)" if interval is None else interval.describe(),
    }


def summarise(rows: Sequence[Mapping[str, Any]], *, seed: int = 0) -> dict[str, Any]:
    """Per class and metric: mean over patients with its interval, median, n (cases), n_patients
    (:data:`LABEL_PRESENT_METRICS` over the cases whose label holds the class; ``cases`` says which);
    plus "Dice where present" (cases whose label holds the class), the detection rate, the
    false-positive rate (cases whose label lacks the class and whose prediction has it) and the
    worst-case HD95 count. A row's patient is ``patient_id`` (else its case is its own patient)."""
    summary: dict[str, Any] = {}
    for name in sorted({r["class_name"] for r in rows}):
        class_rows = [r for r in rows if r["class_name"] == name]
        patients = [str(r.get("patient_id") or r["case_id"]) for r in class_rows]
        entry: dict[str, Any] = {
            "n_cases": len(class_rows),
            "n_patients": len(set(patients)),
            "status": {s: sum(r["status"] == s for r in class_rows) for s in sorted({r["status"] for r in class_rows})},
        }
        for metric in METRICS:
            counted = [(r, p) for r, p in zip(class_rows, patients, strict=True)
                       if metric not in LABEL_PRESENT_METRICS or r["voxels_label"] > 0]  # fmt: skip
            defined = [(float(r[metric]), p) for r, p in counted if r.get(metric) is not None]
            entry[metric] = describe([v for v, _ in defined], [p for _, p in defined], seed=seed)
            entry[metric]["n_undefined"] = len(counted) - len(defined)
            entry[metric]["cases"] = "label holds the class" if metric in LABEL_PRESENT_METRICS else "all"
        present = [(float(r["dice"]), p) for r, p in zip(class_rows, patients, strict=True) if r["voxels_label"] > 0]
        entry["dice_label_present"] = describe([v for v, _ in present], [p for _, p in present], seed=seed)
        with_label = [r for r in class_rows if r["voxels_label"] > 0]
        entry["detection_rate"] = (
            None if not with_label else float(np.mean([bool(r.get("detected", r["voxels_pred"] > 0)) for r in with_label]))
        )
        without_label = [r for r in class_rows if r["voxels_label"] == 0]
        # cases whose label lacks the class: the share where the model calls it anyway (a both-empty
        # case scores Dice 1 in the plain mean, so that mean cannot see these false positives)
        entry["false_positive_rate"] = (
            None if not without_label else float(np.mean([r["voxels_pred"] > 0 for r in without_label]))
        )
        entry["n_cases_label_absent"] = len(without_label)
        # among the cases the HD95 figure is over (a prediction of a class the label lacks is a false positive)
        entry["hd95_worst_case_cases"] = int(sum(bool(r.get("hd95_worst_case")) for r in with_label))
        summary[name] = entry
    return summary


def wilcoxon_p(differences: Sequence[float], alternative: str = "two-sided") -> float | None:
    """Wilcoxon signed-rank p-value (scipy; two-sided, or ``alternative`` "greater"/"less"), zero differences dropped; exact for up to
    50 pairs without ties, else the normal approximation with tie correction (as R's
    ``wilcox.test``: scipy's own choice for ties is a slow permutation test). 1.0 when every
    difference is 0, None without any pair."""
    diffs = np.asarray(differences, dtype=np.float64)
    if diffs.size == 0:
        return None
    kept = diffs[diffs != 0]
    if kept.size == 0:
        return 1.0
    exact = kept.size <= 50 and np.unique(np.abs(kept)).size == kept.size
    return float(stats.wilcoxon(kept, zero_method="wilcox", alternative=alternative,
                                method="exact" if exact else "asymptotic").pvalue)
