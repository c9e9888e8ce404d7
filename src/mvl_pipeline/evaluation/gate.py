"""The promotion gate: which model a hospital runs, decided so that a worse model cannot win.

Both models are scored by the gate itself, now, on the gate patients (never the test patients),
each with its own plan and post-processing (``scoring``). The evidence is paired: per patient,
the challenger's figure minus the champion's, averaged over the patient's cases (follow-ups are
not independent). A case's Dice figure is the mean over the foreground classes its label holds
("Dice where present": an empty lesion class does not score 1 or 0 for free). The rule, in
plain words:

- **promote** only when the lower bound of the 95% BCa bootstrap interval (over patients) of the
  mean Dice improvement is above ``margin`` and the one-sided exact Wilcoxon signed-rank test of
  the per-patient improvements over ``margin`` gives p below (1 - ``confidence_level``) / 2 (the
  improvement is real, not noise: with a handful of patients the bootstrap bound alone promoted a
  no-better model in 8-13% of draws; the exact test's smallest p is 1/2^n, so with 5 gate patients
  or fewer nothing is promoted over a champion), AND the
  challenger is non-inferior on boundary quality: the upper bound of the HD95 difference
  (challenger - champion, mm) is at most ``hd95_tolerance_mm`` and the lower bound of the NSD
  difference at least ``-nsd_tolerance``; and non-inferior on false positives: in cases whose
  label lacks a class (a patient without a lesion), the share of such classes it predicts anyway
  may be higher by at most ``false_positive_tolerance`` (upper bound). Dice where present cannot
  see these: a model that calls a lesion in every healthy patient would otherwise pass;
- otherwise the challenger is registered with the alias ``challenger`` and the reason;
- a first model (no champion) becomes champion only when its mean gate Dice is at least
  ``first_model_floor`` (configured per task); below it, it is registered without an alias;
- with fewer than 3 gate patients there is no interval, so nothing is promoted over a champion;
- a figure that is not a finite number (a NaN Dice or HD95) promotes nothing: every comparison
  with NaN is false, so it would otherwise pass each "may be worse" check;
- models that segment different classes (a re-plan added a label) are not compared: nothing is
  promoted, and the reason says a person decides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mvl_pipeline.core.config import ConfigBlock
from mvl_pipeline.evaluation.summary import MIN_PATIENTS_FOR_CI, bootstrap_ci, describe, wilcoxon_p


@dataclass(frozen=True)
class RegisterConfig(ConfigBlock):
    """``params:register`` (conf/base/parameters_register.yml): what each value protects against
    is written there."""

    WHERE = "register"

    margin: float = 0.0
    hd95_tolerance_mm: float = 1.0
    nsd_tolerance: float = 0.02
    false_positive_tolerance: float = 0.05
    first_model_floor: float = 0.5
    confidence_level: float = 0.95
    n_resamples: int = 5000
    seed: int = 0
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"


def per_case(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{case_id: {"patient_id", "dice", "hd95_mm", "nsd", "false_positive"}}``: each of the
    first three the mean over the foreground classes present in the case's label (None when its
    label holds none); ``false_positive`` the share of the classes its label lacks that the model
    predicts anyway (None when the label holds every class)."""
    cases: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = cases.setdefault(row["case_id"], {"patient_id": str(row.get("patient_id") or row["case_id"]),
                                                  "_": [], "absent": []})  # fmt: skip
        if row["voxels_label"] > 0:
            entry["_"].append(row)
        elif row.get("voxels_pred") is not None:  # (a table without prediction sizes: not counted)
            entry["absent"].append(row["voxels_pred"] > 0)
    result = {}
    for case_id, entry in sorted(cases.items()):
        present, absent = entry.pop("_"), entry.pop("absent")
        result[case_id] = {
            "patient_id": entry["patient_id"],
            **{metric: (float(np.mean([float(r[metric]) for r in present])) if present else None)
               for metric in ("dice", "hd95_mm", "nsd")},
            "false_positive": float(np.mean(absent)) if absent else None,
        }  # fmt: skip
    return result


