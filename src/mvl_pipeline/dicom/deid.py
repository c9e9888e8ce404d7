"""De-identification: DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile.

The action tables (which attribute gets X remove / Z empty / D dummy / U new UID ...) come from
the ``dicom-anonymizer`` package's ``dicomfields_2026c`` database (the standard's 2026c
Table E.1-1); the actions themselves are implemented here:

- compound actions resolve to the choice that keeps IOD conformance: Z/D -> D, X/Z -> Z,
  X/D -> D, X/Z/D -> Z; X/Z/U* keeps the sequence and de-identifies its items;
- U: ``2.25.<int>`` from HMAC-SHA256(key, uid), so one source UID always maps to the same new
  UID under one key (studies stay linked across files and drops) and cannot be reversed
  without the key; well-known DICOM UIDs (``1.2.840.10008.*``) are kept;
- PatientID and PatientName become the patient pseudonym (:func:`pseudonym`);
- every private element is removed; sequences are processed recursively;
- the Patient module's attributes (group 0010) that the tables do not list are removed (the
  tables lag the standard: Patient's Birth Date in Alternative Calendar (0010,0033) is not in
  them), except Anatomical Orientation Type;
- Retain Longitudinal Temporal Information (Full Dates) is off by default: dates and times are
  emptied / replaced; with ``retain_longitudinal_temporal=True`` they are kept (except the
  birth date and time) and code 113106 is recorded;
- without that option, dates left outside the tables (DA/DT) get dummy values too;
- UIDs outside the tables (UI) are mapped as by U (well-known ones kept);
- burned-in annotation is flagged (BurnedInAnnotation YES, or a modality / SOP class where
  burned-in text is likely: secondary capture, US, endoscopy ...); pixels are not changed.

There is no default key: :func:`mvl_pipeline.core.pseudonyms.require_key` refuses a missing or weak one.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import hmac
import logging
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from mvl_pipeline.core.pseudonyms import require_key
from mvl_pipeline.dicom.write import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

log = logging.getLogger(__name__)

ACTION_DATABASE = "dicomfields_2026c"
METHOD_VERSION = "mvl_pipeline deid 3"  # 2: the Patient module outside the tables removed; 3: UIDs outside the tables mapped, burned-in text checked on every file of a series, MSD channel names kept only if contrast terms
#: What an ingest manifest records: a change re-ingests every study still in the drop.
DEID_METHOD = f"{METHOD_VERSION}; action tables {ACTION_DATABASE}"
_BASIC_PROFILE = ("113100", "Basic Application Confidentiality Profile")
_RETAIN_FULL_DATES = ("113106", "Retain Longitudinal Temporal Information Full Dates Option")
_TEMPORAL_VRS = frozenset({"DA", "DT", "TM"})
_NOT_RETAINED_TEMPORAL = frozenset({0x00100030, 0x00100032})  # Patient's Birth Date / Time
_PATIENT_NAME, _PATIENT_ID = 0x00100010, 0x00100020
_PATIENT_GROUP = 0x0010
#: Patient-module attributes the tables do not list that are kept: not about who the patient is.
_KEPT_PATIENT_ELEMENTS = frozenset({0x00102210})  # Anatomical Orientation Type
_BURNED_IN_MODALITIES = frozenset({"US", "XC", "ES", "GM", "SC", "OT", "DOC", "IVUS"})
_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
_ULTRASOUND_PREFIXES = ("1.2.840.10008.5.1.4.1.1.6.", "1.2.840.10008.5.1.4.1.1.3.")
_WELL_KNOWN_UID = "1.2.840.10008."

# dicom-anonymizer category -> our resolved action
_CATEGORY_ACTIONS = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "D",
    "X_Z_TAGS": "Z",
    "X_D_TAGS": "D",
    "X_Z_D_TAGS": "Z",
    "X_Z_U_STAR_TAGS": "clean",
}
_DUMMY_TEXT = "ANONYMIZED"
_DUMMY_BY_VR: dict[str, Any] = {
    "AE": "ANONYMIZED",
    "AS": "000Y",
    "CS": "ANONYMIZED",
    "DA": "19000101",
    "DS": "0",
    "DT": "19000101000000",
    "IS": "0",
    "LO": _DUMMY_TEXT,
    "LT": _DUMMY_TEXT,
    "PN": _DUMMY_TEXT,
    "SH": _DUMMY_TEXT,
    "ST": _DUMMY_TEXT,
    "TM": "000000",
    "UC": _DUMMY_TEXT,
    "UT": _DUMMY_TEXT,
    "UR": "",
    "FL": 0.0,
    "FD": 0.0,
    "SL": 0,
    "SS": 0,
    "SV": 0,
    "UL": 0,
    "US": 0,
    "UV": 0,
    "AT": 0,
    "OB": b"\x00\x00",
    "OD": b"\x00" * 8,
    "OF": b"\x00" * 4,
    "OL": b"\x00" * 4,
    "OV": b"\x00" * 8,
    "OW": b"\x00\x00",
    "UN": b"\x00\x00",
}


def _hmac(key: bytes, *parts: str) -> bytes:
    message = "\x1f".join(parts).encode("utf-8")
    return hmac.new(key, message, hashlib.sha256).digest()


def pseudonym(key: bytes, *parts: str, prefix: str = "case") -> str:
    """A keyed pseudonym such as ``case-1f3a...`` (16 hex): deterministic, irreversible without the key."""
    if not parts:
        raise ValueError("pseudonym needs at least one identifying part")
    return f"{prefix}-{_hmac(key, 'pseudonym', prefix, *parts).hex()[:16]}"


def map_uid(key: bytes, uid: str) -> str:
    """The replacement for ``uid``: ``2.25.<int>`` of a UUID built from HMAC-SHA256(key, uid)."""
    uid = str(uid).strip("\x00 ")
    if not uid or uid.startswith(_WELL_KNOWN_UID):
        return uid
    return f"2.25.{uuid.UUID(bytes=_hmac(key, 'uid', uid)[:16], version=4).int}"


@functools.lru_cache(maxsize=1)
def _action_tables() -> tuple[dict[int, str], list[tuple[int, int, int, int, str]]]:
    """``{tag: action}`` plus masked entries ``(group, element, group_mask, element_mask, action)``."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    database = dicom_anonymization_database_selector(ACTION_DATABASE)
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for category, action in _CATEGORY_ACTIONS.items():
        for entry in database[category]:
            if len(entry) == 2:
                exact[entry[0] << 16 | entry[1]] = action
            else:
                masked.append((*entry, action))
    return exact, masked


