"""One DICOM study of a drop -> cases: each image series with the SEG/RTSTRUCT objects that
reference it, assembled, validated, de-identified and labelled; or, with ``ingest.channels``
declared, one case whose input channels are the series the rules pick (ingestion/channels.py),
resampled onto the reference channel's grid, labelled by the SEG/RTSTRUCT of any of them."""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from mvl_pipeline.core import pseudonyms
from mvl_pipeline.core.case import Case
from mvl_pipeline.core.errors import ImagingError, LabelGridMismatchError
from mvl_pipeline.core.volume import Volume
from mvl_pipeline.dicom import labels as dicom_labels
from mvl_pipeline.dicom.assemble import assemble_series
from mvl_pipeline.dicom.deid import burned_in, deidentify
from mvl_pipeline.dicom.read import (
    SEGMENTATION_STORAGE,
    modality_of,
    read_dataset,
    read_header,
    sort_study,
)
from mvl_pipeline.ingestion.channels import channel_record, check_frames, series_for_channels
from mvl_pipeline.ingestion.config import IngestConfig
from mvl_pipeline.ingestion.labels import case_label_names, map_label_names, remap_labels
from mvl_pipeline.ingestion.result import (
    UnitResult,
    case_meta,
    guard_no_identity,
    identity_strings,
    record,
    scrub,
    validate_image,
)
from mvl_pipeline.ingestion.units import Unit
from mvl_pipeline.preprocessing.channels import label_onto_reference, stack_channels

logger = logging.getLogger(__name__)

# -- DICOM studies ---------------------------------------------------------------------------
def process_dicom_study(drop: Any, unit: Unit, key: bytes, config: IngestConfig) -> UnitResult:
    """All files of one study: image series + their SEG/RTSTRUCT labels -> cases."""
    result = UnitResult(unit=pseudonyms.unit_key(key, unit.kind, unit.source_id))
    headers: dict[str, Any] = {}
    identity: list[str] = list(unit.files)
    for relpath in unit.files:
        try:
            headers[relpath] = read_header(io.BytesIO(drop.read_bytes(relpath)))
        except ImagingError as exc:
            result.quarantined.append(
                record(exc.reason, scrub(exc.detail, [relpath]), case_id=None, n_files=1, kind="dicom")
            )
    for header in headers.values():
        identity.extend(identity_strings(header))
    identity = sorted(set(identity))
    patients = {str(h.get("PatientID", "") or "").strip() for h in headers.values()} - {""}
    if len(patients) > 1:  # one study, several patients: a mix-up upstream; never guess whose it is
        result.quarantined.append(
            record("mixed_patients", f"the study's files name {len(patients)} different patients (Patient ID)",
                   case_id=None, n_files=len(headers), kind="dicom")  # fmt: skip
        )
        guard_no_identity(result, identity)
        return result

    study = sort_study(headers)
    for _relpath, exc in study.skipped:
        result.skipped.append({"reason": exc.reason, "detail": scrub(exc.detail), "n_files": 1})
    series, labels_by_series, label_objects = study.series, study.labels, study.label_files

    if config.channel_rules and series:  # one case of several series (input channels)
        _channel_study(drop, unit, key, config, headers, study, identity, result)
        series = {}
    for series_uid, files in sorted(series.items()):
        case_id = pseudonyms.case_pseudonym(key, unit.source_id, series_uid)
        label_files = labels_by_series.get(series_uid, [])
        if not label_files and not config.keep_unlabelled:
            result.skipped.append(
                {"reason": "unlabelled_series", "detail": "no SEG or RTSTRUCT references this series",
                 "n_files": len(files), "case_id": case_id}  # fmt: skip
            )
            continue
        try:
            case = _dicom_case(drop, files, label_files, headers, case_id, key, config)
        except ImagingError as exc:
            result.quarantined.append(
                record(exc.reason, scrub(exc.detail, identity), case_id=case_id,
                        n_files=len(files) + len(label_files), kind="dicom")  # fmt: skip
            )
            continue
        result.modality = case.modality
        result.cases.append(case)
    for referenced, files in labels_by_series.items():
        if referenced not in study.series:
            result.quarantined.append(
                record("label_without_image", "a SEG/RTSTRUCT references a series not in the drop",
                        case_id=None, n_files=len(files), kind="dicom")  # fmt: skip
            )
    if not result.cases and result.modality == "unknown" and headers:
        # the study's image modality (a SEG or RTSTRUCT may come first in file-name order)
        images = [h for p, h in headers.items() if p not in label_objects] or list(headers.values())
        result.modality = modality_of(images[0], "unknown")
    guard_no_identity(result, identity)
    return result


