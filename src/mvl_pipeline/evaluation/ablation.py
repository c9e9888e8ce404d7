"""The statistics of the ablation (pipeline ``ablation``), fixed before any result is seen in
``conf/base/parameters_ablation.yml`` (``ablation.statistics``).

The unit of evidence is the PATIENT. From the per-(arm, seed, case, class) rows:

1. a case's endpoint is the mean over the foreground classes its label holds ("where present",
   :func:`evaluation.gate.per_case`: the registry gate's own definition);
2. averaged over the seeds of its arm (the seeds are repeats of one arm, not independent
   evidence), then over the cases of each patient;
3. each arm is compared with the reference arm on the same patients: the mean paired difference
   (arm - reference) with a bootstrap interval over patients (``summary.bootstrap_ci``: BCa),
   scipy's Wilcoxon signed-rank p-value (zero differences dropped; exact up to 50 pairs without
   ties, else the normal approximation), Holm's correction over the arms compared on that
   endpoint, and the smallest difference this design could have detected: the mean paired
   difference that this Wilcoxon test, at Holm's first level ``alpha / m``, finds with the stated
   power in a simulation of ``n`` normal per-patient differences with the observed SD
   (:func:`minimum_detectable_difference`; the normal-approximation formula
   ``(z(1 - alpha/2) + z(power)) SD / sqrt(n)`` overstated the power: 0.72, not 0.80, at 30
   patients). Where the exact test cannot reach ``alpha / m`` at all (its smallest p-value is
   ``2 / 2^n``: 6 patients and 5 comparisons), no verdict is possible and none is given;
4. the seed-to-seed spread of each arm (its mean per seed) says how much one training run moves.

The primary endpoint is Dice; HD95 and NSD are secondary, summarised the same way (HD95 lower is
better). A comparison concludes "better"/"worse" only when the Holm-adjusted p-value is below
alpha AND the interval excludes 0; otherwise "no detectable difference" (stated with the minimum
detectable difference), or "inconclusive" when the two disagree.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from mvl_pipeline.core.config import ConfigBlock
from mvl_pipeline.evaluation.gate import per_case
from mvl_pipeline.evaluation.summary import MIN_PATIENTS_FOR_CI, bootstrap_ci, wilcoxon_p

ENDPOINTS = ("dice", "hd95_mm", "nsd")
HIGHER_IS_BETTER = {"dice": True, "hd95_mm": False, "nsd": True}
TESTS = ("wilcoxon",)
CORRECTIONS = ("holm",)


@dataclass(frozen=True)
class StatisticsPlan(ConfigBlock):
    """``ablation.statistics``: what is tested, how, at which level (fixed in advance)."""

    WHERE = "ablation.statistics"

    primary_endpoint: str = "dice"
    secondary_endpoints: tuple[str, ...] = ("hd95_mm", "nsd")
    test: str = "wilcoxon"
    correction: str = "holm"
    alpha: float = 0.05
    power: float = 0.8
    confidence_level: float = 0.95
    n_resamples: int = 10000
    bootstrap_seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "secondary_endpoints", tuple(self.secondary_endpoints))
        bad = [e for e in (self.primary_endpoint, *self.secondary_endpoints) if e not in ENDPOINTS]
        if bad:
            raise ValueError(f"ablation.statistics endpoints {bad} unknown; known: {list(ENDPOINTS)}")
        if self.primary_endpoint in self.secondary_endpoints:
            raise ValueError("ablation.statistics: the primary endpoint cannot also be secondary")
        if self.test not in TESTS:
            raise ValueError(f"ablation.statistics.test must be one of {list(TESTS)}; got {self.test!r}")
        if self.correction not in CORRECTIONS:
            raise ValueError(f"ablation.statistics.correction must be one of {list(CORRECTIONS)}; got {self.correction!r}")
        for name in ("alpha", "power", "confidence_level"):
            if not 0.0 < float(getattr(self, name)) < 1.0:
                raise ValueError(f"ablation.statistics.{name} must be in (0, 1); got {getattr(self, name)}")
        if self.n_resamples < 100:
            raise ValueError(f"ablation.statistics.n_resamples must be >= 100; got {self.n_resamples}")

    @property
    def endpoints(self) -> tuple[str, ...]:
        return (self.primary_endpoint, *self.secondary_endpoints)


# --- the tests, on paired differences (one value per patient) ------------------------------------


def holm(pvalues: Mapping[str, float | None]) -> dict[str, float | None]:
    """Holm's step-down adjustment of a family of p-values (None stays None, not counted)."""
    ranked = sorted((p, key) for key, p in pvalues.items() if p is not None)
    adjusted: dict[str, float | None] = {key: None for key, p in pvalues.items() if p is None}
    running = 0.0
    for index, (p, key) in enumerate(ranked):
        running = max(running, min(1.0, (len(ranked) - index) * p))
        adjusted[key] = running
    return adjusted


