"""Which patient a loose NIfTI / NRRD image belongs to, through the real ingest pipeline: one
folder a patient with the same file names in each is one patient a folder (it was one patient for
the whole drop), and a ``patients.csv`` joins follow-ups, re-ingesting only the images it covers."""

from __future__ import annotations

import gzip

import nibabel as nib
from ingest_support import KEY, run_ingest, write_drop

from mvl_pipeline.core import pseudonyms


def _nifti(volume) -> bytes:
    return gzip.compress(nib.Nifti1Image(volume.array, volume.affine).to_bytes())


def test_one_folder_a_patient_with_the_same_file_names_is_one_patient_each_and_a_patients_csv_joins_them(
    tmp_path, sample_studies, count_processed
):
    files = {}
    for k, study in enumerate(sample_studies[:3]):
        files[f"export/P{k}/scan.nii.gz"] = _nifti(study.image)
        files[f"export/P{k}/scan_seg.nii.gz"] = _nifti(study.label)
    drop = write_drop(tmp_path / "drop", files)
    root = tmp_path / "data"
    first = run_ingest(drop, root)
    case_of = {k: pseudonyms.case_pseudonym(KEY, "volume", f"export/P{k}/scan.nii.gz") for k in range(3)}
    assert first.case_ids() == sorted(case_of.values())
    patients = {k: first.case(case_of[k]).patient_id for k in range(3)}
    assert len(set(patients.values())) == 3, patients
    assert count_processed() == [f"export/P{k}/scan.nii.gz" for k in range(3)]

    # the site learns that P0 and P1 are one patient's two visits: a patients.csv says so
    write_drop(drop, {"export/patients.csv": b"case_id,patient_id\nP0/scan,visit-owner\nP1/scan,visit-owner\n"})
    second = run_ingest(drop, root)
    assert sorted(count_processed()[3:]) == [f"export/P{k}/scan.nii.gz" for k in range(3)]  # the csv covers all three
    assert second.case_ids() == first.case_ids()  # same cases, new patients
    after = {k: second.case(case_of[k]).patient_id for k in range(3)}
    assert after[0] == after[1] != after[2]
    assert after[2] == patients[2]  # not listed: still its own patient, named as before
    text = (root / "02_intermediate" / "ingest_manifest.json").read_text()
    assert "visit-owner" not in text and "P0/scan" not in text

    run_ingest(drop, root)  # and nothing is redone once the mapping is unchanged
    assert len(count_processed()) == 6
