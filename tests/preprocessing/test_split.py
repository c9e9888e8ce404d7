"""Patient-level split into four roles (train, validation, gate, test): disjoint, stable when
patients are added, the held-out roles never shrink, an earlier three-way split migrates without
moving a held-out patient, and each stage's view holds its own roles only."""

from __future__ import annotations

import json

import pytest

from mvl_pipeline.preprocessing.split import (
    DEVELOPMENT,
    HELD_OUT,
    SPLITS,
    SplitConfig,
    assign_patients,
    make_split,
    previous_assignment,
    role_view,
)

CONFIG = SplitConfig.from_params(
    {"seed": 20241002, "ratios": {"train": 0.55, "validation": 0.15, "gate": 0.15, "test": 0.15}}
)


def _cases(patients: list[str], studies: int = 2) -> dict[str, str]:
    """{case_id: patient}: each patient has ``studies`` cases."""
    return {f"{p}-s{k}": p for p in patients for k in range(studies)}


def _patients(n: int, start: int = 0) -> list[str]:
    return [f"P{i:04d}x" for i in range(start, start + n)]


def _patient_of_split(split: dict) -> dict[str, str]:
    return {p: s for s in SPLITS for p in split["patients"][s]}


def _held_out(split: dict) -> set[str]:
    return {p for role in HELD_OUT for p in split["patients"][role]}


def test_the_four_roles_are_train_validation_gate_test():
    assert SPLITS == ("train", "validation", "gate", "test")
    assert set(DEVELOPMENT) | set(HELD_OUT) == set(SPLITS) and not set(DEVELOPMENT) & set(HELD_OUT)


def test_no_patient_appears_in_two_roles_and_every_case_is_assigned():
    cases = _cases(_patients(40), studies=3)
    split = make_split(cases, CONFIG)
    seen: dict[str, str] = {}
    for name in SPLITS:
        for case_id in split[name]:
            patient = cases[case_id]
            assert seen.setdefault(patient, name) == name, f"{patient} in two roles"
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
        {"train": 0.9, "validation": 0.04, "gate": 0.03, "test": 0.03},
        {"train": 0.2, "validation": 0.2, "gate": 0.3, "test": 0.3},
        {"train": 1.0, "validation": 0.0, "gate": 0.0, "test": 0.0},
        {"train": 0.6, "validation": 0.2, "gate": 0.0, "test": 0.2},
    ],
)
@pytest.mark.parametrize("rebalance", [False, True])
def test_the_held_out_roles_never_lose_a_member_even_when_ratios_change(new_ratios, rebalance):
    first = make_split(_cases(_patients(30)), CONFIG)
    gate, test = set(first["patients"]["gate"]), set(first["patients"]["test"])
    assert gate and test
    config = SplitConfig.from_params({"seed": CONFIG.seed, "rebalance_development": rebalance, "ratios": new_ratios})
    second = make_split(_cases(_patients(36)), config, previous_split=first)
    # a gate patient stays gate, a test patient stays test: neither ever becomes development
    assert gate <= set(second["patients"]["gate"])
    assert test <= set(second["patients"]["test"])
    # the held-out roles grow only with new patients: no earlier development patient entered them
    earlier = {p for role in DEVELOPMENT for p in first["patients"][role]}
    assert not earlier & _held_out(second)
    if not rebalance:
        before, after = _patient_of_split(first), _patient_of_split(second)
        assert {p: after[p] for p in before} == before
    else:  # rebalancing re-draws development patients between train and validation only
        after = _patient_of_split(second)
        assert all(after[p] in DEVELOPMENT for p in earlier)


@pytest.mark.parametrize("role", HELD_OUT)
def test_a_held_out_patient_whose_cases_disappear_stays_in_its_role(role):
    patients = _patients(20)
    first = make_split(_cases(patients), CONFIG)
    gone = first["patients"][role][0]
    second = make_split(_cases([p for p in patients if p != gone]), CONFIG, previous_split=first)
    assert gone in second["patients"][role]
    assert second["withdrawn_holdout_patients"] == [gone]
    assert not any(case.startswith(gone) for case in second[role])
    third = make_split(_cases(patients), CONFIG, previous_split=second)  # and it comes back
    assert gone in third["patients"][role] and third["withdrawn_holdout_patients"] == []


@pytest.mark.parametrize("n", [4, 5, 6, 8, 12, 16])
@pytest.mark.parametrize("seed", range(12))
def test_with_four_or_more_patients_every_role_is_non_empty(n, seed):
    split = make_split(_cases(_patients(n)), SplitConfig(seed=seed))
    assert all(split["patients"][s] for s in SPLITS), split["patients"]


