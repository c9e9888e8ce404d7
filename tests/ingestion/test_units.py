"""Sorting a drop's files into units: image/label pairing by name, ignored files, MSD tasks."""

from __future__ import annotations

import json

import pytest

from mvl_pipeline.ingestion.config import IngestConfig
from mvl_pipeline.ingestion.units import is_ignored, is_msd_descriptor, msd_units, pair_volumes

CONFIG = IngestConfig.from_params({"labels": {"organ": 1}})


def pair(*relpaths: str, exclude=()):
    units = pair_volumes(
        list(relpaths), label_suffixes=CONFIG.label_suffixes, image_suffixes=CONFIG.image_suffixes,
        exclude=exclude,
    )  # fmt: skip
    return {u.source_id: u for u in units}


@pytest.mark.parametrize(
    ("image", "label", "patient"),
    [
        ("x_image.nii.gz", "x_label.nii.gz", "x"),
        ("a/b/x.nrrd", "a/b/x_seg.nrrd", "a/b/x"),  # the folder is part of the patient
        ("ct_0000.nii", "ct_mask.nii", "ct"),
        ("x.nii.gz", "x_labels.nii.gz", "x"),
        ("x_image.nii.gz", "x_image_label.nii.gz", "x"),  # label named after the full image stem
        ("case_IMAGE.NII.GZ", "case_Label.nii.gz", "case"),  # suffixes are case-insensitive
        ("scan_img.nrrd", "scan_seg.nii.gz", "scan"),  # formats may differ within a pair
    ],
)
def test_image_and_label_are_paired_by_their_suffixes(image, label, patient):
    units = pair(label, image, "other/unrelated.nii.gz")
    unit = units[image]
    assert (unit.kind, unit.image, unit.label, unit.files) == ("volume", image, label, (image, label))
    assert unit.patient_hint == patient
    assert label not in units  # the label is not also an image
    assert units["other/unrelated.nii.gz"].label is None


def test_an_image_without_label_is_a_volume_unit_of_its_own():
    [unit] = pair("scan.nii.gz").values()
    assert (unit.kind, unit.files, unit.label, unit.patient_hint) == ("volume", ("scan.nii.gz",), None, "scan")


def test_pairs_are_only_made_within_one_folder():
    units = pair("a/x_image.nii.gz", "b/x_label.nii.gz")
    assert units["a/x_image.nii.gz"].label is None
    orphan = units["b/x_label.nii.gz"]
    assert (orphan.kind, orphan.error_reason) == ("bad_file", "orphan_label")


def test_a_label_without_image_becomes_an_orphan_label_bad_file_and_the_rest_is_kept():
    units = pair("lonely_seg.nrrd", "y_image.nii.gz", "y_label.nii.gz")
    orphan = units["lonely_seg.nrrd"]
    assert (orphan.kind, orphan.files, orphan.error_reason) == ("bad_file", ("lonely_seg.nrrd",), "orphan_label")
    assert orphan.error_detail == "label volume without a matching image"
    assert units["y_image.nii.gz"].label == "y_label.nii.gz"  # good data alongside is not lost
    assert len(units) == 2


def test_two_labels_for_one_image_are_quarantined_as_ambiguous_never_ingested_as_images():
    units = pair("x_image.nii.gz", "x_label.nii.gz", "x_seg.nii.gz", "y_image.nii.gz", "y_label.nii.gz")
    for name in ("x_label.nii.gz", "x_seg.nii.gz"):
        assert (units[name].kind, units[name].error_reason) == ("bad_file", "ambiguous_label")
    assert units["x_image.nii.gz"].kind == "volume" and units["x_image.nii.gz"].label is None
    assert units["y_image.nii.gz"].label == "y_label.nii.gz"  # the good pair beside it is kept
    assert len(units) == 4


