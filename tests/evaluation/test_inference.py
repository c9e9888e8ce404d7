"""Sliding-window prediction with tiny voxel-wise models whose logits are known functions of the
input, so that every output voxel has an exact expected probability."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mvl_pipeline.evaluation.inference import predict_probabilities


class VoxelwiseLogits(nn.Module):
    """Logits ``(B, C, X, Y, Z)`` = ``weights @ x`` per voxel; records what it saw."""

    def __init__(self, weights: list[list[float]], out_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.tensor(weights, dtype=torch.float32))  # (C, C_in)
        self.out_dtype = out_dtype
        self.seen_shapes: list[tuple[int, ...]] = []
        self.seen_training: list[bool] = []
        self.seen_grad: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_shapes.append(tuple(x.shape))
        self.seen_training.append(self.training)
        self.seen_grad.append(torch.is_grad_enabled())
        return torch.einsum("ck,bkxyz->bcxyz", self.mix, x).to(self.out_dtype)


class Broken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("model failed")


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=0, keepdims=True))
    return shifted / shifted.sum(axis=0, keepdims=True)


def ramp(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Values in [-3, 3]: far from a uniform softmax, so a voxel no window covered would show."""
    return np.random.default_rng(seed).uniform(-3.0, 3.0, size=shape).astype(np.float32)


def test_softmax_probabilities_have_shape_c_x_y_z_sum_to_one_and_are_float32():
    image = ramp((8, 8, 8))
    model = VoxelwiseLogits([[1.0], [-1.0], [0.0]])
    probs = predict_probabilities(model, image, roi_size=(8, 8, 8), num_classes=3)
    assert probs.shape == (3, 8, 8, 8)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    expected = softmax(np.stack([image, -image, np.zeros_like(image)]))
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_single_sigmoid_channel_gives_background_and_foreground_channels():
    image = ramp((8, 8, 8), seed=1)
    model = VoxelwiseLogits([[2.0]])
    probs = predict_probabilities(model, image, roi_size=(8, 8, 8), num_classes=1)
    foreground = 1.0 / (1.0 + np.exp(-2.0 * image))
    assert probs.shape == (2, 8, 8, 8)
    np.testing.assert_allclose(probs[1], foreground, atol=1e-5)
    np.testing.assert_allclose(probs[0], 1.0 - foreground, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(axis=0), (image > 0).astype(np.int64))


def test_volume_larger_than_roi_is_covered_window_by_window_at_every_voxel():
    image = ramp((20, 13, 9), seed=2)
    model = VoxelwiseLogits([[1.0], [-1.0]])
    probs = predict_probabilities(model, image, roi_size=(8, 8, 8), num_classes=2, overlap=0.25, sw_batch_size=1)
    assert probs.shape == (2, 20, 13, 9)
    # the model only ever saw roi-sized windows, several of them
    assert {shape[2:] for shape in model.seen_shapes} == {(8, 8, 8)}
    assert len(model.seen_shapes) > 1
    np.testing.assert_allclose(probs, softmax(np.stack([image, -image])), atol=1e-5)


def test_volume_smaller_than_roi_is_padded_and_cropped_back_to_its_own_grid():
    image = ramp((5, 6, 3), seed=3)
    model = VoxelwiseLogits([[1.0], [-1.0]])
    probs = predict_probabilities(model, image, roi_size=(8, 8, 8), num_classes=2)
    assert probs.shape == (2, 5, 6, 3)
    np.testing.assert_allclose(probs, softmax(np.stack([image, -image])), atol=1e-5)


def test_four_d_multichannel_input_reaches_the_model_with_its_channels():
    image = ramp((2, 10, 10, 10), seed=4)
    model = VoxelwiseLogits([[1.0, -1.0], [-1.0, 1.0]])
    probs = predict_probabilities(model, image, roi_size=(8, 8, 8), num_classes=2)
    assert probs.shape == (2, 10, 10, 10)
    assert {shape[:2] for shape in model.seen_shapes} <= {(1, 2), (2, 2)}  # (sw batch, C_in)
    difference = image[0] - image[1]
    np.testing.assert_allclose(probs, softmax(np.stack([difference, -difference])), atol=1e-5)


def test_non_float_image_and_double_logits_still_give_float32():
    image = np.arange(4 * 4 * 4, dtype=np.int16).reshape(4, 4, 4) - 32
    model = VoxelwiseLogits([[0.1], [-0.1]], out_dtype=torch.float64)
    probs = predict_probabilities(model, image, roi_size=(4, 4, 4), num_classes=2)
    assert probs.dtype == np.float32
    logits = 0.1 * image.astype(np.float64)
    np.testing.assert_allclose(probs, softmax(np.stack([logits, -logits])), atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_model_runs_in_eval_mode_and_its_mode_is_restored(training):
    model = VoxelwiseLogits([[1.0], [0.0]])
    model.train(training)
    predict_probabilities(model, ramp((8, 8, 8)), roi_size=(8, 8, 8), num_classes=2)
    assert model.seen_training and not any(model.seen_training)
    assert model.training is training


def test_mode_is_restored_when_the_model_raises():
    model = Broken()
    model.train()
    with pytest.raises(RuntimeError, match="model failed"):
        predict_probabilities(model, ramp((8, 8, 8)), roi_size=(8, 8, 8), num_classes=2)
    assert model.training is True


def test_model_runs_without_autograd_and_the_caller_keeps_it():
    model = VoxelwiseLogits([[1.0], [-1.0]])
    predict_probabilities(model, ramp((8, 8, 8)), roi_size=(8, 8, 8), num_classes=2)
    assert model.seen_grad and not any(model.seen_grad)
    assert torch.is_grad_enabled()  # the decorator does not leak no_grad to the caller