def gate_score(rows: Sequence[Mapping[str, Any]]) -> float:
    """A model's gate figure: mean over patients of the per-case Dice where present."""
    cases = [c for c in per_case(rows).values() if c["dice"] is not None]
    if not cases:
        return float("nan")
    return float(describe([c["dice"] for c in cases], [c["patient_id"] for c in cases])["mean"])


def patient_differences(
    challenger: Mapping[str, Mapping[str, Any]], champion: Mapping[str, Mapping[str, Any]], metric: str
) -> np.ndarray:
    """Per patient (sorted), the mean over its cases of (challenger - champion) on ``metric``."""
    by_patient: dict[str, list[float]] = {}
    for case_id, mine in challenger.items():
        theirs = champion.get(case_id)
        if theirs is None or mine[metric] is None or theirs[metric] is None:
            continue
        by_patient.setdefault(mine["patient_id"], []).append(float(mine[metric]) - float(theirs[metric]))
    return np.array([np.mean(v) for _, v in sorted(by_patient.items())], dtype=np.float64)


def paired_difference(
    challenger: Mapping[str, Mapping[str, Any]], champion: Mapping[str, Mapping[str, Any]], metric: str, config: RegisterConfig
) -> dict[str, Any]:
    """Mean over patients of (challenger - champion) on ``metric`` and its bootstrap interval (BCa;
    the percentile interval where BCa is undefined, ``ci_method`` says which)."""
    diffs = patient_differences(challenger, champion, metric)
    interval = bootstrap_ci(diffs, n_resamples=config.n_resamples, seed=config.seed, level=config.confidence_level)
    return {
        "mean": float(diffs.mean()) if diffs.size else None,
        "ci": None if interval is None else [interval[0], interval[1]],
        "ci_method": None if interval is None else interval.method,
        "n_patients": int(diffs.size),
    }


def improvement_p(diffs: np.ndarray, margin: float) -> float:
    """One-sided p (:func:`summary.wilcoxon_p`, "greater") that the per-patient improvements
    exceed ``margin``; 1.0 without any pair."""
    p = wilcoxon_p(np.asarray(diffs, dtype=np.float64) - margin, alternative="greater")
    return 1.0 if p is None else p


def patients_needed(alpha: float) -> int:
    """The fewest patients whose exact test can give p below ``alpha`` (1/2^n < alpha)."""
    return int(math.floor(math.log2(1.0 / alpha))) + 1


def _not_finite(stats: Mapping[str, Mapping[str, Any]]) -> list[str]:
    return [metric for metric, entry in stats.items()
            if any(v is not None and not math.isfinite(v) for v in [entry["mean"], *(entry["ci"] or [])])]  # fmt: skip