def test_non_volume_and_excluded_files_are_left_out():
    units = pair("notes.dcm", "IM0001", "t/imagesTr/a.nii.gz", "x_image.nii.gz", exclude={"t/imagesTr/a.nii.gz"})
    assert list(units) == ["x_image.nii.gz"]


@pytest.mark.parametrize(
    "relpath",
    ["README", "a/readme", "LICENSE", "DICOMDIR", "_COMPLETE", "Thumbs.db", ".hidden", "a/.DS_Store",
     "a/.x.nii.gz", "notes.txt", "list.CSV", "meta.json", "conf.yaml", "data.raw", "x.raw.gz"],
)  # fmt: skip
def test_bookkeeping_files_are_ignored(relpath):
    assert is_ignored(relpath)


@pytest.mark.parametrize("relpath", ["dataset.json", "task/dataset.json", "x.nii.gz", "IM0001", "slice.dcm", "x.nrrd"])
def test_data_files_and_msd_descriptors_are_not_ignored(relpath):
    assert not is_ignored(relpath)


def test_only_a_file_named_dataset_json_is_an_msd_descriptor():
    assert is_msd_descriptor("Task04/dataset.json") and is_msd_descriptor("dataset.json")
    assert is_msd_descriptor("Task04/Dataset.JSON")  # was read as DICOM and quarantined
    assert not is_msd_descriptor("Task04/dataset.json.bak")
    assert not is_msd_descriptor("Task04/mydataset.json")


DESCRIPTOR = {
    "name": "Hippocampus",
    "modality": {"0": "MRI"},
    "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
    "training": [
        {"image": "./imagesTr/hip_001.nii.gz", "label": "./labelsTr/hip_001.nii.gz"},
        {"image": "./imagesTr/hip_002.nii.gz", "label": "./labelsTr/hip_002.nii.gz"},
    ],
    "test": ["./imagesTs/hip_003.nii.gz"],
}
TASK_FILES = {
    "Task04/imagesTr/hip_001.nii.gz", "Task04/labelsTr/hip_001.nii.gz",
    "Task04/imagesTr/hip_002.nii.gz", "Task04/labelsTr/hip_002.nii.gz",
    "Task04/imagesTs/hip_003.nii.gz",
}  # fmt: skip


def msd(descriptor, available=TASK_FILES):
    data = descriptor if isinstance(descriptor, bytes) else json.dumps(descriptor).encode()
    return {u.source_id: u for u in msd_units("Task04/dataset.json", data, set(available))}


def test_msd_training_entries_become_labelled_volume_units_with_names_and_modality():
    units = msd(DESCRIPTOR)
    unit = units["Task04/imagesTr/hip_001.nii.gz"]
    assert unit.kind == "volume"
    assert unit.files == ("Task04/imagesTr/hip_001.nii.gz", "Task04/labelsTr/hip_001.nii.gz")
    assert unit.label == "Task04/labelsTr/hip_001.nii.gz"
    assert unit.label_names == {0: "background", 1: "Anterior", 2: "Posterior"}
    assert unit.modality == "MR"  # MSD says MRI, DICOM says MR
    assert unit.patient_hint == "hip_001"
    assert units["Task04/imagesTr/hip_002.nii.gz"].label == "Task04/labelsTr/hip_002.nii.gz"


def test_msd_test_images_are_volume_units_without_label():
    unit = msd(DESCRIPTOR)["Task04/imagesTs/hip_003.nii.gz"]
    assert (unit.kind, unit.files, unit.label) == ("volume", ("Task04/imagesTs/hip_003.nii.gz",), None)


@pytest.mark.parametrize(("modality", "expected"), [({"0": "CT"}, "CT"), ({"0": "FLAIR", "1": "T1w"}, "MULTI"), ({}, None)])
def test_msd_modality_is_one_name_or_multi(modality, expected):
    units = msd({**DESCRIPTOR, "modality": modality})
    assert {u.modality for u in units.values()} == {expected}


