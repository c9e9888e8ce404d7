"""The drift guard (issue 15): new development cases that do not fit the plan's cases stop the
run (default) or force a fresh plan, never a silent training on data the plan was not made for.
Fingerprints here come from real (small) cases through the project's own fingerprint code."""

from __future__ import annotations

import numpy as np
import pytest

from mvl_pipeline.core.case import Case
from mvl_pipeline.core.volume import Volume
from mvl_pipeline.pipelines.preprocess.nodes import fingerprint_dataset, plan_dataset
from mvl_pipeline.preprocessing.drift import (
    DataDriftError,
    DriftConfig,
    drift_findings,
    guard,
    new_case_ids,
)
from mvl_pipeline.preprocessing.fingerprint import (
    FingerprintConfig,
    aggregate_fingerprint,
    case_fingerprint,
)
from mvl_pipeline.synthetic.phantom import acquisition_affine

CONFIG = FingerprintConfig(quantile_points=101)


def _case(index: int, *, modality: str = "CT", slice_mm: float = 5.0, organ: float = 100.0, lesion_value: int = 2) -> Case:
    shape = (20, 16, 12)
    affine = acquisition_affine(shape=shape, spacing=(2.0, 2.0, slice_mm), orientation="axial", centre=(0, 0, 0))
    rng = np.random.default_rng(index)
    background = -1000.0 if modality == "CT" else 0.0
    image = np.full(shape, background, np.float32)
    image[3:17, 3:13, :] = 40.0
    label = np.zeros(shape, np.uint8)
    label[6:12, 5:10, 2:9] = 1
    label[8:10, 6:8, 4:6] = lesion_value
    image[label > 0] = organ + rng.normal(0, 20, int((label > 0).sum()))
    meta = {"modality": modality, "label_names": {"1": "organ", "2": "lesion", "3": "other"}}
    return Case(f"case-{index:04d}", f"pt-{index:04d}", Volume(image, affine), Volume(label, affine), meta)


def _fingerprint(cases: list[Case]) -> dict:
    return aggregate_fingerprint([case_fingerprint(c, CONFIG) for c in cases], CONFIG)


BEFORE = [_case(i) for i in range(8)]


def test_a_first_plan_and_an_unchanged_dataset_have_nothing_to_drift_from():
    fingerprint = _fingerprint(BEFORE)
    assert drift_findings(fingerprint, None, DriftConfig()) == []
    assert drift_findings(fingerprint, {}, DriftConfig()) == []
    assert drift_findings(fingerprint, fingerprint, DriftConfig()) == []


def test_new_cases_like_the_old_ones_pass():
    previous = _fingerprint(BEFORE)
    now = _fingerprint(BEFORE + [_case(i) for i in range(8, 11)])
    assert new_case_ids(now, previous) == ["case-0008", "case-0009", "case-0010"]
    assert drift_findings(now, previous, DriftConfig()) == []


def test_an_mr_study_dropped_into_a_ct_task_is_found_and_stops_the_run_without_naming_a_patient():
    previous = _fingerprint(BEFORE)
    now = _fingerprint(BEFORE + [_case(8), _case(9, modality="MR", organ=600.0)])
    findings = drift_findings(now, previous, DriftConfig())
    assert len(findings) == 1 and findings[0].startswith("modality: 1 new case(s) of modality MR")
    with pytest.raises(DataDriftError, match="modality MR") as error:
        guard(now, previous, DriftConfig())
    assert "pt-" not in str(error.value) and "case-" not in str(error.value)
    assert "nothing was trained" in str(error.value)
    # taking the study out of the drop keeps its ingested case, so the run stopped again on every
    # retry; the message said only "check the new data" and to "set" an action, not how
    assert "does not take out the cases already ingested" in str(error.value)
    assert "--params preprocess.drift.action=replan" in str(error.value)


def test_a_changed_slice_thickness_is_found_on_its_axis():
    previous = _fingerprint(BEFORE)
    now = _fingerprint(BEFORE + [_case(i, slice_mm=1.25) for i in range(8, 11)])
    findings = drift_findings(now, previous, DriftConfig())
    assert findings == [f for f in findings if f.startswith("spacing: CT axis 2")] and len(findings) == 1
    assert "1.25 mm" in findings[0] and "5 mm" in findings[0]
    # within a looser tolerance it passes: the tolerance is what decides
    assert drift_findings(now, previous, DriftConfig(spacing_tolerance=5.0)) == []


