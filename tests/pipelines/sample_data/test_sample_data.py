"""The sample hospital drop: DICOM that reassembles to the phantom, SEG aligned, reproducible."""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from mvl_pipeline.datasets.drop import DropFolderDataset
from mvl_pipeline.dicom.assemble import assemble_series
from mvl_pipeline.dicom.labels import read_segmentation
from mvl_pipeline.dicom.write import dataset_bytes
from mvl_pipeline.pipelines.sample_data import create_pipeline
from mvl_pipeline.pipelines.sample_data.nodes import generate_sample_drop
from mvl_pipeline.synthetic.fake_headers import PRIVATE_CREATOR, PRIVATE_GROUP
from mvl_pipeline.synthetic.sample_drop import (
    SampleDataConfig,
    iter_sample_studies,
    study_files,
)

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"

SMALL = {
    "seed": 7,
    "n_patients": 3,
    "followup_fraction": 0.34,  # -> 1 follow-up, 4 studies
    "image_size": 64,
    "pixel_spacing_mm": [6.0, 6.2],
    "n_slices": [16, 20],
    "slice_spacing_mm": 10.0,
    "thin_slice_spacings_mm": [7.5],
    "thin_slice_studies": 1,
    "non_axial_studies": 1,
    "non_axial_orientation": "coronal",
    "noise_sigma_hu": [10.0, 20.0],
    "max_lesions": 3,
}


@pytest.fixture(scope="module")
def small_drop():
    """(studies, files) of the small sample drop, generated once for this module."""
    studies = list(iter_sample_studies(SampleDataConfig.from_params(SMALL)))
    files = {}
    for study in studies:
        files.update(study_files(study))
    return studies, files


def _series_files(files: dict, study, series_uid: str) -> list:
    prefix = f"{study.patient_folder}/{study.uids.study}/{series_uid}/"
    return [ds for path, ds in files.items() if path.startswith(prefix)]


def test_plan_has_followups_thin_slices_and_a_non_axial_study(small_drop):
    studies, files = small_drop
    plans = [study.plan for study in studies]
    assert len(plans) == 4 and len({plan.patient for plan in plans}) == 3
    assert sorted(plan.visit for plan in plans) == [0, 0, 0, 1]
    assert [plan.orientation for plan in plans].count("coronal") == 1
    assert sorted(plan.spacing[2] for plan in plans) == [7.5, 10.0, 10.0, 10.0]
    # the follow-up is the same patient (one patient folder, two studies) under one identity
    followup = next(s for s in studies if s.plan.visit == 1)
    baseline = next(s for s in studies if s.plan.patient == followup.plan.patient and s.plan.visit == 0)
    assert followup.patient_folder == baseline.patient_folder
    assert followup.uids.study != baseline.uids.study
    assert followup.header["PatientID"] == baseline.header["PatientID"]
    assert followup.header["StudyDate"] > baseline.header["StudyDate"]  # months later
    n_slices = sum(study.plan.shape[2] for study in studies)
    assert len(files) == n_slices + len(studies)  # one file per slice + one SEG per study


def test_every_file_is_dicom_in_a_uid_named_pacs_layout(small_drop, tmp_path):
    studies, files = small_drop
    DropFolderDataset(filepath=str(tmp_path)).save(files)
    drop = DropFolderDataset(filepath=str(tmp_path)).load()
    assert sorted(f.relpath for f in drop.files) == sorted(files)
    for item in drop.files:
        with drop.open(item.relpath) as handle:
            ds = pydicom.dcmread(handle)
        patient_folder, study_uid, series_uid, filename = item.relpath.split("/")
        assert (study_uid, series_uid, filename) == (
            ds.StudyInstanceUID, ds.SeriesInstanceUID, f"{ds.SOPInstanceUID}.dcm"
        )
        assert patient_folder.startswith("2.25.")
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian


def test_headers_carry_fake_phi_for_deidentification_to_remove(small_drop):
    studies, files = small_drop
    for study in studies:
        ct = _series_files(files, study, study.uids.series)[0]
        for keyword in (
            "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
            "InstitutionName", "ReferringPhysicianName", "StudyDate", "StudyTime",
        ):
            assert str(ct.get(keyword, "")).strip(), keyword
        block = ct.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        assert str(ct.PatientName) in block[0x10].value and ct.PatientID in block[0x10].value
        # a StudyID no PID (<= 7 digits) or port can equal: the PHI scans' needle finds only a leak
        assert len(ct.StudyID) == 8 and int(ct.StudyID) > 4194304, ct.StudyID
        seg = _series_files(files, study, study.seg_uids[0])[0]
        assert seg.PatientID == ct.PatientID and str(seg.PatientName) == str(ct.PatientName)