def test_a_listed_file_missing_from_the_drop_is_a_missing_file_bad_unit_and_the_rest_is_kept():
    units = msd(DESCRIPTOR, TASK_FILES - {"Task04/labelsTr/hip_002.nii.gz"})
    bad = units["Task04/imagesTr/hip_002.nii.gz"]
    assert (bad.kind, bad.error_reason) == ("bad_file", "missing_file")
    assert bad.files == ("Task04/imagesTr/hip_002.nii.gz",)  # the file that is there
    assert bad.error_detail == "1 file(s) listed in dataset.json are missing"
    assert units["Task04/imagesTr/hip_001.nii.gz"].kind == "volume"
    assert len(units) == 3


def test_an_entry_with_every_file_missing_points_at_the_descriptor():
    units = msd(DESCRIPTOR, TASK_FILES - {"Task04/imagesTr/hip_001.nii.gz", "Task04/labelsTr/hip_001.nii.gz"})
    bad = units["Task04/imagesTr/hip_001.nii.gz"]
    assert (bad.kind, bad.error_reason, bad.files) == ("bad_file", "missing_file", ("Task04/dataset.json",))
    assert "2 file(s)" in bad.error_detail


@pytest.mark.parametrize(
    "descriptor",
    [b"{not json", b"\xff\xfe", b"[1, 2]", json.dumps({**DESCRIPTOR, "labels": {"one": "organ"}}).encode()],
)
def test_an_unreadable_descriptor_is_one_invalid_msd_descriptor_bad_file(descriptor):
    [unit] = msd(descriptor).values()
    assert (unit.kind, unit.source_id, unit.files) == ("bad_file", "Task04/dataset.json", ("Task04/dataset.json",))
    assert unit.error_reason == "invalid_msd_descriptor"
    assert unit.error_detail


def test_a_task_patients_csv_groups_follow_ups_under_one_patient_and_is_part_of_every_unit():
    spec = {"labels": {"0": "background", "1": "A"}, "modality": {"0": "MRI"},
            "training": [{"image": "./imagesTr/c1.nii.gz", "label": "./labelsTr/c1.nii.gz"},
                         {"image": "./imagesTr/c2.nii.gz", "label": "./labelsTr/c2.nii.gz"},
                         {"image": "./imagesTr/c3.nii.gz", "label": "./labelsTr/c3.nii.gz"}]}  # fmt: skip
    files = {f"T/{kind}/c{i}.nii.gz" for kind in ("imagesTr", "labelsTr") for i in (1, 2, 3)} | {"T/patients.csv"}
    patients = b"case_id,patient_id\nc1,P-7\nc2,P-7\n"
    units = {u.source_id: u for u in msd_units("T/dataset.json", json.dumps(spec).encode(), files, patients)}
    assert units["T/imagesTr/c1.nii.gz"].patient_hint == units["T/imagesTr/c2.nii.gz"].patient_hint == "P-7"
    assert units["T/imagesTr/c3.nii.gz"].patient_hint == "c3"  # not listed: its own patient
    assert all("T/patients.csv" in u.files for u in units.values())  # a changed mapping re-ingests
    assert not is_ignored("T/patients.csv") and is_ignored("T/notes.csv")


@pytest.mark.parametrize("patients", ["c1,Pétra-7\n".encode("latin-1"), b"\xff\xfe\x00\x01binary\n"], ids=["latin-1", "binary"])
def test_a_patients_csv_that_is_not_utf8_text_holds_back_its_task_and_stops_nothing(patients):
    """It stopped the whole ingest with a bare UnicodeDecodeError (an audit, 2026-12-04). Without
    its patients the split could put one patient's cases on both sides, so the task's cases wait
    for a readable file; the unit is one bad_file, the scan goes on."""
    spec = {"labels": {"0": "background", "1": "A"}, "modality": {"0": "MRI"},
            "training": [{"image": "./imagesTr/c1.nii.gz", "label": "./labelsTr/c1.nii.gz"}]}  # fmt: skip
    files = {"T/imagesTr/c1.nii.gz", "T/labelsTr/c1.nii.gz", "T/patients.csv"}
    (unit,) = msd_units("T/dataset.json", json.dumps(spec).encode(), files, patients)
    assert (unit.kind, unit.files, unit.error_reason) == ("bad_file", ("T/patients.csv",), "invalid_patients_file")
    assert "not UTF-8" in unit.error_detail