def smallest_p(n: int) -> float:
    """The smallest two-sided p-value :func:`wilcoxon_p` can give with ``n`` non-zero differences
    without ties: ``2 / 2^n`` for the exact test (up to 50 pairs); the normal approximation beyond
    has no useful floor (0)."""
    return 2.0 / 2.0**n if n <= 50 else 0.0


#: The simulation behind :func:`minimum_detectable_difference`: draws per candidate difference,
#: its seed (fixed: the same design always states the same figure) and bisection steps.
MDD_DRAWS, MDD_SEED, MDD_STEPS = 4000, 20261205, 24


@functools.lru_cache(maxsize=64)
def _mdd_factor(n: int, alpha: float, power: float) -> float | None:
    """The smallest shift, in SDs, of ``n`` normal differences that :func:`wilcoxon_p`'s test at
    ``alpha`` rejects in at least ``power`` of ``MDD_DRAWS`` draws; None if no shift can."""
    if smallest_p(n) >= alpha:
        return None
    noise = np.random.default_rng(MDD_SEED).standard_normal((MDD_DRAWS, n))
    method = "exact" if n <= 50 else "asymptotic"  # as wilcoxon_p: continuous draws have no ties

    def reached(shift: float) -> bool:
        pvalues = stats.wilcoxon(noise + shift, axis=1, zero_method="wilcox", method=method).pvalue
        return float(np.mean(pvalues < alpha)) >= power

    low, high = 0.0, 1.0
    while not reached(high):
        low, high = high, 2 * high
        if high > 64:
            return None
    for _ in range(MDD_STEPS):  # common random numbers: the rejection rate grows with the shift
        middle = (low + high) / 2
        low, high = (low, middle) if reached(middle) else (middle, high)
    return high


def minimum_detectable_difference(sd: float | None, n: int, *, alpha: float, power: float) -> float | None:
    """The mean paired difference that this module's test (:func:`wilcoxon_p`, two-sided, at
    ``alpha``) detects with ``power``, for ``n`` patients whose differences have SD ``sd``: found
    by simulating the test on normal differences (``MDD_DRAWS`` draws, a fixed seed), not by the
    normal approximation, which is 9% too small at 30 patients and 29% at 10. None where the test
    cannot reach ``alpha`` with ``n`` patients. For a family of ``m`` Holm-corrected comparisons,
    pass ``alpha / m``: the level Holm's first step tests at, so the stated power holds for any arm
    of the family (:func:`summarise_ablation`). The decision also needs the bootstrap interval to
    exclude 0, which costs a few points of power more."""
    if sd is None or n < 2 or not math.isfinite(sd):
        return None
    factor = _mdd_factor(int(n), float(alpha), float(power))
    return None if factor is None else float(factor * sd)


def compare(differences: Sequence[float], plan: StatisticsPlan) -> dict[str, Any]:
    """Mean paired difference, its bootstrap interval over patients, the test's p-value, the SD of
    the differences and the minimum detectable difference."""
    diffs = np.asarray(differences, dtype=np.float64)
    n = int(diffs.size)
    sd = float(diffs.std(ddof=1)) if n > 1 else None
    interval = bootstrap_ci(diffs, n_resamples=plan.n_resamples, seed=plan.bootstrap_seed, level=plan.confidence_level)
    return {
        "n_patients": n,
        "mean_difference": float(diffs.mean()) if n else None,
        "ci": None if interval is None else [interval[0], interval[1]],
        "ci_method": None if interval is None else interval.method,
        "sd_difference": sd,
        "p_value": wilcoxon_p(diffs),
        "minimum_detectable_difference": minimum_detectable_difference(sd, n, alpha=plan.alpha, power=plan.power),
    }


