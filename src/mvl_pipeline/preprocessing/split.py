"""Patients to roles, once, stable over time: development (train / validation), gate, test.

- development (train, validation; k-fold capable): what a model is fitted and selected on;
- gate: the patients the registry gate compares a challenger and the champion on, every retrain;
- test: locked: a model's reported performance, never used for any decision.

Each patient's role is a pure function of ``(seed, pseudonym)`` and three thresholds: a SHA-256 of
both, read as a number in [0, 1), holds the patient out when it falls below the held-out
threshold; a second hash then makes a held-out patient gate or test, and a third makes a
development patient validation or train. So adding patients never moves anyone else.

The thresholds are fixed when the split is first written, from the ranks of the first cohort's
hashes, so that the first split has exactly the configured proportions; they are recorded in the
split document and used for every later patient while seed and ratios are unchanged (otherwise
the ratios themselves are the thresholds).

Persistence: every patient keeps the role recorded in the previous split file; the held-out
roles only grow (a gate or test patient stays there even when its cases disappear upstream:
``withdrawn_holdout_patients``), and a development patient never becomes held out.
A case keeps its id when its patient pseudonym changes (a corrected Patient ID, a new
patients.csv): a patient holding a case that was development stays development, and a new
pseudonym whose cases were held out stays held out (:func:`with_case_history`).
``rebalance_development: true`` re-draws development patients between train and validation
only. A split file of the earlier three-way split (train / validation / test) migrates: its test
patients stay held out, as gate or test by their gate hash.

With at least four current patients every role is non-empty (the nearest patient moves there,
new patients first; a held-out patient never moves, and a development patient of an earlier split
never becomes held out: a held-out role can then stay empty until new patients arrive).
Optional k-fold: ``folds > 1`` adds ``folds`` train/validation partitions of the development
patients, by a fourth hash.
:func:`role_view` is what each stage may read: fit the development roles, the gate the gate role,
evaluate the test role.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mvl_pipeline.core.config import ConfigBlock

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "gate", "test")
DEVELOPMENT = ("train", "validation")
HELD_OUT = ("gate", "test")


@dataclass(frozen=True)
class SplitRatios(ConfigBlock):
    """``preprocess.split.ratios``: shares of patients per role (normalised by their sum)."""

    WHERE = "preprocess.split.ratios"

    train: float = 0.55
    validation: float = 0.15
    gate: float = 0.15
    test: float = 0.15

    def __post_init__(self) -> None:
        ratios = (self.train, self.validation, self.gate, self.test)
        if min(ratios) < 0 or sum(ratios) <= 0:
            raise ValueError(f"split ratios must be >= 0 with a positive sum, got {list(ratios)}")


@dataclass(frozen=True)
class SplitConfig(ConfigBlock):
    """``preprocess.split``."""

    WHERE = "preprocess.split"

    seed: int = 20241002
    ratios: SplitRatios = field(default_factory=SplitRatios)
    folds: int = 0  # > 1: also k train/validation folds of the development patients
    rebalance_development: bool = False  # re-draw earlier train/validation patients (never gate/test)

    def __post_init__(self) -> None:
        if self.folds < 0 or self.folds == 1:
            raise ValueError("split.folds must be 0 (no k-fold) or >= 2")

    @property
    def held_out_fraction(self) -> float:
        r = self.ratios
        return (r.gate + r.test) / (r.train + r.validation + r.gate + r.test)

    @property
    def gate_fraction_of_held_out(self) -> float:
        held = self.ratios.gate + self.ratios.test
        return self.ratios.gate / held if held > 0 else 0.0

    @property
    def validation_fraction_of_development(self) -> float:
        development = self.ratios.train + self.ratios.validation
        return self.ratios.validation / development if development > 0 else 0.0


def unit_hash(seed: int, purpose: str, pseudonym: str) -> float:
    """A number in [0, 1) determined by ``(seed, purpose, pseudonym)`` only."""
    digest = hashlib.sha256(f"{seed}\x00{purpose}\x00{pseudonym}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _rank_threshold(values: list[float], count: int) -> float:
    """A threshold below exactly ``count`` of ``values`` (midway to the next one)."""
    ordered = sorted(values)
    if count <= 0:
        return 0.0
    if count >= len(ordered):
        return 1.0
    return (ordered[count - 1] + ordered[count]) / 2.0


def _default_thresholds(config: SplitConfig) -> dict[str, float]:
    return {
        "held_out": config.held_out_fraction,
        "gate": config.gate_fraction_of_held_out,
        "validation": config.validation_fraction_of_development,
    }


def first_thresholds(patients: Iterable[str], config: SplitConfig) -> dict[str, float]:
    """Thresholds that give the first cohort exactly the configured proportions."""
    cohort = sorted(set(patients))
    n = len(cohort)
    if n < 4:
        return _default_thresholds(config)
    r = config.ratios
    n_held = max(1, round(config.held_out_fraction * n)) if r.gate + r.test > 0 else 0
    held_hashes = [unit_hash(config.seed, "test", p) for p in cohort]
    t_held = _rank_threshold(held_hashes, n_held)
    held = [p for p, u in zip(cohort, held_hashes, strict=True) if u < t_held]
    n_gate = round(config.gate_fraction_of_held_out * len(held))
    if len(held) >= 2 and r.gate > 0 and r.test > 0:  # both held-out roles get a patient
        n_gate = min(max(1, n_gate), len(held) - 1)
    t_gate = _rank_threshold([unit_hash(config.seed, "gate", p) for p in held], n_gate)
    development = [p for p, u in zip(cohort, held_hashes, strict=True) if u >= t_held]
    n_val = round(config.validation_fraction_of_development * len(development))
    n_val = max(1, n_val) if r.validation > 0 and len(development) >= 2 else n_val
    t_val = _rank_threshold([unit_hash(config.seed, "validation", p) for p in development], n_val)
    return {"held_out": t_held, "gate": t_gate, "validation": t_val}


def assign_patients(
    patients: Iterable[str],
    config: SplitConfig,
    previous: Mapping[str, str] | None = None,
    thresholds: Mapping[str, float] | None = None,
) -> dict[str, str]:
    """``{patient: role}`` for the current patients plus the previous held-out patients.

    A previous ``gate`` or ``test`` patient keeps its role; a patient held out under the earlier
    three-way split (``previous == "held_out"``) stays held out and gets gate or test by its
    gate hash; a previous development patient never becomes held out."""
    previous = dict(previous or {})
    current = sorted(set(patients))
    limits = dict(thresholds or _default_thresholds(config))
    assignment: dict[str, str] = {}
    for patient in current:
        before = previous.get(patient)
        if before in HELD_OUT:
            assignment[patient] = before
        elif before == "held_out" or (before is None and unit_hash(config.seed, "test", patient) < limits["held_out"]):
            assignment[patient] = "gate" if unit_hash(config.seed, "gate", patient) < limits["gate"] else "test"
        elif before in DEVELOPMENT and not config.rebalance_development:
            assignment[patient] = before
        else:
            u = unit_hash(config.seed, "validation", patient)
            assignment[patient] = "validation" if u < limits["validation"] else "train"
    if len(current) >= 4:
        _fill_empty_roles(assignment, current, previous, config)
    for patient, role in previous.items():  # the held-out roles never lose a member
        if patient not in assignment and role in (*HELD_OUT, "held_out"):
            assignment[patient] = role if role in HELD_OUT else (
                "gate" if unit_hash(config.seed, "gate", patient) < limits["gate"] else "test"
            )
    return assignment


def _fill_empty_roles(
    assignment: dict[str, str], current: list[str], previous: Mapping[str, str], config: SplitConfig
) -> None:
    """With at least four patients every role with a positive ratio gets a patient. An empty
    role takes, from its sibling role (gate <-> test, train <-> validation) when that has two or
    more and one of them may move, else from development (for a held-out role), the patient whose
    hash lies nearest its range, new patients first; a patient held out before never moves, and a development patient
    of the previous split never becomes held out (a model may have been trained on it)."""

    def distance(patient: str, role: str) -> float:
        if role in HELD_OUT:
            u = unit_hash(config.seed, "gate", patient)
            return u if role == "gate" else 1.0 - u
        u = unit_hash(config.seed, "validation", patient)
        return u if role == "validation" else 1.0 - u

    ratios = config.ratios.to_dict()
    sibling = {"gate": "test", "test": "gate", "train": "validation", "validation": "train"}
    for role in ("test", "gate", "validation", "train"):
        if ratios[role] <= 0 or any(assignment[p] == role for p in current):
            continue
        sizes = {s: sum(1 for p in current if assignment[p] == s) for s in SPLITS}
        candidates: list[str] = []
        for sources in ([sibling[role]], [*DEVELOPMENT] if role in HELD_OUT else []):  # the sibling first
            candidates = [
                p for p in current
                if assignment[p] in sources and sizes[assignment[p]] > 1 and previous.get(p) not in (*HELD_OUT, "held_out")
                and not (role in HELD_OUT and previous.get(p) in DEVELOPMENT)
            ]  # fmt: skip
            if candidates:
                break
        if not candidates:
            continue
        chosen = min(candidates, key=lambda p: (p in previous, distance(p, role), p))
        logger.info("split role %s was empty: moved one patient there from %s", role, assignment[chosen])
        assignment[chosen] = role


def _fold_lists(
    assignment: Mapping[str, str], cases_by_patient: Mapping[str, list[str]], config: SplitConfig
) -> list[dict[str, list[str]]]:
    development = sorted(p for p, s in assignment.items() if s in DEVELOPMENT and p in cases_by_patient)
    fold_of = {p: int(unit_hash(config.seed, "fold", p) * config.folds) for p in development}
    folds = []
    for fold in range(config.folds):
        held = [p for p in development if fold_of[p] == fold]
        if not held:
            logger.warning("fold %d has no patients (too few development patients)", fold)
        folds.append(
            {
                "train": sorted(c for p in development if fold_of[p] != fold for c in cases_by_patient[p]),
                "validation": sorted(c for p in held for c in cases_by_patient[p]),
            }
        )
    return folds


def with_case_history(
    previous: Mapping[str, str], cases_by_patient: Mapping[str, list[str]], previous_split: Mapping[str, Any] | None
) -> dict[str, str]:
    """``previous`` (patient -> role) with the roles the current patients' *cases* had before.

    A case keeps its id when its patient pseudonym changes (the hospital corrects a Patient ID, a
    patients.csv regroups follow-ups): its earlier role still counts. A patient holding a case that
    was development is development (in its cases' role), even when it was held out before: a model
    was developed on that case, so the patient's other cases are no held-out evidence for it. A new
    pseudonym whose cases were all held out keeps them held out, in the role most of them had."""
    if not previous_split:
        return dict(previous)
    three_way = "gate" not in previous_split.get("patients", {})
    case_role = {
        str(case): ("held_out" if three_way and role == "test" else role)
        for role in SPLITS
        for case in previous_split.get(role, [])
    }
    merged = dict(previous)
    moved_out = 0
    for patient, cases in cases_by_patient.items():
        before = [case_role[c] for c in cases if c in case_role]
        developed = [r for r in before if r in DEVELOPMENT]
        if developed:
            if merged.get(patient) not in DEVELOPMENT:
                merged[patient] = max(DEVELOPMENT, key=lambda r: (developed.count(r), r == "train"))
            moved_out += len(before) - len(developed)
        elif before and patient not in merged:
            merged[patient] = max(("gate", "test", "held_out"), key=lambda r: (before.count(r), r == "test"))
    if moved_out:
        logger.warning(
            "%d held-out case(s) now belong to a patient with a development case (a corrected Patient ID or "
            "a new patients.csv joined them): they leave the held-out set, since a model was developed on "
            "that patient",
            moved_out,
        )
    return merged


def previous_assignment(previous_split: Mapping[str, Any] | None) -> dict[str, str]:
    """``{patient: role}`` recorded in a split document written by :func:`make_split`; a
    document of the earlier three-way split (train/validation/test) gives ``held_out`` for its
    test patients, who stay held out (as gate or test)."""
    if not previous_split:
        return {}
    patients = previous_split.get("patients")
    if not isinstance(patients, Mapping):
        raise ValueError("the previous split has no 'patients' block: not written by this pipeline")
    three_way = "gate" not in patients
    found = {}
    for role in SPLITS:
        for p in patients.get(role, []):
            found[str(p)] = "held_out" if (three_way and role == "test") else role
    return found


def make_split(
    case_patients: Mapping[str, str],
    config: SplitConfig,
    previous_split: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The split document: case ids and patient pseudonyms per role, optional folds."""
    cases_by_patient: dict[str, list[str]] = {}
    for case_id, patient in sorted(case_patients.items()):
        cases_by_patient.setdefault(str(patient), []).append(case_id)
    previous = with_case_history(previous_assignment(previous_split), cases_by_patient, previous_split)
    ratios = config.ratios.to_dict()
    same_rule = bool(previous_split) and previous_split.get("seed") == config.seed and previous_split.get("ratios") == ratios
    if not previous_split:
        thresholds = first_thresholds(cases_by_patient, config)
    elif same_rule and "held_out" in previous_split.get("thresholds", {}):
        thresholds = dict(previous_split["thresholds"])
    else:
        thresholds = _default_thresholds(config)
    assignment = assign_patients(cases_by_patient, config, previous, thresholds)
    withdrawn = sorted(p for p, s in assignment.items() if s in HELD_OUT and p not in cases_by_patient)
    if withdrawn:
        logger.warning("%d held-out patient(s) have no current cases; kept held out", len(withdrawn))
    document: dict[str, Any] = {}
    for role in SPLITS:
        patients = sorted(p for p, s in assignment.items() if s == role)
        document[role] = sorted(c for p in patients for c in cases_by_patient.get(p, []))
    document["patients"] = {role: sorted(p for p, s in assignment.items() if s == role) for role in SPLITS}
    document["withdrawn_holdout_patients"] = withdrawn
    document["folds"] = _fold_lists(assignment, cases_by_patient, config) if config.folds else []
    document["seed"] = config.seed
    document["ratios"] = ratios
    document["thresholds"] = thresholds
    return document


def role_view(split: Mapping[str, Any], roles: Iterable[str]) -> dict[str, Any]:
    """The part of a split document a stage may see: the case ids and patients of ``roles`` only
    (fit sees train + validation + folds, the gate sees gate, evaluate sees test)."""
    roles = tuple(roles)
    view: dict[str, Any] = {role: list(split.get(role, [])) for role in roles}
    view["patients"] = {role: list(split.get("patients", {}).get(role, [])) for role in roles}
    if set(roles) <= set(DEVELOPMENT):
        view["folds"] = list(split.get("folds", []))
    if split.get("key_id"):
        view["key_id"] = split["key_id"]  # the pseudonymisation key the patients are named under
    return view
