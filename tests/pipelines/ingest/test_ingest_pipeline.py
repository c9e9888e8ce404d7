"""`kedro run --pipeline ingest` through the project's catalog and Kedro's SequentialRunner:
where outputs land, refusing to run without a usable pseudonymisation key, empty drops, a
worker pool giving the same result, and one failing unit never stopping the run."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from ingest_support import (
    KEY,
    assert_same_cases,
    drop_files,
    ingest_params,
    run_ingest,
    snapshot,
    write_drop,
)
from kedro.io import DatasetError
from pydicom.data import get_testdata_file

from mvl_pipeline.core import pseudonyms
from mvl_pipeline.core.pseudonyms import PseudonymKeyError
from mvl_pipeline.datasets.drop import DROP_HINT, EmptyDropFolderError
from mvl_pipeline.dicom.deid import DEID_METHOD
from mvl_pipeline.pipelines.ingest import create_pipeline


@pytest.fixture(scope="module")
def mixed_drop(tmp_path_factory, sample_studies):
    """Three DICOM studies, a NIfTI pair, a truncated file and a stray text file."""
    root = tmp_path_factory.mktemp("mixed") / "drop"
    files = drop_files(*sample_studies[:3])
    truth = sample_studies[3]
    files["nifti/pt7_image.nii.gz"] = gzip.compress(
        nib.Nifti1Image(truth.image.array, truth.image.affine).to_bytes()
    )
    files["nifti/pt7_label.nii.gz"] = gzip.compress(
        nib.Nifti1Image(truth.label.array, truth.image.affine).to_bytes()
    )
    first_slice = sample_studies[0].files[sample_studies[0].slice_relpath(0)]
    files["incoming/broken.dcm"] = first_slice[:3000]
    files["incoming/notes.txt"] = b"exported by the PACS"
    return write_drop(root, files)


def test_pipeline_writes_each_output_to_its_catalog_layer(tmp_path, mixed_drop, sample_studies):
    pipeline = create_pipeline()
    assert {n.name for n in pipeline.nodes} == {
        "ingest.ingest_drop_node",
        "ingest.report_ingest_node",
    }
    assert pipeline.inputs() == {
        "hospital_drop",
        "previous_ingest_manifest",
        "pseudonymisation_key",
        "params:ingest",
    }

    run = run_ingest(mixed_drop, tmp_path / "data")

    volume_case = pseudonyms.case_pseudonym(KEY, "volume", "nifti/pt7_image.nii.gz")
    assert run.case_ids() == sorted([s.case_id for s in sample_studies[:3]] + [volume_case])
    for case_id in run.case_ids():
        assert sorted(p.name for p in (run.cases_path / case_id).iterdir()) == [
            "_COMPLETE",
            "case.json",
            "image.nii.gz",
            "label.nii.gz",
        ]
    nifti = run.case(volume_case)
    np.testing.assert_array_equal(nifti.image.array, sample_studies[3].image.array)
    np.testing.assert_array_equal(nifti.label.array, sample_studies[3].label.array)
    assert nifti.meta["modality"] == "CT"  # air in the volume (auto modality)

    manifest = run.manifest
    assert manifest["version"] == 1
    assert len(manifest["units"]) == 5  # 3 studies, 1 volume pair, 1 unreadable file
    assert (
        "incoming/notes.txt" not in str(manifest)
        and pseudonyms.file_key(KEY, "incoming/notes.txt") not in manifest["files"]
    )
    broken = run.unit_of("incoming/broken.dcm")
    assert broken["status"] == "quarantined"
    assert [q["reason"] for q in broken["quarantined"]] == ["unreadable_file"]
    assert [(q["reason"], q["source_kind"], q["n_files"]) for q in run.quarantine] == [
        ("unreadable_file", "file", 1)
    ]
    assert run.summary_counts() == {("ingested", "ok"): 4, ("quarantined", "unreadable_file"): 1}
    assert list(run.summary.columns) == ["status", "reason", "modality", "count"]


@pytest.mark.parametrize(
    ("key_hex", "message"),
    [
        (None, "no pseudonymisation key configured"),
        ("abc123", "at least 32 are required"),
        ("ab" * 32, "does not look random"),
    ],
    ids=["missing", "too-short", "not-random"],
)
def test_pipeline_refuses_to_run_without_a_usable_key(tmp_path, mixed_drop, key_hex, message):
    with pytest.raises((DatasetError, PseudonymKeyError)) as error:
        run_ingest(mixed_drop, tmp_path / "data", key_hex=key_hex)
    text = str(error.value)
    assert message in text
    assert (
        "conf/local/credentials.yml" in text and "MVL_PSEUDONYM_KEY" in text and "make key" in text
    )
    assert not (tmp_path / "data").exists()  # nothing written, not even a manifest


def test_empty_drop_is_refused_by_default_and_is_a_no_op_when_allowed(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    with pytest.raises(DatasetError) as error:
        run_ingest(drop, tmp_path / "data")
    assert isinstance(error.value.__cause__, EmptyDropFolderError)
    assert error.value.__cause__.reason == "empty_drop_folder"
    assert str(error.value) == f"hospital_drop: drop folder holds no files ({DROP_HINT}) [{drop}]"
    assert not (tmp_path / "data").exists()

    run = run_ingest(drop, tmp_path / "data", allow_empty=True)
    assert run.case_ids() == []
    assert {k: v for k, v in run.manifest.items() if k not in ("settings_id", "key_id")} == {
        "version": 1, "deid_method": DEID_METHOD, "files": {}, "units": {}}  # fmt: skip
    assert run.manifest["key_id"].startswith("key-")  # which key named the (future) cases
    assert run.quarantine == []
    assert run.summary_path.read_text().strip() == "status,reason,modality,count"


def test_drop_of_only_ignored_files_ingests_nothing(tmp_path):
    dicomdir = get_testdata_file("DICOMDIR")  # pydicom's real media directory file
    assert dicomdir is not None, "pydicom's DICOMDIR test file is missing"
    files = {"README.txt": b"hello", "DICOMDIR": Path(dicomdir).read_bytes(), "x/export.log": b""}
    drop = write_drop(tmp_path / "drop", files)
    (drop / ".DS_Store").write_bytes(b"\x00")
    run = run_ingest(drop, tmp_path / "data")
    assert run.case_ids() == []
    assert run.manifest["units"] == {} and run.manifest["files"] == {}
    assert run.quarantine == []


def test_two_worker_processes_give_the_same_bytes_as_one(tmp_path, mixed_drop):
    one = run_ingest(mixed_drop, tmp_path / "one", ingest_params(workers=1))
    two = run_ingest(mixed_drop, tmp_path / "two", ingest_params(workers=2))
    assert_same_cases(one, two)
    assert snapshot(one.root) == snapshot(two.root)  # manifest, reports and every case file


def _line_of(module, text: str) -> int:
    """The line of ``module`` that holds ``text`` (once)."""
    (line,) = [n for n, source in enumerate(Path(module.__file__).read_text().splitlines(), 1) if text in source]
    return line


def test_an_unexpected_error_in_one_unit_never_stops_the_run_and_is_retried(
    tmp_path, sample_studies, monkeypatch, caplog, count_processed
):
    """A bug (not bad data) in one study: that study is quarantined as internal_error, the rest
    is ingested; once the bug is gone the next run retries that study, and only that one."""
    from mvl_pipeline.ingestion import dicom_study as process

    victim = sample_studies[1]
    original = process.dicom_labels.read_segmentation

    def flaky(seg, reference):
        if np.allclose(reference.affine, victim.image.affine, atol=1e-3):
            raise RuntimeError("simulated crash in a label reader")
        return original(seg, reference)

    drop = write_drop(tmp_path / "drop", drop_files(*sample_studies[:3]))
    with monkeypatch.context() as patch:
        patch.setattr(process.dicom_labels, "read_segmentation", flaky)
        caplog.set_level(logging.INFO)
        first = run_ingest(drop, tmp_path / "data")
    assert first.case_ids() == sorted(s.case_id for s in (sample_studies[0], sample_studies[2]))
    unit = first.unit_of(victim.slice_relpath(0))
    assert unit["status"] == "quarantined"
    # the exception's type and the line of the package it went through; never its message,
    # which could quote a header value
    where = f"(mvl_pipeline/ingestion/dicom_study.py:{_line_of(process, 'dicom_labels.read_segmentation(')})"
    assert [(q["reason"], q["detail"]) for q in unit["quarantined"]] == [("internal_error", f"RuntimeError {where}")]
    assert f"unexpected RuntimeError {where} in a dicom unit; see its quarantine record" in caplog.text
    assert "simulated crash" not in caplog.text
    assert len(count_processed()) == 3

    second = run_ingest(drop, tmp_path / "data")
    assert count_processed()[3:] == [victim.study_uid]  # only the failed study is retried
    assert second.case_ids() == sorted(s.case_id for s in sample_studies[:3])
    assert second.unit_of(victim.slice_relpath(0))["status"] == "ingested"
    assert second.quarantine == []
