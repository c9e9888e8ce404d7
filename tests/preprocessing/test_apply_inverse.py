"""preprocess_case + restore_to_original: the inverse maps model-space labels back exactly
(integer-factor grids, any orientation) and with high overlap otherwise."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mvl_pipeline.core.volume import Volume
from mvl_pipeline.datasets.volume import VolumeDataset
from mvl_pipeline.preprocessing.apply import preprocess_case, restore_to_original
from mvl_pipeline.synthetic.phantom import acquisition_affine

CENTRE = (10.0, -20.0, 35.0)


def _plan(target_spacing, *, image="linear", label="nearest", margin=6.0) -> dict:
    return {
        "plan_id": "test-plan",
        "orientation": "RAS",
        "target_spacing": list(target_spacing),
        "interpolation": {"image": image, "label": label},
        "normalization": {
            "CT": {"scheme": "ct", "clip": [-200.0, 300.0], "mean": 60.0, "std": 80.0}
        },
        "default_normalization": {"scheme": "zscore_body"},
        "body_mask": {
            "ct_threshold_hu": -500.0,
            "relative_threshold": 0.05,
            "min_voxels_per_slice": 1,
        },
        "crop_margin_mm": margin,
    }


def _scan(affine: np.ndarray, shape) -> tuple[Volume, Volume]:
    """CT-like body (an ellipsoid of soft tissue in air) with two labelled ellipsoids, sampled
    at the voxel centres of any grid: world-space geometry, so every orientation sees one anatomy."""
    index = np.indices(shape, dtype=np.float64).reshape(3, -1)
    world = (affine[:3, :3] @ index).T + affine[:3, 3] - np.asarray(CENTRE)  # (N, 3) mm

    def inside(centre, radii):
        return (((world - np.asarray(centre)) / np.asarray(radii)) ** 2).sum(axis=1) <= 1.0

    body = inside((0, 0, 0), (70, 55, 60))
    organ = inside((15, 5, 0), (30, 22, 28))
    lesion = inside((22, 8, 6), (9, 8, 10))
    image = (
        np.where(body, 40.0, -1000.0) + np.where(organ, 60.0, 0.0) + np.where(lesion, -30.0, 0.0)
    )
    label = np.zeros(len(world), np.uint8)
    label[organ] = 1
    label[lesion & organ] = 2
    image = image.reshape(shape).astype(np.float32)
    return (
        Volume(image, affine, {"modality": "CT"}),
        Volume(label.reshape(shape), affine.copy(), {}),
    )


def _custom_affine(spacing) -> np.ndarray:
    """i -> superior, j -> left, k -> posterior: a permuted, flipped grid ('SLP')."""
    direction = np.array([[0, -1, 0], [0, 0, -1], [1, 0, 0]], dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(spacing)[None, :]
    affine[:3, 3] = np.asarray(CENTRE) - affine[:3, :3] @ (np.array([40, 52, 30]) / 2)
    return affine


def _dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    return 2 * np.sum((a == value) & (b == value)) / (np.sum(a == value) + np.sum(b == value))


GRIDS = {
    # name: (affine, shape, target spacing giving integer upsampling factors in RAS order)
    "axial": (acquisition_affine(shape=(56, 48, 30), spacing=(3.0, 3.0, 5.0), orientation="axial", centre=CENTRE), (56, 48, 30), (1.5, 1.5, 2.5)),
    "coronal": (acquisition_affine(shape=(56, 40, 48), spacing=(3.0, 3.0, 5.0), orientation="coronal", centre=CENTRE), (56, 40, 48), (1.5, 2.5, 1.0)),
    "sagittal": (acquisition_affine(shape=(44, 44, 30), spacing=(3.0, 3.0, 5.0), orientation="sagittal", centre=CENTRE), (44, 44, 30), (2.5, 1.5, 1.5)),
    "permuted_flipped": (_custom_affine((3.0, 4.0, 2.0)), (40, 52, 30), (2.0, 1.0, 1.5)),
    "oblique": (acquisition_affine(shape=(56, 48, 30), spacing=(3.0, 3.0, 5.0), orientation="oblique", centre=CENTRE, tilt_deg=(14.0, -9.0)), (56, 48, 30), (1.0, 1.5, 2.5)),
}  # fmt: skip


@pytest.mark.parametrize("label_mode", ["nearest", "onehot_linear"])
@pytest.mark.parametrize("grid", list(GRIDS))
def test_label_round_trip_is_exact_for_integer_factor_grids(grid, label_mode):
    affine, shape, target = GRIDS[grid]
    image, label = _scan(affine, shape)
    assert image.orientation != "RAS"  # every grid here needs reorienting
    out_image, out_label, record = preprocess_case(
        image, _plan(target, label=label_mode), label=label
    )
    assert out_image.dtype == np.float32 and out_label.dtype == np.uint8
    assert out_image.shape == out_label.shape == tuple(record["model_shape"])
    assert set(np.unique(out_label)) == {0, 1, 2}
    json.dumps(record)  # the record travels in case.json
    restored = restore_to_original(out_label, record, is_label=True)
    assert restored.shape == label.shape
    assert np.array_equal(restored, label.array)


@pytest.mark.parametrize("grid", list(GRIDS))
def test_label_round_trip_on_other_grids_keeps_high_overlap(grid):
    affine, shape, _ = GRIDS[grid]
    image, label = _scan(affine, shape)
    _, out_label, record = preprocess_case(image, _plan((2.2, 2.7, 3.3)), label=label)
    restored = restore_to_original(out_label, record, is_label=True)
    assert _dice(restored, label.array, 1) > 0.93
    assert _dice(restored, label.array, 2) > 0.8  # the lesion is only a few voxels across


def test_model_grid_affine_places_every_label_voxel_where_the_original_had_it():
    affine, shape, target = GRIDS["coronal"]
    image, label = _scan(affine, shape)
    _, out_label, record = preprocess_case(image, _plan(target), label=label)
    model_affine = np.asarray(record["model_affine"])
    assert np.allclose(np.linalg.norm(model_affine[:3, :3], axis=0), target)
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(400):
        index = np.array([rng.integers(0, n) for n in out_label.shape] + [1])
        original = np.linalg.solve(affine, model_affine @ index)[:3]
        nearest = np.clip(np.floor(original + 0.5).astype(int), 0, np.array(shape) - 1)
        if np.allclose(original, nearest, atol=1e-6):  # the model voxel sits on an original centre
            assert out_label[tuple(index[:3])] == label.array[tuple(nearest)]
            checked += 1
    assert checked > 20


def test_probabilities_restore_per_channel_and_outside_the_box_is_background():
    affine, shape, target = GRIDS["permuted_flipped"]
    image, label = _scan(affine, shape)
    _, out_label, record = preprocess_case(image, _plan(target, margin=3.0), label=label)
    box_shape = [hi - lo for lo, hi in record["crop_box"]]
    assert box_shape != list(record["reoriented_shape"])  # the body box really cropped
    probabilities = np.stack(
        [(out_label == c).astype(np.float32) for c in range(3)]
    )  # (C, X, Y, Z)
    restored = restore_to_original(probabilities, record, is_label=False)
    assert restored.shape == (3, *shape) and restored.dtype == np.float32
    assert np.array_equal(restored.argmax(axis=0), label.array)
    # voxels outside the crop box come back as certain background
    outside = np.ones(record["reoriented_shape"], bool)
    outside[tuple(slice(lo, hi) for lo, hi in record["crop_box"])] = False
    from mvl_pipeline.core.orientation import AxisTransform

    outside = AxisTransform.from_list(record["axis_transform"]).inverse().apply(outside)
    assert outside.any()
    assert np.all(restored[0][outside] == 1.0) and np.all(restored[1:, outside] == 0.0)


def test_inference_without_label_takes_the_same_code_path():
    affine, shape, target = GRIDS["oblique"]
    image, label = _scan(affine, shape)
    with_label = preprocess_case(image, _plan(target), label=label)
    without = preprocess_case(image, _plan(target))
    assert without.label is None
    assert np.array_equal(with_label.image, without.image)  # labels lie inside the body
    assert with_label.record == without.record


def test_inputs_are_not_modified_and_may_be_read_only():
    affine, shape, target = GRIDS["axial"]
    image, label = _scan(affine, shape)
    for spacing in (target, (3.0, 3.0, 5.0)):  # resampled, and already on the target grid
        frozen_image, frozen_label = image.array.copy(), label.array.copy()
        frozen_image.setflags(write=False)
        frozen_label.setflags(write=False)
        before = frozen_image.copy()
        preprocess_case(
            image.with_array(frozen_image), _plan(spacing), label=label.with_array(frozen_label)
        )
        assert np.array_equal(frozen_image, before)


def test_restore_rejects_arrays_that_are_not_on_the_model_grid():
    affine, shape, target = GRIDS["axial"]
    image, label = _scan(affine, shape)
    _, out_label, record = preprocess_case(image, _plan(target), label=label)
    with pytest.raises(ValueError, match="model grid"):
        restore_to_original(out_label[:-1], record, is_label=True)
    with pytest.raises(ValueError, match="argmax"):
        restore_to_original(np.stack([out_label, out_label]), record, is_label=True)


def test_real_lung_ct_round_trip(shared_data):
    folder = shared_data / "pyradiomics"
    image = VolumeDataset(filepath=str(folder / "lung1_image.nrrd")).load()
    label = VolumeDataset(filepath=str(folder / "lung1_label.nrrd")).load()
    plan = _plan((1.0, 1.0, 2.5), margin=10.0)
    plan["body_mask"]["min_voxels_per_slice"] = 10
    out_image, out_label, record = preprocess_case(image, plan, label=label, modality="CT")
    assert record["axis_transform"] != [[0, 1], [1, 1], [2, 1]]  # LPS: flipped to RAS
    assert np.isfinite(out_image).all() and set(np.unique(out_label)) == {0, 1}
    restored = restore_to_original(out_label, record, is_label=True)
    assert restored.shape == image.shape
    assert _dice(restored, label.array.astype(np.uint8), 1) > 0.85
    # the image maps back too (linear both ways, so smoothed): compare inside the crop box
    restored_hu = restore_to_original(out_image, record, is_label=False) * 80.0 + 60.0
    inside = restore_to_original(np.ones(out_label.shape, np.uint8), record, is_label=True) == 1
    assert 0.2 < inside.mean() < 1.0
    hu = np.clip(image.array, -200, 300).astype(np.float32)
    assert np.corrcoef(restored_hu[inside], hu[inside])[0, 1] > 0.95


def test_a_case_that_resampling_would_blow_up_is_refused_before_any_allocation():
    """A header with 40 mm voxels (a real Hippocampus case rescaled, in an audit of 2026-12-04)
    went through ingest and made preprocess allocate 15 GiB, a MemoryError or an OOM kill that
    named no case. Refused now, with the spacings, before anything that size is allocated (ingest
    quarantines such spacings first: ingest.spacing_range_mm)."""
    from mvl_pipeline.core.errors import ImplausibleGeometryError
    from mvl_pipeline.preprocessing.apply import MAX_RESAMPLED_VOXELS

    image, label = _scan(_custom_affine((40.0, 40.0, 40.0)), (40, 52, 30))
    with pytest.raises(ImplausibleGeometryError, match=r"would make \[\d+, \d+, \d+\] voxels .* other units") as error:
        preprocess_case(image, _plan((0.1, 0.1, 0.1)), label=label)
    assert error.value.reason == "implausible_geometry"
    assert MAX_RESAMPLED_VOXELS == 2**28
