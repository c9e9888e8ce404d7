"""The promotion gate's statistics on constructed per-case rows whose right answer is known.

Each test names the defect of the earlier rule it would have caught: two point estimates of mean
Dice a hair apart (noise promoted), HD95 ignored, both-empty lesion cases scoring 1 for free,
follow-ups counted as independent patients, a first model deployed whatever its quality.
"""

from __future__ import annotations

import numpy as np
import pytest

from mvl_pipeline.evaluation.gate import (
    RegisterConfig,
    decide,
    gate_score,
    paired_difference,
    per_case,
)
from mvl_pipeline.evaluation.summary import bootstrap_ci

FAST = {"n_resamples": 999}  # the decisions below do not need the default 5000 resamples


def rows_of(cases: dict[str, tuple[str, float, float, float]]) -> list[dict]:
    """``{case_id: (patient, dice, hd95_mm, nsd)}`` -> per-class rows as ``score_cases`` writes
    them: the organ with those figures, and a lesion class absent from label and prediction."""
    rows = []
    for case_id, (patient, dice, hd95, nsd) in cases.items():
        rows.append({"case_id": case_id, "patient_id": patient, "class_value": 1, "class_name": "organ",
                     "voxels_label": 500, "voxels_pred": 480, "status": "ok", "dice": dice, "hd95_mm": hd95,
                     "nsd": nsd})  # fmt: skip
        rows.append({"case_id": case_id, "patient_id": patient, "class_value": 2, "class_name": "lesion",
                     "voxels_label": 0, "voxels_pred": 0, "status": "both_empty", "dice": 1.0, "hd95_mm": 0.0,
                     "nsd": 1.0})  # fmt: skip
    return rows


def paired(n: int, *, dice_gain: float, hd95_factor: float = 1.0, noise: float = 0.03, seed: int = 0,
           base_dice: float = 0.8) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """Champion and challenger rows of ``n`` patients (one case each): the challenger's Dice is the
    champion's + ``dice_gain`` + paired noise; its HD95 the champion's x ``hd95_factor``."""
    rng = np.random.default_rng(seed)
    champion, challenger = {}, {}
    for k in range(n):
        dice = float(np.clip(base_dice + rng.normal(0, 0.05), 0, 1))
        hd95 = float(rng.uniform(3.0, 5.0))
        champion[f"case-{k:03d}"] = (f"pt-{k:03d}", dice, hd95, 0.9)
        gain = dice_gain + float(rng.normal(0, noise)) if noise else dice_gain
        challenger[f"case-{k:03d}"] = (f"pt-{k:03d}", float(np.clip(dice + gain, 0, 1)), hd95 * hd95_factor, 0.9)
    return rows_of(challenger), rows_of(champion)


# -- the rule -------------------------------------------------------------------------------------
def test_a_true_improvement_of_005_on_30_patients_is_promoted():
    challenger, champion = paired(30, dice_gain=0.05, noise=0.05, seed=1)
    decision = decide(challenger, champion, RegisterConfig(**FAST))
    assert decision["promoted"] is True and decision["alias"] == "champion"
    dice = decision["paired"]["dice"]
    assert dice["n_patients"] == 30
    assert 0 < dice["ci"][0] < 0.05 < dice["ci"][1]
    assert "clears the margin" in decision["reason"]


def test_no_difference_is_promoted_at_most_at_about_the_nominal_rate():
    """200 draws of a challenger no better than the champion (paired noise only, 30 patients):
    the lower bound of a two-sided 95% interval above 0 is a one-sided 2.5% test. The earlier rule
    (a point estimate 0.005 above) promoted close to half of them."""
    config = RegisterConfig(**FAST)
    promoted = 0
    naive = 0
    for draw in range(200):
        challenger, champion = paired(30, dice_gain=0.0, noise=0.03, seed=1000 + draw)
        decision = decide(challenger, champion, config)
        promoted += decision["promoted"]
        naive += gate_score(challenger) >= gate_score(champion) + 0.005
    assert promoted / 200 <= 0.05 + 0.02, promoted
    assert naive / 200 > 0.15  # the same data fool the earlier point-estimate rule (45 of 200)


def test_plus_001_dice_with_hd95_ten_times_worse_is_not_promoted():
    challenger, champion = paired(30, dice_gain=0.01, hd95_factor=10.0, noise=0.002, seed=2)
    decision = decide(challenger, champion, RegisterConfig(**FAST))
    assert decision["paired"]["dice"]["ci"][0] > 0  # the Dice gain alone is real ...
    assert decision["promoted"] is False and decision["alias"] == "challenger"
    assert "HD95 may be worse" in decision["reason"]
    # ... and the same Dice gain with the champion's boundary quality is promoted: HD95 is what blocks
    same_boundary, champion = paired(30, dice_gain=0.01, hd95_factor=1.0, noise=0.002, seed=2)
    assert decide(same_boundary, champion, RegisterConfig(**FAST))["promoted"] is True


