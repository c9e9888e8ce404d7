"""One DICOM study of a drop -> cases: each image series with the SEG/RTSTRUCT objects that
reference it, assembled, validated, de-identified and labelled."""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from mvl_pipeline.core import pseudonyms
from mvl_pipeline.core.case import Case
from mvl_pipeline.core.errors import ImagingError, LabelGridMismatchError
from mvl_pipeline.core.volume import Volume
from mvl_pipeline.dicom import labels as dicom_labels
from mvl_pipeline.dicom.assemble import assemble_series
from mvl_pipeline.dicom.deid import deidentify
from mvl_pipeline.dicom.read import SEGMENTATION_STORAGE, read_dataset, read_header, sort_study
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

    study = sort_study(headers)
    for _relpath, exc in study.skipped:
        result.skipped.append({"reason": exc.reason, "detail": scrub(exc.detail), "n_files": 1})
    series, labels_by_series, label_objects = study.series, study.labels, study.label_files

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
        if referenced not in series:
            result.quarantined.append(
                record("label_without_image", "a SEG/RTSTRUCT references a series not in the drop",
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
    config: IngestConfig,
) -> Case:
    # (name, bytes) sources take the assembler's fast path for uncompressed slices
    sources = [(f, drop.read_bytes(f)) for f in files]
    image = assemble_series(
        sources, min_slices=config.min_slices, spacing_tolerance=config.spacing_tolerance
    )
    validate_image(image, config)
    first = headers[files[0]]
    deid_header, report = deidentify(
        first, key, retain_longitudinal_temporal=config.retain_longitudinal_temporal
    )
    if report.burned_in_annotation and config.quarantine_burned_in:
        raise _BurnedInError("burned-in annotation flagged: pixels may carry identity")

    label: Volume | None = None
    label_names: dict[int, str] = {}
    for relpath in label_files:
        ds = read_dataset(io.BytesIO(drop.read_bytes(relpath)))
        if str(ds.get("SOPClassUID", "")) == SEGMENTATION_STORAGE:
            volume, names = dicom_labels.read_segmentation(ds, image)
        else:
            volume, names = dicom_labels.rasterise_rtstruct(ds, image)
        if not volume.same_grid(image):
            raise LabelGridMismatchError("label could not be placed on the image grid")
        mapped = remap_labels(volume, map_label_names(names, config))
        if label is None:
            label = mapped
        else:  # several label objects: later ones paint over earlier background only
            merged = np.where(label.array > 0, label.array, mapped.array)
            label = Volume(merged, image.affine, {})
        label_names.update(case_label_names(names, config))

    patient_source = str(first.get("PatientID", "")) or str(first.get("PatientName", ""))
    meta = {
        **case_meta(str(first.get("Modality", "OT")), "dicom", image, label, label_names or config.label_names),
        "burned_in_annotation": bool(report.burned_in_annotation),
        "deidentified_header": _header_json(deid_header),
        "deidentification": report.method,
    }
    clean_image = Volume(image.array.astype(np.float32, copy=False), image.affine, {"modality": meta["modality"]})
    return Case(case_id, pseudonyms.patient_pseudonym(key, patient_source), clean_image, label, meta)


class _BurnedInError(ImagingError):
    reason = "burned_in_annotation"


def _header_json(ds: Any) -> dict[str, Any]:
    """The de-identified header as DICOM JSON, without bulk data."""
    slim = ds.copy()
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in slim:
            del slim[keyword]
    return slim.to_json_dict(bulk_data_threshold=256, bulk_data_element_handler=lambda _e: "")