def test_a_ct_intensity_shift_and_a_new_label_value_are_found():
    previous = _fingerprint(BEFORE)
    shifted = _fingerprint(BEFORE + [_case(i, organ=900.0) for i in range(8, 11)])
    findings = drift_findings(shifted, previous, DriftConfig())
    assert len(findings) == 1 and findings[0].startswith("intensity: CT foreground median")
    relabelled = _fingerprint(BEFORE + [_case(i, lesion_value=3) for i in range(8, 11)])
    findings = drift_findings(relabelled, previous, DriftConfig())
    assert any(f.startswith("labels: label value 3 in the new case(s)") for f in findings), findings


def test_mr_intensities_are_not_compared_by_default():
    before = [_case(i, modality="MR", organ=300.0) for i in range(8)]
    now = _fingerprint(before + [_case(i, modality="MR", organ=3000.0) for i in range(8, 11)])
    assert drift_findings(now, _fingerprint(before), DriftConfig()) == []
    assert drift_findings(now, _fingerprint(before), DriftConfig(intensity_modalities=("CT", "MR")))


def test_the_drift_block_is_validated():
    with pytest.raises(ValueError, match="action must be one of"):
        DriftConfig.from_params({"action": "ignore"})
    with pytest.raises(ValueError, match="spacing_tolerance must be > 0"):
        DriftConfig.from_params({"spacing_tolerance": 0})


def _nodes(cases: list[Case], previous_fingerprint, previous_plan, action: str):
    params = {"drift": {"action": action}, "apply": {"workers": 1}}
    loaders = {c.case_id: (lambda c=c: c) for c in cases}
    development = {"train": sorted(loaders), "validation": []}
    fingerprint = fingerprint_dataset(loaders, development, previous_fingerprint, params)
    return fingerprint, plan_dataset(fingerprint, previous_plan, params, {"patch_size": [8, 8, 4], "token_budget": 64})


def test_through_the_nodes_stop_fails_before_the_plan_and_replan_makes_a_fresh_plan_recording_why():
    first_fingerprint, first_plan = _nodes(BEFORE, None, None, "stop")
    assert "drift" not in first_fingerprint and "drift" not in first_plan["provenance"]
    grown = BEFORE + [_case(i, slice_mm=1.25) for i in range(8, 12)]
    with pytest.raises(DataDriftError, match="spacing: CT axis 2"):
        _nodes(grown, first_fingerprint, first_plan, "stop")
    fingerprint, plan = _nodes(grown, first_fingerprint, first_plan, "replan")
    assert fingerprint["drift"]["new_cases"] == 4
    assert plan["provenance"]["drift"] == fingerprint["drift"]["findings"]
    assert plan["plan_id"] != first_plan["plan_id"]  # a fresh plan: every case is preprocessed again
    # the same growth without drift keeps the plan (and its id): nothing is recomputed
    _, kept = _nodes(BEFORE + [_case(i) for i in range(8, 10)], first_fingerprint, first_plan, "stop")
    assert kept["plan_id"] == first_plan["plan_id"]


def test_class_shares_are_compared_only_over_enough_new_cases():
    previous = _fingerprint(BEFORE)

    def lesion_heavy(index: int) -> Case:
        case = _case(index)
        label = np.asarray(case.label.array).copy()
        label[label == 1] = 2  # the whole organ labelled lesion: the lesion share jumps
        return Case(case.case_id, case.patient_id, case.image, Volume(label, case.label.affine), case.meta)

    few = _fingerprint(BEFORE + [lesion_heavy(i) for i in range(8, 10)])
    assert drift_findings(few, previous, DriftConfig()) == []  # 2 new cases: not compared
    many = _fingerprint(BEFORE + [lesion_heavy(i) for i in range(8, 14)])
    findings = drift_findings(many, previous, DriftConfig())
    assert any(f.startswith("labels: label 2 is") for f in findings), findings
