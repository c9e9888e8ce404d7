"""The ``register`` nodes: score the champion now, let the gate decide (``evaluation.gate``),
and hand the registry dataset what to register with which alias and tags.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from mvl_pipeline.core.hashing import set_digest
from mvl_pipeline.datasets.model_registry import RegistrationRequest, RegistryView
from mvl_pipeline.evaluation.gate import RegisterConfig, decide, gate_score
from mvl_pipeline.evaluation.scoring import EvaluateConfig, cases_in, score_cases
from mvl_pipeline.evaluation.summary import summarise
from mvl_pipeline.model import model_from_weights
from mvl_pipeline.preprocessing.plan import plan_classes

logger = logging.getLogger(__name__)


def decide_registration(
    trained_model: tuple[dict[str, Any], dict[str, Any]],
    evaluation_summary: Mapping[str, Any],
    registry: RegistryView,
    ingested_cases: Mapping[str, Callable[[], Any]],
    data_split: Mapping[str, Any],
    preprocessing_plan: Mapping[str, Any],
    fit_history: Mapping[str, Any],
    lineage: Mapping[str, Any],
    llm_cache_dir: str,
    evaluate_params: Mapping[str, Any],
    params: Mapping[str, Any],
) -> tuple[RegistrationRequest, dict[str, Any]]:
    config = RegisterConfig.from_params(params)
    challenger = gate_score(evaluation_summary["classes"])
    holdout = sorted(data_split["test"])
    decision: dict[str, Any] = {
        "challenger_dice": challenger,
        "margin": config.margin,
        "holdout_cases": len(holdout),
        "holdout_hash": set_digest(holdout),
    }
    if registry.champion is None:
        promoted, reason = decide(challenger, None, config)
        decision.update(champion_version=None, champion_dice=None, promoted=promoted, reason=reason)
    else:
        (state, model_config), champion_plan = registry.champion.load_bundle()
        champion_model = model_from_weights(state, model_config, llm_cache_dir=llm_cache_dir)
        classes = plan_classes(champion_plan)
        rows, _ = score_cases(
            champion_model, cases_in(ingested_cases, data_split, "test"), champion_plan, classes,
            num_classes=champion_model.cfg.num_classes, params=EvaluateConfig.from_params(evaluate_params),
            postprocessing=model_config.get("postprocessing"),
        )  # fmt: skip
        champion = gate_score(summarise(rows))
        promoted, reason = decide(challenger, champion, config)
        decision.update(
            champion_version=registry.champion.version, champion_dice=champion, promoted=promoted, reason=reason
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
