"""Realistic but entirely FAKE identifying DICOM headers for the sample hospital drop.

Names, record numbers, dates and institutions are drawn from small built-in lists with an explicit
``numpy.random.Generator``: no real person, no real hospital. They exist so that the
de-identification step has real work to do (standard PHI attributes plus one private block whose
text repeats the patient's name and record number).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import numpy as np

PRIVATE_GROUP = 0x0009
PRIVATE_CREATOR = "MVL SAMPLE PACS"

_FAMILY_NAMES = (
    "MUELLER", "OKAFOR", "JANSSEN", "ROSSI", "NOWAK", "SILVA", "HALVORSEN", "DUBOIS",
    "KOWALSKI", "FERREIRA", "LINDQVIST", "MORENO", "PETROV", "OCONNELL", "TANAKA", "ABERNATHY",
    "VASQUEZ", "KRUEGER", "DESAI", "MBEKI", "FONTAINE", "BRENNAN", "YILMAZ", "HASSAN",
)
_GIVEN_NAMES = {
    "F": ("ANNA", "MARGARET", "SOFIA", "INGRID", "CHIAMAKA", "ELENA", "PRIYA", "CLAIRE", "ZEYNEP"),
    "M": ("JOHANNES", "PETER", "LUCA", "TOMASZ", "OLUWASEUN", "MARCO", "RAVI", "HENRIK", "AHMED"),
}
_INSTITUTIONS = (
    ("ST ELSEWHERE GENERAL HOSPITAL", "12 Harbour Road, Springfield"),
    ("NORTHGATE UNIVERSITY MEDICAL CENTRE", "400 College Avenue, Riverton"),
)
_STATIONS = ("CT01", "CT02", "CTER1")
_PHYSICIANS = ("HOUSE^GREGORY^^DR", "QUINN^MICHAELA^^DR", "KILDARE^JAMES^^DR", "YANG^CRISTINA^^DR")


@dataclass(frozen=True)
class FakePatient:
    name: str  # DICOM PN: FAMILY^GIVEN
    patient_id: str  # MRN-like: a letter and 7 digits
    birth_date: dt.date
    sex: str  # "F" | "M"
    ward: str
    institution: int  # index into the institution list


def fake_patient(rng: np.random.Generator) -> FakePatient:
    sex = "F" if rng.uniform() < 0.5 else "M"
    family = _FAMILY_NAMES[int(rng.integers(len(_FAMILY_NAMES)))]
    given = _GIVEN_NAMES[sex][int(rng.integers(len(_GIVEN_NAMES[sex])))]
    birth = dt.date(1940, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 55)))
    return FakePatient(
        name=f"{family}^{given}",
        patient_id=f"{'ABCDEFGHJK'[int(rng.integers(10))]}{int(rng.integers(0, 10**7)):07d}",
        birth_date=birth,
        sex=sex,
        ward=f"WARD {int(rng.integers(1, 12))}{'ABC'[int(rng.integers(3))]}",
        institution=int(rng.integers(len(_INSTITUTIONS))),
    )


def fake_study_datetime(rng: np.random.Generator, after: dt.datetime | None = None) -> dt.datetime:
    """A study time in working hours: 2019-2025, or 3-12 months after ``after``."""
    if after is None:
        day = dt.date(2019, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 6)))
    else:
        day = after.date() + dt.timedelta(days=int(rng.integers(90, 366)))
    seconds = int(rng.integers(7 * 3600, 19 * 3600))
    return dt.datetime.combine(day, dt.time()) + dt.timedelta(seconds=seconds)


def study_header(
    patient: FakePatient,
    when: dt.datetime,
    rng: np.random.Generator,
    *,
    modality: str = "CT",
    series_description: str = "",
    study_description: str = "CT ABDOMEN WITH CONTRAST",
) -> dict[str, Any]:
    """DICOM keyword -> value for every slice of one study's image series (incl. private tags)."""
    institution, address = _INSTITUTIONS[patient.institution]
    age = (when.date() - patient.birth_date).days // 365
    return {
        "Modality": modality,
        "PatientName": patient.name,
        "PatientID": patient.patient_id,
        "IssuerOfPatientID": institution.split()[0],
        "PatientBirthDate": patient.birth_date.strftime("%Y%m%d"),
        "PatientSex": patient.sex,
        "PatientAge": f"{age:03d}Y",
        "StudyDate": when.strftime("%Y%m%d"),
        "StudyTime": when.strftime("%H%M%S"),
        "SeriesDate": when.strftime("%Y%m%d"),
        "SeriesTime": when.strftime("%H%M%S"),
        "AccessionNumber": f"RA{when.strftime('%y')}{int(rng.integers(0, 10**6)):06d}",
        # 8 digits: never a PID (at most 7: pid_max 4194304) or a port, so a PHI scan of logs full
        # of those (Ray's gcs_server.out) finds it only where it leaked
        "StudyID": f"{int(rng.integers(10**7, 10**8))}",
        "InstitutionName": institution,
        "InstitutionAddress": address,
        "StationName": _STATIONS[int(rng.integers(len(_STATIONS)))],
        "ReferringPhysicianName": _PHYSICIANS[int(rng.integers(len(_PHYSICIANS)))],
        "OperatorsName": f"{_FAMILY_NAMES[int(rng.integers(len(_FAMILY_NAMES)))]}^TECH",
        "Manufacturer": "MVL SYNTHETIC",
        "ManufacturerModelName": "PHANTOM CT" if modality == "CT" else "IMPORTED VOLUME",
        "BodyPartExamined": "ABDOMEN" if modality == "CT" else "",
        "StudyDescription": study_description,
        "SeriesDescription": series_description,
        "private": [
            (PRIVATE_GROUP, PRIVATE_CREATOR, 0x10, "LO", f"{patient.name} {patient.patient_id}"),
            (
                PRIVATE_GROUP,
                PRIVATE_CREATOR,
                0x11,
                "LT",
                f"Requested from {patient.ward} for {patient.name.replace('^', ' ')}, "
                f"born {patient.birth_date.isoformat()}",
            ),
        ],
    }
