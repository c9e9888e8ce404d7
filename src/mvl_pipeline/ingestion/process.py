"""Turn one unit of a drop into de-identified cases, or into quarantine records.

Runs in worker processes: everything here is a plain function of picklable arguments. Raw
identity (headers, paths, UIDs) lives only in this module's local variables; what is returned
is keyed by pseudonyms and carries a whitelisted, de-identified set of facts. A last guard
checks every returned record against the identifying strings seen in the source headers.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mvl_pipeline.core import pseudonyms
from mvl_pipeline.core.case import Case
from mvl_pipeline.core.errors import (
    EmptyImageError,
    ImagingError,
    LabelGridMismatchError,
    NonFiniteValuesError,
    NotAnImageError,
    TooFewSlicesError,
    UnknownLabelValueError,
)
from mvl_pipeline.core.volume import Volume
from mvl_pipeline.dicom import labels as dicom_labels
from mvl_pipeline.dicom import series as dicom_series
from mvl_pipeline.dicom.deid import deidentify
from mvl_pipeline.ingestion.units import Unit

logger = logging.getLogger(__name__)

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
_UID = re.compile(r"\b(?!1\.2\.840\.10008\.)\d+(?:\.\d+){3,}\b")
#: Identifying attributes whose values must never appear in what leaves this module.
IDENTITY_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
    "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
    "OtherPatientIDs", "OtherPatientNames", "PatientAddress", "PatientTelephoneNumbers",
    "StudyID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "StationName",
)  # fmt: skip


@dataclass(frozen=True)
class IngestSettings:
    """The slice of ``params:ingest`` a worker needs (picklable)."""

    labels: Mapping[str, int]
    label_aliases: Mapping[str, str] = field(default_factory=dict)
    min_slices: int = 8
    spacing_tolerance: float = 0.1
    retain_longitudinal_temporal: bool = False
    quarantine_burned_in: bool = True
    keep_unlabelled: bool = False
    volume_modality: str = "auto"


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
    """Remove UIDs and any given raw strings (paths, names) from a message."""
    for value in sorted((r for r in raw if r), key=len, reverse=True):
        text = text.replace(value, "<redacted>")
    return _UID.sub("<uid>", text)[:300]


def _canonical_label(name: str, settings: IngestSettings) -> str:
    lowered = name.strip().lower()
    return settings.label_aliases.get(lowered, lowered)


def map_label_names(names: Mapping[int, str], settings: IngestSettings) -> dict[int, int]:
    """Source label value -> project label value, by name. Unknown names raise."""
    table = {k.lower(): int(v) for k, v in settings.labels.items()}
    mapping = {}
    for value, name in names.items():
        if int(value) == 0:
            continue
        canonical = _canonical_label(str(name), settings)
        if canonical not in table:
            raise UnknownLabelValueError(
                f"label {int(value)} named {canonical!r} is not in the label map {sorted(table)}"
            )
        mapping[int(value)] = table[canonical]
    return mapping


def remap_labels(label: Volume, mapping: Mapping[int, int]) -> Volume:
    values = np.unique(label.array)
    unknown = [int(v) for v in values if v != 0 and int(v) not in mapping]
    if unknown:
        raise UnknownLabelValueError(f"label values {unknown} have no entry in the label map")
    lut = np.zeros(int(values.max()) + 1 if values.size else 1, dtype=np.uint8)
    for source, target in mapping.items():
        if source < lut.size:
            lut[source] = target
    return Volume(lut[label.array.astype(np.int64)], label.affine, {})


def validate_image(image: Volume, settings: IngestSettings) -> None:
    array = image.array
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise NonFiniteValuesError("image holds NaN or Inf values")
    if min(image.shape) < 1 or image.shape[2] < settings.min_slices:
        raise TooFewSlicesError(f"{image.shape[2]} slices, at least {settings.min_slices} needed")
    if float(array.max()) == float(array.min()):
        raise EmptyImageError("every voxel of the image has the same value")


def _record(reason: str, detail: str, *, case_id: str | None, n_files: int, kind: str) -> dict:
    return {"reason": reason, "detail": detail, "case_id": case_id, "n_files": n_files,
            "source_kind": kind}  # fmt: skip


def _identity_strings(header: Any) -> list[str]:
    values = []
    for keyword in IDENTITY_KEYWORDS:
        value = header.get(keyword) if header is not None else None
        if value is None:
            continue
        for item in value if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue" else [value]:
            text = str(item).strip()
            if len(text) >= 4:
                values.append(text)
                values.extend(part for part in re.split(r"[\^ ,]+", text) if len(part) >= 4)
    return values


def guard_no_identity(result: UnitResult, identity: Sequence[str]) -> None:
    """Last line of defence: no identifying string of the source may appear in the output."""
    if not identity:
        return
    for case in list(result.cases):
        blob = json.dumps({"meta": case.meta, "image": case.image.meta,
                           "label": None if case.label is None else case.label.meta},
                          default=str)  # fmt: skip
        if any(value in blob for value in identity):
            result.cases.remove(case)
            result.quarantined.append(
                _record("phi_guard", "identifying text survived de-identification",
                        case_id=case.case_id, n_files=0, kind="dicom")  # fmt: skip
            )
            logger.error("case %s held identifying text after de-identification", case.case_id)
    for record in result.quarantined + result.skipped:
        record["detail"] = scrub(str(record.get("detail", "")), identity)


# -- DICOM studies ---------------------------------------------------------------------------
def process_dicom_study(drop: Any, unit: Unit, key: bytes, settings: IngestSettings) -> UnitResult:
    """All files of one study: image series + their SEG/RTSTRUCT labels -> cases."""
    result = UnitResult(unit=pseudonyms.unit_key(key, unit.kind, unit.source_id))
    headers: dict[str, Any] = {}
    identity: list[str] = list(unit.files)
    for relpath in unit.files:
        try:
            headers[relpath] = dicom_series.read_header(io.BytesIO(drop.read_bytes(relpath)))
        except ImagingError as exc:
            result.quarantined.append(
                _record(exc.reason, scrub(exc.detail, [relpath]), case_id=None, n_files=1, kind="dicom")
            )
    for header in headers.values():
        identity.extend(_identity_strings(header))
    identity = sorted(set(identity))

    series: dict[str, list[str]] = defaultdict(list)
    label_objects: list[str] = []
    for relpath, header in headers.items():
        sop_class = str(header.get("SOPClassUID", ""))
        if sop_class in (SEG_SOP_CLASS, RTSTRUCT_SOP_CLASS):
            label_objects.append(relpath)
            continue
        try:
            dicom_series.check_is_image(header)
        except NotAnImageError as exc:
            result.skipped.append({"reason": exc.reason, "detail": scrub(exc.detail), "n_files": 1})
            continue
        series[str(header.get("SeriesInstanceUID", ""))].append(relpath)

    labels_by_series: dict[str, list[str]] = defaultdict(list)
    for relpath in label_objects:
        for referenced in dicom_labels.referenced_series_uids(headers[relpath]):
            labels_by_series[referenced].append(relpath)

    for series_uid, files in sorted(series.items()):
        first = headers[files[0]]
        case_id = pseudonyms.case_pseudonym(key, unit.source_id, series_uid)
        label_files = labels_by_series.get(series_uid, [])
        if not label_files and not settings.keep_unlabelled:
            result.skipped.append(
                {"reason": "unlabelled_series", "detail": "no SEG or RTSTRUCT references this series",
                 "n_files": len(files), "case_id": case_id}  # fmt: skip
            )
            continue
        try:
            case = _dicom_case(drop, files, label_files, headers, case_id, key, settings)
        except ImagingError as exc:
            result.quarantined.append(
                _record(exc.reason, scrub(exc.detail, identity), case_id=case_id,
                        n_files=len(files) + len(label_files), kind="dicom")  # fmt: skip
            )
            continue
        result.modality = case.modality
        result.cases.append(case)
        del first
    for referenced, files in labels_by_series.items():
        if referenced not in series:
            result.quarantined.append(
                _record("label_without_image", "a SEG/RTSTRUCT references a series not in the drop",
                        case_id=None, n_files=len(files), kind="dicom")  # fmt: skip
            )
    if not result.cases and result.modality == "unknown" and headers:
        # the study's image modality (a SEG or RTSTRUCT may come first in file-name order)
        images = [h for p, h in headers.items() if p not in label_objects] or list(headers.values())
        result.modality = str(images[0].get("Modality", "unknown"))
    guard_no_identity(result, identity)
    return result


def _dicom_case(
    drop: Any,
    files: list[str],
    label_files: list[str],
    headers: Mapping[str, Any],
    case_id: str,
    key: bytes,
    settings: IngestSettings,
) -> Case:
    # (name, bytes) sources take the assembler's fast path for uncompressed slices
    sources = [(f, drop.read_bytes(f)) for f in files]
    image = dicom_series.assemble_series(
        sources, min_slices=settings.min_slices, spacing_tolerance=settings.spacing_tolerance
    )
    validate_image(image, settings)
    first = headers[files[0]]
    deid_header, report = deidentify(
        first, key, retain_longitudinal_temporal=settings.retain_longitudinal_temporal
    )
    if report.burned_in_annotation and settings.quarantine_burned_in:
        raise _BurnedInError("burned-in annotation flagged: pixels may carry identity")

    label: Volume | None = None
    label_names: dict[int, str] = {}
    for relpath in label_files:
        ds = dicom_series.read_dataset(io.BytesIO(drop.read_bytes(relpath)))
        if str(ds.get("SOPClassUID", "")) == SEG_SOP_CLASS:
            volume, names = dicom_labels.read_segmentation(ds, image)
        else:
            volume, names = dicom_labels.rasterise_rtstruct(ds, image)
        if not volume.same_grid(image):
            raise LabelGridMismatchError("label could not be placed on the image grid")
        mapped = remap_labels(volume, map_label_names(names, settings))
        if label is None:
            label = mapped
        else:  # several label objects: later ones paint over earlier background only
            merged = np.where(label.array > 0, label.array, mapped.array)
            label = Volume(merged, image.affine, {})
        label_names.update({v: _canonical_label(names[k], settings) for k, v in
                            map_label_names(names, settings).items()})  # fmt: skip

    patient_source = str(first.get("PatientID", "")) or str(first.get("PatientName", ""))
    meta = {
        **_volume_meta(str(first.get("Modality", "OT")), "dicom", image, label, settings),
        "burned_in_annotation": bool(report.burned_in_annotation),
        "deidentified_header": _header_json(deid_header),
        "deidentification": report.method,
    }
    clean_image = Volume(image.array.astype(np.float32, copy=False), image.affine, {"modality": meta["modality"]})
    return Case(case_id, pseudonyms.patient_pseudonym(key, patient_source), clean_image, label, meta)


class _BurnedInError(ImagingError):
    reason = "burned_in_annotation"


def _volume_meta(
    modality: str, source_kind: str, image: Volume, label: Volume | None, settings: IngestSettings
) -> dict[str, Any]:
    """The PHI-free geometry and label metadata every ingested case carries."""
    return {
        "modality": modality,
        "source_kind": source_kind,
        "label_names": {str(k): v for k, v in sorted(_project_label_names(settings).items())},
        "present_labels": sorted(int(v) for v in np.unique(label.array) if v) if label is not None else [],
        "spacing": list(image.spacing),
        "shape": list(image.shape),
        "orientation": image.orientation,
        "n_slices": int(image.shape[2]),
    }


def _project_label_names(settings: IngestSettings) -> dict[int, str]:
    return {int(v): k for k, v in settings.labels.items()}


def _header_json(ds: Any) -> dict[str, Any]:
    """The de-identified header as DICOM JSON, without bulk data."""
    slim = ds.copy()
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in slim:
            del slim[keyword]
    return slim.to_json_dict(bulk_data_threshold=256, bulk_data_element_handler=lambda _e: "")


# -- NIfTI / NRRD / MSD ----------------------------------------------------------------------
#: What the volume decoders are told the file is called: they may log it (e.g. "NRRD without
#: 'space'" at WARNING), and a drop's paths can carry names. Quarantine details never use it.
_VOLUME_NAME = "<drop volume>"


def read_volume(drop: Any, relpath: str) -> Volume:
    """A NIfTI / NRRD file of the drop as a Volume (a detached .nhdr reads its data file too)."""
    from mvl_pipeline.datasets.volume import decode_nifti, decode_nrrd

    lower = relpath.lower()
    data = drop.read_bytes(relpath)
    if lower.endswith((".nii.gz", ".nii")):
        return decode_nifti(data, compressed=lower.endswith(".gz"), path=_VOLUME_NAME)
    if lower.endswith(".nhdr"):
        import nrrd

        header = nrrd.read_header(io.BytesIO(data))
        data_file = header.get("data file") or header.get("datafile")
        if not data_file:
            return decode_nrrd(data, path=_VOLUME_NAME)
        sibling = relpath.rsplit("/", 1)[0] + "/" + str(data_file) if "/" in relpath else str(data_file)
        return decode_nrrd(data, path=_VOLUME_NAME, data_bytes=drop.read_bytes(sibling))
    return decode_nrrd(data, path=_VOLUME_NAME)


def process_volume_unit(drop: Any, unit: Unit, key: bytes, settings: IngestSettings) -> UnitResult:
    result = UnitResult(unit=pseudonyms.unit_key(key, unit.kind, unit.source_id))
    case_id = pseudonyms.case_pseudonym(key, "volume", unit.source_id)
    identity = list(unit.files) + ([unit.patient_hint] if unit.patient_hint else [])
    if unit.label is None and not settings.keep_unlabelled:
        result.skipped.append({"reason": "unlabelled_image", "detail": "no label file pairs with this image",
                               "n_files": 1, "case_id": case_id})  # fmt: skip
        return result
    try:
        image = read_volume(drop, unit.image)
        if image.array.ndim != 3:
            raise ImagingError("only single-channel 3-D images are supported")
        modality = unit.modality or _guess_modality(image, settings)
        if modality == "MULTI":
            raise ImagingError("multi-channel (several modalities) images are not supported yet")
        validate_image(image, settings)
        label = None
        names = dict(unit.label_names) or {v: k for k, v in settings.labels.items()}
        if unit.label is not None:
            raw_label = read_volume(drop, unit.label)
            if not raw_label.same_grid(image, atol_mm=1e-2):
                raise LabelGridMismatchError(
                    f"label grid {raw_label.shape} differs from image grid {image.shape}"
                )
            if raw_label.array.dtype.kind == "f" and not np.all(
                raw_label.array == np.round(raw_label.array)
            ):
                raise UnknownLabelValueError("label volume holds non-integer values")
            raw = Volume(raw_label.array.astype(np.int64), image.affine, {})
            label = remap_labels(raw, map_label_names(names, settings))
    except ImagingError as exc:
        result.quarantined.append(
            _record(exc.reason, scrub(exc.detail, identity), case_id=case_id,
                    n_files=len(unit.files), kind="volume")  # fmt: skip
        )
        guard_no_identity(result, identity)
        return result
    result.modality = modality
    meta = _volume_meta(modality, "volume", image, label, settings)
    clean = Volume(image.array.astype(np.float32, copy=False), image.affine, {"modality": modality})
    patient = pseudonyms.patient_pseudonym(key, "volume", unit.patient_hint or unit.source_id)
    result.cases.append(Case(case_id, patient, clean, label, meta))
    guard_no_identity(result, identity)
    return result


def _guess_modality(image: Volume, settings: IngestSettings) -> str:
    if settings.volume_modality != "auto":
        return settings.volume_modality.upper()
    low = float(np.percentile(image.array[::4, ::4, :], 1))
    return "CT" if low <= -500 else "MR"


def process_bad_file(unit: Unit, key: bytes) -> UnitResult:
    result = UnitResult(unit=pseudonyms.unit_key(key, unit.kind, unit.source_id))
    result.quarantined.append(
        _record(unit.error_reason or "unreadable_file", scrub(unit.error_detail or "", list(unit.files)),
                case_id=None, n_files=len(unit.files), kind="file")  # fmt: skip
    )
    return result


def process_unit(drop: Any, unit: Unit, key: bytes, settings: IngestSettings) -> UnitResult:
    """Entry point for worker processes: never raises for bad data."""
    try:
        if unit.kind == "dicom":
            return process_dicom_study(drop, unit, key, settings)
        if unit.kind == "volume":
            return process_volume_unit(drop, unit, key, settings)
        return process_bad_file(unit, key)
    except ImagingError as exc:  # anything not caught closer to its source
        result = UnitResult(unit=pseudonyms.unit_key(key, unit.kind, unit.source_id))
        result.quarantined.append(
            _record(exc.reason, scrub(exc.detail, list(unit.files)), case_id=None,
                    n_files=len(unit.files), kind=unit.kind)  # fmt: skip
        )
        return result
    except Exception as exc:  # a bug or an unforeseen file: quarantine, keep the run going
        # No traceback in the log: its text could quote a path or a header value.
        logger.error("unexpected %s in a %s unit; see its quarantine record", type(exc).__name__, unit.kind)
        result = UnitResult(unit=pseudonyms.unit_key(key, unit.kind, unit.source_id))
        result.quarantined.append(
            _record("internal_error", scrub(f"{type(exc).__name__}: {exc}", list(unit.files)),
                    case_id=None, n_files=len(unit.files), kind=unit.kind)  # fmt: skip
        )
        return result
