"""The MLflow pyfunc on a tiny model bundle written to ``tmp_path`` (no MLflow server): loading
the bundle, batch prediction, the named-tensor input and the refusal of a wrong shape."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from mvl_pipeline.evaluation.inference import predict_probabilities
from mvl_pipeline.formats.model_bundle import BundleError, write_weights
from mvl_pipeline.model import MedVisionLlamaConfig, build_model, model_weights
from mvl_pipeline.serving.pyfunc import MedVisionLlamaPyfunc

PLAN = {"patch_size": [8, 8, 8], "plan_id": "tiny"}


def tiny_config(num_classes: int) -> MedVisionLlamaConfig:
    return MedVisionLlamaConfig.from_params({
        "num_classes": num_classes, "embed_dim": 16, "depth": 1, "num_heads": 2,
        "patch_size": [4, 4, 4], "pos_grid": [2, 2, 2], "precision": "fp32",
        "llm": {"mode": "none"}, "decoder": {"taps": [1], "channels": [8, 8], "stem_channels": 4},
    })  # fmt: skip


def write_bundle(folder: Path, num_classes: int, plan: dict[str, Any] | None = PLAN):
    torch.manual_seed(0)
    model = build_model(tiny_config(num_classes), llm_cache_dir=folder.parent / "llm-cache")
    write_weights(folder, model_weights(model), plan=plan)
    return model


def loaded(folder: Path, model_config: dict[str, Any] | None) -> MedVisionLlamaPyfunc:
    pyfunc = MedVisionLlamaPyfunc()
    pyfunc.load_context(SimpleNamespace(artifacts={"model_dir": str(folder)}, model_config=model_config))
    return pyfunc


@pytest.fixture
def bundle(tmp_path) -> tuple[Path, torch.nn.Module]:
    original = write_bundle(tmp_path / "model_dir", num_classes=3)
    return tmp_path / "model_dir", original


def batch(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_load_context_rebuilds_the_model_in_eval_mode_with_its_plan(bundle, tmp_path):
    folder, original = bundle
    pyfunc = loaded(folder, {"llm_cache_dir": str(tmp_path / "llm-cache")})
    assert pyfunc.plan == PLAN
    assert pyfunc.model.cfg == original.cfg
    assert not pyfunc.model.training
    restored = pyfunc.model.state_dict()
    assert all(torch.equal(restored[name], tensor) for name, tensor in original.state_dict().items())


def test_predict_returns_float32_probabilities_b_c_x_y_z_summing_to_one(bundle, tmp_path):
    folder, _ = bundle
    pyfunc = loaded(folder, {"llm_cache_dir": str(tmp_path / "llm-cache")})
    out = pyfunc.predict(None, batch((2, 1, 8, 8, 8)))
    assert out.shape == (2, 3, 8, 8, 8)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)
    assert not np.allclose(out[0], out[1])  # each volume of the batch is its own prediction


def test_predict_matches_sliding_window_inference_of_the_saved_model(bundle, tmp_path):
    folder, original = bundle
    pyfunc = loaded(folder, {"llm_cache_dir": str(tmp_path / "llm-cache")})
    volumes = batch((2, 1, 12, 10, 8), seed=1)  # larger than the plan's patch: sliding window
    out = pyfunc.predict(None, volumes)
    assert out.shape == (2, 3, 12, 10, 8)
    for got, volume in zip(out, volumes, strict=True):
        expected = predict_probabilities(original, volume, roi_size=PLAN["patch_size"], num_classes=3)
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_named_tensor_input_gives_the_same_answer_as_the_array(bundle, tmp_path):
    folder, _ = bundle
    pyfunc = loaded(folder, {"llm_cache_dir": str(tmp_path / "llm-cache")})
    volumes = batch((1, 1, 8, 8, 8), seed=2)
    np.testing.assert_array_equal(pyfunc.predict(None, {"image": volumes}), pyfunc.predict(None, volumes))


def test_float64_input_is_accepted_and_output_stays_float32(bundle, tmp_path):
    folder, _ = bundle
    pyfunc = loaded(folder, {"llm_cache_dir": str(tmp_path / "llm-cache")})
    out = pyfunc.predict(None, batch((1, 1, 8, 8, 8)).astype(np.float64))
    assert out.dtype == np.float32 and out.shape == (1, 3, 8, 8, 8)


@pytest.mark.parametrize("shape", [(8, 8, 8), (1, 8, 8, 8), (1, 1, 1, 8, 8, 8)])
def test_wrong_number_of_dimensions_is_refused_naming_the_expected_layout(bundle, tmp_path, shape):
    folder, _ = bundle
    pyfunc = loaded(folder, {"llm_cache_dir": str(tmp_path / "llm-cache")})
    with pytest.raises(ValueError, match=r"expected \(B, C, X, Y, Z\) float32, got shape") as caught:
        pyfunc.predict(None, np.zeros(shape, np.float32))
    assert str(shape) in str(caught.value)


def test_single_sigmoid_channel_model_predicts_background_and_foreground(tmp_path):
    write_bundle(tmp_path / "binary", num_classes=1)
    pyfunc = loaded(tmp_path / "binary", {"llm_cache_dir": str(tmp_path / "llm-cache")})
    out = pyfunc.predict(None, batch((1, 1, 8, 8, 8)))
    assert out.shape == (1, 2, 8, 8, 8)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("model_config", [None, {}])
def test_without_an_llm_cache_dir_the_model_still_loads(bundle, model_config):
    folder, _ = bundle
    pyfunc = loaded(folder, model_config)
    assert pyfunc.predict(None, batch((1, 1, 8, 8, 8))).shape == (1, 3, 8, 8, 8)


def test_a_bundle_without_its_plan_is_refused(tmp_path):
    write_bundle(tmp_path / "no_plan", num_classes=3, plan=None)
    with pytest.raises(BundleError, match="plan.json missing"):
        loaded(tmp_path / "no_plan", {"llm_cache_dir": str(tmp_path / "llm-cache")})


def test_predict_declares_its_input_type_so_mlflow_has_nothing_to_warn_about():
    # settings.py hides MLflow's "Add type hints to the `predict` method" for kedro-mlflow's class
    # only because ours is not concerned: MLflow warns when the input argument has no type hint
    from typing import get_type_hints

    assert get_type_hints(MedVisionLlamaPyfunc.predict)["model_input"] is np.ndarray


def test_the_model_code_file_builds_this_pyfunc(monkeypatch):
    # what MLflow runs when it loads a registered model ("models from code"): set_model(our class)
    import runpy

    import mlflow.models

    models = []
    monkeypatch.setattr(mlflow.models, "set_model", models.append)
    from mvl_pipeline.serving.pyfunc import MODEL_CODE

    runpy.run_path(str(MODEL_CODE))
    assert len(models) == 1 and type(models[0]) is MedVisionLlamaPyfunc
