"""The ablation's report, written from its summary (``evaluation.ablation``) and the trials'
histories: ``report.md``, the README section (``commands/ablation_readme.py``), a forest plot of
each arm's paired difference to the reference and the learning curves of every arm and seed.

Every sentence of a conclusion follows from the verdicts of the summary (``ablation.verdict``):
"better"/"worse" only with a Holm-adjusted p-value below alpha AND an interval without 0;
otherwise "no detectable difference", stated with the smallest difference the design could have
detected, so that a null result is not read as "the same".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from mvl_pipeline.evaluation.ablation import HIGHER_IS_BETTER, PLATEAU_RULE  # noqa: E402

LABELS = {"dice": "Dice", "hd95_mm": "HD95 (mm)", "nsd": "NSD"}
DIGITS = {"dice": 3, "hd95_mm": 2, "nsd": 3}


def _num(value: float | None, metric: str, *, signed: bool = False) -> str:
    """A figure; differences (``signed``) with one digit more than levels."""
    if value is None:
        return "n/a"
    return f"{value:{'+' if signed else ''}.{DIGITS[metric] + int(signed)}f}"


def _mdd(value: float | None, metric: str) -> str:
    """A minimum detectable difference, to the digits of a difference."""
    return _num(value, metric, signed=True).lstrip("+")


def _ci(ci: list[float] | None, metric: str, *, signed: bool = False) -> str:
    return "no interval" if ci is None else f"{_num(ci[0], metric, signed=signed)} to {_num(ci[1], metric, signed=signed)}"


def _p(value: float | None) -> str:
    return "n/a" if value is None else ("< 0.001" if value < 0.001 else f"{value:.3f}")


def _percentile_note(summary: Mapping[str, Any]) -> str:
    """Says how many intervals fell back to the percentile bootstrap (BCa undefined), if any."""
    n = sum(e.get("ci_method") == "percentile" for family in summary["comparisons"].values() for e in family.values())
    return f"; {n} interval(s) by the percentile method, where BCa is undefined" if n else ""


def arm_sentence(arm: str, entry: Mapping[str, Any], metric: str, design: Mapping[str, Any]) -> str:
    """One sentence: what the numbers say about ``arm`` against the reference on ``metric``."""
    reference, label = design["reference"], LABELS[metric]
    plan = design["statistics"]
    figures = (f"{_num(entry['mean_difference'], metric, signed=True)} ({plan['confidence_level']:.0%} CI "
               f"{_ci(entry['ci'], metric, signed=True)}; Holm-adjusted Wilcoxon p {_p(entry['p_adjusted'])}, "
               f"{entry['n_patients']} patients)")  # fmt: skip
    mdd = entry.get("minimum_detectable_difference")
    level = entry.get("mdd_alpha", plan["alpha"])
    detectable = (f"this design could have detected a mean difference of {_mdd(mdd, metric)} or more "
                  f"({plan['power']:.0%} power, two-sided alpha {level:.3g}: {plan['alpha']} Holm-adjusted over the "
                  "comparisons)") if mdd is not None else ""  # fmt: skip
    verdict = entry["verdict"]
    if verdict in ("better", "worse"):
        direction = "higher" if (entry["mean_difference"] > 0) else "lower"
        quality = "better" if verdict == "better" else "worse"
        return f"`{arm}` scored {direction} {label} than `{reference}` ({quality}): {figures}."
    if verdict == "no detectable difference":
        return f"No detectable {label} difference between `{arm}` and `{reference}`: {figures}; {detectable}."
    if verdict == "inconclusive":
        return f"`{arm}` vs `{reference}` on {label} is inconclusive (the test and the interval disagree): {figures}."
    why = entry.get("not_testable_because") or f"{entry['n_patients']} paired patients"
    return f"`{arm}` vs `{reference}` on {label} could not be tested ({why})."


def headline(summary: Mapping[str, Any]) -> str:
    """The answer to the question, from the primary endpoint's verdicts."""
    design = summary["design"]
    metric, reference = design["statistics"]["primary_endpoint"], design["reference"]
    family = summary["comparisons"][metric]
    verdicts = {arm: entry["verdict"] for arm, entry in family.items()}
    # a verdict is about the arm: an arm "worse" than the reference means the reference won
    won = [a for a, v in verdicts.items() if v == "worse"]
    lost = [a for a, v in verdicts.items() if v == "better"]
    listed = lambda arms: ", ".join(f"`{a}`" for a in arms)  # noqa: E731
    if len(won) == len(verdicts):
        return f"`{reference}` scored better {LABELS[metric]} than {'every other arm: ' if len(won) > 1 else ''}{listed(won)}."
    if all(v == "no detectable difference" for v in verdicts.values()):
        mdds = [e["minimum_detectable_difference"] for e in family.values() if e.get("minimum_detectable_difference") is not None]
        low, high = (_mdd(min(mdds), metric), _mdd(max(mdds), metric)) if mdds else ("n/a", "n/a")
        span = low if low == high else f"{low}-{high}"
        return (f"No detectable {LABELS[metric]} difference between `{reference}` and any other arm: the design "
                f"could have detected mean differences of {span} or more.")  # fmt: skip
    inconclusive = [a for a, v in verdicts.items() if v in ("inconclusive", "not testable")]
    null = [a for a, v in verdicts.items() if v == "no detectable difference"]
    parts = [f"`{reference}` scored better {LABELS[metric]} than {listed(won)}"] if won else []
    if lost:
        parts.append(f"worse than {listed(lost)}" if parts else f"`{reference}` scored worse {LABELS[metric]} than {listed(lost)}")
    if null:
        parts.append(f"{'no' if parts else f'`{reference}`: no'} detectable difference against {listed(null)}")
    if inconclusive:
        parts.append(f"{'no' if parts else f'`{reference}`: no'} clear answer against {listed(inconclusive)}")
    return "; ".join(parts) + "."


