"""Channels of one study onto the reference channel's grid (preprocessing/channels.py and
resample.resample_onto): exact in world coordinates, whatever the series' planes, spacings and
fields of view; a series that does not overlap is an error with its own reason."""

from __future__ import annotations

import numpy as np
import pytest

from mvl_pipeline.core.errors import ChannelsDoNotOverlapError
from mvl_pipeline.core.volume import Volume
from mvl_pipeline.preprocessing.channels import label_onto_reference, stack_channels
from mvl_pipeline.preprocessing.resample import resample_onto
from mvl_pipeline.synthetic.phantom import acquisition_affine

CENTRE = (12.0, -30.0, 40.0)
GRADIENT = np.array([0.7, -1.3, 2.1])


def linear_field(shape, affine) -> np.ndarray:
    """``GRADIENT . world + 5`` at every voxel centre: linear interpolation reproduces it exactly."""
    index = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1).astype(np.float64)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    return (world @ GRADIENT + 5.0).astype(np.float32)


def grid(orientation: str, shape, spacing, centre=CENTRE, tilt=(0.0, 0.0)) -> tuple[tuple[int, ...], np.ndarray]:
    return tuple(shape), acquisition_affine(shape=shape, spacing=spacing, orientation=orientation,
                                            centre=centre, tilt_deg=tilt)  # fmt: skip


REFERENCE = grid("axial", (20, 18, 12), (3.0, 3.0, 5.0))


@pytest.mark.parametrize(
    "source",
    [grid("axial", (20, 18, 8), (3.0, 3.0, 7.5)),  # thicker slices over the same extent
     grid("coronal", (24, 16, 22), (2.5, 4.0, 2.5)),  # another plane: axes permuted and flipped
     grid("sagittal", (22, 16, 26), (3.5, 4.0, 2.5)),
     grid("oblique", (26, 26, 18), (2.8, 2.8, 4.0), tilt=(12.0, 5.0))],  # not axis-aligned
    ids=["thick-slices", "coronal", "sagittal", "oblique"],
)  # fmt: skip
def test_a_series_lands_on_the_reference_grid_exactly_in_world_coordinates(source):
    shape, affine = source
    out, coverage = resample_onto(linear_field(shape, affine), affine, REFERENCE[0], REFERENCE[1])
    expected = linear_field(*REFERENCE)
    assert out.shape == REFERENCE[0] and out.dtype == np.float32
    # where a reference voxel lies between the source's voxel centres, linear interpolation of a
    # linear field is exact; within half a voxel beyond them it takes the border value
    index = np.stack(np.meshgrid(*(np.arange(n) for n in REFERENCE[0]), indexing="ij"), axis=-1).reshape(-1, 3)
    mapped = (np.c_[index, np.ones(len(index))] @ (np.linalg.inv(affine) @ REFERENCE[1]).T)[:, :3]
    hull = np.all((mapped >= -1e-6) & (mapped <= np.array(shape) - 1 + 1e-6), axis=1).reshape(REFERENCE[0])
    view = np.all((mapped >= -0.5) & (mapped <= np.array(shape) - 0.5), axis=1).reshape(REFERENCE[0])
    assert coverage == pytest.approx(view.mean()) and hull.mean() > 0.6
    np.testing.assert_allclose(out[hull], expected[hull], atol=2e-3)
    assert np.all(out[~view] == linear_field(shape, affine).min())


def test_identical_grids_take_the_fast_path_and_channels_stack_channel_first():
    image = Volume(linear_field(*REFERENCE), REFERENCE[1], {"modality": "MR"})
    other = Volume(-image.array, REFERENCE[1])
    stacked, coverages = stack_channels([image, other], ["t1", "t2"])
    assert stacked.array.shape == (2, *REFERENCE[0]) and stacked.same_grid(image)
    np.testing.assert_array_equal(stacked.array[1], -image.array)
    assert coverages == [1.0, 1.0] and stacked.meta == {"modality": "MR"}


def test_a_partial_field_of_view_is_filled_with_the_channels_minimum_and_its_coverage_counted():
    # the second series covers the upper half of the reference slab only
    shape, affine = grid("axial", (20, 18, 6), (3.0, 3.0, 5.0), centre=(12.0, -30.0, 40.0 + 3 * 5.0))
    array = linear_field(shape, affine)
    out, coverage = resample_onto(array, affine, REFERENCE[0], REFERENCE[1])
    assert coverage == pytest.approx(0.5, abs=1e-6)
    outside = np.zeros(REFERENCE[0], bool)
    outside[:, :, :6] = True
    assert np.all(out[outside] == array.min())
    np.testing.assert_allclose(out[~outside], linear_field(*REFERENCE)[~outside], atol=2e-3)


def test_series_that_do_not_overlap_are_an_error_naming_the_channel():
    reference = Volume(linear_field(*REFERENCE), REFERENCE[1])
    shape, affine = grid("axial", REFERENCE[0], (3.0, 3.0, 5.0), centre=(12.0, -30.0, 400.0))
    far = Volume(linear_field(shape, affine), affine)
    with pytest.raises(ChannelsDoNotOverlapError, match=r"channel 't2' covers 0% of the reference") as info:
        stack_channels([reference, far], ["t1", "t2"], min_overlap=0.0)
    assert info.value.reason == "channels_do_not_overlap"
    shape, affine = grid("axial", REFERENCE[0], (3.0, 3.0, 5.0), centre=(12.0, -30.0, 40.0 + 40.0))
    with pytest.raises(ChannelsDoNotOverlapError, match=r"channel 't2' covers 33% .*\(50% needed\)"):
        stack_channels([reference, Volume(linear_field(shape, affine), affine)], ["t1", "t2"], min_overlap=0.5)


@pytest.mark.parametrize("orientation", ["coronal", "oblique"])
def test_a_label_placed_on_the_reference_grid_keeps_only_its_own_values(orientation):
    shape, affine = grid(orientation, (24, 20, 22), (2.5, 3.0, 2.5), tilt=(10.0, 0.0))
    field = linear_field(shape, affine)
    label = Volume(np.digitize(field, np.percentile(field, [40, 70])).astype(np.uint8), affine)
    placed = label_onto_reference(label, Volume(np.zeros(REFERENCE[0], np.float32), REFERENCE[1]))
    assert placed.shape == REFERENCE[0] and placed.array.dtype == np.uint8
    assert set(np.unique(placed.array)) <= {0, 1, 2} and {1, 2} <= set(np.unique(placed.array))
    # nearest: the reference voxels well inside a class region get that class
    reference_field = linear_field(*REFERENCE)
    cut_low, cut_high = np.percentile(field, [40, 70])
    deep = (reference_field > cut_high + 8) & (placed.array > 0)
    assert np.all(placed.array[deep] == 2)
    assert np.all(placed.array[(reference_field < cut_low - 8) & (placed.array > 0)] == 0)
