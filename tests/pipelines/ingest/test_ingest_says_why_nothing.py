"""A drop that gives no case says why (a first-try audit, 2026-12-05): a folder of images with no
labels was "20 units processed -> 0 cases ingested, 0 quarantine records", then "no ingested cases
to split" from the next stage, with no reason anywhere a user would look."""

from __future__ import annotations

import gzip
import logging

import nibabel as nib
import pytest
from ingest_support import run_ingest, write_drop

from mvl_pipeline.pipelines.preprocess.nodes import split_dataset


def test_a_drop_of_images_without_labels_says_they_were_skipped_and_why(tmp_path, sample_studies, caplog):
    files = {
        f"images/case{k}.nii.gz": gzip.compress(nib.Nifti1Image(s.image.array, s.image.affine).to_bytes())
        for k, s in enumerate(sample_studies[:2])
    }
    drop = write_drop(tmp_path / "drop", files)
    caplog.set_level(logging.INFO)
    run = run_ingest(drop, tmp_path / "data")
    assert run.case_ids() == []
    assert "0 cases ingested, 0 quarantine records, 2 skipped (unlabelled_image: 2)" in caplog.text
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "no label" in r.getMessage())
    assert "ingest.keep_unlabelled" in warning and "case0" not in caplog.text


def test_the_split_of_no_cases_names_where_to_look():
    with pytest.raises(ValueError, match="ingest kept no case from the drop.*skipped and why.*quarantine.json"):
        split_dataset({}, None, None, {})