def _action_for(tag: BaseTag) -> str | None:
    exact, masked = _action_tables()
    action = exact.get(int(tag))
    if action is not None:
        return action
    for group, element, group_mask, element_mask, masked_action in masked:
        if tag.group & group_mask == group and tag.element & element_mask == element & element_mask:
            return masked_action
    return None


@dataclass(frozen=True)
class DeidReport:
    """What :func:`deidentify` did; ``counts`` per action (X, Z, D, U, clean, private, ...)."""

    counts: dict[str, int]
    burned_in_annotation: bool
    burned_in_reason: str
    patient_pseudonym: str
    retain_longitudinal_temporal: bool
    method: tuple[str, ...] = field(default=())


class _Cleaner:
    def __init__(self, key: bytes, retain_temporal: bool) -> None:
        self.key = key
        self.retain_temporal = retain_temporal
        self.counts: Counter[str] = Counter()

    def empty(self, element: DataElement) -> None:
        if element.VR == "SQ":
            element.value = Sequence([])
        elif element.VR in ("OB", "OD", "OF", "OL", "OV", "OW", "UN"):
            element.value = b""
        elif element.VR in _DUMMY_BY_VR and isinstance(_DUMMY_BY_VR[element.VR], int | float):
            element.value = None
        else:
            element.value = ""

    def dummy(self, element: DataElement) -> None:
        if element.VR == "SQ":
            element.value = Sequence([])  # a dummy item could carry nothing useful either
        elif element.VR == "UI":
            self.map_uids(element)
        else:
            element.value = _DUMMY_BY_VR.get(element.VR, "")

    def map_uids(self, element: DataElement) -> None:
        value = element.value
        if element.VR != "UI":
            self.dummy(element)
        elif isinstance(value, str):
            element.value = map_uid(self.key, value) if value else value
        elif value is not None:
            element.value = [map_uid(self.key, str(v)) for v in value]

    def clean(self, ds: Dataset) -> None:
        for element in list(ds):
            tag = element.tag
            if tag.is_private:
                continue  # removed in one pass at the end
            action = _action_for(tag)
            temporal = element.VR in _TEMPORAL_VRS
            if (
                self.retain_temporal
                and temporal
                and int(tag) not in _NOT_RETAINED_TEMPORAL
                and action in ("X", "Z", "D")
            ):
                self.counts["kept_temporal"] += 1
                continue
            if action is None and tag.group == _PATIENT_GROUP and int(tag) not in _KEPT_PATIENT_ELEMENTS:
                # the Patient module outside the tables (e.g. Patient's Birth Date in Alternative
                # Calendar (0010,0033), newer than the tables' source): removed, never kept
                self.counts["patient_group_outside_tables"] += 1
                del ds[tag]
                continue
            if action is None:
                if element.VR == "SQ":
                    for item in element.value:
                        self.clean(item)
                elif (
                    temporal
                    and element.VR != "TM"
                    and not self.retain_temporal
                    and element.value not in (None, "")
                ):
                    self.dummy(element)
                    self.counts["dates_outside_tables"] += 1
                elif element.VR == "UI" and element.value not in (None, ""):
                    # a UID outside the tables (newer than their source, e.g. Concatenation Source,
                    # Volume Frame of Reference): vendors' UIDs embed dates and serial numbers
                    self.map_uids(element)
                    self.counts["uids_outside_tables"] += 1
                continue
            self.counts[action] += 1
            if action == "X":
                del ds[tag]
            elif action == "Z":
                self.empty(element)
            elif action == "D":
                self.dummy(element)
            elif action == "U":
                self.map_uids(element)
            elif action == "clean" and element.VR == "SQ":
                for item in element.value:
                    self.clean(item)


