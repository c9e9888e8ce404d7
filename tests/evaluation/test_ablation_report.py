"""The ablation's report says what the numbers support, from summaries of constructed results
whose answer is known: a real difference is named as such, a null result is "no detectable
difference" with the smallest difference the design could have detected; the summary node, the
report, the forest plot and the learning curves follow the design's arms."""

from __future__ import annotations

import json
import re

import pytest

from mvl_pipeline.evaluation.ablation_report import headline, readme_section, render_report
from mvl_pipeline.pipelines.ablation.nodes import (
    ablation_metrics,
    forest_plot,
    learning_curves,
    summarise_ablation,
)
from tests.support.ablation_results import histories, results

PARAMS = {"statistics": {"n_resamples": 1000}}


def summary_of(effects: dict[str, float]) -> dict:
    arms = list(effects)
    params = PARAMS | {"arms": arms, "seeds": [0, 1, 2], "reference": arms[0],
                       "arm_models": {a: {"llm": {"mode": "none"}} for a in arms}}  # fmt: skip
    summary = summarise_ablation(results(effects), histories(arms, [0, 1, 2]), params)
    json.dumps(summary, allow_nan=False)  # summary.json holds no NaN
    return summary


def test_a_null_result_is_no_detectable_difference_with_the_detectable_difference_stated():
    summary = summary_of({"pretrained": 0.0, "shuffled": 0.0, "none": 0.0})
    mdds = [e["minimum_detectable_difference"] for e in summary["comparisons"]["dice"].values()]
    text = headline(summary)
    assert text.startswith("No detectable Dice difference between `pretrained` and any other arm")
    assert f"{min(mdds):.4f}" in text and f"{max(mdds):.4f}" in text
    report = render_report(summary)
    assert "No detectable Dice difference between `shuffled` and `pretrained`" in report
    assert re.search(r"could have detected a mean difference of 0\.0\d{3} or more \(80% power, two-sided alpha 0\.0\d+: "
                     r"0\.05 Holm-adjusted over the comparisons\)", report)  # fmt: skip
    for title in ("## Primary endpoint: Dice", "## Secondary endpoint: HD95 (mm) (lower is better)", "## Secondary endpoint: NSD"):
        assert title in report
    assert "scored better" not in report and "scored worse" not in report
    assert "No trial skipped a step for a non-finite gradient" in report
    assert "peak learning rate" not in report  # a design from before ablation.trial.lr: not named
    # the design paragraph describes how the stated figure is found (it was the normal formula's text)
    assert "simulation" in report and "Holm's first level" in report and "z(1-alpha/2)" not in report
    # every interval here is BCa; one that fell back to the percentile method is counted in the text
    assert {e["ci_method"] for family in summary["comparisons"].values() for e in family.values()} == {"BCa"}
    assert "by the percentile method" not in report
    summary["comparisons"]["dice"]["shuffled"]["ci_method"] = "percentile"
    assert "1 interval(s) by the percentile method, where BCa is undefined" in render_report(summary)


def test_a_real_difference_is_named_with_its_direction_and_figures():
    summary = summary_of({"pretrained": 0.0, "shuffled": -0.04, "random": -0.04, "none": 0.0})
    text = headline(summary)
    assert text.startswith("`pretrained` scored better Dice than `shuffled`, `random`") and "`none`" in text
    report = render_report(summary)
    assert "`shuffled` scored lower Dice than `pretrained` (worse): -0.04" in report
    assert "| `shuffled` |" in report and "| worse |" in report
    mixed = headline(summary_of({"pretrained": 0.0, "shuffled": 0.05, "none": 0.0}))
    assert mixed == "`pretrained` scored worse Dice than `shuffled`; no detectable difference against `none`."


