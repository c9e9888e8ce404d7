"""Evaluation metrics on hand-built prediction/label pairs with known values."""

import math
import warnings

import numpy as np
import pytest

from mvl_pipeline.evaluation.metrics import case_metrics, class_metrics
from mvl_pipeline.evaluation.summary import bootstrap_ci, summarise


def box(shape, lo, hi, value=1):
    array = np.zeros(shape, dtype=np.uint8)
    array[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = value
    return array


def test_dice_and_jaccard_of_half_overlapping_boxes():
    label = box((20, 20, 20), (0, 0, 0), (10, 10, 10))
    pred = box((20, 20, 20), (0, 0, 5), (10, 10, 15))  # 500 of 1000 voxels shared
    row = class_metrics(pred, label, 1, spacing=(1, 1, 1), nsd_tolerance_mm=1.0)
    assert row["dice"] == pytest.approx(0.5)
    assert row["jaccard"] == pytest.approx(1 / 3)
    assert row["precision"] == pytest.approx(0.5)
    assert row["recall"] == pytest.approx(0.5)
    assert row["status"] == "ok"


def test_monai_s_deprecation_of_an_argument_its_own_code_passes_is_not_shown_to_users():
    label = box((20, 20, 20), (0, 0, 0), (10, 10, 10))
    pred = box((20, 20, 20), (0, 0, 5), (10, 10, 15))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        row = class_metrics(pred, label, 1, spacing=(1, 1, 1), nsd_tolerance_mm=1.0)
        warnings.warn("a warning of the caller's own", UserWarning, stacklevel=1)  # others still pass
    assert row["hd95_mm"] > 0 and 0 < row["nsd"] < 1
    assert [str(w.message) for w in caught] == ["a warning of the caller's own"]


def test_hd95_is_in_millimetres_with_anisotropic_spacing():
    label = box((30, 30, 20), (5, 5, 5), (15, 15, 10))
    pred = box((30, 30, 20), (5, 5, 7), (15, 15, 12))  # shifted by 2 slices
    iso = class_metrics(pred, label, 1, spacing=(1, 1, 1), nsd_tolerance_mm=1.0)
    aniso = class_metrics(pred, label, 1, spacing=(0.5, 0.5, 4.0), nsd_tolerance_mm=1.0)
    assert iso["hd95_mm"] == pytest.approx(2.0)
    assert aniso["hd95_mm"] == pytest.approx(8.0)  # 2 slices x 4 mm


def test_surface_dice_depends_on_the_tolerance_in_mm():
    label = box((30, 30, 30), (5, 5, 5), (20, 20, 20))
    pred = box((30, 30, 30), (5, 5, 6), (20, 20, 21))  # 1 voxel shift along k
    tight = class_metrics(pred, label, 1, spacing=(1, 1, 3), nsd_tolerance_mm=1.0)
    loose = class_metrics(pred, label, 1, spacing=(1, 1, 3), nsd_tolerance_mm=3.5)
    assert loose["nsd"] == pytest.approx(1.0)
    assert tight["nsd"] < 1.0


def test_empty_cases_are_explicit_not_nan():
    empty = np.zeros((10, 10, 10), np.uint8)
    some = box((10, 10, 10), (2, 2, 2), (5, 5, 5))
    both = class_metrics(empty, empty, 1, spacing=(1, 1, 1), nsd_tolerance_mm=1.0)
    assert (both["status"], both["dice"], both["hd95_mm"], both["nsd"]) == ("both_empty", 1.0, 0.0, 1.0)
    assert both["detected"] is None and both["hd95_worst_case"] is False
    diagonal = math.sqrt(3 * 10.0**2)  # the image diagonal in mm
    missed = class_metrics(empty, some, 1, spacing=(1, 1, 1), nsd_tolerance_mm=1.0)
    assert (missed["status"], missed["dice"], missed["nsd"]) == ("prediction_empty", 0.0, 0.0)
    assert missed["hd95_mm"] == pytest.approx(diagonal) and missed["hd95_worst_case"] is True
    assert missed["detected"] is False
    invented = class_metrics(some, empty, 1, spacing=(1, 1, 1), nsd_tolerance_mm=1.0)
    assert (invented["status"], invented["dice"], invented["nsd"]) == ("label_empty", 0.0, 0.0)
    assert invented["hd95_mm"] == pytest.approx(diagonal) and invented["hd95_worst_case"] is True
    assert invented["detected"] is None  # nothing to detect
    found = class_metrics(some, some, 1, spacing=(1, 1, 1), nsd_tolerance_mm=1.0)
    assert found["detected"] is True and found["hd95_worst_case"] is False and found["hd95_mm"] == 0.0


def test_one_sided_empty_hd95_is_the_diagonal_in_mm_with_anisotropic_spacing():
    """The worst case is a distance on the case's own grid: extent x spacing, corner to corner."""
    empty = np.zeros((20, 16, 8), np.uint8)
    some = box((20, 16, 8), (2, 2, 2), (5, 5, 5))
    row = class_metrics(empty, some, 1, spacing=(0.5, 0.8, 4.0), nsd_tolerance_mm=1.0)
    assert row["hd95_mm"] == pytest.approx(math.sqrt(10.0**2 + 12.8**2 + 32.0**2))
    # worse than any distance two masks on this grid can have: never better than a poor hit
    poor = class_metrics(box((20, 16, 8), (15, 12, 5), (16, 13, 6)), some, 1, spacing=(0.5, 0.8, 4.0),
                         nsd_tolerance_mm=1.0)  # fmt: skip
    assert poor["status"] == "ok" and 0 < poor["hd95_mm"] < row["hd95_mm"]


def test_summary_averages_the_worst_case_hd95_instead_of_dropping_it():
    label = box((20, 20, 20), (0, 0, 0), (10, 10, 10))
    empty = np.zeros_like(label)
    rows = []
    for case_id, pred in (("a", label), ("b", empty)):
        for row in case_metrics(pred, label, {1: "organ"}, spacing=(1, 1, 1), nsd_tolerance_mm=1.0):
            rows.append({"case_id": case_id, **row})
    summary = summarise(rows)["organ"]
    assert summary["dice"]["mean"] == pytest.approx(0.5)
    # a perfect case (0 mm) and a missed one (the 34.6 mm diagonal): the mean is their mean
    assert summary["hd95_mm"]["mean"] == pytest.approx(math.sqrt(3 * 20.0**2) / 2)
    assert summary["hd95_mm"]["n_undefined"] == 0 and summary["hd95_mm"]["n"] == 2
    assert summary["hd95_worst_case_cases"] == 1
    assert summary["detection_rate"] == pytest.approx(0.5)
    assert summary["status"] == {"ok": 1, "prediction_empty": 1}
    assert not any(isinstance(v, float) and math.isnan(v) for v in summary["dice"].values() if v is not None and not isinstance(v, list))


def test_a_model_that_never_predicts_the_lesion_never_reports_lesion_hd95_zero():
    """The defect: a model that missed every lesion reported lesion HD95 0.0 mm (both-empty cases
    scored 0, one-sided-empty cases were left out)."""
    rows = []
    for k in range(4):
        label = box((16, 16, 16), (2, 2, 2), (12, 12, 12)) + (box((16, 16, 16), (4, 4, 4), (6, 6, 6)) if k < 2 else 0)
        pred = box((16, 16, 16), (2, 2, 2), (12, 12, 12))  # the organ, never the lesion
        for row in case_metrics(pred, label.astype(np.uint8), {1: "organ", 2: "lesion"}, spacing=(2, 2, 2),
                                nsd_tolerance_mm=1.0):  # fmt: skip
            rows.append({"case_id": f"c{k}", "patient_id": f"p{k}", **row})
    lesion = summarise(rows)["lesion"]
    assert lesion["detection_rate"] == 0.0
    assert lesion["hd95_worst_case_cases"] == 2
    assert lesion["dice_label_present"]["mean"] == 0.0
    assert lesion["hd95_mm"]["mean"] > 0.0
    # over the 2 cases whose label holds a lesion, both missed: the diagonal (the 2 cases with
    # neither label nor prediction of a lesion halved it, an audit 2026-12-07), NSD and Jaccard 0,
    # precision undefined (nothing predicted); "cases" says which cases a figure is over
    assert lesion["hd95_mm"]["mean"] == pytest.approx(math.sqrt(3 * 32.0**2))
    assert lesion["hd95_mm"]["n"] == 2 and lesion["hd95_mm"]["cases"] == "label holds the class"
    assert lesion["nsd"]["mean"] == 0.0 and lesion["jaccard"]["mean"] == 0.0
    assert lesion["precision"]["mean"] is None and lesion["precision"]["n_undefined"] == 2
    assert lesion["dice"]["n"] == 4 and lesion["dice"]["mean"] == pytest.approx(0.5)  # both-empty as 1: plain Dice


def test_lesion_dice_where_present_is_reported_apart_from_both_empty_cases():
    label_with = box((20, 20, 20), (2, 2, 2), (6, 6, 6), value=2)
    nothing = np.zeros_like(label_with)
    rows = []
    for case_id, (pred, label) in {"with": (nothing, label_with), "without": (nothing, nothing)}.items():
        for row in case_metrics(pred, label, {2: "lesion"}, spacing=(1, 1, 1), nsd_tolerance_mm=1.0):
            rows.append({"case_id": case_id, **row})
    summary = summarise(rows)["lesion"]
    assert summary["dice"]["mean"] == pytest.approx(0.5)  # inflated by the both-empty case
    assert summary["dice_label_present"]["mean"] == pytest.approx(0.0)
    assert summary["dice_label_present"]["n"] == 1


def test_bootstrap_ci_brackets_the_mean():
    values = np.random.default_rng(0).normal(0.8, 0.05, size=40)
    low, high = bootstrap_ci(values, seed=1)
    assert low < values.mean() < high
    assert high - low < 0.05
