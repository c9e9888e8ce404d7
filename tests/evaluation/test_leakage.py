"""The leakage guard on hand-built records: a model is never scored on a patient it was developed
on, the record cannot be joined across models, and the refusal says what to do."""

from __future__ import annotations

import json

import pytest

from mvl_pipeline.evaluation.leakage import (
    RECORD_KEY,
    LeakageError,
    check_no_leakage,
    development_record,
    shared_patients,
)

DEVELOPMENT = [f"pt-{k:04d}" for k in range(10)]
GATE = [f"pt-{k:04d}" for k in range(10, 14)]


def test_the_record_holds_salted_hashes_never_pseudonyms():
    record = development_record(DEVELOPMENT, salt="a" * 32)
    assert record["n"] == 10 and len(record["hashes"]) == 10 and record["salt"] == "a" * 32
    text = json.dumps(record)
    assert not any(p in text for p in DEVELOPMENT)
    # the same patients under another salt (another model) give unrelated hashes
    other = development_record(DEVELOPMENT, salt="b" * 32)
    assert not set(record["hashes"]) & set(other["hashes"])
    # the same salt (the same weights) gives the same record
    assert development_record(reversed(DEVELOPMENT), salt="a" * 32) == record
    assert development_record(DEVELOPMENT)["salt"] != development_record(DEVELOPMENT)["salt"]  # random by default


def test_a_disjoint_gate_set_passes_and_an_overlap_is_counted():
    record = development_record(DEVELOPMENT, salt="s" * 32)
    assert shared_patients(record, GATE) == 0
    assert shared_patients(record, [*GATE, DEVELOPMENT[3], DEVELOPMENT[7]]) == 2
    assert shared_patients(None, GATE) is None and shared_patients({}, GATE) is None
    assert check_no_leakage({RECORD_KEY: record}, GATE, role="gate", model="challenger") == 0
    assert check_no_leakage({"model": {}}, GATE, role="gate", model="challenger") is None  # nothing to check


def test_a_gate_set_holding_a_development_patient_is_refused_with_what_to_do():
    config = {"model": {"num_classes": 3}, RECORD_KEY: development_record(DEVELOPMENT, salt="s" * 32)}
    with pytest.raises(LeakageError) as refused:
        check_no_leakage(config, [*GATE, DEVELOPMENT[0]], role="gate", model="champion (version 3)")
    message = str(refused.value)
    assert message.startswith("1 patient(s) of the gate set were development (training or validation) patients")
    assert "champion (version 3)" in message
    assert "Restore the split (03_primary/split.json) and the key it was made with" in message
    assert "retrain the model on the current split" in message
    assert DEVELOPMENT[0] not in message  # no pseudonym in the message
    assert isinstance(refused.value, ValueError)


def test_a_held_out_set_named_under_another_key_is_refused():
    """After a key rotation the same patient has another pseudonym: no hash can match, so the
    guard must not pass silently; it refuses because the overlap cannot be known."""
    record = development_record(DEVELOPMENT, salt="s" * 32, key_id="key-aaaaaaaaaaaa")
    config = {RECORD_KEY: record}
    assert check_no_leakage(config, GATE, role="gate", model="champion", key_id="key-aaaaaaaaaaaa") == 0
    with pytest.raises(LeakageError, match="another key") as caught:
        check_no_leakage(config, GATE, role="gate", model="champion (version 3)", key_id="key-bbbbbbbbbbbb")
    assert "key-aaaaaaaaaaaa" in str(caught.value) and "key-bbbbbbbbbbbb" in str(caught.value)
    # a record from before key ids, or a split without one, falls back to the pseudonym check
    legacy = {RECORD_KEY: development_record(DEVELOPMENT, salt="s" * 32)}
    assert check_no_leakage(legacy, GATE, role="gate", model="champion", key_id="key-bbbbbbbbbbbb") == 0


def test_a_development_case_in_a_held_out_set_under_another_patient_is_refused():
    """A case keeps its id when its patient pseudonym changes (a corrected Patient ID): the
    patient hashes cannot see it, the case hashes can."""
    cases = [f"case-{k:04d}" for k in range(20)]
    record = development_record(DEVELOPMENT, salt="s" * 32, cases=cases)
    assert not any(c in json.dumps(record) for c in cases)  # hashes only
    config = {RECORD_KEY: record}
    held_out_cases = ["case-9000", "case-9001"]
    assert check_no_leakage(config, GATE, role="gate", model="challenger", cases=held_out_cases) == 0
    with pytest.raises(LeakageError) as refused:
        check_no_leakage(config, ["pt-new-pseudonym"], role="test", model="trained model", cases=[*held_out_cases, cases[4]])
    message = str(refused.value)
    assert message.startswith("1 case(s) of the test set were development (training or validation) cases")
    assert cases[4] not in message and "regrouped" in message
    # a record from before case hashes checks patients only
    legacy = {RECORD_KEY: {k: v for k, v in record.items() if k != "case_hashes"}}
    assert check_no_leakage(legacy, GATE, role="gate", model="champion", cases=[cases[4]]) == 0
