"""The PHI guard's matching: a real leak is caught in every form it is written, and the
key-dependent digits of pseudonymised UIDs never trip it (they quarantined good cases at random)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mvl_pipeline.core.case import Case
from mvl_pipeline.core.volume import Volume
from mvl_pipeline.dicom.deid import map_uid
from mvl_pipeline.ingestion.result import (
    UnitResult,
    guard_no_identity,
    identity_found,
    identity_strings,
    scrub,
)

HEADER = {
    "PatientName": "KOWALSKA^ANNA", "PatientID": "79440", "PatientBirthDate": "19650412",
    "InstitutionName": "Saint Olaf General", "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.1234",
}  # fmt: skip
IDENTITY = identity_strings(HEADER)


@pytest.mark.parametrize(
    "text",
    [
        '{"PatientID": "79440"}', "MRN 79440, ward 3", "A^79440", "(79440)", "id=79440;",
        '"KOWALSKA^ANNA"', "Anna KOWALSKA", "kowalska ANNA", "born 19650412", "Saint Olaf General",
        '"uid": "1.2.826.0.1.3680043.8.498.1234"', "1.2.826.0.1.3680043.8.498.1234.5",  # a derived UID
        '"KOWALSKA_ANNA"', "Saint-Olaf",
        # letter case is not identity: the same name typed by hand or lower-cased by a tool
        "kowalska anna", "notes_Kowalska.txt", "saint olaf general", "SAINT-OLAF",
    ],
)
def test_a_leaked_value_is_found_wherever_it_stands_as_a_value_of_its_own(text):
    assert identity_found(text, IDENTITY), text


@pytest.mark.parametrize(
    "text",
    [
        '"2.25.254715987556924655526579440063068351612"',  # a real pseudonym seen to quarantine a case
        "spacing 0.79440", "79440.5", "1079440", "x19650412x", "ANNALS", "GeneralElectric",
    ],
)
def test_a_value_glued_inside_a_longer_number_or_word_is_not_found(text):
    assert not identity_found(text, IDENTITY), text


def test_pseudonymised_uids_of_many_keys_never_trip_the_guard_though_they_hold_the_id_as_digits():
    """2,000 keys x 4 UIDs each: the raw substring test (what the guard did before) finds the
    5-digit ID inside some pseudonyms; the guard finds none."""
    ids = [f"{n:05d}" for n in range(10000, 100000, 997)]  # 91 five-digit IDs
    uids = [map_uid(os.urandom(32), f"1.2.3.{k}") for k in range(8000)]
    blob = json.dumps(uids)
    substring_hits = sum(token in blob for token in ids)
    assert substring_hits > 0  # the old check would have quarantined good cases here
    assert not identity_found(blob, ids)


def _case(case_id: str, meta: dict) -> Case:
    volume = Volume(np.zeros((4, 4, 4), np.float32), np.eye(4), {})
    return Case(case_id=case_id, patient_id="patient-0123456789ab", image=volume, label=None, meta=meta)


def test_the_guard_quarantines_the_leaking_case_and_keeps_its_neighbour():
    leaking = _case("case-0123456789abcdef", {"series_description": "T1 KOWALSKA"})
    clean = _case("case-fedcba9876543210", {"series_uid": map_uid(b"k" * 32, "1.2.3"), "note": "ok 1079440"})
    result = UnitResult(unit="u", cases=[leaking, clean])
    guard_no_identity(result, IDENTITY)
    assert [c.case_id for c in result.cases] == ["case-fedcba9876543210"]
    assert [(q["reason"], q["case_id"]) for q in result.quarantined] == [("phi_guard", "case-0123456789abcdef")]


def test_a_record_detail_is_scrubbed_of_the_identity_in_any_letter_case():
    detail = "cannot read /drop/Kowalska^Anna/79440_broken.dcm of kowalska anna (ward 3)"
    scrubbed = scrub(detail, IDENTITY)
    assert not any(part in scrubbed.casefold() for part in ("kowalska", "anna", "79440")), scrubbed
    assert not identity_found(scrubbed, IDENTITY), scrubbed
    assert "ward 3" in scrubbed and "broken.dcm" in scrubbed  # only the identity goes
