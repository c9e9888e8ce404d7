"""Geometry through the ingest pipeline: slice order never comes from file names or
InstanceNumbers, non-axial series keep their direction, and a missing slice is quarantined."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from ingest_support import SAMPLE_PARAMS, build_sample_studies, drop_files, run_ingest, write_drop

from mvl_pipeline.datasets.drop import encode_file


def _assert_matches_truth(case, study) -> None:
    """The ingested case is the generator's truth: same grid, HU to rounding, exact labels."""
    np.testing.assert_allclose(case.image.affine, study.image.affine, atol=1e-4)
    assert case.image.shape == study.image.shape
    # stored as int16 with slope 1: the round trip is exact up to rounding to whole HU
    np.testing.assert_allclose(case.image.array, study.image.array, atol=0.5 + 1e-3)
    np.testing.assert_array_equal(case.label.array, study.label.array)
    np.testing.assert_array_equal(case.label.affine, case.image.affine)


def test_shuffled_file_names_and_instance_numbers_reassemble_identically(tmp_path, sample_studies):
    study, other = sample_studies[0], sample_studies[2]
    rng = np.random.default_rng(3)
    shuffled: dict[str, bytes] = {}
    slices = [study.slice_relpath(k) for k in range(study.image.shape[2])]  # in slice order k
    names = rng.permutation(len(slices))
    numbers = rng.permutation(len(slices)) + 1
    for index, relpath in enumerate(slices):
        ds = pydicom.dcmread(io.BytesIO(study.files[relpath]))
        ds.InstanceNumber = int(numbers[index])  # lies about the order
        shuffled[f"export/img{names[index]:03d}.dcm"] = encode_file(ds)
    (seg,) = set(study.files) - set(slices)
    shuffled["export/zz_seg.dcm"] = study.files[seg]
    # neither the names nor the InstanceNumbers follow the slice order k
    assert list(names) != sorted(names) and list(numbers) != sorted(numbers)

    ordered = run_ingest(
        write_drop(tmp_path / "ordered", drop_files(study, other)), tmp_path / "out_ordered"
    )
    mixed = run_ingest(
        write_drop(tmp_path / "mixed", {**shuffled, **other.files}), tmp_path / "out_mixed"
    )

    assert ordered.case_ids() == mixed.case_ids() == sorted([study.case_id, other.case_id])
    a, b = ordered.case(study.case_id), mixed.case(study.case_id)
    np.testing.assert_array_equal(a.image.array, b.image.array)
    np.testing.assert_array_equal(a.image.affine, b.image.affine)
    np.testing.assert_array_equal(a.label.array, b.label.array)
    _assert_matches_truth(b, study)
    assert b.meta["n_slices"] == study.image.shape[2]


def test_oblique_series_keeps_its_direction(tmp_path, sample_studies):
    oblique = next(s for s in sample_studies if s.orientation == "oblique")
    axial = next(s for s in sample_studies if s.orientation == "axial")
    run = run_ingest(write_drop(tmp_path / "drop", drop_files(oblique, axial)), tmp_path / "out")

    case = run.case(oblique.case_id)
    _assert_matches_truth(case, oblique)
    direction = case.image.affine[:3, :3] / np.linalg.norm(case.image.affine[:3, :3], axis=0)
    assert not np.allclose(np.abs(direction), np.eye(3), atol=0.05)  # really tilted, not snapped
    _assert_matches_truth(run.case(axial.case_id), axial)


def test_coronal_series_keeps_its_direction(tmp_path):
    params = {**SAMPLE_PARAMS, "n_patients": 1, "non_axial_orientation": "coronal"}
    (coronal,) = build_sample_studies(params)
    assert coronal.orientation == "coronal"
    run = run_ingest(write_drop(tmp_path / "drop", coronal.files), tmp_path / "out")
    case = run.case(coronal.case_id)
    _assert_matches_truth(case, coronal)
    # slices stack along anterior-posterior: the k axis of the grid is the A-P world axis
    k_axis = case.image.affine[:3, 2] / np.linalg.norm(case.image.affine[:3, 2])
    assert abs(k_axis[1]) > 0.999


def test_series_with_a_missing_slice_is_quarantined_and_others_are_kept(tmp_path, sample_studies):
    broken, good = sample_studies[3], sample_studies[4]
    files = drop_files(broken, good)
    del files[broken.slice_relpath(5)]
    # the PACS export names the SEG so that it sorts before the slices
    (seg_path,) = set(broken.files) - {broken.slice_relpath(k) for k in range(12)}
    files[f"{seg_path.split('/')[0]}/0_seg.dcm"] = files.pop(seg_path)
    run = run_ingest(write_drop(tmp_path / "drop", files), tmp_path / "out")

    assert run.case_ids() == [good.case_id]
    _assert_matches_truth(run.case(good.case_id), good)
    unit = run.unit_of(broken.slice_relpath(4))
    assert unit["status"] == "quarantined"
    assert [q["reason"] for q in unit["quarantined"]] == ["missing_slices"]
    record = unit["quarantined"][0]
    assert record["case_id"] == broken.case_id
    assert record["n_files"] == len(broken.files) - 1  # 11 slices + the SEG
    assert "1 slice(s) missing" in record["detail"]
    assert [r["reason"] for r in run.quarantine] == ["missing_slices"]
    assert run.summary_counts() == {("ingested", "ok"): 1, ("quarantined", "missing_slices"): 1}
    # the quarantined study is reported under its image modality, not its SEG's
    assert unit["modality"] == run.quarantine[0]["modality"] == "CT"
    assert set(run.summary.itertuples(index=False, name=None)) == {
        ("ingested", "ok", "CT", 1),
        ("quarantined", "missing_slices", "CT", 1),
    }