@pytest.mark.parametrize("seed", range(40))
def test_filling_an_empty_role_never_moves_a_patient_into_or_out_of_the_held_out_roles(seed):
    """Growing from 1-3 patients (too few for four roles) to 4-7: empty roles are filled, but a
    gate or test patient keeps its role, and a patient an earlier model may have been trained on
    (train or validation before) never becomes gate or test."""
    for before in (1, 2, 3):
        first = make_split(_cases(_patients(before)), SplitConfig(seed=seed))
        held_before = {p: s for p, s in _patient_of_split(first).items() if s in HELD_OUT}
        developed_on = {p for p, s in _patient_of_split(first).items() if s in DEVELOPMENT}
        for now in range(4, 8):
            second = make_split(_cases(_patients(now)), SplitConfig(seed=seed), previous_split=first)
            after = _patient_of_split(second)
            assert {p: after[p] for p in held_before} == held_before, (before, now)
            assert not developed_on & _held_out(second), (before, now, first["patients"], second["patients"])


def test_an_empty_held_out_role_is_filled_from_new_development_patients_when_its_sibling_cannot_give():
    """Seed 26, three patients: one train, two test, no gate. With three more the gate gets a new
    patient even though test (two, both held out before) cannot give one."""
    first = make_split(_cases(_patients(3)), SplitConfig(seed=26))
    assert (len(first["patients"]["test"]), first["patients"]["gate"]) == (2, [])  # the premise
    second = make_split(_cases(_patients(6)), SplitConfig(seed=26), previous_split=first)
    assert second["patients"]["test"] == first["patients"]["test"]
    assert len(second["patients"]["gate"]) == 1 and second["patients"]["gate"][0] in _patients(3, start=3)


def test_sample_drop_sized_split_has_every_role_and_most_patients_in_training():
    split = make_split(_cases(_patients(16)), CONFIG)
    assert all(split["patients"][s] for s in SPLITS)
    assert len(split["patients"]["train"]) >= 8


def test_folds_partition_the_development_patients_and_never_touch_gate_or_test():
    cases = _cases(_patients(40))
    split = make_split(cases, SplitConfig(seed=3, folds=5))
    development = set(split["train"]) | set(split["validation"])
    held = set(split["gate"]) | set(split["test"])
    assert len(split["folds"]) == 5
    held_in_folds = [c for fold in split["folds"] for c in fold["validation"]]
    assert sorted(held_in_folds) == sorted(development)  # each development case held out exactly once
    for fold in split["folds"]:
        assert set(fold["train"]) | set(fold["validation"]) == development
        assert not set(fold["train"]) & set(fold["validation"])
        assert not {cases[c] for c in fold["train"]} & {cases[c] for c in fold["validation"]}
        assert not (set(fold["train"]) | set(fold["validation"])) & held


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
    """20 patients at 0.5/0.2/0.15/0.15: a bare "hash < ratio" rule can give anything from 0 to 10
    held-out patients; the first split takes exactly round(0.3 * 20) = 6 (3 gate, 3 test), and
    later patients never move anyone."""
    config = SplitConfig.from_params({"seed": 7, "ratios": {"train": 0.5, "validation": 0.2, "gate": 0.15, "test": 0.15}})
    first = {f"case-{i:02d}": f"pt-{i:02d}" for i in range(20)}
    split = make_split(first, config)
    assert len(split["patients"]["gate"]) == 3 and len(split["patients"]["test"]) == 3
    assert len(split["patients"]["validation"]) == round(0.2 / 0.7 * 14)
    later = {**first, **{f"case-{i:02d}": f"pt-{i:02d}" for i in range(20, 60)}}
    grown = make_split(later, config, split)
    for name in SPLITS:
        assert set(split["patients"][name]) <= set(grown["patients"][name])
    assert grown["thresholds"] == split["thresholds"]
    assert len(_held_out(grown)) > len(_held_out(split))


# -- migration of the earlier three-way split (train / validation / test) ---------------------------
def _three_way(patients: list[str], test: list[str], validation: list[str]) -> dict:
    """A split document as the earlier pipeline wrote it (no gate role, its own thresholds)."""
    train = [p for p in patients if p not in test and p not in validation]
    roles = {"train": train, "validation": validation, "test": test}
    cases = _cases(patients)
    return {
        **{role: sorted(c for c, p in cases.items() if p in members) for role, members in roles.items()},
        "patients": {role: sorted(members) for role, members in roles.items()},
        "withdrawn_holdout_patients": [],
        "folds": [],
        "seed": CONFIG.seed,
        "ratios": {"train": 0.7, "validation": 0.15, "test": 0.15},
        "thresholds": {"test": 0.15, "validation": 0.176},
    }


def test_an_earlier_three_way_split_migrates_keeping_every_test_patient_held_out():
    patients = _patients(24)
    old_test = patients[:6]  # chosen by hand: not what the four-way hashes would pick
    old_validation = patients[6:10]
    old = _three_way(patients, old_test, old_validation)
    assert set(previous_assignment(old).values()) == {"train", "validation", "held_out"}

    migrated = make_split(_cases(patients + _patients(4, start=24)), CONFIG, previous_split=old)
    after = _patient_of_split(migrated)
    # every old test patient is still held out: gate or test, never development
    assert all(after[p] in HELD_OUT for p in old_test), {p: after[p] for p in old_test}
    # ... and the held-out patients are split between the two held-out roles by their gate hash
    assert {after[p] for p in old_test} == {"gate", "test"}
    # no old train/validation patient becomes held out, and each keeps its role
    assert {p: after[p] for p in old_validation} == {p: "validation" for p in old_validation}
    assert all(after[p] == "train" for p in patients[10:])
    assert migrated["patients"]["gate"] and migrated["patients"]["test"]
    # the migrated split is then a four-way document that later runs keep as is
    again = make_split(_cases(patients + _patients(4, start=24)), CONFIG, previous_split=migrated)
    assert again["patients"] == migrated["patients"]


