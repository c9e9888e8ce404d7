"""bf16 inference agrees with fp32 (issue 17): the same trained weights, predicted on the validation
cases with ``model.precision: bf16-mixed`` (the default) and ``fp32``, give the same labels
almost everywhere and nearly the same probabilities."""

from __future__ import annotations

import copy

import numpy as np

from mvl_pipeline.evaluation.inference import predict_probabilities
from mvl_pipeline.evaluation.metrics import dice_per_class
from mvl_pipeline.model import model_from_weights


def _with_precision(config: dict, precision: str) -> dict:
    changed = copy.deepcopy(config)
    changed["model"]["precision"] = precision
    return changed


def test_bf16_inference_gives_the_labels_of_fp32_on_cases_it_was_not_trained_on(tiny_training_data, tiny_models):
    data = tiny_training_data
    state, config = tiny_models["long"]
    assert config["model"]["precision"] == "bf16-mixed"  # the default this test is about
    models = {p: model_from_weights(state, _with_precision(config, p), llm_cache_dir=data["llm_cache_dir"])
              for p in ("bf16-mixed", "fp32")}  # fmt: skip
    roi = data["preprocessing_plan"]["patch_size"]
    # the validation cases: preprocessed like the training cases, never trained on
    cases = sorted(data["development_split"]["validation"])
    assert len(cases) >= 2
    worst_dice, worst_mean_abs = 1.0, 0.0
    for case_id in cases:
        image = np.asarray(data["model_input_cases"][case_id]().image.array)
        probs = {p: predict_probabilities(m, image, roi_size=roi, num_classes=3) for p, m in models.items()}
        labels = {p: q.argmax(axis=0) for p, q in probs.items()}
        present = [c for c in (1, 2) if (labels["fp32"] == c).any()]
        assert present, f"{case_id}: the trained model predicts no foreground: nothing to compare"
        scores = dice_per_class(labels["bf16-mixed"], labels["fp32"], present)
        worst_dice = min(worst_dice, *scores.values())
        worst_mean_abs = max(worst_mean_abs, float(np.abs(probs["bf16-mixed"] - probs["fp32"]).mean()))
    assert worst_dice >= 0.98, f"bf16 vs fp32 label agreement (Dice) {worst_dice:.4f}"
    assert worst_mean_abs < 0.01, f"mean |p_bf16 - p_fp32| {worst_mean_abs:.4f}"
    # and the two did run in different precisions: equal probabilities would mean the precision
    # setting never reached inference, and the agreement above would prove nothing
    assert worst_mean_abs > 1e-6, "bf16 and fp32 inference gave identical probabilities"
