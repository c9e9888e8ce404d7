"""Incremental ingest: only new or changed studies are processed, everything else is left
byte-identical, and a study changed upstream replaces its old outputs."""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import pydicom
import pytest
from ingest_support import drop_files, run_ingest, snapshot, write_drop

from mvl_pipeline.core import pseudonyms
from mvl_pipeline.datasets.drop import encode_file


@pytest.fixture
def first_run(tmp_path, sample_studies):
    """Three studies ingested once; returns (drop folder, output root, run)."""
    drop = write_drop(tmp_path / "drop", drop_files(*sample_studies[:3]))
    run = run_ingest(drop, tmp_path / "data")
    assert run.case_ids() == sorted(s.case_id for s in sample_studies[:3])
    return drop, tmp_path / "data", run


def _case_folders(run, case_ids) -> dict[str, bytes]:
    return snapshot(run.cases_path, under=case_ids)


def test_two_new_studies_are_the_only_work_and_earlier_cases_stay_byte_identical(
    first_run, sample_studies, count_processed
):
    drop, root, run = first_run
    earlier_ids = [s.case_id for s in sample_studies[:3]]
    before = _case_folders(run, earlier_ids)
    units_before = run.manifest["units"]
    assert len(before) == 3 * 4  # image, label, case.json, _COMPLETE per case

    write_drop(drop, drop_files(*sample_studies[3:]))
    second = run_ingest(drop, root)

    assert sorted(count_processed()) == sorted(s.study_uid for s in sample_studies[3:])
    assert second.case_ids() == sorted(s.case_id for s in sample_studies)
    assert _case_folders(second, earlier_ids) == before
    units_after = second.manifest["units"]
    assert {k: units_after[k] for k in units_before} == units_before
    assert len(units_after) == 5
    assert second.summary_counts() == {("ingested", "ok"): 5}


def test_rerun_with_nothing_new_processes_nothing_and_changes_no_byte(first_run, count_processed):
    drop, root, run = first_run
    before = snapshot(root)
    assert set(before) >= {
        "02_intermediate/ingest_manifest.json",
        "02_intermediate/quarantine.json",
        "08_reporting/ingest_summary.csv",
    }
    run_ingest(drop, root)
    assert count_processed() == []
    assert snapshot(root) == before


def test_touched_but_unchanged_file_is_not_reprocessed(first_run, sample_studies, count_processed):
    drop, root, run = first_run
    cases_before = snapshot(run.cases_path)
    touched = drop / sample_studies[0].slice_relpath(3)
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a copy tool re-stamps it

    again = run_ingest(drop, root)
    assert count_processed() == []
    assert snapshot(again.cases_path) == cases_before


def test_study_changed_upstream_is_reingested_and_replaces_its_old_outputs(
    first_run, sample_studies, count_processed
):
    drop, root, run = first_run
    changed, *unchanged = sample_studies[:3]
    untouched_before = _case_folders(run, [s.case_id for s in unchanged])
    old_case = run.case(changed.case_id)
    old_files = _case_folders(run, [changed.case_id])
    old_hash = run.unit_of(changed.slice_relpath(0))["source_hash"]

    # the hospital re-sends slice 6 with corrected pixels (a 10x10 patch raised by 300 HU)
    relpath = changed.slice_relpath(6)
    ds = pydicom.dcmread(io.BytesIO(changed.files[relpath]))
    pixels = ds.pixel_array.copy()
    pixels[:10, :10] += 300
    ds.PixelData = pixels.tobytes()
    write_drop(drop, {relpath: encode_file(ds)})

    second = run_ingest(drop, root)
    assert count_processed() == [changed.study_uid]
    assert second.case_ids() == run.case_ids()  # same case id: replaced, not duplicated
    new_case = second.case(changed.case_id)
    difference = new_case.image.array - old_case.image.array
    # pixel [row, column] -> array [i = column, j = row, k]
    np.testing.assert_allclose(difference[:10, :10, 6], 300.0)
    difference[:10, :10, 6] = 0
    assert not difference.any()
    np.testing.assert_array_equal(new_case.label.array, old_case.label.array)
    assert _case_folders(second, [changed.case_id]) != old_files
    assert new_case.meta["source_hash"] != old_case.meta["source_hash"]
    assert (
        second.unit_of(changed.slice_relpath(0))["source_hash"]
        == new_case.meta["source_hash"]
        != old_hash
    )
    assert _case_folders(second, [s.case_id for s in unchanged]) == untouched_before
    # the replaced folder holds exactly one version (no leftovers of the old write)
    assert sorted(p.name for p in (second.cases_path / changed.case_id).iterdir()) == [
        "_COMPLETE",
        "case.json",
        "image.nii.gz",
        "label.nii.gz",
    ]
    assert not [p for p in second.cases_path.iterdir() if p.name.startswith(".")]