def verdict(entry: Mapping[str, Any], endpoint: str, alpha: float) -> str:
    """better | worse | no detectable difference | inconclusive | not testable."""
    p, ci, mean = entry.get("p_adjusted"), entry.get("ci"), entry.get("mean_difference")
    if p is None or ci is None or mean is None or entry["n_patients"] < MIN_PATIENTS_FOR_CI:
        return "not testable"
    excludes_zero = ci[0] > 0 or ci[1] < 0
    if p < alpha and excludes_zero:
        return "better" if (mean > 0) == HIGHER_IS_BETTER[endpoint] else "worse"
    if p < alpha or excludes_zero:
        return "inconclusive"
    return "no detectable difference"


# --- from the results table to the summary --------------------------------------------------------


def case_endpoints(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (arm, seed, case): patient and each endpoint over the classes present."""
    records = []
    for (arm, seed), group in results.groupby(["arm", "seed"], sort=True):
        for case_id, entry in per_case(group.to_dict("records")).items():
            records.append({"arm": arm, "seed": int(seed), "case_id": case_id, **entry})
    return pd.DataFrame(records, columns=["arm", "seed", "case_id", "patient_id", *ENDPOINTS])


def check_complete(endpoints: pd.DataFrame, arms: Sequence[str], seeds: Sequence[int]) -> None:
    """Every arm x seed scored on the same cases: otherwise the pairing is broken."""
    expected = {(a, int(s)) for a in arms for s in seeds}
    found = set(zip(endpoints["arm"], endpoints["seed"].astype(int), strict=True))
    missing = sorted(expected - found)
    if missing:
        raise ValueError(f"the ablation results lack the trials (arm, seed) {missing}")
    case_sets = {key: frozenset(g["case_id"]) for key, g in endpoints.groupby(["arm", "seed"])}
    if len(set(case_sets.values())) > 1:
        raise ValueError("the ablation trials were scored on different cases: the per-case pairing is broken")


def _patient_values(frame: pd.DataFrame, metric: str) -> pd.Series:
    """Mean per patient of the per-case values (NaN-free: cases without the endpoint dropped)."""
    defined = frame[frame[metric].notna()]
    return defined.groupby("patient_id")[metric].mean().sort_index()


def _describe_arm(averaged: pd.DataFrame, endpoints: pd.DataFrame, metric: str, plan: StatisticsPlan) -> dict[str, Any]:
    values = _patient_values(averaged, metric)
    interval = bootstrap_ci(values.to_numpy(), n_resamples=plan.n_resamples, seed=plan.bootstrap_seed, level=plan.confidence_level)
    per_seed = {str(s): float(_patient_values(g, metric).mean()) for s, g in endpoints.groupby("seed")}
    spread = list(per_seed.values())
    return {
        "mean": float(values.mean()) if len(values) else None,
        "ci": None if interval is None else [interval[0], interval[1]],
        "ci_method": None if interval is None else interval.method,
        "n_patients": len(values),
        "per_seed": per_seed,
        "seed_sd": float(np.std(spread, ddof=1)) if len(spread) > 1 else None,
        "seed_range": [min(spread), max(spread)] if spread else None,
    }


def summarise_ablation(
    results: pd.DataFrame, *, arms: Sequence[str], seeds: Sequence[int], reference: str, plan: StatisticsPlan
) -> dict[str, Any]:
    """Per arm, per endpoint: the arm's mean and interval, its seed spread; per comparison with
    the reference: difference, interval, p-values (raw and Holm), detectable difference, verdict."""
    endpoints = case_endpoints(results)
    check_complete(endpoints, arms, seeds)
    averaged = endpoints.groupby(["arm", "case_id", "patient_id"], as_index=False)[list(ENDPOINTS)].mean()
    summary: dict[str, Any] = {"arms": {}, "comparisons": {}}
    for arm in arms:
        summary["arms"][arm] = {m: _describe_arm(averaged[averaged.arm == arm], endpoints[endpoints.arm == arm], m, plan)
                                for m in plan.endpoints}  # fmt: skip
    for metric in plan.endpoints:
        reference_values = _patient_values(averaged[averaged.arm == reference], metric)
        family: dict[str, dict[str, Any]] = {}
        for arm in (a for a in arms if a != reference):
            values = _patient_values(averaged[averaged.arm == arm], metric)
            paired = values.index.intersection(reference_values.index)
            entry = compare((values[paired] - reference_values[paired]).to_numpy(), plan)
            entry["per_seed_difference"] = _per_seed_difference(endpoints, arm, reference, metric)
            family[arm] = entry
        adjusted = holm({a: e["p_value"] for a, e in family.items()})
        tested = sum(p is not None for p in adjusted.values())
        for arm, p in adjusted.items():
            entry = family[arm]
            entry["p_adjusted"] = p
            entry["verdict"] = verdict(entry, metric, plan.alpha)
            # a verdict needs the Holm-adjusted p below alpha: the difference detectable with the
            # stated power is the one at alpha / m, not at alpha (which overstated the power)
            entry["mdd_alpha"] = plan.alpha / max(tested, 1)
            entry["minimum_detectable_difference"] = minimum_detectable_difference(
                entry["sd_difference"], entry["n_patients"], alpha=entry["mdd_alpha"], power=plan.power
            )
            if entry["verdict"] != "not testable" and smallest_p(entry["n_patients"]) >= entry["mdd_alpha"]:
                # no p-value this test can give survives Holm: "no detectable difference" (or
                # "inconclusive" for a large effect) would read as a finding
                entry["verdict"] = "not testable"
                entry["not_testable_because"] = (
                    f"with {entry['n_patients']} patients the exact test's smallest p-value, 2/2^{entry['n_patients']} = "
                    f"{smallest_p(entry['n_patients']):.3g}, is not below {plan.alpha} / {max(tested, 1)} (Holm over "
                    f"{max(tested, 1)} comparisons): no difference of any size could get a verdict"
                )
        summary["comparisons"][metric] = family
    return summary


def _per_seed_difference(endpoints: pd.DataFrame, arm: str, reference: str, metric: str) -> dict[str, float | None]:
    """Mean over patients of (arm - reference) within each seed: does the sign hold per seed?"""
    out: dict[str, float | None] = {}
    for seed in sorted(endpoints["seed"].unique()):
        mine = _patient_values(endpoints[(endpoints.arm == arm) & (endpoints.seed == seed)], metric)
        theirs = _patient_values(endpoints[(endpoints.arm == reference) & (endpoints.seed == seed)], metric)
        paired = mine.index.intersection(theirs.index)
        out[str(int(seed))] = float((mine[paired] - theirs[paired]).mean()) if len(paired) else None
    return out


PLATEAU_TOLERANCE = 0.01
# the criterion in words, as the report and the README section state it
PLATEAU_RULE = f"the best of the last third of the validations gains less than {PLATEAU_TOLERANCE:g} over the best before it"


def plateau(history: Sequence[Mapping[str, Any]], *, tolerance: float = PLATEAU_TOLERANCE) -> dict[str, Any]:
    """Whether validation Dice had stopped rising: the best of the last third of the validations
    gains less than ``tolerance`` over the best before it."""
    curve = [float(e["val_dice"]) for e in history if e.get("val_dice") is not None]
    if len(curve) < 3:
        return {"reached": None, "gain_last_third": None, "validations": len(curve)}
    cut = len(curve) - max(1, len(curve) // 3)
    gain = max(curve[cut:]) - max(curve[:cut])
    return {"reached": bool(gain < tolerance), "gain_last_third": float(gain), "validations": len(curve)}


def json_safe(value: Any) -> Any:
    """NaN / inf -> None and numpy scalars -> Python numbers, recursively (JSON holds no NaN)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