def _assemble(drop: Any, files: list[str], config: IngestConfig, channels: tuple[str, ...] = ()) -> Volume:
    # (name, bytes) sources take the assembler's fast path for uncompressed slices
    sources = [(f, drop.read_bytes(f)) for f in files]
    image = assemble_series(
        sources, min_slices=config.min_slices, spacing_tolerance=config.spacing_tolerance
    )
    validate_image(image, config, channels)
    return image


def _deidentify(header: Any, key: bytes, config: IngestConfig, series: Iterable[Any] = ()) -> tuple[Any, Any]:
    """The series' first ``header`` de-identified; the burned-in check is made on every file of the
    ``series`` (a slice annotated and sent again carries the flag that the first may not)."""
    deid_header, report = deidentify(
        header, key, retain_longitudinal_temporal=config.retain_longitudinal_temporal
    )
    if not report.burned_in_annotation:
        flagged = next((why for flag, why in map(burned_in, series) if flag), None)
        if flagged is not None:
            report = dataclasses.replace(report, burned_in_annotation=True, burned_in_reason=f"a file of the series: {flagged}")
    if report.burned_in_annotation and config.quarantine_burned_in:
        raise _BurnedInError("burned-in annotation flagged: pixels may carry identity")
    return deid_header, report


def _labels(
    drop: Any, label_files: list[str], image: Volume, config: IngestConfig, label: Volume | None = None,
    reference: Volume | None = None,
) -> tuple[Volume | None, dict[int, str]]:
    """The label objects referencing ``image``'s series, merged (onto ``reference``'s grid, when
    the series is not the reference channel's) into ``label``."""
    label_names: dict[int, str] = {}
    target = reference or image
    for relpath in label_files:
        ds = read_dataset(io.BytesIO(drop.read_bytes(relpath)))
        if str(ds.get("SOPClassUID", "")) == SEGMENTATION_STORAGE:
            volume, names = dicom_labels.read_segmentation(ds, image)
        else:
            volume, names = dicom_labels.rasterise_rtstruct(ds, image)
        if not volume.same_grid(image):
            raise LabelGridMismatchError("label could not be placed on the image grid")
        if reference is not None and not volume.same_grid(reference):
            volume = label_onto_reference(volume, reference)
        mapped = remap_labels(volume, map_label_names(names, config))
        if label is None:
            label = mapped
        else:  # several label objects: later ones paint over earlier background only
            merged = np.where(label.array > 0, label.array, mapped.array)
            label = Volume(merged, target.affine, {})
        label_names.update(case_label_names(names, config))
    return label, label_names


def _case(
    case_id: str, key: bytes, image: Volume, label: Volume | None, label_names: Mapping[int, str],
    first: Any, deidentified: tuple[Any, Any], config: IngestConfig, channels: list[dict[str, Any]] | None = None,
) -> Case:
    deid_header, report = deidentified
    patient_source = str(first.get("PatientID", "")) or str(first.get("PatientName", ""))
    meta = {
        **case_meta(modality_of(first), "dicom", image, label, label_names or config.label_names),
        "burned_in_annotation": bool(report.burned_in_annotation),
        "deidentified_header": _header_json(deid_header),
        "deidentification": report.method,
    }
    if channels:
        meta["channels"] = channels
        meta["channel_min_overlap"] = config.channel_min_overlap
    clean_image = Volume(image.array.astype(np.float32, copy=False), image.affine, {"modality": meta["modality"]})
    return Case(case_id, pseudonyms.patient_pseudonym(key, patient_source), clean_image, label, meta)


