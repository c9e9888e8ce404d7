"""What a hospital drop holds, as units of ingest work.

A drop is any mix of DICOM files (any depth, with or without suffix or preamble), NIfTI / NRRD
image-label pairs, and Medical Segmentation Decathlon task folders. This module sorts its files
into *units*: a DICOM study (all files sharing a StudyInstanceUID, labels included), one
image/label pair, or one unreadable file (so that it can be quarantined on its own). Units are
what gets processed in parallel, re-processed when changed, and quarantined as a whole.

Only raw paths and raw UIDs are handled here, in memory: what leaves is keyed (see ``keys``).
"""

from __future__ import annotations

import csv
import io
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from mvl_pipeline.formats.msd import MsdDescriptorError, read_task
from mvl_pipeline.formats.volumes import volume_suffix

IGNORED_SUFFIXES = (
    ".json", ".txt", ".csv", ".md", ".xml", ".html", ".pdf", ".log", ".yml", ".yaml",
    ".raw", ".raw.gz", ".zraw", ".dvc", ".gitignore", ".ds_store",
)  # fmt: skip
PATIENTS_FILE = "patients.csv"
IGNORED_NAMES = ("dicomdir", "thumbs.db", "license", "readme", "_complete")
#: Why an entry of a drop cannot be read as a file (``DropFile.problem``, datasets/drop.py): the
#: detail of its quarantine record.
ENTRY_PROBLEMS = {
    "invalid_path": "the file's path is not a plain relative path (a backslash, or an empty, '.' or '..' "
                    "part): rename it",
    "broken_link": "a link whose target is missing or loops back on itself",
    "link_to_folder": "a link to a folder: links to folders are not followed",
    "not_a_regular_file": "neither a file nor a link to one (a pipe, socket or device)",
    "unreadable_file": "the file could not be read: permission denied, or removed after the drop was listed",
    "unreadable_folder": "the folder could not be listed (permission denied, or removed while the drop was listed): "
                         "none of its files was ingested; "
                         "make it readable and run ingest again",
}  # fmt: skip


@dataclass(frozen=True)
class Unit:
    """One unit of ingest work.

    ``kind`` is ``dicom`` (a study), ``volume`` (an image with an optional label file),
    or ``bad_file``. ``source_id`` is the raw identity the unit is keyed by (StudyInstanceUID
    or the image's relative path): it stays in memory. ``files`` are relative paths in the drop.
    """

    kind: str
    source_id: str
    files: tuple[str, ...]
    image: str | None = None
    label: str | None = None
    patient_hint: str | None = None
    label_names: Mapping[int, str] = field(default_factory=dict)
    modality: str | None = None
    channel_names: tuple[str, ...] = ()  # an MSD task's modalities by index (its image's 4th axis)
    error_reason: str | None = None
    error_detail: str | None = None


def is_ignored(relpath: str) -> bool:
    name = posixpath.basename(relpath).lower()
    if name.startswith(".") or name in IGNORED_NAMES:
        return True
    return name.endswith(IGNORED_SUFFIXES) and not is_task_file(relpath)


def is_task_file(relpath: str) -> bool:
    """An MSD task's own files (``dataset.json``, ``patients.csv``): read, hashed, never DICOM."""
    return posixpath.basename(relpath).lower() in ("dataset.json", PATIENTS_FILE)


def is_msd_descriptor(relpath: str) -> bool:
    return posixpath.basename(relpath).lower() == "dataset.json"


def _strip(relpath: str) -> str:
    suffix = volume_suffix(relpath) or ""
    return relpath[: len(relpath) - len(suffix)]


#: The detail of a ``patients.csv`` that cannot be read: the images it covers wait for it.
UNREADABLE_PATIENTS = (
    "the patients.csv cannot be read as UTF-8 CSV text (not UTF-8, or no read permission): the cases it covers "
    "are ingested once it is"
)


def _patients_file_of(path: str, by_folder: Mapping[str, str]) -> str | None:
    """The nearest ``patients.csv`` (``by_folder``: folder -> its path) in the folder of ``path``
    or a folder above it."""
    folder = posixpath.dirname(path)
    while folder not in by_folder:
        if not folder:
            return None
        folder = posixpath.dirname(folder)
    return by_folder[folder]


