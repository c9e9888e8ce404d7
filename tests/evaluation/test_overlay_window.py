"""Overlays are windowed per case: the display window is the case's own 1st-99th intensity
percentile inside the label's box (with a margin), so an MR case's scale and a bright spot far
from the anatomy do not wash the slice out; ``plot_overlays`` shows the slice with that window."""

from __future__ import annotations

import numpy as np
import pytest

from mvl_pipeline.core.case import Case
from mvl_pipeline.core.volume import Volume
from mvl_pipeline.evaluation.plots import plot_overlays
from mvl_pipeline.evaluation.scoring import _overlay


def mr_case(label: np.ndarray, image: np.ndarray) -> Case:
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    return Case("case-1", "pt-1", Volume(image, affine, {"modality": "MR"}), Volume(label, affine, {}),
                {"modality": "MR"})  # fmt: skip


def test_the_window_is_the_percentiles_around_the_label_not_of_the_whole_image():
    rng = np.random.default_rng(0)
    image = rng.normal(300.0, 40.0, (40, 40, 30)).astype(np.float32)
    image[35:, 35:, :] = 50_000.0  # a bright artefact far from the anatomy (outside the label box)
    label = np.zeros((40, 40, 30), dtype=np.uint8)
    label[10:16, 12:20, 8:14] = 1
    label[10:18, 12:22, 11] = 1  # slice 11 has the largest cross-section
    overlay = _overlay(mr_case(label, image), label.copy())

    low, high = np.array([10, 12, 8]), np.array([18, 22, 14])
    margin = np.maximum(4, (high - low) // 2)
    box = tuple(slice(max(0, lo - m), hi + m) for lo, hi, m in zip(low, high, margin, strict=True))
    expected = np.percentile(image[box], [1.0, 99.0])
    assert overlay["window"] == pytest.approx(list(expected))
    assert overlay["window"][1] < 1_000  # the artefact is not in the window
    assert np.percentile(image, 99.5) > 1_000  # ... though it is in the image
    np.testing.assert_array_equal(overlay["image"], image[:, :, 11])
    np.testing.assert_array_equal(overlay["label"], label[:, :, 11])
    assert overlay["spacing"] == (1.0, 1.0)


def test_a_flat_region_still_gets_a_window_of_positive_width_and_no_label_uses_the_whole_image():
    image = np.full((20, 20, 10), 7.0, dtype=np.float32)
    label = np.zeros((20, 20, 10), dtype=np.uint8)
    label[5:8, 5:8, 3:5] = 1
    assert _overlay(mr_case(label, image), label)["window"] == [7.0, 8.0]

    ramp = np.arange(20 * 20 * 10, dtype=np.float32).reshape(20, 20, 10)
    empty = np.zeros_like(label)
    overlay = _overlay(mr_case(empty, ramp), empty)
    assert overlay["window"] == pytest.approx(list(np.percentile(ramp, [1.0, 99.0])))
    np.testing.assert_array_equal(overlay["image"], ramp[:, :, 5])  # the middle slice


def test_plot_overlays_displays_each_slice_with_its_own_window():
    label = np.zeros((20, 20, 10), dtype=np.uint8)
    label[5:12, 5:12, 2:6] = 1
    images = [np.random.default_rng(seed).normal(mean, mean / 10, (20, 20, 10)).astype(np.float32)
              for seed, mean in ((1, 10.0), (2, 900.0))]  # fmt: skip
    dark, bright = (_overlay(mr_case(label, image), label) for image in images)
    figure = plot_overlays([dark, bright])
    shown = [ax.images[0].get_clim() for ax in figure.axes if ax.images]
    assert shown == [pytest.approx(tuple(dark["window"])), pytest.approx(tuple(bright["window"]))]