def test_a_dice_gain_with_a_worse_nsd_is_not_promoted():
    challenger, champion = paired(30, dice_gain=0.02, noise=0.002, seed=4)
    for row in challenger:
        if row["class_name"] == "organ":
            row["nsd"] = 0.8  # the champion's is 0.9
    decision = decide(challenger, champion, RegisterConfig(**FAST))
    assert decision["promoted"] is False and "NSD may be worse" in decision["reason"]


def test_a_gain_that_does_not_clear_the_margin_is_not_promoted():
    challenger, champion = paired(30, dice_gain=0.02, noise=0.002, seed=5)
    assert decide(challenger, champion, RegisterConfig(**FAST))["promoted"] is True
    decision = decide(challenger, champion, RegisterConfig(margin=0.03, **FAST))
    assert decision["promoted"] is False and "does not clear the margin 0.03" in decision["reason"]


@pytest.mark.parametrize("n", [1, 2])
def test_with_fewer_than_three_gate_patients_nothing_is_promoted_over_a_champion(n):
    challenger, champion = paired(n, dice_gain=0.2, noise=0.0)
    decision = decide(challenger, champion, RegisterConfig(**FAST))
    assert decision["promoted"] is False and decision["alias"] == "challenger"
    assert decision["paired"]["dice"]["ci"] is None
    assert f"fewer than 3 gate patients with paired results ({n})" in decision["reason"]


def test_follow_ups_are_grouped_by_patient_before_the_bootstrap():
    """One patient with 20 follow-ups that all improve, four patients that each get slightly
    worse: the 24 cases look like a clear gain, the 5 patients do not."""
    champion, challenger = {}, {}
    for k in range(20):
        champion[f"a-{k}"] = ("pt-a", 0.7, 4.0, 0.9)
        challenger[f"a-{k}"] = ("pt-a", 0.8, 4.0, 0.9)
    for patient, loss in (("pt-b", 0.02), ("pt-c", 0.01), ("pt-d", 0.0), ("pt-e", 0.03)):
        champion[patient] = (patient, 0.7, 4.0, 0.9)
        challenger[patient] = (patient, 0.7 - loss, 4.0, 0.9)
    config = RegisterConfig(**FAST)
    mine, theirs = per_case(rows_of(challenger)), per_case(rows_of(champion))
    dice = paired_difference(mine, theirs, "dice", config)
    assert dice["n_patients"] == 5
    assert dice["mean"] == pytest.approx((0.1 - 0.02 - 0.01 - 0.0 - 0.03) / 5)
    case_level = bootstrap_ci([mine[c]["dice"] - theirs[c]["dice"] for c in mine], n_resamples=999)
    assert case_level[0] > 0  # resampling cases would have promoted it
    decision = decide(rows_of(challenger), rows_of(champion), config)
    assert decision["promoted"] is False and "5 patients" in decision["reason"]


def test_the_gate_dice_is_dice_where_present():
    """A both-empty lesion class must not add a free 1.0 to a case's figure."""
    rows = rows_of({"c1": ("p1", 0.6, 3.0, 0.9), "c2": ("p2", 0.8, 3.0, 0.9)})
    assert gate_score(rows) == pytest.approx(0.7)  # not (0.6 + 1 + 0.8 + 1) / 4
    # the absent lesion class, not predicted: no false positive
    assert per_case(rows)["c1"] == {"patient_id": "p1", "dice": 0.6, "hd95_mm": 3.0, "nsd": 0.9, "false_positive": 0.0}
    # a case whose label holds no foreground class has no figure at all
    empty_case = [dict(r, voxels_label=0) for r in rows_of({"c3": ("p3", 0.0, 50.0, 0.0)})]
    assert per_case(empty_case)["c3"]["dice"] is None


# -- the first model ---------------------------------------------------------------------------------
def test_a_first_model_below_the_floor_gets_no_alias_and_says_why():
    weak, _ = paired(6, dice_gain=0.0, noise=0.0, base_dice=0.3)
    decision = decide(weak, None, RegisterConfig(first_model_floor=0.5, **FAST))
    assert decision["promoted"] is False and decision["alias"] is None
    assert decision["challenger_gate_dice"] < 0.5
    assert "< the floor 0.5" in decision["reason"] and "registered without an alias, not deployed" in decision["reason"]


def test_a_first_model_at_or_above_the_floor_becomes_champion():
    good, _ = paired(6, dice_gain=0.0, noise=0.0, base_dice=0.8)
    decision = decide(good, None, RegisterConfig(first_model_floor=0.5, **FAST))
    assert decision["promoted"] is True and decision["alias"] == "champion"
    assert decision["champion_gate_dice"] is None and ">= the floor 0.5" in decision["reason"]


def test_the_register_block_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown"):
        RegisterConfig.from_params({"margn": 0.01})


