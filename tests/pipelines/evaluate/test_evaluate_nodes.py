"""The evaluate nodes on a tiny trained model and holdout."""

from __future__ import annotations

import matplotlib.figure
import pytest

from mvl_pipeline.pipelines.evaluate.nodes import (
    evaluate_holdout,
    metrics_for_mlflow,
    plot_learning_curves,
    plot_overlays,
    plot_per_case,
)

pytestmark = pytest.mark.slow


def test_evaluate_holdout_scores_every_holdout_case_on_its_original_grid(tiny_training_data, tiny_models):
    data = tiny_training_data
    per_case, summary, overlays = evaluate_holdout(
        tiny_models["long"], data["ingested_cases"], data["data_split"], data["preprocessing_plan"],
        data["llm_cache_dir"], {"overlay_cases": 2},
    )  # fmt: skip
    holdout = sorted(data["data_split"]["test"])
    assert sorted(per_case["case_id"].unique()) == holdout
    assert set(per_case["class_name"]) == {"organ", "lesion"}
    for case_id in holdout:  # voxel counts are those of the ORIGINAL (ingested) label grid
        label = data["ingested_cases"][case_id]().label.array
        row = per_case[(per_case.case_id == case_id) & (per_case.class_name == "organ")].iloc[0]
        assert row["voxels_label"] == int((label == 1).sum())
    assert summary["n_holdout_cases"] == len(holdout)
    organ = summary["classes"]["organ"]["dice"]
    assert 0 <= organ["ci95"][0] <= organ["mean"] <= organ["ci95"][1] <= 1
    assert len(overlays) == min(2, len(holdout))
    flat = metrics_for_mlflow(summary)
    assert flat["holdout.organ.dice"]["value"] == pytest.approx(organ["mean"])
    assert not any("case-" in k for k in flat)
    for figure in (plot_per_case(per_case), plot_overlays(overlays)):
        assert isinstance(figure, matplotlib.figure.Figure)


def test_learning_curves_plot_only_validated_epochs():
    history = {"epochs": [{"epoch": 0, "train_loss": 1.0}, {"epoch": 1, "train_loss": 0.8, "val_dice": 0.5,
                          "val_dice_1": 0.7, "val_dice_2": 0.3}], "best_epoch": 1,
               "class_names": {"1": "organ", "2": "lesion"}}  # fmt: skip
    figure = plot_learning_curves(history)
    right = figure.axes[1]
    assert [line.get_label() for line in right.get_lines()][:3] == ["mean", "organ", "lesion"]
    assert list(right.get_lines()[0].get_xdata()) == [2]
