"""The champion/challenger gate.

The challenger (this run's model) becomes ``champion`` only if its holdout Dice beats the current
champion's by at least ``margin``, both scored *now* on the same holdout cases with the same
evaluation code (each model under its own preprocessing plan). Otherwise it is registered as
``challenger`` with the comparison recorded. The first model becomes champion.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mvl_pipeline.core.config import known_only
from mvl_pipeline.datasets.model_registry import RegistrationRequest, RegistryView
from mvl_pipeline.evaluation.metrics import summarise
from mvl_pipeline.evaluation.scoring import EvaluateParams, score_cases
from mvl_pipeline.model import model_from_weights
from mvl_pipeline.pipelines.evaluate.nodes import holdout_loaders

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegisterParams:
    margin: float = 0.005
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> RegisterParams:
        return cls(**known_only(cls, params, "register parameters"))


def gate_score(summary_classes: Mapping[str, Any]) -> float:
    """The gate's figure: mean over classes of the mean holdout Dice."""
    means = [entry["dice"]["mean"] for entry in summary_classes.values() if entry["dice"]["mean"] is not None]
    return float(np.mean(means)) if means else float("nan")


def _holdout_hash(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def decide_registration(
    trained_model: tuple[dict[str, Any], dict[str, Any]],
    evaluation_summary: Mapping[str, Any],
    registry: RegistryView,
    ingested_cases: Mapping[str, Callable[[], Any]],
    data_split: Mapping[str, Any],
    preprocessing_plan: Mapping[str, Any],
    fit_history: Mapping[str, Any],
    lineage: Mapping[str, Any],
    labels: Mapping[str, int],
    llm_cache_dir: str,
    evaluate_params: Mapping[str, Any],
    params: Mapping[str, Any],
) -> tuple[RegistrationRequest, dict[str, Any]]:
    config = RegisterParams.from_params(params)
    challenger = gate_score(evaluation_summary["classes"])
    holdout = sorted(data_split["test"])
    decision: dict[str, Any] = {
        "challenger_dice": challenger,
        "margin": config.margin,
        "holdout_cases": len(holdout),
        "holdout_hash": _holdout_hash(holdout),
    }
    if registry.champion is None:
        decision.update(champion_version=None, champion_dice=None, promoted=True, reason="first model")
    else:
        (state, model_config), champion_plan = registry.champion.load_bundle()
        champion_model = model_from_weights(state, model_config, llm_cache_dir=llm_cache_dir)
        classes = {int(v): str(k) for k, v in labels.items()}
        rows, _ = score_cases(
            champion_model, holdout_loaders(ingested_cases, data_split), champion_plan, classes,
            num_classes=champion_model.cfg.num_classes, params=EvaluateParams.from_params(evaluate_params),
        )  # fmt: skip
        champion = gate_score(summarise(rows))
        promoted = bool(challenger >= champion + config.margin)
        decision.update(
            champion_version=registry.champion.version,
            champion_dice=champion,
            promoted=promoted,
            reason=(f"holdout Dice {challenger:.4f} {'>=' if promoted else '<'} champion {champion:.4f} + margin "
                    f"{config.margin}"),  # fmt: skip
        )
    aliases = (config.champion_alias,) if decision["promoted"] else (config.challenger_alias,)
    logger.info("registry gate: %s -> %s", decision["reason"], aliases[0])
    tags = {
        "data_version": str(fit_history.get("data_version")),
        "dvc_data_version": str(lineage.get("dvc_data_version")),
        "dvc_data_status": str(lineage.get("dvc_data_status")),
        "plan_id": str(preprocessing_plan.get("plan_id")),
        "git_commit": str(lineage.get("git_commit")),
        "git_dirty": str(lineage.get("git_dirty")),
        "fit_run": str(fit_history.get("run_name")),
        "holdout_hash": decision["holdout_hash"],
        "holdout_mean_dice": f"{challenger:.4f}",
        "gate": "promoted" if decision["promoted"] else "not promoted",
        "gate_reason": decision["reason"],
    }
    for name, entry in evaluation_summary["classes"].items():
        for metric in ("dice", "hd95_mm", "nsd"):
            if entry[metric]["mean"] is not None:
                tags[f"holdout_{name}_{metric}"] = f"{entry[metric]['mean']:.4f}"
    request = RegistrationRequest(
        weights=trained_model,
        plan=dict(preprocessing_plan),
        aliases=aliases,
        tags=tags,
        run_name=str(fit_history.get("run_name", "register")),
        num_classes=int(trained_model[1].get("num_classes", trained_model[1].get("model", {}).get("num_classes", 2))),
        description=decision["reason"],
    )
    return request, decision


def report_registration(registry: RegistryView, decision: Mapping[str, Any]) -> dict[str, Any]:
    """What the registry holds after this run (written to data/08_reporting)."""
    return {
        **decision,
        "registered_version": None if registry.latest is None else registry.latest.version,
        "registered_aliases": list(registry.aliases_of_latest),
        "champion_version_now": None if registry.champion is None else registry.champion.version,
    }
