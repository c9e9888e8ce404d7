"""One NIfTI / NRRD image (with its label file, or an MSD task entry) of a drop -> a case."""

from __future__ import annotations

import logging
import posixpath
from typing import Any

import numpy as np

from mvl_pipeline.core import pseudonyms
from mvl_pipeline.core.case import Case
from mvl_pipeline.core.errors import ImagingError, LabelGridMismatchError, UnknownLabelValueError
from mvl_pipeline.core.storage import path_problem
from mvl_pipeline.core.volume import Volume, guess_modality
from mvl_pipeline.dicom.read import MODALITIES
from mvl_pipeline.formats.codec import VolumeFileError
from mvl_pipeline.formats.volumes import read_volume
from mvl_pipeline.ingestion.channels import rules_for_unit, volume_channels
from mvl_pipeline.ingestion.config import IngestConfig
from mvl_pipeline.ingestion.labels import case_label_names, map_label_names, remap_labels
from mvl_pipeline.ingestion.result import (
    UnitResult,
    case_meta,
    guard_no_identity,
    record,
    scrub,
    validate_image,
)
from mvl_pipeline.ingestion.units import Unit

logger = logging.getLogger(__name__)

# -- NIfTI / NRRD / MSD ----------------------------------------------------------------------
#: What the volume decoders are told the file is called: they may log it (e.g. "NRRD without
#: 'space'" at WARNING), and a drop's paths can carry names. Quarantine details never use it.
_VOLUME_NAME = "<drop volume>"


def known_modality(name: str | None) -> str | None:
    """An MSD task's modality (``dataset.json``, free text typed at the site) when it is one of
    DICOM's defined terms (``MRI`` is ``MR``), else None: it goes into the manifest, the summary
    table, the log and the plan, so any other text ("MRI St Elsewhere") is not kept."""
    value = str(name or "").strip().upper()
    value = {"MRI": "MR"}.get(value, value)
    return value if value in MODALITIES else None


def read_drop_volume(drop: Any, relpath: str, *, channels: bool = False) -> Volume:
    """A NIfTI / NRRD file of the drop as a Volume (a detached .nhdr reads its data file too);
    with ``channels``, a 4-D NIfTI as a channel-first multi-channel volume."""

    def read_data_file(path: str) -> bytes:  # the header names it: it must be a file of the drop
        normalised = posixpath.normpath(path)  # an absolute path keeps its leading "/": an empty part
        if path_problem(normalised) is not None:
            raise VolumeFileError("the detached header's data file is not a file inside the drop folder")
        return drop.read_bytes(normalised)

    return read_volume(drop.read_bytes(relpath), relpath, read_sibling=read_data_file, name=_VOLUME_NAME, channels=channels)


def process_volume_unit(drop: Any, unit: Unit, key: bytes, config: IngestConfig) -> UnitResult:
    result = UnitResult(unit=pseudonyms.unit_key(key, unit.kind, unit.source_id))
    case_id = pseudonyms.case_pseudonym(key, "volume", unit.source_id)
    identity = list(unit.files) + ([unit.patient_hint] if unit.patient_hint else [])
    if unit.label is None and not config.keep_unlabelled:
        result.skipped.append({"reason": "unlabelled_image", "detail": "no label file pairs with this image",
                               "n_files": 1, "case_id": case_id})  # fmt: skip
        return result
    rules = rules_for_unit(config.channel_rules, unit.channel_names)
    channels: list[dict[str, Any]] = []
    try:
        image = read_drop_volume(drop, unit.image, channels=bool(rules))
        if rules:  # the declared channels: volumes of a 4-D image, all on its grid
            image, channels = volume_channels(image, rules, unit.channel_names, volume_modality=config.volume_modality)
            modality = channels[0]["modality"]
        else:
            if image.array.ndim != 3:
                raise ImagingError("only single-channel 3-D images are supported")
            modality = known_modality(unit.modality) or (
                guess_modality(image) if config.volume_modality == "auto" else config.volume_modality.upper()
            )
        validate_image(image, config, [c["name"] for c in channels])
        label = None
        names = dict(unit.label_names) or {v: k for k, v in config.labels.items()}
        if unit.label is not None:
            raw_label = read_drop_volume(drop, unit.label)
            if not raw_label.same_grid(image, atol_mm=1e-2):
                if raw_label.shape != image.shape:
                    raise LabelGridMismatchError(f"label grid {raw_label.shape} differs from image grid {image.shape}")
                apart = float(np.abs(raw_label.affine - image.affine).max())
                raise LabelGridMismatchError(
                    f"label and image have the same shape {image.shape} but other orientation or position "
                    f"(their affines differ by up to {apart:.3g})"
                )
            if raw_label.array.dtype.kind == "f" and not np.all(
                raw_label.array == np.round(raw_label.array)
            ):
                raise UnknownLabelValueError("label volume holds non-integer values")
            raw = Volume(raw_label.array.astype(np.int64), image.affine, {})
            if not names:  # neither the task nor the project names them: the values themselves
                names = {int(v): f"label {int(v)}" for v in np.unique(raw.array) if v}
            label = remap_labels(raw, map_label_names(names, config))
    except ImagingError as exc:
        result.quarantined.append(
            record(exc.reason, scrub(exc.detail, identity), case_id=case_id,
                    n_files=len(unit.files), kind="volume")  # fmt: skip
        )
        guard_no_identity(result, identity)
        return result
    result.modality = modality
    meta = case_meta(modality, "volume", image, label, case_label_names(names, config))
    if channels:
        meta["channels"] = channels
        meta["channel_min_overlap"] = config.channel_min_overlap
    clean = Volume(image.array.astype(np.float32, copy=False), image.affine, {"modality": modality})
    patient = pseudonyms.patient_pseudonym(key, "volume", unit.patient_hint or unit.source_id)
    result.cases.append(Case(case_id, patient, clean, label, meta))
    guard_no_identity(result, identity)
    return result
