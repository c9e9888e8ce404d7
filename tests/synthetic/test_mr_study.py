"""The multi-series MR sample drop: one DICOM series per contrast of the same phantom, in one
study and one Frame of Reference, the contrasts with different intensity relationships, the
later ones on thicker slices; the SEG on the first contrast's series; the CT drop unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from mvl_pipeline.dicom.assemble import assemble_series
from mvl_pipeline.dicom.labels import read_segmentation
from mvl_pipeline.synthetic import phantom
from mvl_pipeline.synthetic.mr_study import contrast_grids, simulate_mr
from mvl_pipeline.synthetic.sample_drop import SampleDataConfig, iter_sample_studies, study_files

MR = {
    "seed": 5, "n_patients": 2, "followup_fraction": 0.0, "image_size": 48, "pixel_spacing_mm": [7.0, 7.5],
    "n_slices": [13, 13], "slice_spacing_mm": 8.0, "thin_slice_studies": 0, "non_axial_studies": 0,
    "max_lesions": 3, "mr_contrasts": ["t1", "t2", "flair"],
}  # fmt: skip


def test_each_contrast_is_its_own_series_of_one_study_and_frame_of_reference():
    study = next(iter_sample_studies(SampleDataConfig.from_params(MR)))
    files = study_files(study)
    by_series: dict[str, list] = {}
    for ds in files.values():
        by_series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    images = {uid: slices for uid, slices in by_series.items() if slices[0].Modality == "MR"}
    assert len(images) == 3 and len(by_series) == 4  # three contrasts + the SEG
    assert {s[0].SeriesDescription for s in images.values()} == {"T1 AXIAL", "T2 AXIAL", "FLAIR AXIAL"}
    assert len({s[0].StudyInstanceUID for s in by_series.values()}) == 1
    assert len({s[0].FrameOfReferenceUID for s in by_series.values()}) == 1
    assert len({s[0].SeriesNumber for s in images.values()}) == 3
    slices = {s[0].SeriesDescription: len(s) for s in images.values()}
    assert slices == {"T1 AXIAL": 13, "T2 AXIAL": 9, "FLAIR AXIAL": 9}  # thicker slices, same extent
    t1 = assemble_series(images[study.uids.series])
    np.testing.assert_allclose(t1.array, np.round(study.image.array), atol=0.5)
    [seg] = by_series[study.seg_uids[0]]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study.uids.series
    labels, _ = read_segmentation(seg, t1)
    np.testing.assert_array_equal(labels.array, study.label.array)


def test_the_contrasts_relate_tissues_differently():
    rng = np.random.default_rng(3)
    anatomy = phantom.sample_anatomy(rng, max_lesions=3)
    while not anatomy.lesions:
        anatomy = phantom.sample_anatomy(rng, max_lesions=3)
    affine = phantom.acquisition_affine(shape=(64, 64, 24), spacing=(6.0, 6.0, 6.0), orientation="axial",
                                        centre=anatomy.lesions[0].centre)  # fmt: skip
    means = {}
    for contrast in ("t1", "t2"):
        image, label = simulate_mr(anatomy, affine, (64, 64, 24), np.random.default_rng(0), contrast)
        assert image.meta["modality"] == "MR" and image.array.min() >= 0
        means[contrast] = {value: float(image.array[label.array == value].mean()) for value in (1, 2)}
    assert means["t1"][2] < means["t1"][1]  # T1: the lesion darker than the organ
    assert means["t2"][2] > means["t2"][1]  # T2: brighter


def test_contrast_grids_keep_the_extent_and_a_ratio_of_one_keeps_the_grid():
    grids = contrast_grids((40, 40, 17), (5.0, 5.0, 4.0), 2, 2.0)
    assert grids[1] == ((40, 40, 9), (5.0, 5.0, 8.0))
    assert contrast_grids((40, 40, 17), (5.0, 5.0, 4.0), 2, 1.0)[1] == grids[0]


def test_unknown_contrasts_and_thinner_later_slices_are_rejected():
    with pytest.raises(ValueError, match="MR contrasts must be distinct names among"):
        SampleDataConfig.from_params({"mr_contrasts": ["t1", "dwi"]})
    with pytest.raises(ValueError, match="contrast_slice_ratio must be >= 1"):
        SampleDataConfig.from_params({"mr_contrasts": ["t1", "t2"], "contrast_slice_ratio": 0.5})


def test_the_ct_drop_has_no_contrasts():
    study = next(iter_sample_studies(SampleDataConfig.from_params(MR | {"mr_contrasts": []})))
    assert study.contrasts == () and study.image.meta["modality"] == "CT"
    assert {ds.Modality for ds in study_files(study).values()} == {"CT", "SEG"}
