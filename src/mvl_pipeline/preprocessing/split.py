"""Train / validation / test split by patient pseudonym, stable over time.

Each patient's assignment is a pure function of ``(seed, pseudonym)`` and two thresholds: a
SHA-256 of both, read as a number in [0, 1), puts the patient in ``test`` when it falls below the
test threshold; otherwise a second, independent hash puts it in ``validation`` when it falls below
the validation threshold. So adding patients never moves anyone else.

The thresholds are fixed when the split is first written: from the ranks of the first cohort's
hashes, so that the first split has exactly the configured proportions (with 16 patients a plain
"hash < ratio" rule gives anything from 0 to 6 test patients); they are recorded in the split
document and used for every later patient, as long as seed and ratios are unchanged (otherwise the
ratios themselves are the thresholds).

Persistence (the holdout the registry gate compares models on):

- every patient keeps the split recorded in the previous split file;
- the test set only grows, with new patients: a previous test patient stays in ``test`` (even
  when the ratios change, and even when its cases disappear upstream: it stays listed under
  ``patients.test`` and in ``withdrawn_holdout_patients``), and a previous train/validation
  patient never enters it;
- ``rebalance_development: true`` re-draws previous train/validation patients under the current
  ratios (between train and validation only).

With at least three current patients every split is non-empty: when one would be empty, the
patient whose hash is nearest to that split's range moves there, new patients first (a previous
test patient never moves). Optional k-fold: ``folds > 1`` adds ``folds`` train/validation
partitions of the development patients (train + validation), by a third hash.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mvl_pipeline.core.config import ConfigBlock

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class SplitRatios(ConfigBlock):
    """``preprocess.split.ratios``: shares of patients (normalised by their sum)."""

    WHERE = "preprocess.split.ratios"

    train: float = 0.6
    validation: float = 0.2
    test: float = 0.2

    def __post_init__(self) -> None:
        ratios = (self.train, self.validation, self.test)
        if min(ratios) < 0 or sum(ratios) <= 0:
            raise ValueError(f"split ratios must be >= 0 with a positive sum, got {list(ratios)}")


@dataclass(frozen=True)
class SplitConfig(ConfigBlock):
    """``preprocess.split``."""

    WHERE = "preprocess.split"

    seed: int = 20241002
    ratios: SplitRatios = field(default_factory=SplitRatios)
    folds: int = 0  # > 1: also k train/validation folds of the development patients
    rebalance_development: bool = False  # re-draw earlier train/validation patients (never test)

    def __post_init__(self) -> None:
        if self.folds < 0 or self.folds == 1:
            raise ValueError("split.folds must be 0 (no k-fold) or >= 2")

    @property
    def test_fraction(self) -> float:
        r = self.ratios
        return r.test / (r.train + r.validation + r.test)

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


def first_thresholds(patients: Iterable[str], config: SplitConfig) -> dict[str, float]:
    """Thresholds that give the first cohort exactly the configured proportions."""
    cohort = sorted(set(patients))
    n = len(cohort)
    if n < 3:
        return {"test": config.test_fraction, "validation": config.validation_fraction_of_development}
    n_test = max(1, round(config.test_fraction * n)) if config.ratios.test > 0 else 0
    test_hashes = [unit_hash(config.seed, "test", p) for p in cohort]
    t_test = _rank_threshold(test_hashes, n_test)
    development = [p for p, u in zip(cohort, test_hashes, strict=True) if u >= t_test]
    n_val = round(config.validation_fraction_of_development * len(development))
    n_val = max(1, n_val) if config.ratios.validation > 0 and len(development) >= 2 else n_val
    t_val = _rank_threshold([unit_hash(config.seed, "validation", p) for p in development], n_val)
    return {"test": t_test, "validation": t_val}


def assign_patients(
    patients: Iterable[str],
    config: SplitConfig,
    previous: Mapping[str, str] | None = None,
    thresholds: Mapping[str, float] | None = None,
) -> dict[str, str]:
    """``{patient: split}`` for the current patients plus the previous test patients."""
    previous = dict(previous or {})
    current = sorted(set(patients))
    limits = dict(thresholds or {"test": config.test_fraction,
                                 "validation": config.validation_fraction_of_development})  # fmt: skip
    assignment: dict[str, str] = {}
    for patient in current:
        before = previous.get(patient)
        if before == "test":
            assignment[patient] = "test"
        elif before in ("train", "validation") and not config.rebalance_development:
            assignment[patient] = before
        elif before is None and unit_hash(config.seed, "test", patient) < limits["test"]:
            assignment[patient] = "test"
        else:
            u = unit_hash(config.seed, "validation", patient)
            assignment[patient] = "validation" if u < limits["validation"] else "train"
    if len(current) >= 3:
        _fill_empty_splits(assignment, current, previous, config)
    for patient, split in previous.items():  # the holdout never loses a member
        if split == "test" and patient not in assignment:
            assignment[patient] = "test"
    return assignment


def _fill_empty_splits(
    assignment: dict[str, str], current: list[str], previous: Mapping[str, str], config: SplitConfig
) -> None:
    # How far each patient's hash is from each split's range: smaller is a more natural move.
    def distance(patient: str, split: str) -> float:
        if split == "test":
            return unit_hash(config.seed, "test", patient)
        u = unit_hash(config.seed, "validation", patient)
        return u if split == "validation" else 1.0 - u

    for split in ("test", "validation", "train"):
        members = [p for p in current if assignment[p] == split]
        if members:
            continue
        sizes = {s: sum(1 for p in current if assignment[p] == s) for s in SPLITS}
        candidates = [p for p in current if previous.get(p) != "test" and sizes[assignment[p]] > 1]
        if not candidates:
            continue
        # New patients first; a previous patient moves only when no new one can (e.g. the
        # previous split had fewer than three patients).
        chosen = min(candidates, key=lambda p: (p in previous, distance(p, split), p))
        logger.info(
            "split %s was empty: moved one patient there from %s", split, assignment[chosen]
        )
        assignment[chosen] = split


def _fold_lists(
    assignment: Mapping[str, str], cases_by_patient: Mapping[str, list[str]], config: SplitConfig
) -> list[dict[str, list[str]]]:
    development = sorted(p for p, s in assignment.items() if s != "test" and p in cases_by_patient)
    fold_of = {p: int(unit_hash(config.seed, "fold", p) * config.folds) for p in development}
    folds = []
    for fold in range(config.folds):
        held = [p for p in development if fold_of[p] == fold]
        if not held:
            logger.warning("fold %d has no patients (too few development patients)", fold)
        folds.append(
            {
                "train": sorted(
                    c for p in development if fold_of[p] != fold for c in cases_by_patient[p]
                ),
                "validation": sorted(c for p in held for c in cases_by_patient[p]),
            }
        )
    return folds


def previous_assignment(previous_split: Mapping[str, Any] | None) -> dict[str, str]:
    """``{patient: split}`` recorded in a split document written by :func:`make_split`."""
    if not previous_split:
        return {}
    patients = previous_split.get("patients")
    if not isinstance(patients, Mapping):
        raise ValueError("the previous split has no 'patients' block: not written by this pipeline")
    return {str(p): split for split in SPLITS for p in patients.get(split, [])}


def make_split(
    case_patients: Mapping[str, str],
    config: SplitConfig,
    previous_split: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The split document: case ids per split, patient pseudonyms per split, optional folds."""
    cases_by_patient: dict[str, list[str]] = {}
    for case_id, patient in sorted(case_patients.items()):
        cases_by_patient.setdefault(str(patient), []).append(case_id)
    previous = previous_assignment(previous_split)
    ratios = config.ratios.to_dict()
    same_rule = bool(previous_split) and previous_split.get("seed") == config.seed and previous_split.get(
        "ratios"
    ) == ratios
    if not previous_split:
        thresholds = first_thresholds(cases_by_patient, config)
    elif same_rule and "thresholds" in previous_split:
        thresholds = dict(previous_split["thresholds"])
    else:
        thresholds = {"test": config.test_fraction, "validation": config.validation_fraction_of_development}
    assignment = assign_patients(cases_by_patient, config, previous, thresholds)
    withdrawn = sorted(
        p for p, s in assignment.items() if s == "test" and p not in cases_by_patient
    )
    if withdrawn:
        logger.warning(
            "%d holdout patient(s) have no current cases; kept in the holdout", len(withdrawn)
        )
    document: dict[str, Any] = {}
    for split in SPLITS:
        patients = sorted(p for p, s in assignment.items() if s == split)
        document[split] = sorted(c for p in patients for c in cases_by_patient.get(p, []))
    document["patients"] = {
        split: sorted(p for p, s in assignment.items() if s == split) for split in SPLITS
    }
    document["withdrawn_holdout_patients"] = withdrawn
    document["folds"] = _fold_lists(assignment, cases_by_patient, config) if config.folds else []
    document["seed"] = config.seed
    document["ratios"] = ratios
    document["thresholds"] = thresholds
    return document