def test_no_phi_in_any_path(small_drop):
    studies, files = small_drop
    identifiers = set()
    for study in studies:
        header = study.header
        name = str(header["PatientName"])
        identifiers |= {header["PatientID"], header["AccessionNumber"], name, *name.split("^")}
        identifiers |= {header["PatientBirthDate"], header["InstitutionName"]}
    identifiers = {i.lower() for i in identifiers if len(i) >= 3}
    for path in files:
        assert all(identifier not in path.lower() for identifier in identifiers), path
        assert all(part.replace(".dcm", "").replace(".", "").isdigit() for part in path.split("/"))


def test_series_reassemble_to_the_generated_volumes(small_drop):
    studies, files = small_drop
    for study in studies:
        volume = assemble_series(_series_files(files, study, study.uids.series))
        assert volume.shape == study.image.shape
        assert np.allclose(volume.affine, study.image.affine, atol=1e-3), study.plan.orientation
        assert np.max(np.abs(volume.array - study.image.array)) <= 0.5 + 1e-4
    coronal = next(s for s in studies if s.plan.orientation == "coronal")
    assert coronal.image.orientation == "LIP"  # rows to the left, columns down, slices back


def test_seg_masks_align_with_their_series(small_drop):
    studies, files = small_drop
    lesions_seen = 0
    for study in studies:
        image = assemble_series(_series_files(files, study, study.uids.series))
        (seg,) = _series_files(files, study, study.seg_uids[0])
        assert seg.SOPClassUID == SEG_SOP_CLASS and seg.Modality == "SEG"
        label, names = read_segmentation(seg, image)
        assert label.same_grid(study.label)
        assert np.array_equal(np.asarray(label.array), study.label.array)
        assert np.count_nonzero(label.array == 1) > 100
        lesions_seen += int(np.count_nonzero(label.array == 2))
        assert {int(k): v for k, v in dict(names).items()} == {1: "Liver", 2: "Lesion"}
        referenced = {
            item.ReferencedSOPInstanceUID
            for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
        }
        assert referenced == set(study.uids.sop_instances)
    assert lesions_seen > 0


def test_oblique_acquisition_reassembles_exactly():
    params = {**SMALL, "n_patients": 1, "followup_fraction": 0.0, "thin_slice_studies": 0,
              "non_axial_orientation": "oblique", "oblique_tilt_deg": [18.0, -7.0]}
    (study,) = iter_sample_studies(SampleDataConfig.from_params(params))
    files = study_files(study)
    volume = assemble_series(_series_files(files, study, study.uids.series))
    assert np.allclose(volume.affine, study.image.affine, atol=1e-3)
    assert np.max(np.abs(volume.array - study.image.array)) <= 0.5 + 1e-4
    assert not np.allclose(np.abs(volume.direction), np.eye(3), atol=0.05)
    (seg,) = _series_files(files, study, study.seg_uids[0])
    label, _ = read_segmentation(seg, volume)
    assert np.array_equal(np.asarray(label.array), study.label.array)


def test_same_seed_same_bytes_other_seed_other_data(small_drop):
    _, files = small_drop
    again = generate_sample_drop(copy.deepcopy(SMALL))
    assert sorted(again) == sorted(files)
    assert all(dataset_bytes(again[path]) == dataset_bytes(files[path]) for path in files)
    other = generate_sample_drop({**SMALL, "seed": 8})
    assert not set(other) & set(files)
    pixels = {ds.PixelData for ds in files.values() if "PixelData" in ds and ds.Modality == "CT"}
    assert not any(
        ds.PixelData in pixels for ds in other.values() if ds.Modality == "CT"
    )


def test_parameters_are_validated():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['n_patiens'\] in sample_data; known keys"):
        SampleDataConfig.from_params({**SMALL, "n_patiens": 3})
    with pytest.raises(ValueError, match="non_axial_orientation"):
        SampleDataConfig.from_params({**SMALL, "non_axial_orientation": "diagonal"})


def test_pipeline_writes_the_drop_through_the_catalog(tmp_path):
    params = {**SMALL, "n_patients": 1, "followup_fraction": 0.0, "n_slices": [8, 8],
              "image_size": 32, "pixel_spacing_mm": [12.0, 12.0], "thin_slice_studies": 0}
    catalog = DataCatalog(
        datasets={
            "params:sample_data": MemoryDataset(params),
            "sample_drop": DropFolderDataset(filepath=str(tmp_path / "sample_drop")),
        }
    )
    SequentialRunner().run(create_pipeline(), catalog)
    drop = catalog.load("sample_drop")
    assert len(drop.files) == 8 + 1
    sop_classes = set()
    for item in drop.files:
        with drop.open(item.relpath) as handle:
            sop_classes.add(pydicom.dcmread(handle, stop_before_pixels=True).SOPClassUID)
    assert sop_classes == {pydicom.uid.CTImageStorage, SEG_SOP_CLASS}