def decide(
    challenger_rows: Sequence[Mapping[str, Any]],
    champion_rows: Sequence[Mapping[str, Any]] | None,
    config: RegisterConfig,
) -> dict[str, Any]:
    """The gate's decision: ``promoted`` (bool), ``alias`` (or None), ``reason`` (plain words),
    and the statistics behind it."""
    mine = per_case(challenger_rows)
    score = gate_score(challenger_rows)
    decision: dict[str, Any] = {"challenger_gate_dice": score, "rule": config.to_dict()}
    if champion_rows is None:
        promoted = bool(score >= config.first_model_floor)
        reason = (
            f"first model: gate Dice {score:.4f} {'>=' if promoted else '<'} the floor {config.first_model_floor}"
            + ("" if promoted else ": registered without an alias, not deployed")
        )
        return decision | {"promoted": promoted, "alias": config.champion_alias if promoted else None,
                           "reason": reason, "champion_gate_dice": None}  # fmt: skip
    theirs = per_case(champion_rows)
    decision["champion_gate_dice"] = gate_score(champion_rows)
    classes = {name: sorted({(int(r["class_value"]), str(r["class_name"])) for r in rows})
               for name, rows in (("challenger", challenger_rows), ("champion", champion_rows))}  # fmt: skip
    if classes["challenger"] != classes["champion"]:
        # after a re-plan that added (or renamed) a label: "Dice where present" would average other
        # classes for each model, and the new class would not be compared at all
        listed = {k: ", ".join(f"{v} {n}" for v, n in c) for k, c in classes.items()}
        reason = (f"the models segment different classes (challenger: {listed['challenger']}; champion: "
                  f"{listed['champion']}): the gate cannot compare them, so it promotes nothing; a person decides "
                  f"(set the alias by hand after reading both reports)")  # fmt: skip
        return decision | {"promoted": False, "alias": config.challenger_alias, "reason": reason}
    stats = {m: paired_difference(mine, theirs, m, config) for m in ("dice", "hd95_mm", "nsd", "false_positive")}
    decision["paired"] = stats
    dice, hd95, nsd, false_positive = stats["dice"], stats["hd95_mm"], stats["nsd"], stats["false_positive"]
    alpha = (1 - config.confidence_level) / 2
    broken = _not_finite(stats)
    if not broken:
        dice["p_improvement"] = improvement_p(patient_differences(mine, theirs, "dice"), config.margin)
    if broken:
        reason = f"the paired {', '.join(broken)} difference is not a finite number (a NaN score): not promoted"
        promoted = False
    elif dice["ci"] is None:
        reason = f"fewer than {MIN_PATIENTS_FOR_CI} gate patients with paired results ({dice['n_patients']}): no evidence, not promoted"
        promoted = False
    elif dice["ci"][0] <= config.margin:
        reason = (f"Dice improvement {dice['mean']:+.4f} (95% CI {dice['ci'][0]:+.4f} to {dice['ci'][1]:+.4f}, "
                  f"{dice['n_patients']} patients) does not clear the margin {config.margin}")  # fmt: skip
        promoted = False
    elif (p := dice["p_improvement"]) >= alpha:
        needed = patients_needed(alpha)
        reason = (f"Dice improvement {dice['mean']:+.4f} (95% CI {dice['ci'][0]:+.4f} to {dice['ci'][1]:+.4f}) but the "
                  f"one-sided exact Wilcoxon test of the per-patient improvements over the margin gives p {p:.4f}, not "
                  f"below {alpha:g}" + (f": at least {needed} gate patients are needed ({dice['n_patients']})"
                                        if dice["n_patients"] < needed else ""))  # fmt: skip
        promoted = False
    elif hd95["ci"] is not None and hd95["ci"][1] > config.hd95_tolerance_mm:
        reason = (f"Dice improved ({dice['ci'][0]:+.4f} to {dice['ci'][1]:+.4f}) but HD95 may be worse by up to "
                  f"{hd95['ci'][1]:.2f} mm (tolerance {config.hd95_tolerance_mm} mm)")  # fmt: skip
        promoted = False
    elif nsd["ci"] is not None and nsd["ci"][0] < -config.nsd_tolerance:
        reason = (f"Dice improved ({dice['ci'][0]:+.4f} to {dice['ci'][1]:+.4f}) but NSD may be worse by up to "
                  f"{-nsd['ci'][0]:.4f} (tolerance {config.nsd_tolerance})")  # fmt: skip
        promoted = False
    elif false_positive["ci"] is not None and false_positive["ci"][1] > config.false_positive_tolerance:
        reason = (f"Dice improved ({dice['ci'][0]:+.4f} to {dice['ci'][1]:+.4f}) but the share of classes predicted "
                  f"where the label has none may be higher by up to {false_positive['ci'][1]:.4f} (tolerance "
                  f"{config.false_positive_tolerance}; {false_positive['n_patients']} patients)")  # fmt: skip
        promoted = False
    else:
        reason = (f"Dice improvement {dice['mean']:+.4f} (95% CI {dice['ci'][0]:+.4f} to {dice['ci'][1]:+.4f}, "
                  f"{dice['n_patients']} patients) clears the margin {config.margin}; HD95, NSD and false positives "
                  "non-inferior")  # fmt: skip
        promoted = True
    return decision | {"promoted": promoted, "alias": config.champion_alias if promoted else config.challenger_alias,
                       "reason": reason}  # fmt: skip
