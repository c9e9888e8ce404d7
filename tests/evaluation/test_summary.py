"""Summaries over PATIENTS on hand-built rows whose answers are known: no interval below three
patients, follow-ups of one patient count once, and the interval resamples patients, not cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from mvl_pipeline.evaluation.summary import (
    MIN_PATIENTS_FOR_CI,
    bootstrap_ci,
    describe,
    patient_means,
    summarise,
)


def row(case_id: str, patient_id: str, dice: float, *, label: int = 100) -> dict:
    """One organ row of one case, as ``case_metrics`` writes it (a case with the class present)."""
    return {
        "case_id": case_id, "patient_id": patient_id, "class_value": 1, "class_name": "organ",
        "voxels_label": label, "voxels_pred": 100, "status": "ok", "dice": dice, "jaccard": dice / (2 - dice),
        "precision": dice, "recall": dice, "specificity": 1.0, "accuracy": 1.0, "hd95_mm": 2.0, "nsd": dice,
        "detected": True, "hd95_worst_case": False,
    }  # fmt: skip


@pytest.mark.parametrize("n", [1, 2])
def test_below_three_patients_there_is_no_interval(n):
    """The defect: at n = 1 the "CI" was [x, x], a certainty of zero width."""
    rows = [row(f"c{k}", f"p{k}", 0.5 + 0.1 * k) for k in range(n)]
    dice = summarise(rows)["organ"]["dice"]
    assert dice["ci95"] is None
    assert dice["n"] == n and dice["n_patients"] == n
    assert "fewer than 3 patients" in dice["ci_method"]
    assert dice["mean"] == pytest.approx(np.mean([0.5 + 0.1 * k for k in range(n)]))
    assert bootstrap_ci([0.5 + 0.1 * k for k in range(n)]) is None


def test_from_three_patients_there_is_a_bca_interval_around_the_mean():
    rows = [row(f"c{k}", f"p{k}", d) for k, d in enumerate([0.55, 0.7, 0.8, 0.62])]
    dice = summarise(rows)["organ"]["dice"]
    assert MIN_PATIENTS_FOR_CI == 3
    assert dice["ci_method"] == "BCa bootstrap over patients"
    low, high = dice["ci95"]
    assert low < dice["mean"] < high and high - low > 0


def test_follow_ups_of_one_patient_are_one_patient():
    """Two studies of one patient are not two independent observations: n_patients 1, no interval."""
    rows = [row("c1", "p1", 0.6), row("c2", "p1", 0.8)]
    dice = summarise(rows)["organ"]
    assert dice["n_cases"] == 2 and dice["n_patients"] == 1
    assert dice["dice"]["n"] == 2 and dice["dice"]["n_patients"] == 1
    assert dice["dice"]["ci95"] is None
    assert dice["dice"]["mean"] == pytest.approx(0.7)


def test_the_mean_weighs_patients_not_cases():
    """Patient A has 6 follow-ups at 0.9, B and C one case each at 0.3: the figure is the mean of
    the three patients (0.5), not of the eight cases (0.75)."""
    rows = [row(f"a{k}", "A", 0.9) for k in range(6)] + [row("b", "B", 0.3), row("c", "C", 0.3)]
    dice = summarise(rows)["organ"]["dice"]
    assert dice["mean"] == pytest.approx(0.5)
    assert dice["n"] == 8 and dice["n_patients"] == 3
    assert list(patient_means([r["dice"] for r in rows], [r["patient_id"] for r in rows])) == pytest.approx([0.9, 0.3, 0.3])


def test_the_interval_resamples_patients_not_cases():
    """Ten follow-ups each of two patients who do well, single cases of three who do badly: the
    30-odd cases look like a tight sample, the five patients are not. A case bootstrap gives a
    narrow interval around the case mean; the patient bootstrap (what is reported) a wide one
    around the patient mean."""
    good = [(f"{p}{k}", p, 0.85 + 0.01 * (k % 3)) for p in ("A", "B") for k in range(10)]
    bad = [("c", "C", 0.35), ("d", "D", 0.45), ("e", "E", 0.4)]
    rows = [row(c, p, d) for c, p, d in good + bad]
    dice = summarise(rows)["organ"]["dice"]
    values, patients = [r["dice"] for r in rows], [r["patient_id"] for r in rows]

    by_patient = bootstrap_ci(patient_means(values, patients))
    by_case = bootstrap_ci(values)
    assert dice["ci95"] == pytest.approx(list(by_patient))
    assert dice["mean"] == pytest.approx(np.mean(patient_means(values, patients)))
    # what the reported interval would be if it resampled cases: a different, much narrower one
    assert (by_patient[1] - by_patient[0]) > 2 * (by_case[1] - by_case[0])
    assert by_case[0] > dice["mean"]  # the case interval would not even contain the patient mean


def test_bca_interval_matches_scipy_and_differs_from_the_percentile_method_on_skewed_data():
    data = np.array([0.91, 0.9, 0.88, 0.93, 0.89, 0.2])  # one failure among six patients
    low, high = bootstrap_ci(data, n_resamples=4000, seed=3)
    reference = stats.bootstrap((data,), np.mean, n_resamples=4000, method="BCa",
                                random_state=np.random.default_rng(3)).confidence_interval  # fmt: skip
    assert (low, high) == pytest.approx((reference.low, reference.high))
    percentile = stats.bootstrap((data,), np.mean, n_resamples=4000, method="percentile",
                                 random_state=np.random.default_rng(3)).confidence_interval  # fmt: skip
    assert low < percentile.low  # BCa reaches further towards the failure than the percentile method


def test_bootstrap_ci_brackets_the_mean_of_independent_values():
    values = np.random.default_rng(0).normal(0.8, 0.05, size=40)
    low, high = bootstrap_ci(values, seed=1)
    assert low < values.mean() < high
    assert high - low < 0.05


def test_describe_of_nothing_is_explicit():
    assert describe([], []) == {"mean": None, "std": None, "median": None, "ci95": None, "n": 0, "n_patients": 0,
                                "ci_method": None}  # fmt: skip


def test_false_positives_and_misses_in_a_rare_class_are_seen_beside_the_plain_mean():
    """One lesion in ten cases, missed, and one healthy case where a lesion is called: the plain
    mean (a both-empty case scores 1) says 0.8; Dice where present says 0, the false-positive rate
    1 in 9 (an audit, 2026-12-04: the headline used the plain mean)."""

    def lesion(case: int, *, label: int, pred: int, dice: float) -> dict:
        return row(f"case-{case}", f"p{case}", dice, label=label) | {"class_name": "lesion", "voxels_pred": pred}

    rows = [lesion(0, label=50, pred=0, dice=0.0), lesion(1, label=0, pred=40, dice=0.0)]
    rows += [lesion(k, label=0, pred=0, dice=1.0) for k in range(2, 10)]
    entry = summarise(rows)["lesion"]
    assert entry["dice"]["mean"] == pytest.approx(0.8)
    assert entry["dice_label_present"]["mean"] == 0.0
    assert entry["false_positive_rate"] == pytest.approx(1 / 9)
    assert entry["n_cases_label_absent"] == 9
    assert summarise([row("c", "p", 0.9)])["organ"]["false_positive_rate"] is None  # never absent: no figure


def test_an_interval_names_the_bootstrap_it_came_from(monkeypatch):
    """BCa falls back to the percentile interval where it is undefined; the summary said "BCa"
    all the same (an audit, 2026-12-07). It now names the method used."""
    from mvl_pipeline.evaluation import summary as module

    values, patients = [0.7, 0.8, 0.9, 0.85], ["a", "b", "c", "d"]
    assert module.describe(values, patients)["ci_method"] == "BCa bootstrap over patients"
    real = stats.bootstrap

    def bca_undefined(data, statistic, **kwargs):
        result = real(data, statistic, **kwargs)
        if kwargs["method"] == "BCa":  # as scipy gives it for some tiny skewed samples
            result.confidence_interval = type(result.confidence_interval)(float("nan"), float("nan"))
        return result

    monkeypatch.setattr(module.stats, "bootstrap", bca_undefined)
    described = module.describe(values, patients)
    assert described["ci_method"] == "percentile bootstrap over patients"
    low, high = described["ci95"]
    assert low <= 0.8125 <= high
    assert module.bootstrap_ci([1.0, 2.0, 4.0]).method == "percentile"
