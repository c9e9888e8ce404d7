"""Compare a drop with the previous manifest: which units are new or changed.

A file whose cheap fingerprint (size + mtime locally, ETag on S3) is unchanged is not read at
all; one whose fingerprint changed is hashed, and only if its content changed is it treated as
new. New DICOM files have their header read (in parallel) to find their study. A unit (study,
image/label pair) is processed again when any of its files is new or changed, when it has no
result yet, or when its last result was an ``internal_error`` (a crash of the code, not bad
data). Files that disappeared from the drop do not delete what was ingested from them:
hospitals often clear a drop once it has been collected.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import posixpath
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from mvl_pipeline.core import pseudonyms
from mvl_pipeline.core.errors import ImagingError
from mvl_pipeline.core.storage import StorageUnavailableError, path_problem
from mvl_pipeline.dicom.read import read_header
from mvl_pipeline.formats.nrrd import detached_data_file
from mvl_pipeline.formats.volumes import volume_suffix
from mvl_pipeline.ingestion.units import (
    ENTRY_PROBLEMS,
    PATIENTS_FILE,
    Unit,
    is_ignored,
    is_msd_descriptor,
    is_task_file,
    msd_units,
    pair_volumes,
    read_patients_or_none,
)

logger = logging.getLogger(__name__)


@dataclass
class DropScan:
    files: dict[str, dict[str, Any]]  # manifest "files" section for the current drop
    todo: list[tuple[Unit, str, str]]  # (unit, unit key, source hash) to (re)process
    live_units: set[str] = field(default_factory=set)
    superseded_units: set[str] = field(default_factory=set)  # case-less units whose files now read otherwise
    n_files: int = 0
    n_units: int = 0


def failed_internally(unit_entry: Mapping[str, Any]) -> bool:
    """True when a unit's last result was an ``internal_error``: a crash of the code, not a
    verdict on the data, so the unit is retried on the next run instead of being kept."""
    return any(r.get("reason") == "internal_error" for r in unit_entry.get("quarantined", []))


def _dicom_study_of(drop: Any, relpath: str) -> tuple[str, str | None, str | None]:
    """Return ``(relpath, StudyInstanceUID or None, error reason)`` (runs in workers)."""
    try:
        header = read_header(io.BytesIO(drop.read_bytes(relpath)))
        study = str(header.get("StudyInstanceUID", "") or "")
    except ImagingError as exc:
        return relpath, None, exc.reason
    except StorageUnavailableError:  # an outage is no verdict on the file: it stops the run
        raise
    except Exception:  # pydicom decodes a value when it is first read: a corrupt one raises here
        return relpath, None, "unreadable_file"
    if not study:
        return relpath, None, "missing_study_uid"
    return relpath, study, None


def _read_studies(drop: Any, relpaths: list[str], pool: Executor | None) -> list[tuple[str, str | None, str | None]]:
    if pool is None or len(relpaths) < 32:
        return [_dicom_study_of(drop, p) for p in relpaths]
    return list(pool.map(_dicom_study_of, [drop] * len(relpaths), relpaths, chunksize=64))


def _detached_data_files(drop: Any, listing: list[Any]) -> dict[str, str]:
    """``{detached .nhdr header: the data file it names}`` for the headers of the drop whose data
    file is a plain file beside them in the drop (others fail when read, with their reason)."""
    present = {entry.relpath for entry in listing if not entry.problem}
    found = {}
    for relpath in sorted(present):
        if not relpath.lower().endswith(".nhdr") or is_ignored(relpath):
            continue
        try:
            named = detached_data_file(drop.read_bytes(relpath), "<drop volume>")
        except StorageUnavailableError:
            raise
        except Exception:  # an unreadable header is quarantined when its unit is processed
            continue
        if named is None:
            continue
        target = posixpath.normpath(posixpath.join(posixpath.dirname(relpath), named))
        if path_problem(target) is None and target in present:
            found[relpath] = target
    return found


def _with_data_files(unit: Unit, data_files: Mapping[str, str]) -> Unit:
    """A volume unit with the data files of its detached headers: a changed .raw re-ingests it."""
    extra = tuple(data_files[f] for f in unit.files if f in data_files and data_files[f] not in unit.files)
    return dataclasses.replace(unit, files=(*unit.files, *extra)) if extra else unit


def _patients_bytes(drop: Any, relpath: str) -> bytes:
    """A ``patients.csv``'s bytes; one ingest may not read is given as bytes that are not UTF-8, so
    that, as a csv that is not UTF-8, it holds back the cases it covers until it can be read."""
    try:
        return drop.read_bytes(relpath)
    except ImagingError:
        return b"\xff"


def _task_files(descriptor: str, available: set[str]) -> set[str]:
    """The files of the MSD task whose ``dataset.json`` is ``descriptor`` (those below its folder)."""
    folder = posixpath.dirname(descriptor)
    return {f for f in available if not folder or f.startswith(folder + "/")}


def scan_drop(
    drop: Any, manifest: Mapping[str, Any], key: bytes, config: Any, pool: Executor | None, *, force: bool = False
) -> DropScan:
    """``force``: every unit still in the drop is processed again (the ingest settings changed)."""
    old_files: Mapping[str, Mapping[str, Any]] = manifest.get("files", {})
    old_units: Mapping[str, Mapping[str, Any]] = manifest.get("units", {})
    # units a run set out to process and was cut off before (ingestion/run.py): its manifest already
    # holds their files' new fingerprints and its settings, so nothing else would show them as work
    pending = set(manifest.get("pending", []))
    files: dict[str, dict[str, Any]] = {}
    dirty: set[str] = set()
    fkeys: dict[str, str] = {}
    listing = sorted(drop.files, key=lambda f: f.relpath)
    problems: dict[str, str] = {}  # entries that cannot be read as files: each its own bad_file unit
    data_files = _detached_data_files(drop, listing)  # a .nhdr's .raw: ignored alone, part of its unit
    for entry in listing:
        relpath = entry.relpath
        if is_ignored(relpath) and relpath not in data_files.values():
            continue
        fkey = pseudonyms.file_key(key, relpath)
        fkeys[relpath] = fkey
        old = old_files.get(fkey)
        fingerprint = str(entry.fingerprint)
        if entry.problem:
            problems[relpath] = entry.problem
            unchanged = old is not None and old.get("fingerprint") == fingerprint
            files[fkey] = dict(old) if unchanged else {"fingerprint": fingerprint, "content": "", "unit": None}
            if not unchanged:
                dirty.add(relpath)
            continue
        if old is not None and old.get("fingerprint") == fingerprint:
            files[fkey] = dict(old)
            continue
        try:
            content = pseudonyms.content_key(key, drop.sha256(relpath))
        except ImagingError:  # no read permission, or gone since listed: quarantined, never the run's
            # error (whose message and traceback would quote the path); tried again on the next run
            files[fkey] = {"fingerprint": f"unreadable:{fingerprint}", "content": "", "unit": None}
            dirty.add(relpath)
            if posixpath.basename(relpath).lower() != PATIENTS_FILE:
                problems[relpath] = "unreadable_file"
            # else kept in the listing and read as no CSV text (_patients_bytes): without it the cases
            # it covers would each be their own patient, so they wait for it
            continue
        if old is not None and old.get("content") == content:
            files[fkey] = {**old, "fingerprint": fingerprint}
            continue
        files[fkey] = {"fingerprint": fingerprint, "content": content, "unit": None}
        dirty.add(relpath)

    # Volumes and MSD tasks: pairing is by name, cheap, and recomputed over the whole drop.
    units: list[Unit] = [
        Unit("bad_file", relpath, (relpath,), error_reason=problem, error_detail=ENTRY_PROBLEMS[problem])
        for relpath, problem in sorted(problems.items())
    ]
    descriptors = [e.relpath for e in listing if is_msd_descriptor(e.relpath)]
    listing = [e for e in listing if e.relpath not in problems]
    available = {e.relpath for e in listing}
    msd_files: set[str] = set()
    held: set[str] = set()  # units of tasks whose dataset.json cannot be read now: kept as they were
    for descriptor in descriptors:
        patients = posixpath.join(posixpath.dirname(descriptor), PATIENTS_FILE)
        try:
            text = None if descriptor in problems else drop.read_bytes(descriptor)
        except ImagingError:  # gone or unreadable since hashed: the run's error would quote its path
            units.append(Unit("bad_file", descriptor, (descriptor,), error_reason="unreadable_file",
                              error_detail="an MSD dataset.json that could not be read"))  # fmt: skip
            text = None
        task_units = [] if text is None else msd_units(
            descriptor, text, available,
            _patients_bytes(drop, patients) if patients in available else None,
        )  # fmt: skip
        if text is None or [(u.kind, u.source_id) for u in task_units] in ([("bad_file", descriptor)], [("bad_file", patients)]):
            # its dataset.json or patients.csv cannot be read: the task waits. Its volumes are not
            # loose ones, and the units they gave stay (a changed file's unit too: from the last manifest)
            units.extend(task_units)
            task = _task_files(descriptor, available)
            msd_files.update(task | {descriptor})
            held.update(u for f in task if f in fkeys and (u := (old_files.get(fkeys[f]) or {}).get("unit")))
            continue
        units.extend(task_units)
        msd_files.update(f for u in task_units for f in u.files)
        msd_files.add(descriptor)
        fkeys.setdefault(descriptor, pseudonyms.file_key(key, descriptor))
    volume_paths = [p for p in fkeys if volume_suffix(p) and p not in problems]
    task_folders = {posixpath.dirname(d) for d in descriptors}
    loose_patients = {
        p: read_patients_or_none(_patients_bytes(drop, p))
        for p in sorted(available)
        if posixpath.basename(p).lower() == PATIENTS_FILE and posixpath.dirname(p) not in task_folders
    }
    units.extend(
        _with_data_files(unit, data_files)
        for unit in pair_volumes(volume_paths, label_suffixes=config.label_suffixes,
                                 image_suffixes=config.image_suffixes, exclude=msd_files, patients=loose_patients)
    )  # fmt: skip

    # DICOM: unchanged files keep their unit; new ones are grouped by StudyInstanceUID.
    not_dicom = set(problems) | set(data_files.values())  # unreadable entries; detached data files
    dicom_paths = [p for p in fkeys if not volume_suffix(p) and not is_task_file(p) and p not in not_dicom]
    members: dict[str, list[str]] = defaultdict(list)
    for relpath in dicom_paths:
        ukey = files[fkeys[relpath]].get("unit")
        if relpath not in dirty and ukey:
            members[ukey].append(relpath)
    study_of_new: dict[str, str] = {}
    for relpath, study, reason in _read_studies(drop, sorted(p for p in dicom_paths if p in dirty), pool):
        if study is None:
            units.append(Unit("bad_file", relpath, (relpath,), error_reason=reason or "unreadable_file",
                              error_detail="file could not be read as DICOM"))  # fmt: skip
        else:
            study_of_new[relpath] = study
    for study in sorted(set(study_of_new.values())):
        ukey = pseudonyms.unit_key(key, "dicom", study)
        new_files = [p for p, s in study_of_new.items() if s == study]
        units.append(Unit("dicom", study, tuple(sorted(set(members.pop(ukey, [])) | set(new_files)))))
    # Studies with no new file: unchanged unless they have no result yet (or failed on a bug).
    for ukey, relpaths in members.items():
        if ukey in old_units and not failed_internally(old_units[ukey]) and not force and ukey not in pending:
            for relpath in relpaths:
                files[fkeys[relpath]]["unit"] = ukey
        else:  # re-read one header to rebuild the unit (new settings, a lost entry, a crash)
            _, study, reason = _dicom_study_of(drop, relpaths[0])
            if study:
                units.append(Unit("dicom", study, tuple(sorted(relpaths))))
            else:  # an unreadable file is its own unit: quarantined again, never dropped
                units.extend(
                    Unit("bad_file", relpath, (relpath,), error_reason=reason or "unreadable_file",
                         error_detail="file could not be read as DICOM")
                    for relpath in relpaths
                )  # fmt: skip

    todo = []
    live: set[str] = set(members) | held
    for unit in units:
        ukey = pseudonyms.unit_key(key, unit.kind, unit.source_id)
        live.add(ukey)
        for relpath in unit.files:
            fkey = fkeys.get(relpath) or pseudonyms.file_key(key, relpath)
            files.setdefault(fkey, {"fingerprint": "", "content": "", "unit": None})["unit"] = ukey
        source_hash = pseudonyms.keyed_digest(
            key, "source", *sorted(files[fkeys[f]]["content"] for f in unit.files if f in fkeys),
            *(("patient", unit.patient_hint) if unit.kind == "volume" and unit.patient_hint else ()),
        )[:32]  # a volume's patient is part of its source: a new patient rule re-ingests it
        previous = old_units.get(ukey)
        if (
            force
            or ukey in pending
            or previous is None
            or previous.get("source_hash") != source_hash
            or any(f in dirty for f in unit.files)
            or failed_internally(previous)
        ):
            todo.append((unit, ukey, source_hash))
    # Units of the last manifest that no longer form, with no case and every file still in the drop:
    # their files now read (a file that could not be read, then could) or group otherwise, so their
    # quarantine records are of the past. Those whose files left the drop keep theirs.
    old_files_of: dict[str, set[str]] = defaultdict(set)
    for fkey, entry in old_files.items():
        if entry.get("unit"):
            old_files_of[entry["unit"]].add(fkey)
    superseded = {
        ukey for ukey, unit in old_units.items()
        if ukey not in live and not unit.get("cases") and old_files_of.get(ukey) and old_files_of[ukey] <= files.keys()
    }  # fmt: skip
    return DropScan(files=files, todo=todo, live_units=live, superseded_units=superseded, n_files=len(fkeys), n_units=len(live))