def _dicom_case(
    drop: Any,
    files: list[str],
    label_files: list[str],
    headers: Mapping[str, Any],
    case_id: str,
    key: bytes,
    config: IngestConfig,
) -> Case:
    image = _assemble(drop, files, config)
    first = headers[files[0]]
    deidentified = _deidentify(first, key, config, (headers[f] for f in files[1:]))
    label, label_names = _labels(drop, label_files, image, config)
    return _case(case_id, key, image, label, label_names, first, deidentified, config)


# -- several series as the input channels of one case (ingest.channels) -----------------------
def _channel_study(
    drop: Any, unit: Unit, key: bytes, config: IngestConfig, headers: Mapping[str, Any], study: Any,
    identity: list[str], result: UnitResult,
) -> None:
    """The study's series matched to the declared channels -> one case (or its quarantine)."""
    rules = config.channel_rules
    case_id = pseudonyms.case_pseudonym(key, unit.source_id, "channels")
    n_files = sum(len(f) for f in study.series.values())
    try:
        chosen = series_for_channels(rules, {uid: headers[files[0]] for uid, files in study.series.items()})
        label_files = [f for uid in chosen for f in study.labels.get(uid, [])]
        if not label_files and not config.keep_unlabelled:
            result.skipped.append(
                {"reason": "unlabelled_series", "detail": "no SEG or RTSTRUCT references a channel's series",
                 "n_files": n_files, "case_id": case_id}  # fmt: skip
            )
            return
        firsts = [headers[study.series[uid][0]] for uid in chosen]
        check_frames(rules, firsts)
        deidentified = [_deidentify(first, key, config, (headers[f] for f in study.series[uid][1:]))
                        for uid, first in zip(chosen, firsts, strict=True)]  # fmt: skip
        volumes = [_assemble(drop, study.series[uid], config, (r.name,)) for uid, r in zip(chosen, rules, strict=True)]
        image, coverages = stack_channels(volumes, [r.name for r in rules], min_overlap=config.channel_min_overlap)
        label, label_names = None, {}
        for uid, volume in zip(chosen, volumes, strict=True):
            label, names = _labels(drop, study.labels.get(uid, []), volume, config, label, reference=volumes[0])
            label_names.update(names)
        channels = [
            channel_record(rule, modality_of(first), coverage=coverage)
            for rule, first, coverage in zip(rules, firsts, coverages, strict=True)
        ]
        case = _case(case_id, key, image, label, label_names, firsts[0], deidentified[0], config, channels)
    except ImagingError as exc:
        result.quarantined.append(
            record(exc.reason, scrub(exc.detail, identity), case_id=case_id, n_files=n_files, kind="dicom")
        )
        return
    for uid, files in sorted(study.series.items()):
        if uid not in chosen:
            result.skipped.append({"reason": "not_a_channel", "detail": "the series matches no channel's rule",
                                   "n_files": len(files), "case_id": case_id})  # fmt: skip
    result.modality = case.modality
    result.cases.append(case)


class _BurnedInError(ImagingError):
    reason = "burned_in_annotation"


def _header_json(ds: Any) -> dict[str, Any]:
    """The de-identified header as DICOM JSON, without bulk data."""
    slim = ds.copy()
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in slim:
            del slim[keyword]
    # an element whose value cannot be converted (a text in an IS) is left out, not the study
    return slim.to_json_dict(bulk_data_threshold=256, bulk_data_element_handler=lambda _e: "", suppress_invalid_tags=True)
