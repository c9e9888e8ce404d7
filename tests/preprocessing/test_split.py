"""Patient-level split: disjoint, stable when patients are added, the holdout never shrinks."""

from __future__ import annotations

import json

import pytest

from mvl_pipeline.preprocessing.split import SPLITS, SplitConfig, assign_patients, make_split

CONFIG = SplitConfig.from_params({"seed": 20241002, "ratios": {"train": 0.7, "validation": 0.15, "test": 0.15}})


def _cases(patients: list[str], studies: int = 2) -> dict[str, str]:
    """{case_id: patient}: each patient has ``studies`` cases."""
    return {f"{p}-s{k}": p for p in patients for k in range(studies)}


def _patients(n: int, start: int = 0) -> list[str]:
    return [f"P{i:04d}x" for i in range(start, start + n)]


def _patient_of_split(split: dict) -> dict[str, str]:
    return {p: s for s in SPLITS for p in split["patients"][s]}


def test_no_patient_appears_in_two_splits_and_every_case_is_assigned():
    cases = _cases(_patients(40), studies=3)
    split = make_split(cases, CONFIG)
    seen: dict[str, str] = {}
    for name in SPLITS:
        for case_id in split[name]:
            patient = cases[case_id]
            assert seen.setdefault(patient, name) == name, f"{patient} in two splits"
    assert sorted(c for s in SPLITS for c in split[s]) == sorted(cases)
    assert all(split["patients"][s] for s in SPLITS)
    json.dumps(split)


def test_adding_five_patients_leaves_every_earlier_assignment_unchanged():
    first = make_split(_cases(_patients(16)), CONFIG)
    second = make_split(_cases(_patients(21)), CONFIG, previous_split=first)
    before, after = _patient_of_split(first), _patient_of_split(second)
    assert {p: after[p] for p in before} == before
    assert set(after) - set(before) == set(_patients(5, start=16))
    # and the case lists only grew
    for name in SPLITS:
        assert set(first[name]) <= set(second[name])


def test_assignment_is_a_function_of_seed_and_pseudonym_only():
    a = assign_patients(_patients(30), CONFIG)
    b = assign_patients(list(reversed(_patients(30))) + _patients(10, start=30), CONFIG)
    assert {p: b[p] for p in a} == a
    other_seed = assign_patients(_patients(30), SplitConfig(seed=1))
    assert other_seed != a


@pytest.mark.parametrize(
    "new_ratios",
    [
        {"train": 0.9, "validation": 0.05, "test": 0.05},
        {"train": 0.2, "validation": 0.2, "test": 0.6},
        {"train": 1.0, "validation": 0.0, "test": 0.0},
    ],
)
@pytest.mark.parametrize("rebalance", [False, True])
def test_the_holdout_never_loses_a_member_even_when_ratios_change(new_ratios, rebalance):
    first = make_split(_cases(_patients(30)), CONFIG)
    holdout = set(first["patients"]["test"])
    assert holdout
    config = SplitConfig.from_params({"seed": CONFIG.seed, "rebalance_development": rebalance, "ratios": new_ratios})
    second = make_split(_cases(_patients(36)), config, previous_split=first)
    assert holdout <= set(second["patients"]["test"])
    # it grows only with new patients: no earlier train/validation patient entered it
    earlier = set(first["patients"]["train"]) | set(first["patients"]["validation"])
    assert not earlier & set(second["patients"]["test"])
    if not rebalance:
        before, after = _patient_of_split(first), _patient_of_split(second)
        assert {p: after[p] for p in before} == before


def test_a_holdout_patient_whose_cases_disappear_stays_in_the_holdout():
    patients = _patients(20)
    first = make_split(_cases(patients), CONFIG)
    gone = first["patients"]["test"][0]
    second = make_split(_cases([p for p in patients if p != gone]), CONFIG, previous_split=first)
    assert gone in second["patients"]["test"]
    assert second["withdrawn_holdout_patients"] == [gone]
    assert not any(case.startswith(gone) for case in second["test"])
    third = make_split(_cases(patients), CONFIG, previous_split=second)  # and it comes back
    assert gone in third["patients"]["test"] and third["withdrawn_holdout_patients"] == []


@pytest.mark.parametrize("n", [3, 4, 5, 8, 12, 16])
@pytest.mark.parametrize("seed", range(12))
def test_with_three_or_more_patients_every_split_is_non_empty(n, seed):
    split = make_split(_cases(_patients(n)), SplitConfig(seed=seed))
    assert all(split["patients"][s] for s in SPLITS), split["patients"]


def test_sample_drop_sized_split_has_a_holdout_and_a_validation_set():
    split = make_split(_cases(_patients(16)), CONFIG)
    assert split["patients"]["test"] and split["patients"]["validation"]
    assert len(split["patients"]["train"]) >= 8


def test_folds_partition_the_development_patients_and_never_touch_the_holdout():
    cases = _cases(_patients(40))
    split = make_split(cases, SplitConfig(seed=3, folds=5))
    development = set(split["train"]) | set(split["validation"])
    assert len(split["folds"]) == 5
    held = [c for fold in split["folds"] for c in fold["validation"]]
    assert sorted(held) == sorted(development)  # each development case held out exactly once
    for fold in split["folds"]:
        assert set(fold["train"]) | set(fold["validation"]) == development
        assert not set(fold["train"]) & set(fold["validation"])
        assert not {cases[c] for c in fold["train"]} & {cases[c] for c in fold["validation"]}
        assert not set(fold["validation"]) & set(split["test"])


def test_bad_split_parameters_are_rejected():
    with pytest.raises(ValueError, match="ratios"):
        SplitConfig.from_params({"ratios": {"train": -0.1}})
    with pytest.raises(ValueError, match="folds"):
        SplitConfig(folds=1)
    with pytest.raises(ValueError, match="unknown"):
        SplitConfig.from_params({"ratios": {"train": 0.8, "holdout": 0.2}})
    with pytest.raises(ValueError, match="patients"):
        make_split(_cases(_patients(3)), CONFIG, previous_split={"train": ["x"]})


def test_first_split_has_exact_proportions_and_later_patients_use_its_thresholds():
    """16 patients at 0.6/0.2/0.2: a bare "hash < ratio" rule can give 0-6 test patients; the
    first split takes exactly round(0.2 * 16) = 3, and later patients never move anyone."""
    from mvl_pipeline.preprocessing.split import SplitConfig, make_split

    config = SplitConfig.from_params({"seed": 7, "ratios": {"train": 0.6, "validation": 0.2, "test": 0.2}})
    first = {f"case-{i:02d}": f"pt-{i:02d}" for i in range(16)}
    split = make_split(first, config)
    assert len(split["patients"]["test"]) == 3
    assert len(split["patients"]["validation"]) == round(0.25 * 13)
    later = {**first, **{f"case-{i:02d}": f"pt-{i:02d}" for i in range(16, 40)}}
    grown = make_split(later, config, split)
    for name in ("train", "validation", "test"):
        assert set(split["patients"][name]) <= set(grown["patients"][name])
    assert grown["thresholds"] == split["thresholds"]
    assert len(grown["patients"]["test"]) > len(split["patients"]["test"])