def burned_in(ds: Dataset) -> tuple[bool, str]:
    """Whether ``ds``'s pixels may carry burned-in text (its flag, or a modality / SOP class where
    such text is likely), and why. One file's answer: a series is flagged when any file is."""
    value = str(ds.get("BurnedInAnnotation", "") or "").upper()
    modality = str(ds.get("Modality", "") or "").upper()
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if value == "YES":
        return True, "BurnedInAnnotation is YES"
    if sop_class.startswith(_SECONDARY_CAPTURE_PREFIX):
        return (
            True,
            f"secondary capture: burned-in text likely (BurnedInAnnotation={value or 'absent'})",
        )
    if modality in _BURNED_IN_MODALITIES or sop_class.startswith(_ULTRASOUND_PREFIXES):
        return (
            True,
            f"modality {modality or sop_class}: burned-in text likely (BurnedInAnnotation={value or 'absent'})",
        )
    return False, ""


def _patient_pseudonym(ds: Dataset, key: bytes) -> str:
    patient_id = str(ds.get("PatientID", "") or "").strip()
    if patient_id:
        return pseudonym(key, "patient", str(ds.get("IssuerOfPatientID", "") or ""), patient_id)
    log.warning("no PatientID: the patient pseudonym is derived from the study instead")
    return pseudonym(key, "study", str(ds.get("StudyInstanceUID", "") or ""))


def deidentify(
    ds: Dataset,
    key: bytes,
    *,
    retain_longitudinal_temporal: bool = False,
    patient_pseudonym: str | None = None,
) -> tuple[Dataset, DeidReport]:
    """A de-identified copy of ``ds`` (the input is not changed) and a report of what was done.

    ``key`` comes from :func:`require_key`. ``patient_pseudonym`` overrides the default
    ``pseudonym(key, "patient", IssuerOfPatientID, PatientID)``.
    """
    key = require_key(key)
    burned_in_flag, burned_in_reason = burned_in(ds)
    pseudo = patient_pseudonym or _patient_pseudonym(ds, key)
    out = copy.deepcopy(ds)
    if hasattr(out, "filename"):
        out.filename = None  # a source path can itself identify the patient
    if getattr(out, "preamble", None) is not None:
        out.preamble = b"\x00" * 128
    cleaner = _Cleaner(key, retain_longitudinal_temporal)
    cleaner.counts["private"] = sum(1 for element in out.iterall() if element.tag.is_private)
    out.remove_private_tags()
    cleaner.clean(out)
    out.PatientID = pseudo
    out.PatientName = pseudo
    cleaner.counts["pseudonym"] += 2

    original_meta = getattr(ds, "file_meta", None)
    if original_meta is not None:
        meta = FileMetaDataset()
        for keyword in ("MediaStorageSOPClassUID", "TransferSyntaxUID"):
            if keyword in original_meta:
                setattr(meta, keyword, original_meta[keyword].value)
        if "MediaStorageSOPInstanceUID" in original_meta:
            meta.MediaStorageSOPInstanceUID = map_uid(key, original_meta.MediaStorageSOPInstanceUID)
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        out.file_meta = meta

    method = (
        "DICOM PS3.15 E.1 Basic Application Confidentiality Profile",
        f"Retain Longitudinal Temporal Full Dates: {'yes' if retain_longitudinal_temporal else 'no'}",
        DEID_METHOD,
    )
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = list(method)
    codes = [_BASIC_PROFILE] + ([_RETAIN_FULL_DATES] if retain_longitudinal_temporal else [])
    items = []
    for value, meaning in codes:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        items.append(item)
    out.DeidentificationMethodCodeSequence = items
    out.LongitudinalTemporalInformationModified = (
        "UNMODIFIED" if retain_longitudinal_temporal else "REMOVED"
    )
    if burned_in_flag:
        log.info("burned-in annotation flagged: %s", burned_in_reason)
    report = DeidReport(
        counts=dict(cleaner.counts),
        burned_in_annotation=burned_in_flag,
        burned_in_reason=burned_in_reason,
        patient_pseudonym=pseudo,
        retain_longitudinal_temporal=retain_longitudinal_temporal,
        method=method,
    )
    return out, report
