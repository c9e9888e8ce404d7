"""Patch sampling and on-the-fly augmentation."""

import numpy as np
import torch

from mvl_pipeline.training.augmentation import AugmentConfig, affine_grid, augment
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


def test_the_affine_grid_is_torchs_up_to_rounding():
    theta = torch.from_numpy(np.random.default_rng(0).normal(size=(3, 3, 4)).astype(np.float32))
    for spatial in [(40, 56, 40), (8, 5, 3), (1, 4, 2)]:
        expected = torch.nn.functional.affine_grid(theta, [3, 1, *spatial], align_corners=False)
        torch.testing.assert_close(affine_grid(theta, spatial), expected, rtol=0, atol=2e-6)


def _warp_whole_batch(x, y, thetas):
    """The warp as it was until 2026-12-06: every sample of a batch that has one to warp goes through
    torch's affine_grid and grid_sample, the others with the identity."""
    identity = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]
    theta = torch.tensor([thetas.get(b, identity) for b in range(x.shape[0])], dtype=x.dtype)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    warped_x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    warped_y = torch.nn.functional.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return warped_x, warped_y[:, 0].round().long()


def test_only_the_samples_that_drew_a_warp_are_warped_as_the_whole_batch_was_before():
    """Sample 1 of 3 draws a rotation and a scale; samples 0 and 2 none: they come out as they went
    in (bit for bit), where the whole-batch warp passed them through an identity (the same up to
    rounding), and sample 1 comes out as that warp made it."""
    x, y = sample_batch([volume()], (16, 24, 8), 3, np.random.default_rng(3), foreground_fraction=1.0)
    config = AugmentConfig(flip_prob=0.0, rotate_prob=0.5, scale_prob=0.5, intensity_prob=0.0, noise_prob=0.0)

    class Draws:  # the coins after the 9 flips' (probability 0): only sample 1's rotation and scale come up
        def __init__(self):
            self.coins = iter([0.9] * 9 + [0.9, 0.9, 0.1, 0.1, 0.9, 0.9])

        def random(self):
            return next(self.coins, 0.9)  # then the intensity and noise coins (probability 0)

        def uniform(self, low, high):
            return low + 0.7 * (high - low)

    ax, ay = augment(x, y, Draws(), config)
    assert torch.equal(ax[[0, 2]], x[[0, 2]]) and torch.equal(ay[[0, 2]], y[[0, 2]])
    angle, scale = np.radians(-15.0 + 0.7 * 30.0), 0.85 + 0.7 * 0.3
    cos, sin, ratio = np.cos(angle) / scale, np.sin(angle) / scale, 16 / 24
    theta = {1: [[1.0 / scale, 0.0, 0.0, 0.0], [0.0, cos, -sin * ratio, 0.0], [0.0, sin / ratio, cos, 0.0]]}
    bx, by = _warp_whole_batch(x, y, theta)
    torch.testing.assert_close(ax, bx, rtol=0, atol=1e-5)
    assert torch.equal(ay[1], by[1]) and not torch.equal(ay[1], y[1])
    assert torch.equal(ay, by)  # the unwarped samples: the identity warp kept every label too