def test_the_same_file_name_in_two_folders_is_two_patients():
    """A common export: one folder a patient, the same file names in each. Named by base name
    alone, every folder's scan was one patient, and the whole drop one role of the split."""
    units = pair("P001/scan.nii.gz", "P001/scan_seg.nii.gz", "P002/scan.nii.gz", "P002/scan_seg.nii.gz",
                 "siteA/case1_image.nii.gz", "siteB/case1_image.nii.gz")  # fmt: skip
    hints = {source: unit.patient_hint for source, unit in units.items()}
    assert hints == {"P001/scan.nii.gz": "P001/scan", "P002/scan.nii.gz": "P002/scan",
                     "siteA/case1_image.nii.gz": "siteA/case1", "siteB/case1_image.nii.gz": "siteB/case1"}  # fmt: skip


def _pair_with(patients: dict[str, bytes], *relpaths: str) -> dict[str, object]:
    from mvl_pipeline.ingestion.units import read_patients_or_none

    units = pair_volumes(
        list(relpaths), label_suffixes=CONFIG.label_suffixes, image_suffixes=CONFIG.image_suffixes,
        patients={path: read_patients_or_none(data) for path, data in patients.items()},
    )  # fmt: skip
    return {u.source_id: u for u in units}


def test_the_nearest_patients_csv_groups_loose_follow_ups_and_is_part_of_their_units():
    files = ("P001/2024/scan.nii.gz", "P001/2024/scan_seg.nii.gz", "P001/2025/scan.nii.gz",
             "P001/2025/scan_seg.nii.gz", "P002/2024/scan.nii.gz", "other/x_image.nii.gz",
             "other/x_label.nii.gz", "other/y_image.nii.gz")  # fmt: skip
    patients = {
        "patients.csv": b"case_id,patient_id\nP001/2024/scan,pt-1\nP001/2025/scan,pt-1\n",
        "other/patients.csv": b"x,pt-9\ny_image,pt-9\n",  # nearer for other/: the base or the image's name
    }
    units = _pair_with(patients, *files)
    hint = {s: u.patient_hint for s, u in units.items()}
    assert hint["P001/2024/scan.nii.gz"] == hint["P001/2025/scan.nii.gz"] == "pt-1"
    assert hint["P002/2024/scan.nii.gz"] == "P002/2024/scan"  # not listed: its own patient
    assert hint["other/x_image.nii.gz"] == hint["other/y_image.nii.gz"] == "pt-9"
    assert units["P001/2024/scan.nii.gz"].files == ("P001/2024/scan.nii.gz", "P001/2024/scan_seg.nii.gz", "patients.csv")
    assert units["other/x_image.nii.gz"].files[-1] == "other/patients.csv"


def test_an_unreadable_loose_patients_csv_holds_back_the_images_it_covers_and_nothing_else():
    units = _pair_with({"a/patients.csv": "x,Pétra\n".encode("latin-1")},
                       "a/x_image.nii.gz", "a/x_label.nii.gz", "b/y_image.nii.gz")  # fmt: skip
    assert set(units) == {"a/patients.csv", "b/y_image.nii.gz"}  # the label is waiting, not an orphan
    bad = units["a/patients.csv"]
    assert (bad.kind, bad.files, bad.error_reason) == ("bad_file", ("a/patients.csv",), "invalid_patients_file")
    assert "Pétra" not in bad.error_detail
