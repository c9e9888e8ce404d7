"""The analytic CT phantom: determinism, anatomy, and exact geometry across acquisitions."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from mvl_pipeline.synthetic import phantom


def _anatomy(seed: int, **kwargs) -> phantom.Anatomy:
    return phantom.sample_anatomy(np.random.default_rng(seed), **kwargs)


def _axial(anatomy: phantom.Anatomy, shape=(64, 64, 24), spacing=(6.0, 6.0, 8.0)) -> np.ndarray:
    return phantom.acquisition_affine(
        shape=shape, spacing=spacing, orientation="axial", centre=anatomy.scan_centre
    )


def test_same_generator_state_gives_identical_volumes_and_other_seeds_differ():
    shape = (48, 48, 16)
    runs = []
    for seed in (3, 3, 4):
        rng = np.random.default_rng(seed)
        anatomy = phantom.sample_anatomy(rng)
        runs.append(phantom.simulate_ct(anatomy, _axial(anatomy, shape), shape, rng))
    (img_a, lab_a), (img_b, lab_b), (img_c, _) = runs
    assert np.array_equal(img_a.array, img_b.array) and np.array_equal(lab_a.array, lab_b.array)
    assert not np.array_equal(img_a.array, img_c.array)


@pytest.mark.parametrize("seed", [0, 1, 2, 5])
def test_phantom_has_the_promised_anatomy(seed: int):
    anatomy = _anatomy(seed)
    shape = (64, 64, 32)
    affine = _axial(anatomy, shape, (6.0, 6.0, 6.0))
    clean, label = phantom.render(anatomy, affine, shape)
    assert clean.dtype == np.float32 and label.dtype == np.uint8
    assert set(np.unique(label)) <= {0, 1, 2}
    # air around the body, fat and soft tissue inside, bright bone, a ~100 HU organ
    assert clean[0, 0, 0] == phantom.AIR_HU and clean[-1, -1, -1] == phantom.AIR_HU
    assert np.any(clean == phantom.FAT_HU)
    assert np.count_nonzero(clean == phantom.BONE_HU) > 50
    organ = label == phantom.LABEL_ORGAN
    organ_ml = np.count_nonzero(label > 0) * 6.0**3 / 1000.0
    assert 300.0 < organ_ml < 2500.0, organ_ml
    assert 80.0 < float(np.mean(clean[organ])) < 120.0
    tissue = (label == 0) & (clean > 0) & (clean < 80)
    assert abs(float(np.mean(clean[tissue])) - phantom.SOFT_TISSUE_HU) < 10.0
    # the organ is on the patient's right (RAS +x)
    ijk = np.argwhere(organ).mean(axis=0)
    assert (affine[:3, :3] @ ijk + affine[:3, 3])[0] > anatomy.body_centre[0] + 20.0
    assert 0 <= len(anatomy.lesions) <= 3
    for lesion in anatomy.lesions:
        assert 4.0 * 0.85 <= min(lesion.radii) and max(lesion.radii) <= 15.0 * 1.15
        assert 25.0 <= abs(lesion.contrast_hu) <= 60.0


def test_lesions_lie_in_the_organ_with_their_contrast():
    # find a patient with lesions, render finely enough to see them
    anatomy = next(a for a in (_anatomy(s, max_lesions=3) for s in range(50)) if len(a.lesions) >= 2)
    lesion = anatomy.lesions[0]
    points = np.asarray(lesion.centre)[None, :]
    hu, label = phantom.render_points(anatomy, points)
    assert label[0] == phantom.LABEL_LESION
    organ_only = replace(anatomy, lesions=())
    hu_without, label_without = phantom.render_points(organ_only, points)
    assert label_without[0] == phantom.LABEL_ORGAN
    assert hu[0] - hu_without[0] == pytest.approx(lesion.contrast_hu)


def test_axial_coronal_and_oblique_grids_sample_the_same_anatomy_exactly():
    anatomy = _anatomy(11)
    n, s = 41, 5.0  # odd size: all three grids share their centre voxel
    axial = phantom.acquisition_affine(
        shape=(n, n, n), spacing=(s, s, s), orientation="axial", centre=anatomy.scan_centre
    )
    coronal = phantom.acquisition_affine(
        shape=(n, n, n), spacing=(s, s, s), orientation="coronal", centre=anatomy.scan_centre
    )
    ax_hu, ax_label = phantom.render(anatomy, axial, (n, n, n))
    co_hu, co_label = phantom.render(anatomy, coronal, (n, n, n))
    # coronal voxel centres are axial voxel centres (same lattice): map them and compare
    ijk = np.argwhere(np.ones((n, n, n), dtype=bool))
    world = ijk @ coronal[:3, :3].T + coronal[:3, 3]
    ax_ijk = np.rint((world - axial[:3, 3]) @ np.linalg.inv(axial[:3, :3]).T).astype(int)
    assert np.all((ax_ijk >= 0) & (ax_ijk < n))
    mapped_label = ax_label[tuple(ax_ijk.T)].reshape(n, n, n)
    mapped_hu = ax_hu[tuple(ax_ijk.T)].reshape(n, n, n)
    assert np.array_equal(mapped_label, co_label)
    assert np.array_equal(mapped_hu, co_hu)
    assert np.count_nonzero(co_label == phantom.LABEL_ORGAN) > 100
    # an oblique grid: its labels agree with the analytic model at its own voxel centres
    oblique = phantom.acquisition_affine(
        shape=(n, n, 9), spacing=(s, s, s), orientation="oblique",
        centre=anatomy.scan_centre, tilt_deg=(20.0, 10.0),
    )
    ob_hu, ob_label = phantom.render(anatomy, oblique, (n, n, 9))
    ijk = np.argwhere(np.ones((n, n, 9), dtype=bool))
    ref_hu, ref_label = phantom.render_points(anatomy, ijk @ oblique[:3, :3].T + oblique[:3, 3])
    assert np.array_equal(ob_label.reshape(-1), ref_label)
    assert np.allclose(ob_hu.reshape(-1), ref_hu, atol=1e-3)


@pytest.mark.parametrize("orientation", ["axial", "coronal", "sagittal", "oblique"])
def test_acquisition_affine_is_a_dicom_like_right_handed_grid(orientation: str):
    affine = phantom.acquisition_affine(
        shape=(10, 12, 7), spacing=(2.0, 3.0, 5.0), orientation=orientation,
        centre=(1.0, 2.0, 3.0), tilt_deg=(15.0, 8.0),
    )
    directions = affine[:3, :3] / np.array([2.0, 3.0, 5.0])
    assert np.allclose(directions.T @ directions, np.eye(3), atol=1e-12)
    assert np.allclose(np.cross(directions[:, 0], directions[:, 1]), directions[:, 2])
    centre = affine[:3, :3] @ ((np.array([10, 12, 7]) - 1) / 2) + affine[:3, 3]
    assert np.allclose(centre, (1.0, 2.0, 3.0))
    if orientation == "axial":  # DICOM IOP [1,0,0,0,1,0]: rows to patient left, columns posterior
        assert np.allclose(directions, np.diag([-1.0, -1.0, 1.0]))
    if orientation == "oblique":
        assert not np.allclose(np.abs(directions), np.eye(3), atol=0.05)


def test_simulated_ct_noise_and_clip():
    rng = np.random.default_rng(7)
    anatomy = phantom.sample_anatomy(rng, noise_sigma_hu=(15.0, 15.0))
    shape = (48, 48, 12)
    image, label = phantom.simulate_ct(anatomy, _axial(anatomy, shape), shape, rng)
    clean, clean_label = phantom.render(anatomy, image.affine, shape)
    assert np.array_equal(label.array, clean_label) and image.same_grid(label)
    residual = (image.array - clean)[clean > -900]
    assert 13.0 < float(np.std(residual)) < 17.0
    assert image.array.min() >= phantom.CT_RANGE_HU[0] and image.array.dtype == np.float32
    assert image.meta["modality"] == "CT" and label.meta["label_names"]["1"] == "Liver"


def test_follow_up_keeps_the_patient_and_changes_the_lesions():
    anatomy = next(a for a in (_anatomy(s) for s in range(50)) if a.lesions)
    later = phantom.follow_up(anatomy, np.random.default_rng(0))
    assert later.organ_centre == anatomy.organ_centre and later.body_semi_axes == anatomy.body_semi_axes
    assert [lesion.centre for lesion in later.lesions] == [lesion.centre for lesion in anatomy.lesions]
    assert [lesion.radii for lesion in later.lesions] != [lesion.radii for lesion in anatomy.lesions]
