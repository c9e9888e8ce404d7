"""Two ways a drop's names reached what users see, found by the kedro-viz / run output audit
(2026-12-05):

- a file ingest may not read (no read permission; as root no file is unreadable, so the
  filesystem's open is made to refuse it here) stopped the whole run with a ``PermissionError``
  that quoted its full path (a folder named after the patient) on the console, in ``info.log`` and
  in kedro-viz's ``/api/run-status``. It is now one ``unreadable_file`` quarantine record, and
  the file is read again by the next run;
- a file in a folder whose name is not UTF-8 (a zip made on Windows: "M\\xfcller") stopped the
  whole run with a ``UnicodeEncodeError`` (while its path was hashed into the manifest's key);
- an MSD task's ``dataset.json`` modality is free text typed at the site: it was kept as the
  cases' modality, in the manifest, the summary table (previewed by kedro-viz) and the log.
  Only DICOM's defined terms are kept now; other text gives the guessed modality.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Callable

import nibabel as nib
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from ingest_support import drop_files, ingest_params, run_ingest, write_drop

NAME = "Kowalczyk"
FOLDER = f"{NAME}_Jan_19310517"


def _outputs_text(root) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(root.rglob("*")) if p.suffix in (".json", ".csv"))


def _refuse_reading(monkeypatch, refused) -> Callable[[], None]:
    """The filesystem's open refuses the paths ``refused(path)`` picks (as root no file is
    unreadable); the function returned gives the permission back."""
    original = LocalFileSystem._open

    def refusing(self, path, mode="rb", *args, **kwargs):
        if refused(str(path)):
            raise PermissionError(13, "Permission denied", str(path))
        return original(self, path, mode, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "_open", refusing)
    return lambda: monkeypatch.setattr(LocalFileSystem, "_open", original)


def test_a_file_ingest_may_not_read_is_quarantined_without_its_path_and_read_again_later(
    tmp_path, sample_studies, monkeypatch, caplog
):
    first, second = sample_studies[0], sample_studies[1]
    files = drop_files(first, second)
    seg = next(p for p in second.files if f"/{second.seg_series_uid}/" in p)
    files[f"{FOLDER}/{seg.rsplit('/', 1)[1]}"] = files.pop(seg)  # the SEG, in a patient-named folder
    drop = write_drop(tmp_path / "drop", files)

    give_back = _refuse_reading(monkeypatch, lambda path: FOLDER in path)
    caplog.set_level(logging.INFO)
    run = run_ingest(drop, tmp_path / "data")

    assert run.case_ids() == [first.case_id]  # the second study waits for its SEG
    assert [(q["reason"], q["n_files"]) for q in run.quarantine] == [("unreadable_file", 1)]
    shown = _outputs_text(tmp_path / "data") + caplog.text
    assert NAME.lower() not in shown.lower() and "19310517" not in shown

    give_back()  # the permission is fixed
    run = run_ingest(drop, tmp_path / "data")
    assert sorted(run.case_ids()) == sorted([first.case_id, second.case_id])
    assert run.quarantine == []  # the record of the file it could not read is of the past


def test_an_msd_modality_that_is_not_a_dicom_term_is_not_kept(tmp_path, caplog):
    task = tmp_path / "drop" / "Task99_Site"
    rng = np.random.default_rng(7)
    image = (400 + 50 * rng.standard_normal((16, 16, 16))).astype(np.float32)
    label = np.zeros((16, 16, 16), np.uint8)
    label[4:12, 4:12, 4:12] = 1
    for kind, array in (("imagesTr", image), ("labelsTr", label)):
        (task / kind).mkdir(parents=True)
        (task / kind / "case_001.nii.gz").write_bytes(gzip.compress(nib.Nifti1Image(array, np.eye(4)).to_bytes()))
    (task / "dataset.json").write_text(json.dumps({
        "name": "site task", "modality": {"0": f"MRI St Elsewhere {NAME}"},
        "labels": {"0": "background", "1": "liver"},
        "training": [{"image": "./imagesTr/case_001.nii.gz", "label": "./labelsTr/case_001.nii.gz"}], "test": [],
    }))  # fmt: skip

    caplog.set_level(logging.INFO)
    run = run_ingest(tmp_path / "drop", tmp_path / "data", ingest_params())

    [case_id] = run.case_ids()
    assert run.case(case_id).modality == "MR"  # guessed: no air in the image
    assert set(run.summary["modality"]) == {"MR"}
    shown = _outputs_text(tmp_path / "data") + caplog.text
    assert "elsewhere" not in shown.lower() and NAME.lower() not in shown.lower()


def test_a_file_whose_folder_name_is_not_utf8_does_not_stop_the_run(tmp_path, sample_studies):
    first, second = sample_studies[0], sample_studies[1]
    files = drop_files(first, second)
    seg = next(p for p in second.files if f"/{second.seg_series_uid}/" in p)
    data = files.pop(seg)
    drop = write_drop(tmp_path / "drop", files)
    folder = os.fsencode(drop) + b"/M\xfcller_Hans_19310517"  # cp1252, as a Windows zip stores it
    os.makedirs(folder)
    with open(folder + b"/IM0001.dcm", "wb") as handle:
        handle.write(data)

    run = run_ingest(drop, tmp_path / "data")

    assert sorted(run.case_ids()) == sorted([first.case_id, second.case_id])
    assert b"ller_Hans" not in b"".join(p.read_bytes() for p in (tmp_path / "data").rglob("*") if p.is_file())


def test_a_patients_csv_ingest_may_not_read_holds_back_the_images_it_covers(tmp_path, sample_studies, monkeypatch):
    """Its images must not be ingested each as its own patient: the split could then put one
    patient's visits on both sides. They wait, as for a csv that is not UTF-8."""
    files = {}
    for k, study in enumerate(sample_studies[:2]):
        for suffix, volume in (("", study.image), ("_seg", study.label)):
            affine = volume.affine
            files[f"export/P{k}/scan{suffix}.nii.gz"] = gzip.compress(nib.Nifti1Image(volume.array, affine).to_bytes())
    files["export/patients.csv"] = b"case_id,patient_id\nP0/scan,visit-owner\nP1/scan,visit-owner\n"
    drop = write_drop(tmp_path / "drop", files)

    give_back = _refuse_reading(monkeypatch, lambda path: path.endswith("patients.csv"))
    run = run_ingest(drop, tmp_path / "data")
    assert run.case_ids() == []  # both images wait for their patients
    assert [q["reason"] for q in run.quarantine] == ["invalid_patients_file"]

    give_back()  # the permission is fixed
    run = run_ingest(drop, tmp_path / "data")
    assert len(run.case_ids()) == 2
    assert len({run.case(c).patient_id for c in run.case_ids()}) == 1  # one patient's two visits
    assert run.quarantine == []


