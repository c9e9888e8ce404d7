"""Resampling: geometry (shape, extent, voxel-centre alignment), label safety, exact round trips."""

from __future__ import annotations

import numpy as np
import pytest

from mvl_pipeline.preprocessing.resample import (
    resample_array,
    resample_label,
    resample_to_spacing,
    resampled_affine,
    resampled_shape,
    spacing_scale,
)


def _blobs(shape: tuple[int, int, int], values: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Integer label map of a few solid ellipsoids (each several voxels across)."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float64)
    label = np.zeros(shape, dtype=np.uint8)
    for value in values:
        centre = rng.uniform(0.25, 0.75, size=3) * np.asarray(shape)
        radii = rng.uniform(0.15, 0.3, size=3) * np.asarray(shape)
        inside = sum(((grid[a] - centre[a]) / radii[a]) ** 2 for a in range(3)) <= 1.0
        label[inside] = value
    return label


def test_shape_and_physical_extent_follow_the_target_spacing():
    shape, spacing, target = (40, 30, 12), (1.0, 1.5, 5.0), (2.0, 1.0, 2.5)
    out = resample_to_spacing(np.zeros(shape, np.float32), spacing, target)
    # round((n - 1) * s / t + 1): 20.5 -> 20 (numpy rounds halves to even), 44.5 -> 44, 23
    assert out.shape == (20, 44, 23) == resampled_shape(shape, spacing, target)
    for n, s, m, t in zip(shape, spacing, out.shape, target, strict=True):
        # first-to-last voxel-centre extent agrees within half a target voxel
        assert abs((m - 1) * t - (n - 1) * s) <= t / 2 + 1e-9


def test_resampled_affine_keeps_voxel_zero_and_has_the_target_spacing():
    affine = np.array(
        [[0.0, 0.0, -5.0, 10.0], [-1.5, 0.0, 0.0, 20.0], [0.0, 1.0, 0.0, -30.0], [0, 0, 0, 1]]
    )
    spacing = tuple(np.linalg.norm(affine[:3, :3], axis=0))
    out = resampled_affine(affine, spacing, (2.0, 2.0, 2.0))
    assert np.allclose(np.linalg.norm(out[:3, :3], axis=0), 2.0)
    assert np.allclose(out[:3, 3], affine[:3, 3])
    # same directions
    assert np.allclose(out[:3, :3] / 2.0, affine[:3, :3] / np.asarray(spacing))


def test_linear_resampling_reproduces_a_linear_field_at_the_new_voxel_centres():
    shape, spacing, target = (30, 24, 10), (1.2, 0.8, 4.0), (2.0, 1.1, 1.5)
    coefficients = np.array([0.7, -1.3, 2.1])
    mm = [np.arange(n) * s for n, s in zip(shape, spacing, strict=True)]
    field = sum(np.meshgrid(*[c * x for c, x in zip(coefficients, mm, strict=True)], indexing="ij"))
    out = resample_to_spacing(field.astype(np.float32), spacing, target, "linear")
    out_mm = [np.arange(m) * t for m, t in zip(out.shape, target, strict=True)]
    expected = sum(
        np.meshgrid(*[c * x for c, x in zip(coefficients, out_mm, strict=True)], indexing="ij")
    )
    # inside the input's extent the field is reproduced exactly (border clamps beyond it)
    inside = tuple(
        slice(0, int(np.floor((n - 1) * s / t)) + 1)
        for n, s, t in zip(shape, spacing, target, strict=True)
    )
    assert np.allclose(out[inside], expected[inside], atol=1e-3)


def test_linear_resampling_matches_monai_spacing_bilinear():
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    rng = np.random.default_rng(3)
    shape, spacing, target = (23, 17, 9), (0.9, 1.7, 5.0), (1.4, 1.0, 2.5)
    image = rng.normal(size=shape).astype(np.float32)
    ours = resample_to_spacing(image, spacing, target, "linear")
    tensor = MetaTensor(
        torch.from_numpy(image)[None], affine=torch.tensor(np.diag([*spacing, 1.0]))
    )
    theirs = Spacing(pixdim=target, mode="bilinear", padding_mode="border")(tensor)[0].numpy()
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() < 1e-4


@pytest.mark.parametrize("mode", ["nearest", "onehot_linear"])
@pytest.mark.parametrize("target", [(0.5, 0.5, 1.0), (2.3, 1.7, 3.1), (1.0, 3.0, 0.7)])
def test_label_resampling_only_produces_original_label_values(mode, target):
    label = _blobs((32, 28, 20), values=(3, 7, 200), seed=1)
    out = resample_to_spacing(label, (1.0, 1.0, 2.0), target, mode, is_label=True)
    assert out.dtype == label.dtype
    assert set(np.unique(out)) <= {0, 3, 7, 200}
    assert set(np.unique(out)) == {0, 3, 7, 200}  # nothing vanished at these scales


@pytest.mark.parametrize("mode", ["nearest", "onehot_linear"])
def test_label_round_trip_is_exact_for_integer_factor_upsampling(mode):
    label = _blobs((20, 18, 9), values=(1, 2), seed=2)
    spacing, target = (2.0, 3.0, 5.0), (1.0, 1.0, 2.5)  # factors 2, 3, 2
    up_shape = resampled_shape(label.shape, spacing, target)
    up = resample_label(label, up_shape, spacing_scale(spacing, target), mode)
    back = resample_label(up, label.shape, spacing_scale(target, spacing), "nearest")
    assert np.array_equal(back, label)


def test_label_round_trip_after_downsampling_keeps_high_overlap():
    label = _blobs((48, 48, 24), values=(1,), seed=4)
    spacing, target = (1.0, 1.0, 2.0), (1.7, 1.3, 3.3)
    down = resample_to_spacing(label, spacing, target, "nearest", is_label=True)
    back = resample_label(down, label.shape, spacing_scale(target, spacing), "nearest")
    dice = 2 * np.sum((back == 1) & (label == 1)) / (np.sum(back == 1) + np.sum(label == 1))
    assert dice > 0.85  # two nearest-neighbour quantisations, ~1.5 voxel downsampling


def test_linear_resampling_does_not_modify_or_alias_its_input():
    image = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    before = image.copy()
    out = resample_array(image, image.shape, (1.0, 1.0, 1.0), "linear")
    assert np.array_equal(out, before) and out is not image
    out[0, 0, 0] = -1
    assert np.array_equal(image, before)


def test_cubic_is_exact_on_constant_and_close_to_linear_on_smooth_data():
    grid = np.indices((24, 24, 12), dtype=np.float32)
    smooth = np.sin(grid[0] / 5.0) + np.cos(grid[1] / 7.0) + grid[2] / 10.0
    cubic = resample_to_spacing(smooth, (1, 1, 1), (0.7, 1.3, 0.9), "cubic")
    linear = resample_to_spacing(smooth, (1, 1, 1), (0.7, 1.3, 0.9), "linear")
    assert cubic.dtype == np.float32 and cubic.shape == linear.shape
    assert np.abs(cubic - linear).max() < 0.05
    constant = resample_to_spacing(
        np.full((8, 8, 8), 3.5, np.float32), (1, 1, 1), (0.6, 0.6, 0.6), "cubic"
    )
    assert np.allclose(constant, 3.5, atol=1e-5)


def test_bad_modes_and_dtypes_are_rejected():
    with pytest.raises(ValueError, match="interpolation"):
        resample_array(np.zeros((2, 2, 2)), (3, 3, 3), (0.5, 0.5, 0.5), "bilinear")
    with pytest.raises(ValueError, match="label interpolation"):
        resample_label(np.zeros((2, 2, 2), np.uint8), (3, 3, 3), (0.5, 0.5, 0.5), "linear")
    with pytest.raises(TypeError, match="integer"):
        resample_label(np.zeros((2, 2, 2), np.float32), (3, 3, 3), (0.5, 0.5, 0.5), "nearest")
