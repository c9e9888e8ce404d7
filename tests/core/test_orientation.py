"""Reorientation to RAS: permutation + flips only, world positions kept, exactly invertible."""

from __future__ import annotations

import numpy as np
import pytest

from mvl_pipeline.core.orientation import AxisTransform, orientation_transform, reorient
from mvl_pipeline.core.volume import Volume
from mvl_pipeline.synthetic.phantom import acquisition_affine


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal", "oblique"])
def test_reorient_to_ras_keeps_every_voxel_at_its_world_position(plane):
    shape = (6, 7, 5)
    affine = acquisition_affine(
        shape=shape, spacing=(1.0, 2.0, 3.0), orientation=plane, centre=(5.0, -3.0, 20.0),
        tilt_deg=(12.0, -7.0),
    )  # fmt: skip
    array = np.arange(np.prod(shape)).reshape(shape)
    out, out_affine, transform = reorient(array, affine, "RAS")
    assert Volume(out.astype(np.float32), out_affine).orientation == "RAS"
    assert sorted(out.shape) == sorted(shape)
    rng = np.random.default_rng(0)
    for _ in range(20):
        ijk = np.array([rng.integers(0, n) for n in shape] + [1])
        world = affine @ ijk
        out_ijk = np.linalg.solve(out_affine, world)[:3]
        assert np.allclose(out_ijk, np.round(out_ijk), atol=1e-6)
        assert out[tuple(np.round(out_ijk).astype(int))] == array[tuple(ijk[:3])]
    back = transform.inverse().apply(out)
    assert np.array_equal(back, array)
    assert np.allclose(transform.inverse().apply_to_affine(out_affine, out.shape), affine)


def test_coronal_spacing_is_permuted_to_the_axis_it_spans():
    affine = acquisition_affine(
        shape=(8, 8, 4), spacing=(3.0, 3.0, 5.0), orientation="coronal", centre=(0, 0, 0)
    )
    transform = orientation_transform(affine, "RAS")
    # coronal slices are stacked along anterior-posterior: the 5 mm spacing lands on y
    assert transform.permute((3.0, 3.0, 5.0)) == (3.0, 5.0, 3.0)
    assert transform.output_shape((8, 8, 4)) == (8, 4, 8)


def test_axis_transform_serialises_and_handles_channels():
    transform = AxisTransform.from_list([[2, -1], [0, 1], [1, -1]])
    assert AxisTransform.from_list(transform.to_list()) == transform
    array = np.random.default_rng(1).normal(size=(3, 4, 5, 6))
    moved = transform.apply(array)
    assert moved.shape == (3, *transform.output_shape((4, 5, 6)))
    for c in range(3):
        assert np.array_equal(moved[c], transform.apply(array[c]))
    assert np.array_equal(transform.inverse().apply(moved), array)


def test_identity_transform_returns_the_array_and_bad_codes_fail():
    array = np.zeros((2, 3, 4))
    out, _, transform = reorient(array, np.eye(4), "RAS")
    assert transform.is_identity and out is array
    with pytest.raises(ValueError, match="three axis codes"):
        orientation_transform(np.eye(4), "RA")