def test_a_challenger_that_calls_a_lesion_in_every_healthy_patient_is_not_promoted():
    """An honesty audit (2026-12-04): 8 patients with a lesion case and a healthy follow-up each;
    the challenger is +0.02 Dice on the lesions but predicts a 5000-voxel lesion (HD95 250 mm) in
    every healthy case. Dice, HD95 and NSD are measured where the label holds the class, so all
    three passed and it was promoted. Its false positives now stop it, and a challenger without
    them is still promoted."""
    rng = np.random.default_rng(3)

    def rows(gain: float, false_positives: bool) -> list[dict]:
        out = []
        for k in range(8):
            dice = float(0.7 + rng.normal(0, 0.02)) + gain
            base = {"patient_id": f"pt-{k}", "class_value": 2, "class_name": "lesion", "hd95_mm": 3.0, "nsd": 0.9}
            out.append(base | {"case_id": f"sick-{k}", "voxels_label": 400, "voxels_pred": 420, "status": "ok", "dice": dice})
            healthy = {"voxels_pred": 5000, "status": "false_positive", "dice": 0.0, "hd95_mm": 250.0, "nsd": 0.0}
            out.append(base | {"case_id": f"healthy-{k}", "voxels_label": 0, "voxels_pred": 0, "status": "both_empty",
                               "dice": 1.0, "hd95_mm": 0.0, "nsd": 1.0} | (healthy if false_positives else {}))  # fmt: skip
        return out

    rng = np.random.default_rng(3)
    champion = rows(0.0, false_positives=False)
    rng = np.random.default_rng(3)
    over_caller = rows(0.02, false_positives=True)
    decision = decide(over_caller, champion, RegisterConfig(**FAST))
    assert decision["promoted"] is False and decision["alias"] == "challenger"
    assert "where the label has none may be higher by up to 1.0000" in decision["reason"]
    assert decision["paired"]["false_positive"]["mean"] == 1.0
    rng = np.random.default_rng(3)
    careful = rows(0.02, false_positives=False)
    decision = decide(careful, champion, RegisterConfig(**FAST))
    assert decision["promoted"] is True and "false positives non-inferior" in decision["reason"]
    assert per_case(careful)["sick-0"]["false_positive"] is None  # its label holds every class


@pytest.mark.parametrize("n", [3, 4, 5, 6, 8])
def test_with_few_gate_patients_a_no_better_challenger_is_promoted_at_most_at_the_nominal_rate(n):
    """An audit (2026-12-05): with 3-5 gate patients (the sample drop has 4) the bootstrap bound
    alone promoted a challenger no better than the champion in 8-13% of draws, not 2.5%. The rule
    also needs the one-sided exact Wilcoxon test of the improvements over the margin: its smallest
    p with n patients is 1/2^n, so with 5 or fewer nothing is promoted over a champion."""
    config = RegisterConfig(**FAST)
    draws = 300
    promoted = sum(decide(*paired(n, dice_gain=0.0, noise=0.03, seed=7000 + draw), config)["promoted"] for draw in range(draws))
    assert promoted / draws <= 0.025 + 0.02, promoted  # binomial SD at 2.5% and 300 draws: 0.009
    if n <= 5:
        assert promoted == 0
        decision = decide(*paired(n, dice_gain=0.2, noise=0.01, seed=1), config)
        assert decision["promoted"] is False and decision["paired"]["dice"]["ci"][0] > 0  # the bound alone would
        assert f"at least 6 gate patients are needed ({n})" in decision["reason"]
        assert decision["paired"]["dice"]["p_improvement"] == pytest.approx(1 / 2**n)  # every patient improved


def test_a_non_finite_gate_figure_never_promotes():
    """Comparisons with NaN are false: a NaN Dice used to pass every 'may be worse' check."""
    challenger, champion = paired(30, dice_gain=0.05, noise=0.01, seed=3)
    challenger[0]["dice"] = float("nan")
    decision = decide(challenger, champion, RegisterConfig(**FAST))
    assert decision["promoted"] is False and "not a finite number" in decision["reason"]
    challenger, champion = paired(30, dice_gain=0.05, noise=0.01, seed=3)
    challenger[0]["hd95_mm"] = float("nan")
    assert decide(challenger, champion, RegisterConfig(**FAST))["promoted"] is False


def test_models_that_segment_different_classes_are_not_compared():
    """After a re-plan that added a label, 'Dice where present' averaged other classes for each
    model and the new class was never compared (an audit, 2026-12-05). Nothing is promoted."""
    challenger, champion = paired(30, dice_gain=0.1, noise=0.01, seed=8)
    older = [row for row in champion if row["class_value"] == 1]  # the champion's plan had one class
    decision = decide(challenger, older, RegisterConfig(**FAST))
    assert decision["promoted"] is False and decision["alias"] == "challenger"
    assert "different classes (challenger: 1 organ, 2 lesion; champion: 1 organ)" in decision["reason"]
    assert decide(challenger, champion, RegisterConfig(**FAST))["promoted"] is True  # same classes: compared
