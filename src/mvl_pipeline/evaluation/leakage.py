"""The leakage guard: a model is never scored on a patient it was developed on.

Each model carries, in its config, a record of its development patients (train + validation):
salted SHA-256 hashes of their pseudonyms, with a salt of its own (so records of different
models cannot be joined with each other or with the split files). Before a model is scored on a
gate or test set, :func:`check_no_leakage` hashes that set's patients with the model's salt and
refuses any overlap: after a key rotation, a lost split file or a hand-edited split, the same
patient could otherwise be a champion's training case and its "held-out" evidence at once.

Pseudonyms are keyed: under a new key the same patient has a new pseudonym, and no hash can
match. So the record also names the key its patients were named under (``key_id``, from the
split), and a held-out set named under another key is refused outright: its overlap with the
model's development patients cannot be known.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

RECORD_KEY = "development_patients"


class LeakageError(ValueError):
    """A held-out set shares patients with a model's development set."""


def _hash(salt: str, patient: str) -> str:
    return hashlib.sha256(f"{salt}\x1f{patient}".encode()).hexdigest()[:20]


def development_record(
    patients: Iterable[str], salt: str | None = None, key_id: str | None = None, cases: Iterable[str] = ()
) -> dict[str, Any]:
    """``{"salt", "hashes", "n", "key_id", "case_hashes"}`` of a model's development patients and
    cases (stored in its config). The fit passes its weights' hash as the salt, so the same model
    always gets the same record, and the split's ``key_id``. The cases are recorded too: a case
    keeps its id when its patient pseudonym changes (a corrected Patient ID, a new patients.csv),
    so only its own hash can show that a held-out case was a development case."""
    salt = salt or secrets.token_hex(16)
    hashes = sorted({_hash(salt, str(p)) for p in patients})
    case_hashes = sorted({_hash(salt, f"case\x1f{c}") for c in cases})
    return {"salt": salt, "hashes": hashes, "n": len(hashes), "key_id": key_id, "case_hashes": case_hashes}


def shared_patients(record: Mapping[str, Any] | None, patients: Iterable[str]) -> int | None:
    """How many of ``patients`` are in the record (None when the model has no record)."""
    if not record or "salt" not in record:
        return None
    known = set(record.get("hashes", []))
    return sum(_hash(str(record["salt"]), str(p)) in known for p in set(patients))


def shared_cases(record: Mapping[str, Any] | None, cases: Iterable[str]) -> int | None:
    """How many of ``cases`` are development cases in the record (None when it has no cases)."""
    if not record or "salt" not in record or "case_hashes" not in record:
        return None
    known = set(record["case_hashes"])
    return sum(_hash(str(record["salt"]), f"case\x1f{c}") in known for c in set(cases))


def check_no_leakage(
    model_config: Mapping[str, Any],
    patients: Iterable[str],
    *,
    role: str,
    model: str,
    key_id: str | None = None,
    cases: Iterable[str] = (),
) -> int | None:
    """Raise :class:`LeakageError` when ``patients`` (the ``role`` set, named under the key
    ``key_id``) share a patient with the development patients recorded in ``model_config``, or
    ``cases`` a case with its development cases, or are named under another key than those;
    returns the overlap (0) or None when the model predates the record (nothing can be checked:
    the caller says so)."""
    record = model_config.get(RECORD_KEY) or {}
    recorded_key = record.get("key_id")
    if recorded_key and key_id and recorded_key != key_id:
        raise LeakageError(
            f"the {model} was developed on patients pseudonymised under another key ({recorded_key}) than the "
            f"{role} set ({key_id}): the same patient has another pseudonym under each key, so whether the {role} "
            "set holds its training patients cannot be checked. Restore the earlier key, or retrain the model on "
            "the current split (a champion from before the key change must be retired: remove its alias)"
        )
    shared = shared_patients(record, patients)
    if shared:
        raise LeakageError(
            f"{shared} patient(s) of the {role} set were development (training or validation) patients of the "
            f"{model}: scoring it there would report what it has learnt, not how it generalises. This follows a "
            "changed pseudonymisation key, a lost or edited split file, or a re-split. Restore the split "
            "(03_primary/split.json) and the key it was made with, or retrain the model on the current split"
        )
    shared_case_count = shared_cases(record, cases)
    if shared_case_count:
        raise LeakageError(
            f"{shared_case_count} case(s) of the {role} set were development (training or validation) cases of the "
            f"{model}, now under another patient (a corrected Patient ID or a new patients.csv regrouped them): "
            "scoring it there would report what it has learnt. Restore the split (03_primary/split.json) it was "
            "made with, or retrain the model on the current split"
        )
    return shared


#: The plan a model was trained under (``decide_postprocessing`` records it in the model's config).
PLAN_KEY = "plan_id"


class PlanMismatchError(ValueError):
    """A model scored under another preprocessing plan than the one it was trained under."""


def check_plan(model_config: Mapping[str, Any], plan: Mapping[str, Any], *, model: str) -> None:
    """Raise :class:`PlanMismatchError` when ``model_config`` records a plan other than ``plan``:
    its inputs would be resampled and normalised otherwise than in training, and the figures (and a
    registration, which stores the plan beside the weights) would describe a pairing that never
    trained. A model from before the record is not checked."""
    trained_on = model_config.get(PLAN_KEY)
    if trained_on and trained_on != plan.get("plan_id"):
        raise PlanMismatchError(
            f"the {model} was trained under preprocessing plan {trained_on}, the current plan is "
            f"{plan.get('plan_id')} (the data were re-planned since): run the fit stage again "
            "(kedro run --pipelines fit, or make train) before evaluate or register"
        )
