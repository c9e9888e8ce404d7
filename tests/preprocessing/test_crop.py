"""Body masks and boxes: per-modality thresholds, speckle-robust boxes, margins in millimetres."""

from __future__ import annotations

import numpy as np
import pytest

from mvl_pipeline.preprocessing.crop import (
    BodyMaskConfig,
    body_box,
    body_threshold,
    bounding_box,
    grow_box,
    margin_voxels,
)


def test_bounding_box_is_half_open_and_ignores_sparse_speckle():
    mask = np.zeros((20, 30, 10), bool)
    mask[5:12, 8:25, 2:7] = True
    assert bounding_box(mask) == ((5, 12), (8, 25), (2, 7))
    mask[0, 0, 9] = True  # one noise voxel far away
    assert bounding_box(mask) == ((0, 12), (0, 25), (2, 10))
    assert bounding_box(mask, min_voxels_per_slice=2) == ((5, 12), (8, 25), (2, 7))
    assert bounding_box(np.zeros((3, 3, 3), bool)) is None


def test_margin_is_in_millimetres_and_the_box_stays_inside_the_volume():
    assert margin_voxels(10.0, (3.0, 0.5, 5.0)) == (4, 20, 2)
    assert margin_voxels(10.0, (2.5, 2.5, 2.5)) == (4, 4, 4)  # exact multiples do not round up
    assert grow_box(((2, 8), (0, 5), (3, 4)), (4, 4, 1), (9, 6, 10)) == ((0, 9), (0, 6), (2, 5))


def test_thresholds_per_modality_and_label_foreground_is_kept():
    config = BodyMaskConfig()
    image = np.zeros((30, 30, 8), np.float32)
    image[10:20, 8:22, :] = 500.0
    assert body_threshold(image, "CT", config) == -500.0
    assert 0.0 < body_threshold(image, "MR", config) < 500.0
    assert body_box(image, "MR", config) == ((10, 20), (8, 22), (0, 8))
    label = np.zeros(image.shape, np.uint8)
    label[25, 25, 4] = 1  # a label outside the body box widens it
    assert body_box(image, "MR", config, label=label) == ((10, 26), (8, 26), (0, 8))
    assert body_box(np.zeros((4, 4, 4), np.float32), "MR", config) == ((0, 4), (0, 4), (0, 4))


def test_unknown_or_bad_body_mask_parameters_fail():
    with pytest.raises(ValueError, match="unknown"):
        BodyMaskConfig.from_params({"threshold": 1})
    with pytest.raises(ValueError, match="min_voxels_per_slice"):
        BodyMaskConfig.from_params({"min_voxels_per_slice": 0})
