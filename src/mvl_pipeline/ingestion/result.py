"""What processing one unit produces, and the guards every result passes through.

A unit ends as cases and/or PHI-free records (quarantined or skipped, each with a stable
``reason``). Raw identity (headers, paths, UIDs) lives only in the processing functions' local
variables; :func:`guard_no_identity` is the last line of defence: no identifying string seen in
a source header may appear in what leaves, and every record's detail is scrubbed.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mvl_pipeline.core.case import Case
from mvl_pipeline.core.errors import (
    EmptyImageError,
    ImplausibleGeometryError,
    NonFiniteValuesError,
    TooFewSlicesError,
)
from mvl_pipeline.core.volume import Volume
from mvl_pipeline.ingestion.config import IngestConfig

logger = logging.getLogger(__name__)

#: The shortest identifying value or name part looked for ("Ng", "Li", "Wu" are surnames).
MIN_IDENTITY = 2
#: The shortest one looked for anywhere in a case's metadata, and scrubbed inside words: shorter
#: ones only as words of their own, and in a case's free text only (see guard_no_identity).
MIN_SEARCHED = 4

_UID = re.compile(r"\b(?!1\.2\.840\.10008\.)\d+(?:\.\d+){3,}\b")


#: Identifying attributes whose values must never appear in what leaves this module.
IDENTITY_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
    "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
    "OtherPatientIDs", "OtherPatientNames", "PatientAddress", "PatientTelephoneNumbers",
    "StudyID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "StationName",
)  # fmt: skip


@dataclass
class UnitResult:
    """What one unit produced. ``cases`` are ready to store; the rest goes to the manifest."""

    unit: str
    cases: list[Case] = field(default_factory=list)
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    modality: str = "unknown"


# -- helpers ---------------------------------------------------------------------------------
def scrub(text: str, raw: Sequence[str] = ()) -> str:
    """Remove UIDs and any given raw strings (paths, names) from a message: strings of
    ``MIN_SEARCHED`` characters or more wherever they stand, shorter ones (a surname such as
    "Ng" or "Li") where they stand as a word of their own."""
    for value in sorted((r for r in raw if r), key=len, reverse=True):
        pattern = re.escape(value) if len(value) >= MIN_SEARCHED else rf"(?<!\w){re.escape(value)}(?!\w)"
        text = re.sub(pattern, "<redacted>", text, flags=re.IGNORECASE)
    return _UID.sub("<uid>", text)[:300]


def validate_image(image: Volume, config: IngestConfig, channels: Sequence[str] = ()) -> None:
    """Finite values, enough slices, and contrast in every channel (``channels``: their names)."""
    array = image.array
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise NonFiniteValuesError("image holds NaN or Inf values")
    if min(image.shape) < 1 or image.shape[2] < config.min_slices:
        raise TooFewSlicesError(f"{image.shape[2]} slices, at least {config.min_slices} needed")
    if min(image.shape) < config.min_slices:  # a 2-D image stored with its thin axis first
        raise TooFewSlicesError(
            f"the image is {min(image.shape)} voxel(s) thick along axis {image.shape.index(min(image.shape))} "
            f"(shape {list(image.shape)}): a 3-D image needs at least {config.min_slices} along every axis"
        )
    low, high = config.spacing_range_mm
    if not all(low <= s <= high for s in image.spacing):
        raise ImplausibleGeometryError(
            f"voxel spacing {[round(float(s), 4) for s in image.spacing]} mm is outside ingest.spacing_range_mm "
            f"[{low}, {high}]: a header in other units (metres, microns)?"
        )
    for index in range(image.n_channels):
        values = image.channel(index).array
        if float(values.max()) == float(values.min()):
            which = f"channel {channels[index]!r} of the image" if index < len(channels) else "the image"
            raise EmptyImageError(f"every voxel of {which} has the same value")


def record(reason: str, detail: str, *, case_id: str | None, n_files: int, kind: str) -> dict:
    return {"reason": reason, "detail": detail, "case_id": case_id, "n_files": n_files,
            "source_kind": kind}  # fmt: skip


def identity_strings(header: Any) -> list[str]:
    """The header's identifying values and their name parts, down to two characters: "Ng^Bo"
    gives "Ng^Bo", "Ng" and "Bo" (initials alone are left out). Where each is looked for:
    :func:`guard_no_identity`."""
    values = []
    for keyword in IDENTITY_KEYWORDS:
        value = header.get(keyword) if header is not None else None
        if value is None:
            continue
        for item in value if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue" else [value]:
            text = str(item).strip()
            if len(text) >= MIN_IDENTITY:
                values.append(text)
                values.extend(part for part in re.split(r"[\^ ,=]+", text) if len(part) >= MIN_IDENTITY)
    return list(dict.fromkeys(values))


def identity_found(text: str, identity: Sequence[str]) -> bool:
    """Whether ``text`` holds one of the ``identity`` strings as a whole token.

    A value with a '.' or '/' (a UID, a path) is searched as plain text. Any other value (a name
    part, an ID, a date) counts only where it is not glued to a letter or digit on either side and
    is not one part of a dotted number: the pseudonymised UIDs and the float geometry of every case
    are long digit runs that depend on the pseudonymisation key, and a 5-digit ID or a birth date
    turns up inside one of them about once in a few hundred studies. Matching those by substring
    quarantined good cases at random; as a token, the ID still matches wherever it is written
    as a value of its own ("12345", "MRN 12345", "A^12345"). Letter case is ignored: a name
    written "Kowalska" or "kowalska" in a file name or a free-text field is the same name.
    """
    folded = text.casefold()
    for value in identity:
        if not value:
            continue
        needle = value.casefold()
        if "." in value or "/" in value:
            if needle in folded:
                return True
        elif re.search(rf"(?<![a-z0-9])(?<![0-9]\.){re.escape(needle)}(?![a-z0-9])(?!\.[0-9])", folded):
            return True
    return False


def guard_no_identity(result: UnitResult, identity: Sequence[str]) -> None:
    """Last line of defence: no identifying string of the source may appear in the output."""
    if not identity:
        return
    searched = [value for value in identity if len(value) >= MIN_SEARCHED]
    for case in list(result.cases):
        blob = json.dumps({"meta": case.meta, "image": case.image.meta,
                           "label": None if case.label is None else case.label.meta},
                          default=str, ensure_ascii=False)  # fmt: skip
        # free text of the source that a case keeps (its label names, e.g. a SEG's SegmentLabel)
        # is searched for the short name parts too: the rest of the blob is codes and numbers
        # ("MR", "RAS", "DA") where a two-letter name would match by chance
        free_text = json.dumps(case.meta.get("label_names", {}), ensure_ascii=False)
        if identity_found(blob, searched) or identity_found(free_text, identity):
            result.cases.remove(case)
            result.quarantined.append(
                record("phi_guard", "identifying text survived de-identification",
                        case_id=case.case_id, n_files=0, kind="dicom")  # fmt: skip
            )
            logger.error("case %s held identifying text after de-identification", case.case_id)
    for entry in result.quarantined + result.skipped:
        entry["detail"] = scrub(str(entry.get("detail", "")), identity)
    if identity_found(result.modality, searched):  # a header's Modality, shown in the manifest
        result.modality = "unknown"


def case_meta(
    modality: str, source_kind: str, image: Volume, label: Volume | None, label_names: Mapping[int, str]
) -> dict[str, Any]:
    """The PHI-free geometry and label metadata every ingested case carries."""
    return {
        "modality": modality,
        "source_kind": source_kind,
        "label_names": {str(k): v for k, v in sorted(label_names.items())},
        "present_labels": sorted(int(v) for v in np.unique(label.array) if v) if label is not None else [],
        "spacing": list(image.spacing),
        "shape": list(image.shape),
        "orientation": image.orientation,
        "n_slices": int(image.shape[2]),
    }
