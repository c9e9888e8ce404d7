"""The evaluate nodes on a tiny trained model and holdout."""

from __future__ import annotations

import matplotlib.figure
import numpy as np
import pytest

from mvl_pipeline.core.hashing import set_digest
from mvl_pipeline.evaluation.leakage import LeakageError, PlanMismatchError, check_plan
from mvl_pipeline.formats.model_bundle import weights_sha256
from mvl_pipeline.pipelines.evaluate.nodes import (
    evaluate_holdout,
    metrics_for_mlflow,
    plot_learning_curves,
    plot_overlays,
    plot_per_case,
)

pytestmark = pytest.mark.slow


def test_evaluate_holdout_scores_every_test_case_on_its_original_grid(tiny_training_data, tiny_models):
    data = tiny_training_data
    weights = tiny_models["long"]
    per_case, summary, overlays = evaluate_holdout(
        weights, data["ingested_cases"], data["test_split"], data["preprocessing_plan"],
        data["llm_cache_dir"], {"overlay_cases": 2},
    )  # fmt: skip
    test_cases = sorted(data["data_split"]["test"])
    assert sorted(per_case["case_id"].unique()) == test_cases  # the test role only: no gate case
    assert not set(per_case["case_id"]) & set(data["data_split"]["gate"])
    assert set(per_case["class_name"]) == {"organ", "lesion"}
    for case_id in test_cases:  # voxel counts are those of the ORIGINAL (ingested) label grid
        label = data["ingested_cases"][case_id]().label.array
        row = per_case[(per_case.case_id == case_id) & (per_case.class_name == "organ")].iloc[0]
        assert row["voxels_label"] == int((label == 1).sum())
        assert row["patient_id"] == data["ingested_cases"][case_id]().patient_id
    # the summary is tied to these weights and this test set (register attaches it only then)
    assert summary["role"] == "test"
    assert summary["n_cases"] == len(test_cases) and summary["n_patients"] == 3
    assert summary["weights_sha256"] == weights_sha256(weights[0])
    assert summary["test_set_hash"] == set_digest(test_cases)
    organ = summary["classes"]["organ"]
    assert organ["n_patients"] == 3 and organ["dice"]["ci_method"] == "BCa bootstrap over patients"
    assert 0 <= organ["dice"]["ci95"][0] <= organ["dice"]["mean"] <= organ["dice"]["ci95"][1] <= 1
    lesion = summary["classes"]["lesion"]
    assert lesion["hd95_mm"]["n_undefined"] == 0  # a missed lesion has its worst case, never a gap
    assert 0.0 <= lesion["detection_rate"] <= 1.0
    assert len(overlays) == min(2, len(test_cases))
    # the headline is Dice where the label holds the class, over the classes; a both-empty case
    # counting 1 lifts only the plain figure beside it
    assert summary["mean_dice"] == pytest.approx(np.mean([summary["classes"][c]["dice_label_present"]["mean"] for c in ("organ", "lesion")]))
    assert summary["mean_dice_all_cases"] == pytest.approx(np.mean([summary["classes"][c]["dice"]["mean"] for c in ("organ", "lesion")]))
    flat = metrics_for_mlflow(summary)
    assert flat["holdout.organ.dice"]["value"] == pytest.approx(organ["dice"]["mean"])
    assert flat["holdout.mean_dice"]["value"] == pytest.approx(summary["mean_dice"])
    assert not any("case-" in k for k in flat)
    for figure in (plot_per_case(per_case), plot_overlays(overlays)):
        assert isinstance(figure, matplotlib.figure.Figure)


def test_evaluate_refuses_a_test_set_holding_a_development_patient(tiny_training_data, tiny_models):
    data = tiny_training_data
    state, config = tiny_models["long"]
    trained_on = data["development_split"]["patients"]["train"][0]
    leaky = {"test": list(data["test_split"]["test"]),
             "patients": {"test": [*data["test_split"]["patients"]["test"], trained_on]}}  # fmt: skip
    with pytest.raises(LeakageError, match="1 patient\\(s\\) of the test set were development"):
        evaluate_holdout((state, config), data["ingested_cases"], leaky, data["preprocessing_plan"],
                         data["llm_cache_dir"], {"overlay_cases": 0})  # fmt: skip


def test_evaluate_refuses_a_model_trained_under_another_plan(tiny_training_data, tiny_models):
    """After a re-plan, `kedro run --pipelines evaluate` alone would have scored the old weights on
    the new preprocessing (an honesty audit, 2026-12-04): the model records its plan, and a
    mismatch stops evaluate (and the gate) saying what to run."""
    data = tiny_training_data
    state, config = tiny_models["long"]
    assert config["plan_id"] == data["preprocessing_plan"]["plan_id"]  # decide_postprocessing recorded it
    replanned = {**data["preprocessing_plan"], "plan_id": "replanned-0000"}
    with pytest.raises(PlanMismatchError, match=r"trained under preprocessing plan \S+, the current plan is replanned-0000"):
        evaluate_holdout((state, config), data["ingested_cases"], data["test_split"], replanned,
                         data["llm_cache_dir"], {"overlay_cases": 0})  # fmt: skip
    check_plan({k: v for k, v in config.items() if k != "plan_id"}, replanned, model="old model")  # not recorded: not checked


def test_learning_curves_plot_only_validated_epochs():
    history = {"epochs": [{"epoch": 0, "train_loss": 1.0}, {"epoch": 1, "train_loss": 0.8, "val_dice": 0.5,
                          "val_dice_1": 0.7, "val_dice_2": 0.3}], "best_epoch": 1,
               "class_names": {"1": "organ", "2": "lesion"}}  # fmt: skip
    figure = plot_learning_curves(history)
    right = figure.axes[1]
    assert [line.get_label() for line in right.get_lines()][:3] == ["mean", "organ", "lesion"]
    assert list(right.get_lines()[0].get_xdata()) == [2]