def _table(summary: Mapping[str, Any], metric: str) -> list[str]:
    design = summary["design"]
    reference = design["reference"]
    level = f"{design['statistics']['confidence_level']:.0%}"
    lines = [
        f"| arm | mean ({level} CI) | seed SD (per-seed means) | difference vs `{reference}` ({level} CI) "
        "| Wilcoxon p | Holm p | min. detectable difference | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, entries in summary["arms"].items():
        e = entries[metric]
        seeds = ", ".join(_num(v, metric) for v in e["per_seed"].values())
        c = summary["comparisons"][metric].get(arm)
        cells = ["(reference)", "", "", "", ""] if c is None else [
            f"{_num(c['mean_difference'], metric, signed=True)} ({_ci(c['ci'], metric, signed=True)})",
            _p(c["p_value"]), _p(c["p_adjusted"]), _mdd(c["minimum_detectable_difference"], metric), c["verdict"],
        ]  # fmt: skip
        lines.append(f"| `{arm}` | {_num(e['mean'], metric)} ({_ci(e['ci'], metric)}) | {_num(e['seed_sd'], metric)} "
                     f"({seeds}) | " + " | ".join(cells) + " |")  # fmt: skip
    return lines


def render_report(summary: Mapping[str, Any]) -> str:
    """report.md: design, the conclusion, one table per endpoint, per-seed differences, training."""
    design = summary["design"]
    plan = design["statistics"]
    primary, reference = plan["primary_endpoint"], design["reference"]
    out = [
        "# Ablation: does the frozen LLM layer help?", "",
        f"Experiment `{design['experiment']}`: data version `{design['data_version']}`, plan `{design['plan_id']}`, "
        f"git commit `{design['git_commit']}`. Arms {', '.join(f'`{a}`' for a in design['arms'])}; reference "
        f"`{reference}`; seeds {design['seeds']}; {design['n_test_cases']} test cases of {design['n_test_patients']} "
        f"patients (never used for training, checkpoint choice or post-processing); per trial {design['trial']['epochs']} "
        f"epochs x {design['trial']['steps_per_epoch']} steps{_peak_lr(design['trial'])}, validation every "
        f"{design['trial']['val_every']}.", "",
        "Statistics fixed in advance (`conf/base/parameters_ablation.yml`, `ablation.statistics`): a case's endpoint is the "
        "mean over the foreground classes its label holds, averaged over the seeds of its arm, then per patient; per arm "
        f"against `{reference}`: the mean paired difference with a {plan['confidence_level']:.0%} BCa bootstrap interval "
        f"over patients ({plan['n_resamples']} resamples{_percentile_note(summary)}), scipy's Wilcoxon signed-rank test, Holm's correction over the "
        f"{len(summary['comparisons'][primary])} comparisons of each endpoint at alpha {plan['alpha']}; the minimum "
        f"detectable difference is the mean paired difference this Wilcoxon test finds with {plan['power']:.0%} power at "
        "Holm's first level (alpha / the number of comparisons), by a seeded simulation of normal per-patient "
        "differences with the observed SD. Primary endpoint: "
        f"{LABELS[primary]}; secondary: "
        f"{', '.join(LABELS[m] for m in plan['secondary_endpoints']) or 'none'}.", "",
        "## Conclusion", "", headline(summary), "",
    ]  # fmt: skip
    out += [f"- {arm_sentence(arm, e, primary, design)}" for arm, e in summary["comparisons"][primary].items()]
    for metric in (primary, *plan["secondary_endpoints"]):
        kind = "Primary" if metric == primary else "Secondary"
        better = "higher" if HIGHER_IS_BETTER[metric] else "lower"
        out += ["", f"## {kind} endpoint: {LABELS[metric]} ({better} is better)", "", *_table(summary, metric)]
    out += ["", f"## {LABELS[primary]} difference per seed (arm - `{reference}`)", "",
            "| arm | " + " | ".join(f"seed {s}" for s in design["seeds"]) + " |",
            "|---|" + "---|" * len(design["seeds"])]  # fmt: skip
    for arm, entry in summary["comparisons"][primary].items():
        out.append(f"| `{arm}` | " + " | ".join(_num(entry["per_seed_difference"].get(str(s)), primary, signed=True)
                                               for s in design["seeds"]) + " |")  # fmt: skip
    out += ["", "## Training", "", f"Validation Dice plateau: {PLATEAU_RULE} (`learning_curves.png`). " + plateau_count(summary), "",
            "| arm | " + " | ".join(f"seed {s}: best val Dice (plateau)" for s in design["seeds"]) + " |",
            "|---|" + "---|" * len(design["seeds"])]  # fmt: skip
    for arm, seeds in summary["training"].items():
        cells = [f"{_num(seeds[str(s)]['best_val_dice'], 'dice')} ({_plateau(seeds[str(s)]['plateau'])})" for s in design["seeds"]]
        out.append(f"| `{arm}` | " + " | ".join(cells) + " |")
    skipped = [f"`{arm}` seed {s}: {n}" for arm, seeds in summary["training"].items() for s, entry in seeds.items()
               if (n := int(entry.get("skipped_steps", 0)))]  # fmt: skip
    out += ["", "Steps skipped for a non-finite gradient (the loop skips such a step rather than let NaN into the "
            "weights, so these trials took fewer optimiser steps than the others): " + ", ".join(skipped) + "."
            if skipped else "No trial skipped a step for a non-finite gradient: every trial took every optimiser step."]
    out += ["", "Figures: `forest.png` (difference and interval per arm), `learning_curves.png` (per arm and seed).", ""]
    return "\n".join(out)


def _peak_lr(trial: Mapping[str, Any]) -> str:
    """", peak learning rate L" where the design names it (grids before ``ablation.trial.lr`` do not)."""
    return f", peak learning rate {trial['lr']:g}" if trial.get("lr") is not None else ""


def plateau_count(summary: Mapping[str, Any]) -> str:
    """How many trials reached the plateau, in all and per arm (a reader of the README's table sees
    whether the arms were compared trained out or still rising)."""
    per_arm, reached, judged, total = [], 0, 0, 0
    for arm, seeds in summary["training"].items():
        states = [entry["plateau"].get("reached") for entry in seeds.values()]
        arm_reached = sum(state is True for state in states)
        per_arm.append(f"`{arm}` {arm_reached} of {len(states)}")
        reached, judged, total = reached + arm_reached, judged + sum(state is not None for state in states), total + len(states)
    unjudged = f" ({total - judged} with too few validations to tell)" if judged < total else ""
    return f"Reached in {reached} of {total} trials{unjudged}: {', '.join(per_arm)}."


def _plateau(entry: Mapping[str, Any]) -> str:
    if entry.get("reached") is None:
        return "too few validations"
    return f"{'yes' if entry['reached'] else 'no'}, last-third gain {entry['gain_last_third']:+.3f}"


def readme_section(summary: Mapping[str, Any], *, summary_path: str) -> str:
    """The README's ablation section (between its markers), generated from summary.json."""
    design = summary["design"]
    primary = design["statistics"]["primary_endpoint"]
    lines = [
        "", f"Generated from `{summary_path}` by `python -m mvl_pipeline.commands.ablation_readme {summary_path} README.md`; "
        f"experiment `{design['experiment']}` (data version `{design['data_version']}`, git commit `{design['git_commit']}`): "
        f"{len(design['arms'])} arms x {len(design['seeds'])} seeds, {design['n_test_patients']} test patients.", "",
        f"**{headline(summary)}**", "",
    ]  # fmt: skip
    lines += [f"- {arm_sentence(arm, e, primary, design)}" for arm, e in summary["comparisons"][primary].items()]
    lines += ["", *_table(summary, primary), "", f"Validation Dice plateau ({PLATEAU_RULE}): {plateau_count(summary)}", "",
              "Full report with the secondary endpoints (HD95, NSD) and the learning "
              "curves: `report.md` beside the summary.", ""]  # fmt: skip
    return "\n".join(lines)


def forest_plot(summary: Mapping[str, Any]) -> plt.Figure:
    """Per endpoint: each arm's mean paired difference to the reference with its interval, and
    (grey band) the minimum detectable difference around 0."""
    design = summary["design"]
    metrics = [design["statistics"]["primary_endpoint"], *design["statistics"]["secondary_endpoints"]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 0.6 * len(summary["comparisons"][metrics[0]]) + 1.8),
                             squeeze=False)  # fmt: skip
    for ax, metric in zip(axes[0], metrics, strict=True):
        family = summary["comparisons"][metric]
        arms = list(family)
        for y, arm in enumerate(arms):
            entry = family[arm]
            mdd = entry.get("minimum_detectable_difference")
            if mdd is not None:
                ax.fill_betweenx([y - 0.3, y + 0.3], -mdd, mdd, color="0.88", linewidth=0)
            if entry["mean_difference"] is None:
                continue
            low, high = entry["ci"] if entry["ci"] is not None else (entry["mean_difference"],) * 2
            colour = {"better": "tab:green", "worse": "tab:red"}.get(entry["verdict"], "tab:blue")
            ax.errorbar(entry["mean_difference"], y, xerr=[[entry["mean_difference"] - low], [high - entry["mean_difference"]]],
                        fmt="o", color=colour, capsize=4)  # fmt: skip
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.tick_params(axis="x", labelsize=8)
        ax.set_yticks(range(len(arms)), arms)
        ax.invert_yaxis()
        ax.set(xlabel=f"{LABELS[metric]}: arm - {design['reference']}", title=LABELS[metric])
    fig.suptitle(f"Paired difference to {design['reference']} ({design['statistics']['confidence_level']:.0%} CI over "
                 "patients; grey: minimum detectable difference)", fontsize=9)  # fmt: skip
    fig.tight_layout()
    return fig


def learning_curves(histories: Mapping[str, Any]) -> plt.Figure:
    """One column per arm: validation Dice (top) and training loss (bottom) per epoch, per seed."""
    arms = histories["design"]["arms"]  # the design's order (the JSON file sorts its keys)
    fig, axes = plt.subplots(2, len(arms), figsize=(3.2 * len(arms), 5.6), squeeze=False, sharey="row")
    for column, arm in enumerate(arms):
        top, bottom = axes[0][column], axes[1][column]
        for seed in histories["design"]["seeds"]:
            trial = histories["arms"][arm][str(seed)]
            epochs = trial["history"]
            validated = [e for e in epochs if e.get("val_dice") is not None]
            top.plot([e["epoch"] + 1 for e in validated], [e["val_dice"] for e in validated], marker=".", label=f"seed {seed}")
            bottom.plot([e["epoch"] + 1 for e in epochs], [e.get("train_loss", np.nan) for e in epochs], label=f"seed {seed}")
        top.set(title=arm, ylim=(0, 1))
        bottom.set(xlabel="epoch")
        top.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("validation Dice")
    axes[1][0].set_ylabel("training loss")
    fig.tight_layout()
    return fig
