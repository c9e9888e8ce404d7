"""Sliding-window prediction with tiny voxel-wise models whose logits are known functions of the
input, so that every output voxel has an exact expected probability."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from mvl_pipeline.evaluation.inference import predict_many, predict_probabilities


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


class SmallConv(nn.Module):
    """A seeded 3x3x3 conv: each voxel's logits depend on its neighbours, so a case padded or
    cropped back at the wrong offset gives other probabilities near its border."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(in_channels, num_classes, 3, padding=1)
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        return self.conv(x) * 3.0


@pytest.mark.parametrize("num_classes", [2, 1])
def test_predict_many_gives_each_case_what_predict_probabilities_gives_in_order(num_classes):
    roi = (8, 8, 6)
    shapes = [(7, 8, 5), (8, 8, 6), (5, 6, 3), (12, 9, 6), (6, 7, 6), (8, 3, 2), (4, 4, 4)]  # (12, 9, 6) needs windows
    images = [ramp(shape, seed=i) for i, shape in enumerate(shapes)]
    model = SmallConv(num_classes=num_classes)
    expected = [predict_probabilities(model, image, roi_size=roi, num_classes=num_classes) for image in images]
    model.batch_sizes.clear()
    got = list(predict_many(model, list(enumerate(images)), lambda item: item[1], roi_size=roi, num_classes=num_classes, case_batch=3))
    assert [index for (index, _), _ in got] == list(range(len(images)))
    for (_, image), probs in got:
        assert probs.shape == (2, *image.shape) and probs.dtype == np.float32
    for want, (_, probs) in zip(expected, got, strict=True):
        np.testing.assert_allclose(probs, want, atol=1e-5)
    # the three cases before the large one in one pass, the large one window by window (MONAI's
    # sw_batch_size 2 at most per pass), the last three in one pass
    assert model.batch_sizes[0] == 3 and model.batch_sizes[-1] == 3
    assert len(model.batch_sizes) > 3 and max(model.batch_sizes[1:-1]) <= 2


def test_predict_many_multichannel_and_case_batch_one():
    roi = (6, 6, 6)
    images = [ramp((2, 5, 6, 4), seed=i) for i in range(3)]
    model = SmallConv(in_channels=2)
    expected = [predict_probabilities(model, image, roi_size=roi, num_classes=2) for image in images]
    for case_batch in (1, 4):
        model.batch_sizes.clear()
        got = [p for _, p in predict_many(model, images, lambda v: v, roi_size=roi, num_classes=2, case_batch=case_batch)]
        for want, probs in zip(expected, got, strict=True):
            np.testing.assert_allclose(probs, want, atol=1e-5)
        assert model.batch_sizes == ([1, 1, 1] if case_batch == 1 else [3])


def test_predict_many_reads_lazily_and_restores_the_mode():
    read: list[int] = []

    def images():
        for index in range(7):
            read.append(index)
            yield ramp((4, 4, 4), seed=index)

    model = SmallConv()
    model.train()
    stream = predict_many(model, images(), lambda v: v, roi_size=(4, 4, 4), num_classes=2, case_batch=3)
    next(stream)
    assert read == [0, 1, 2]  # one batch read, not the whole stream
    assert len(list(stream)) == 6
    assert model.training is True
    with pytest.raises(ValueError, match="case_batch"):
        list(predict_many(model, [ramp((4, 4, 4))], lambda v: v, roi_size=(4, 4, 4), num_classes=2, case_batch=0))


def test_predict_many_restores_the_mode_when_the_model_raises():
    model = Broken()
    model.train()
    with pytest.raises(RuntimeError, match="model failed"):
        list(predict_many(model, [ramp((4, 4, 4))], lambda v: v, roi_size=(8, 8, 8), num_classes=2))
    assert model.training is True


def test_memory_mapped_cases_are_predicted_without_a_warning(tmp_path):
    # model-input cases are memory-mapped read-only; torch.from_numpy on one warned ("The given
    # NumPy array is not writable") in every evaluate, gate and predict log
    roi = (8, 8, 6)
    image = ramp((7, 8, 5), seed=3)
    np.save(tmp_path / "case.npy", image)
    mapped = np.load(tmp_path / "case.npy", mmap_mode="r")
    assert not mapped.flags.writeable
    model = SmallConv()
    expected = predict_probabilities(model, image, roi_size=roi, num_classes=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ((_, probs),) = predict_many(model, [mapped], lambda v: v, roi_size=roi, num_classes=2)
        windowed = predict_probabilities(model, mapped, roi_size=roi, num_classes=2)  # the other path
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    np.testing.assert_array_equal(windowed, expected)