def test_study_that_turns_bad_upstream_loses_its_old_case(
    first_run, sample_studies, count_processed
):
    """The hospital re-sends a study's SEG with a structure outside the label map: the study is
    quarantined, and its case from the earlier version is removed rather than left stale."""
    drop, root, run = first_run
    changed, *unchanged = sample_studies[:3]
    untouched_before = _case_folders(run, [s.case_id for s in unchanged])
    slices = {changed.slice_relpath(k) for k in range(len(changed.sop_uids))}
    (seg_path,) = set(changed.files) - slices
    seg = pydicom.dcmread(io.BytesIO(changed.files[seg_path]))
    seg.SegmentSequence[1].SegmentLabel = "Spleen"
    write_drop(drop, {seg_path: encode_file(seg)})

    second = run_ingest(drop, root)
    assert count_processed() == [changed.study_uid]
    assert second.case_ids() == sorted(s.case_id for s in unchanged)
    assert not (second.cases_path / changed.case_id).exists()
    unit = second.unit_of(seg_path)
    assert (unit["status"], unit["cases"]) == ("quarantined", [])
    assert [(q["reason"], q["case_id"]) for q in unit["quarantined"]] == [
        ("label_values_not_in_label_map", changed.case_id)
    ]
    detail = unit["quarantined"][0]["detail"]
    assert "the name of label 2 is not in the label map" in detail
    assert "spleen" not in detail.lower()  # a segment's label is free text: never quoted
    assert _case_folders(second, [s.case_id for s in unchanged]) == untouched_before


def test_changed_ingest_settings_reingest_every_study_once(first_run, sample_studies, count_processed):
    """A new label alias (or any setting that shapes a case) must not be silently ignored for the
    studies ingested before it; the run after that is incremental again."""
    from ingest_support import ingest_params

    drop, root, run = first_run
    first_settings = run.manifest["settings_id"]
    params = ingest_params(label_aliases={"liver": "organ", "lesion": "lesion", "hepar": "organ"})
    changed = run_ingest(drop, root, params=params)
    assert sorted(count_processed()) == sorted(s.study_uid for s in sample_studies[:3])
    assert changed.case_ids() == run.case_ids()
    assert changed.manifest["settings_id"] != first_settings
    run_ingest(drop, root, params=params)
    assert len(count_processed()) == 3  # nothing more the second time


def test_a_changed_key_is_refused_before_anything_is_written(first_run, sample_studies):
    """Ingest under another key would give every study a second pseudonym next to its first (and
    one patient two places in the split): refused, naming both keys' ids and what to do, with
    the earlier cases and manifest untouched."""
    drop, root, run = first_run
    before = snapshot(root)
    other_key = hashlib.sha256(b"another site key").hexdigest()
    write_drop(drop, drop_files(*sample_studies[3:]))
    with pytest.raises(Exception) as caught:
        run_ingest(drop, root, key_hex=other_key)
    error = caught.value
    while not isinstance(error, pseudonyms.KeyChangedError) and error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, pseudonyms.KeyChangedError), caught.value
    message = str(error)
    assert pseudonyms.key_id(bytes.fromhex(other_key)) in message and run.manifest["key_id"] in message
    assert "ingest_manifest.json" in message and other_key not in message
    assert snapshot(root) == before
    # every case records the key it was made under; the manifest too
    assert {run.case(c).meta["key_id"] for c in run.case_ids()} == {run.manifest["key_id"]}


def test_a_drop_that_no_longer_holds_the_earlier_studies_says_their_cases_stay(first_run, sample_studies, caplog, tmp_path):
    # `make train KEDRO_ENV=msd MVL_MSD_TASK=<another folder>` (or a new drop_url) went on in silence
    # with every case of the earlier drop: nothing said that they were still trained on
    _, root, _ = first_run
    other = write_drop(tmp_path / "other-drop", drop_files(*sample_studies[3:4]))
    with caplog.at_level("WARNING", logger="mvl_pipeline.ingestion.run"):
        second = run_ingest(other, root)
    assert second.case_ids() == sorted(s.case_id for s in sample_studies[:4])  # the design: they stay
    [warning] = [r.getMessage() for r in caplog.records if "not in this drop" in r.getMessage()]
    assert warning.startswith("3 of the 3 ingested unit(s) with cases are not in this drop (")
    assert str(tmp_path) not in warning  # no path of the drop (it may name a patient)
