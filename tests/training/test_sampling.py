"""Patch sampling and on-the-fly augmentation."""

import numpy as np
import torch

from mvl_pipeline.training.augmentation import AugmentConfig, augment
from mvl_pipeline.training.sampling import TrainingVolume, sample_batch


def volume(seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(64, 64, 32)).astype(np.float32)
    label = np.zeros((64, 64, 32), np.uint8)
    label[50:54, 50:54, 20:22] = 2  # a small lesion far from the centre
    return TrainingVolume.from_arrays(image, label)


def test_foreground_fraction_of_patches_is_centred_on_foreground():
    rng = np.random.default_rng(0)
    x, y = sample_batch([volume()], (16, 16, 8), 6, rng, foreground_fraction=1 / 3)
    assert x.shape == (6, 1, 16, 16, 8) and y.shape == (6, 16, 16, 8)
    has_lesion = [(y[i] == 2).any().item() for i in range(6)]
    assert all(has_lesion[-2:])  # the last third is forced onto foreground


def test_small_volumes_are_padded_to_the_patch():
    small = TrainingVolume.from_arrays(np.ones((10, 12, 4), np.float32), np.ones((10, 12, 4), np.uint8))
    x, y = sample_batch([small], (16, 16, 8), 2, np.random.default_rng(0))
    assert x.shape == (2, 1, 16, 16, 8)
    assert set(np.unique(y.numpy())) <= {0, 1}


def test_augmentation_is_seeded_and_keeps_label_values():
    x, y = sample_batch([volume()], (16, 16, 8), 4, np.random.default_rng(3), foreground_fraction=1.0)
    config = AugmentConfig(rotate_prob=1.0, scale_prob=1.0, intensity_prob=1.0, noise_prob=1.0)
    a = augment(x, y, np.random.default_rng(7), config)
    b = augment(x, y, np.random.default_rng(7), config)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert set(np.unique(a[1].numpy())) <= {0, 2}
    assert not torch.equal(a[0], x)  # something happened
    assert torch.equal(x, sample_batch([volume()], (16, 16, 8), 4, np.random.default_rng(3), foreground_fraction=1.0)[0])


def test_multi_channel_volumes_give_channel_first_patches_cut_at_the_same_place():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(2, 20, 18, 6)).astype(np.float32)
    image[1] = 10.0 * image[0] + 3.0  # the second channel is a function of the first, voxel by voxel
    label = np.zeros((20, 18, 6), np.uint8)
    label[5:8, 5:8, 2:4] = 1
    x, y = sample_batch([TrainingVolume.from_arrays(image, label)], (16, 16, 8), 4, np.random.default_rng(0))
    assert x.shape == (4, 2, 16, 16, 8) and y.shape == (4, 16, 16, 8)
    # padded along Z (6 -> 8) with each channel's own minimum; elsewhere the channels stay aligned
    inside = x[:, 0] != float(image[0].min())
    torch.testing.assert_close(x[:, 1][inside], 10.0 * x[:, 0][inside] + 3.0)
    assert torch.all(x[:, 1][~inside] == float(image[1].min()))


def test_the_rotation_turns_a_disc_on_a_patch_that_is_not_square_without_stretching_it():
    """An audit (2026-12-04): on the Hippocampus patch (40 x 56 in X-Y) the rotation was built in
    affine_grid's -1..1 coordinates per axis, which shears: a disc came out 1.2 times longer one way."""
    shape = (40, 56, 8)
    xx, yy, _ = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    disc = torch.from_numpy((xx**2 + yy**2 <= 12**2).astype(np.int64))[None]
    config = AugmentConfig(flip_prob=0.0, rotate_prob=1.0, max_rotation_deg=15.0, scale_prob=0.0,
                           intensity_prob=0.0, noise_prob=0.0)  # fmt: skip
    worst = 1.0
    for seed in range(40):
        _, y = augment(disc[:, None].float(), disc, np.random.default_rng(seed), config)
        inside = y[0].numpy() > 0
        spread = np.linalg.eigvalsh(np.cov(np.stack([xx[inside], yy[inside]])))
        worst = max(worst, float(np.sqrt(spread[1] / spread[0])))
    assert worst < 1.03, worst  # a rigid turn of a voxelised disc; the shear gave up to 1.20
