"""Multi-series DICOM studies as multi-channel cases (``ingest.channels``), through the real
ingest pipeline: the generated MR drop (T1 + T2 of one phantom, the T2 with thicker slices),
good studies beside broken ones. Each broken study is quarantined with its own reason (missing,
ambiguous, another Frame of Reference, no overlap), the good ones are ingested, and no detail
carries identity."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ingest_support import KEY, ingest_params, run_ingest, write_drop

from mvl_pipeline.core import pseudonyms
from mvl_pipeline.datasets.drop import encode_file
from mvl_pipeline.synthetic.sample_drop import SampleDataConfig, iter_sample_studies, study_files

CHANNELS = {"t1": {"SeriesDescription": "(?i)^t1 "}, "t2": {"SeriesDescription": "(?i)^t2 ", "Modality": "^MR$"}}
MR_PARAMS = {
    "seed": 77, "n_patients": 7, "followup_fraction": 0.0, "image_size": 40, "pixel_spacing_mm": [7.0, 7.5],
    "n_slices": [12, 12], "slice_spacing_mm": 8.0, "thin_slice_studies": 0, "non_axial_studies": 1,
    "non_axial_orientation": "coronal", "max_lesions": 1, "mr_contrasts": ["t1", "t2"],
}  # fmt: skip
GOOD = (0, 1, 2)
MISSING, AMBIGUOUS, OTHER_FRAME, FAR_AWAY = 3, 4, 5, 6


def _edit(files: dict, series_uid: str, **changes) -> None:
    for ds in files.values():
        if ds.SeriesInstanceUID == series_uid:
            for keyword, value in changes.items():
                if keyword == "shift_z":
                    position = [float(v) for v in ds.ImagePositionPatient]
                    ds.ImagePositionPatient = [f"{v:.4f}" for v in (position[0], position[1], position[2] + value)]
                else:
                    setattr(ds, keyword, value)


@pytest.fixture(scope="module")
def channel_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ingest-channels")
    studies = list(iter_sample_studies(SampleDataConfig.from_params(MR_PARAMS)))
    files: dict[str, bytes] = {}
    for index, study in enumerate(studies):
        datasets = study_files(study)
        t2 = study.contrasts[0][2].series
        if index == MISSING:  # the T2 series never arrived
            datasets = {p: ds for p, ds in datasets.items() if ds.SeriesInstanceUID != t2}
        elif index == AMBIGUOUS:  # a repeated T1 instead of a T2
            _edit(datasets, t2, SeriesDescription="T1 AXIAL REPEAT")
        elif index == OTHER_FRAME:  # registered to another frame: coordinates not comparable
            _edit(datasets, t2, FrameOfReferenceUID="2.25.4242")
        elif index == FAR_AWAY:  # the T2 slab is half a metre away
            _edit(datasets, t2, shift_z=500.0)
        files.update({path: encode_file(ds) for path, ds in datasets.items()})
    drop = write_drop(tmp / "drop", files)
    run = run_ingest(drop, tmp / "data", ingest_params(channels=CHANNELS))
    return {"run": run, "studies": studies}


def case_id(study) -> str:
    return pseudonyms.case_pseudonym(KEY, study.uids.study, "channels")


def unit(run, study) -> dict:
    return run.unit_of(f"{study.patient_folder}/{study.uids.study}/{study.uids.series}/{study.uids.sop_instances[0]}.dcm")


def test_good_studies_become_one_case_with_both_contrasts_on_the_t1_grid(channel_run):
    run, studies = channel_run["run"], channel_run["studies"]
    assert run.case_ids() == sorted(case_id(studies[i]) for i in GOOD)
    for index in GOOD:
        study = studies[index]
        case = run.case(case_id(study))
        t1, (_, t2, _) = study.image, study.contrasts[0]
        assert case.image.array.shape == (2, *t1.shape) and case.modality == "MR"
        np.testing.assert_allclose(case.image.affine, t1.affine, atol=1e-3)
        np.testing.assert_allclose(case.image.array[0], np.round(t1.array), atol=0.5)
        # the T2 slab spans the same extent with thicker slices: its first and last slices lie
        # exactly on the T1 grid's, in between it is interpolated
        for k_t1, k_t2 in ((0, 0), (-1, -1)):
            np.testing.assert_allclose(case.image.array[1][:, :, k_t1], np.round(t2.array[:, :, k_t2]), atol=0.5)
        assert not np.allclose(case.image.array[0], case.image.array[1])
        np.testing.assert_array_equal(case.label.array, study.label.array)
        assert [(c["name"], c["modality"], c["coverage"]) for c in case.meta["channels"]] == [
            ("t1", "MR", 1.0), ("t2", "MR", 1.0)]  # fmt: skip
        assert case.meta["channel_min_overlap"] == 0.5 and case.meta["label_names"] == {"1": "organ", "2": "lesion"}
        assert unit(run, study)["status"] == "ingested"


@pytest.mark.parametrize(
    ("index", "reason", "detail"),
    [(MISSING, "missing_channel", "channel 't2' is missing: none of the 1 image series matches its rule"),
     (AMBIGUOUS, "ambiguous_channel", "channel 't1': 2 image series match its rule"),
     (OTHER_FRAME, "channel_frame_mismatch", "channel 't2' lies in another Frame of Reference than channel 't1'"),
     (FAR_AWAY, "channels_do_not_overlap", "channel 't2' covers 0% of the reference channel's grid")],
    ids=["missing", "ambiguous", "other-frame", "no-overlap"],
)  # fmt: skip
def test_each_broken_study_is_quarantined_with_its_own_reason(channel_run, index, reason, detail):
    run, studies = channel_run["run"], channel_run["studies"]
    entry = unit(run, studies[index])
    assert entry["status"] == "quarantined"
    [record] = entry["quarantined"]
    assert record["reason"] == reason and record["detail"].startswith(detail)
    assert record["case_id"] == case_id(studies[index]) and case_id(studies[index]) not in run.case_ids()


def test_the_report_counts_each_reason_once_and_carries_no_identity(channel_run):
    run, studies = channel_run["run"], channel_run["studies"]
    counts = run.summary_counts()
    for reason in ("missing_channel", "ambiguous_channel", "channel_frame_mismatch", "channels_do_not_overlap"):
        assert counts[("quarantined", reason)] == 1
    assert sum(c for (status, _), c in counts.items() if status == "ingested") == len(GOOD)
    report = json.dumps(run.quarantine) + json.dumps(run.manifest) + run.summary_path.read_text()
    for study in studies:
        for keyword in ("PatientName", "PatientID", "InstitutionName", "StudyDate", "AccessionNumber"):
            value = str(study.header[keyword])
            assert value not in report, keyword
        assert study.uids.study not in report and study.uids.series not in report


def test_without_channels_every_series_of_the_mr_study_stays_its_own_case(tmp_path):
    [study] = list(iter_sample_studies(SampleDataConfig.from_params(MR_PARAMS | {"n_patients": 1})))
    drop = write_drop(tmp_path / "drop", {p: encode_file(ds) for p, ds in study_files(study).items()})
    run = run_ingest(drop, tmp_path / "data", ingest_params(keep_unlabelled=True))
    t2 = study.contrasts[0][2].series
    assert run.case_ids() == sorted(pseudonyms.case_pseudonym(KEY, study.uids.study, uid) for uid in (study.uids.series, t2))
    for case_id_ in run.case_ids():
        assert run.case(case_id_).image.array.ndim == 3 and "channels" not in run.case(case_id_).meta