def pair_volumes(
    relpaths: Sequence[str],
    *,
    label_suffixes: Sequence[str],
    image_suffixes: Sequence[str],
    exclude: Iterable[str] = (),
    patients: Mapping[str, Mapping[str, str] | None] | None = None,
) -> list[Unit]:
    """Pair loose NIfTI/NRRD files: ``x_image.nii.gz`` + ``x_label.nii.gz``, ``x.nrrd`` +
    ``x_seg.nrrd`` ... (suffixes from parameters). A file that is nobody's label is an image.

    Each image is its own patient, named by its path without suffixes (``siteA/case1`` and
    ``siteB/case1`` are two patients), unless the nearest ``patients.csv`` in its folder or a folder
    above (``patients``: its path -> its rows, None when unreadable) names the patient of its
    path relative to that folder (``case1`` or ``case1_image``; ``P001/scan`` from a folder above):
    that file is then part of the unit, so a changed mapping re-ingests it."""
    patients = dict(patients or {})
    by_folder = {posixpath.dirname(p): p for p in sorted(patients)}
    excluded = set(exclude)
    candidates = sorted(p for p in relpaths if volume_suffix(p) and p not in excluded)
    label_re = re.compile(
        "(" + "|".join(re.escape(s) for s in sorted(label_suffixes, key=len, reverse=True)) + ")$",
        re.IGNORECASE,
    )
    labels: dict[str, str] = {}
    ambiguous: dict[str, list[str]] = {}
    for path in candidates:
        stem = _strip(path)
        match = label_re.search(stem)
        if match:
            base = stem[: match.start()]
            if base in labels:  # two label files for one image: which one is meant is unknown
                ambiguous.setdefault(base, [labels[base]]).append(path)
            labels[base] = path
    label_files = {p for paths in ambiguous.values() for p in paths} | set(labels.values())
    units = []
    waiting: set[str] = set()
    for base in sorted(ambiguous):
        units.extend(
            Unit("bad_file", path, (path,), error_reason="ambiguous_label",
                 error_detail=f"{len(ambiguous[base])} label files share one image name")
            for path in ambiguous[base]
        )  # fmt: skip
        del labels[base]
    for path in candidates:
        if path in label_files:
            continue
        stem = _strip(path)
        base = stem
        for suffix in sorted(image_suffixes, key=len, reverse=True):
            if suffix and stem.lower().endswith(suffix.lower()):
                base = stem[: -len(suffix)]
                break
        label = labels.get(base) or labels.get(stem)
        files = (path,) if label is None else (path, label)
        patient_hint = base
        patients_file = _patients_file_of(path, by_folder)
        if patients_file is not None:
            mapping = patients[patients_file]
            if mapping is None:  # its images wait for a readable file (cases from them are kept)
                waiting.update(files)
                continue
            root = posixpath.dirname(patients_file)
            names = [posixpath.relpath(p, root) if root else p for p in (base, stem)]
            patient_hint = mapping.get(names[0]) or mapping.get(names[1]) or base
            files = (*files, patients_file)
        units.append(Unit("volume", path, files, image=path, label=label, patient_hint=patient_hint))
    units.extend(
        Unit("bad_file", path, (path,), error_reason="invalid_patients_file", error_detail=UNREADABLE_PATIENTS)
        for path, mapping in sorted(patients.items())
        if mapping is None
    )  # fmt: skip
    used = {f for u in units for f in u.files} | waiting
    for _stem, path in sorted(labels.items()):
        if path not in used:
            units.append(
                Unit("bad_file", path, (path,), error_reason="orphan_label",
                     error_detail="label volume without a matching image")
            )  # fmt: skip
    return units


def read_patients(data: bytes) -> dict[str, str]:
    """``patients.csv`` of a task folder: ``case_id,patient_id`` rows (a header row is allowed):
    the case's image file name without its suffix -> the patient it belongs to, so that the
    follow-ups of one patient stay together in the split."""
    rows = list(csv.reader(io.StringIO(data.decode("utf-8-sig"))))
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["case_id", "patient_id"]:
        rows = rows[1:]
    mapping = {}
    for row in rows:
        if len(row) >= 2 and row[0].strip() and row[1].strip():
            mapping[row[0].strip()] = row[1].strip()
    return mapping


def read_patients_or_none(data: bytes) -> dict[str, str] | None:
    """:func:`read_patients`, or None for a file that is not UTF-8 CSV text."""
    try:
        return read_patients(data)
    except (UnicodeDecodeError, csv.Error):
        return None


def msd_units(
    descriptor_path: str, descriptor: bytes, available: set[str], patients: bytes | None = None
) -> list[Unit]:
    """Units of a Medical Segmentation Decathlon task from its ``dataset.json`` (and the task's
    optional ``patients.csv``: without it every case is its own patient)."""
    root = posixpath.dirname(descriptor_path)
    patients_file = posixpath.join(root, PATIENTS_FILE) if patients else None
    patient_of = read_patients_or_none(patients) if patients else {}
    if patient_of is None:
        # without its patients the split could put one patient's cases on both sides: the task
        # waits for a readable file (cases ingested from it earlier are kept)
        return [Unit("bad_file", patients_file, (patients_file,), error_reason="invalid_patients_file",
                     error_detail="the task's patients.csv cannot be read as UTF-8 CSV text (not UTF-8, or "
                                  "no read permission): its cases are ingested once it is")]  # fmt: skip
    try:
        task = read_task(descriptor)
    except MsdDescriptorError as exc:
        return [Unit("bad_file", descriptor_path, (descriptor_path,),
                     error_reason="invalid_msd_descriptor", error_detail=str(exc))]  # fmt: skip
    units = []
    entries = [*task.training, *((image, None) for image in task.test)]
    for image_rel, label_rel in entries:
        image = posixpath.normpath(posixpath.join(root, image_rel))
        label = posixpath.normpath(posixpath.join(root, label_rel)) if label_rel else None
        missing = [p for p in (image, label) if p and p not in available]
        files = tuple(p for p in (image, label) if p and p in available)
        if missing:
            units.append(
                Unit("bad_file", image, files or (descriptor_path,), error_reason="missing_file",
                     error_detail=f"{len(missing)} file(s) listed in dataset.json are missing")
            )  # fmt: skip
            continue
        case = posixpath.basename(_strip(image))
        if patients_file:  # a new patient mapping re-ingests the task's cases
            files = (*files, patients_file)
        units.append(
            Unit("volume", image, files, image=image, label=label, patient_hint=patient_of.get(case, case),
                 label_names=dict(task.labels), modality=task.modality,
                 channel_names=task.channel_names)
        )  # fmt: skip
    return units