def test_an_old_test_patient_without_current_cases_stays_held_out_after_migration():
    patients = _patients(12)
    old = _three_way(patients, patients[:3], patients[3:5])
    migrated = make_split(_cases(patients[1:]), CONFIG, previous_split=old)
    assert patients[0] in _held_out(migrated)
    assert migrated["withdrawn_holdout_patients"] == [patients[0]]


# -- what each stage may see ------------------------------------------------------------------------
def test_role_views_hold_their_own_roles_only():
    split = make_split(_cases(_patients(30)), SplitConfig(seed=5, folds=3))
    development = role_view(split, DEVELOPMENT)
    gate = role_view(split, ("gate",))
    test = role_view(split, ("test",))
    assert set(development) == {"train", "validation", "patients", "folds"}
    assert set(development["patients"]) == {"train", "validation"}
    assert development["folds"] == split["folds"]
    assert set(gate) == {"gate", "patients"} and set(gate["patients"]) == {"gate"}
    assert set(test) == {"test", "patients"} and set(test["patients"]) == {"test"}
    # not one gate or test case or patient anywhere in the development view
    text = json.dumps(development)
    held_ids = set(split["gate"]) | set(split["test"]) | _held_out(split)
    assert held_ids and not any(ident in text for ident in held_ids)
    assert not any(ident in json.dumps(gate) for ident in set(split["test"]) | set(split["patients"]["test"]))
    for role in SPLITS:
        view = {"gate": gate, "test": test}.get(role, development)
        assert view[role] == split[role] and view["patients"][role] == split["patients"][role]


def _case_roles(split: dict) -> dict[str, str]:
    return {case: role for role in SPLITS for case in split[role]}


@pytest.mark.parametrize("seed", range(6))
def test_a_case_whose_patient_changes_never_moves_from_development_into_a_held_out_role(seed):
    """A case keeps its identity (case id) when the hospital corrects its Patient ID or a
    patients.csv regroups it; its patient pseudonym changes. Its earlier role must still count: a
    case a model was developed on, now held out under a new pseudonym, is what the model learnt,
    and the patient-level leakage guard cannot see it (the pseudonyms differ)."""
    config = SplitConfig.from_params({"seed": seed})
    patients = _patients(24)
    cases = _cases(patients)
    first = make_split(cases, config)
    roles = _case_roles(first)
    # every patient's cases regrouped under new pseudonyms (a patients.csv added after the fact),
    # and two development patients merged with two held-out patients
    development = [p for role in DEVELOPMENT for p in first["patients"][role]]
    held = [p for role in HELD_OUT for p in first["patients"][role]]
    regrouped = {case: f"new-{patient}" for case, patient in cases.items()}
    for dev, out in zip(development[:2], held[:2], strict=True):
        regrouped.update({case: f"merged-{dev}" for case, p in cases.items() if p in (dev, out)})
    second = make_split(regrouped, config, previous_split=first)
    after = _case_roles(second)
    assert set(after) == set(cases)
    for case, role in roles.items():
        if role in DEVELOPMENT:
            assert after[case] in DEVELOPMENT, (case, role, after[case])
    # a patient whose cases were all held out keeps them held out, in the same role
    for patient in held[2:]:
        for k in range(2):
            case = f"{patient}-s{k}"
            assert after[case] == roles[case]
    # one patient, one role: the merged patients are development (their held-out case leaves)
    for dev, out in zip(development[:2], held[:2], strict=True):
        assert {after[f"{p}-s{k}"] for p in (dev, out) for k in range(2)} == {roles[f"{dev}-s0"]}
    _no_patient_in_two_roles(second)


def _no_patient_in_two_roles(split: dict) -> None:
    seen: dict[str, str] = {}
    for role in SPLITS:
        for patient in split["patients"][role]:
            assert seen.setdefault(patient, role) == role


def test_the_held_out_cases_that_leave_with_a_regrouped_patient_are_counted_in_a_warning(caplog):
    patients = _patients(24)
    cases = _cases(patients)
    first = make_split(cases, CONFIG)
    dev, out = first["patients"]["train"][0], first["patients"]["test"][0]
    regrouped = {case: (dev if p == out else p) for case, p in cases.items()}  # out's cases join dev
    with caplog.at_level("WARNING", logger="mvl_pipeline.preprocessing.split"):
        second = make_split(regrouped, CONFIG, previous_split=first)
    assert {f"{out}-s0", f"{out}-s1"} <= set(second["train"])
    assert any(r.getMessage().startswith("2 held-out case(s) now belong to a patient") for r in caplog.records)