def test_the_summary_follows_the_design_and_feeds_mlflow_and_the_figures():
    summary = summary_of({"pretrained": 0.0, "shuffled": 0.0, "none": 0.02})
    assert list(summary["arms"]) == ["pretrained", "shuffled", "none"]
    assert list(summary["training"]) == ["pretrained", "shuffled", "none"]
    assert summary["training"]["none"]["0"]["plateau"]["validations"] == 6
    assert summary["training"]["none"]["1"]["skipped_steps"] == 0
    assert summary["design"]["n_test_patients"] == 30 and summary["design"]["statistics"]["test"] == "wilcoxon"
    metrics = ablation_metrics(summary)
    assert metrics["none.dice.mean_difference"]["value"] == pytest.approx(summary["comparisons"]["dice"]["none"]["mean_difference"])
    assert not any("pt-" in name or "case" in name for name in metrics)
    forest = forest_plot(summary)
    assert [ax.get_title() for ax in forest.axes] == ["Dice", "HD95 (mm)", "NSD"]
    assert [t.get_text() for t in forest.axes[0].get_yticklabels()] == ["shuffled", "none"]
    curves = learning_curves(histories(["pretrained", "shuffled", "none"], [0, 1, 2]))
    assert [ax.get_title() for ax in curves.axes[:3]] == ["pretrained", "shuffled", "none"]
    assert len(curves.axes[0].get_lines()) == 3  # one curve per seed


def test_the_report_names_every_trial_that_skipped_steps_for_a_non_finite_gradient():
    arms = ["pretrained", "none"]
    trials = histories(arms, [0, 1, 2])
    trials["arms"]["none"]["1"]["history"][2]["skipped_steps"] = 2
    trials["arms"]["none"]["1"]["history"][4]["skipped_steps"] = 1
    params = PARAMS | {"arms": arms, "seeds": [0, 1, 2], "reference": "pretrained"}
    summary = summarise_ablation(results({"pretrained": 0.0, "none": 0.0}), trials, params)
    assert summary["training"]["none"]["1"]["skipped_steps"] == 3 and summary["training"]["none"]["0"]["skipped_steps"] == 0
    report = render_report(summary)
    assert "Steps skipped for a non-finite gradient" in report and "took fewer optimiser steps" in report
    assert report.count("seed 1: 3") == 1 and "`none` seed 1: 3." in report
    assert "No trial skipped a step" not in report


def test_the_summary_node_refuses_results_of_another_design():
    params = PARAMS | {"arms": ["pretrained", "none"], "seeds": [0, 1, 2], "reference": "pretrained"}
    with pytest.raises(ValueError, match="other arms or seeds"):
        summarise_ablation(results({"pretrained": 0.0, "none": 0.0}), histories(["pretrained", "none"], [0, 1]), params)


def test_the_readme_section_carries_the_conclusion_and_its_source():
    summary = summary_of({"pretrained": 0.0, "none": 0.0})
    section = readme_section(summary, summary_path="data/08_reporting/ablation/summary.json")
    assert "python -m mvl_pipeline.commands.ablation_readme data/08_reporting/ablation/summary.json README.md" in section
    assert f"**{headline(summary)}**" in section and "| `none` |" in section


def test_the_report_and_the_readme_section_count_the_trials_that_reached_the_plateau():
    # the README's table said nothing of whether its arms were compared trained out or still rising
    arms = ["pretrained", "none"]
    trials = histories(arms, [0, 1, 2])  # rising curves: the last third gains 0.04, no plateau
    flat = [{"epoch": e, "train_loss": 0.5, "val_dice": 0.8} for e in range(6)]
    trials["arms"]["none"]["0"]["history"] = flat
    trials["arms"]["none"]["2"]["history"] = flat
    trials["arms"]["pretrained"]["1"]["history"] = flat[:2]  # two validations: too few to tell
    params = PARAMS | {"arms": arms, "seeds": [0, 1, 2], "reference": "pretrained"}
    summary = summarise_ablation(results({"pretrained": 0.0, "none": 0.0}), trials, params)
    count = "Reached in 2 of 6 trials (1 with too few validations to tell): `pretrained` 0 of 3, `none` 2 of 3."
    assert count in render_report(summary)
    assert count in readme_section(summary, summary_path="data/08_reporting/ablation/summary.json")
    assert "Reached in 0 of 9 trials: `pretrained` 0 of 3, `shuffled` 0 of 3, `none` 0 of 3." in render_report(
        summary_of({"pretrained": 0.0, "shuffled": 0.0, "none": 0.0}))  # fmt: skip