def _msd_task(task, n: int = 2) -> None:
    rng = np.random.default_rng(3)
    training = []
    for k in range(n):
        image = (400 + 50 * rng.standard_normal((16, 16, 16))).astype(np.float32)
        label = np.zeros((16, 16, 16), np.uint8)
        label[4 + k : 12, 4:12, 4:12] = 1
        for kind, array in (("imagesTr", image), ("labelsTr", label)):
            (task / kind).mkdir(parents=True, exist_ok=True)
            (task / kind / f"case_{k:03d}.nii.gz").write_bytes(gzip.compress(nib.Nifti1Image(array, np.eye(4)).to_bytes()))
        training.append({"image": f"./imagesTr/case_{k:03d}.nii.gz", "label": f"./labelsTr/case_{k:03d}.nii.gz"})
    (task / "dataset.json").write_text(json.dumps({
        "name": "task", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "organ"},
        "training": training, "test": [],
    }))  # fmt: skip


def test_an_msd_dataset_json_ingest_may_not_read_holds_its_task_and_names_no_path(tmp_path, monkeypatch, caplog):
    """An audit (2026-12-07): a task's dataset.json that could be hashed once, then not read (its
    permission taken, its fingerprint unchanged, so never hashed again) stopped the run with an
    error quoting its full path; one unreadable when hashed left its task's volumes to be paired as
    loose image/label files, new cases of the same images. Now it is quarantined, its task waits,
    and the cases it gave stay."""
    task = tmp_path / "drop" / FOLDER / "Task98_Site"
    _msd_task(task)
    caplog.set_level(logging.INFO)
    first = run_ingest(tmp_path / "drop", tmp_path / "data", ingest_params())
    cases = first.case_ids()
    assert len(cases) == 2 and first.quarantine == []

    give_back = _refuse_reading(monkeypatch, lambda path: path.endswith("dataset.json"))
    held = run_ingest(tmp_path / "drop", tmp_path / "data", ingest_params())  # unchanged: read, not hashed
    assert held.case_ids() == cases
    assert [(q["reason"], q["n_files"]) for q in held.quarantine] == [("unreadable_file", 1)]
    assert "not in this drop" not in caplog.text  # its cases are still the drop's

    _msd_task(task, n=3)  # the site adds a case: dataset.json changes, and is hashed, which fails
    held = run_ingest(tmp_path / "drop", tmp_path / "data", ingest_params())
    assert held.case_ids() == cases  # no loose image/label pairs of the task's volumes
    assert [(q["reason"], q["n_files"]) for q in held.quarantine] == [("unreadable_file", 1)]
    shown = _outputs_text(tmp_path / "data") + caplog.text
    assert NAME.lower() not in shown.lower() and "19310517" not in shown

    give_back()  # the permission is fixed
    again = run_ingest(tmp_path / "drop", tmp_path / "data", ingest_params())
    assert len(again.case_ids()) == 3 and set(cases) < set(again.case_ids()) and again.quarantine == []


def test_a_task_whose_dataset_json_is_broken_waits_and_keeps_its_cases(tmp_path, caplog):
    """A half-copied or hand-edited dataset.json: its task's volumes were paired as loose image /
    label files, and its cases said to have left the drop (a review, 2026-12-07)."""
    task = tmp_path / "drop" / "Task97_Site"
    _msd_task(task)
    first = run_ingest(tmp_path / "drop", tmp_path / "data", ingest_params())
    (task / "dataset.json").write_text('{"name": "task", "training": [')  # cut off mid-copy
    caplog.set_level(logging.INFO)
    held = run_ingest(tmp_path / "drop", tmp_path / "data", ingest_params())
    assert held.case_ids() == first.case_ids()
    assert [q["reason"] for q in held.quarantine] == ["invalid_msd_descriptor"]
    assert "not in this drop" not in caplog.text and "unlabelled" not in caplog.text
    _msd_task(task)  # copied again, whole
    again = run_ingest(tmp_path / "drop", tmp_path / "data", ingest_params())
    assert again.case_ids() == first.case_ids() and again.quarantine == []
