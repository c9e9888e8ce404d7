"""The ``register`` nodes: the gate scores champion and challenger itself on the gate patients
(``evaluation.gate``), the test report of THESE weights is attached, the registry records it.

Nothing the gate decides on is read from a file another run could have written: both models are
scored now, on the gate cases, with their own plan and post-processing. The test metrics only
describe the model (they are what the README, the model version and registration.json show as
its performance) and are attached only when ``evaluate`` ran on the same weights.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from mvl_pipeline.core.hashing import set_digest
from mvl_pipeline.datasets.model_registry import (
    GATE_CHAMPION,
    AlreadyRegistered,
    RegistrationRequest,
    RegistryView,
)
from mvl_pipeline.evaluation.gate import RegisterConfig, decide, per_case
from mvl_pipeline.evaluation.leakage import check_no_leakage, check_plan
from mvl_pipeline.formats.model_bundle import weights_sha256
from mvl_pipeline.preprocessing.plan import plan_classes

# torch and MONAI are imported by the node that runs, not here (see pipelines/fit/nodes.py)
if TYPE_CHECKING:
    from mvl_pipeline.evaluation.scoring import EvaluateConfig

logger = logging.getLogger(__name__)

REPORTED = ("dice", "dice_label_present", "hd95_mm", "nsd")


def _score(weights: tuple[dict[str, Any], dict[str, Any]], plan: Mapping[str, Any], cases: list, llm_cache_dir: str,
           evaluate: EvaluateConfig) -> list[dict[str, Any]]:  # fmt: skip
    from mvl_pipeline.evaluation.scoring import score_cases
    from mvl_pipeline.model import model_from_weights

    state, config = weights
    model = model_from_weights(state, config, llm_cache_dir=llm_cache_dir)
    rows, _ = score_cases(
        model, cases, plan, plan_classes(plan), num_classes=model.cfg.num_classes, params=evaluate,
        postprocessing=config.get("postprocessing"),
    )  # fmt: skip
    return rows


def decide_registration(
    trained_model: tuple[dict[str, Any], dict[str, Any]],
    registry: RegistryView,
    ingested_cases: Mapping[str, Callable[[], Any]],
    gate_split: Mapping[str, Any],
    preprocessing_plan: Mapping[str, Any],
    fit_history: Mapping[str, Any],
    lineage: Mapping[str, Any],
    llm_cache_dir: str,
    evaluate_params: Mapping[str, Any],
    params: Mapping[str, Any],
) -> tuple[RegistrationRequest | AlreadyRegistered, dict[str, Any]]:
    """The gate's decision on this run's model, and what to register (:class:`AlreadyRegistered`:
    nothing new)."""
    from mvl_pipeline.evaluation.scoring import EvaluateConfig, cases_in

    config = RegisterConfig.from_params(params)
    evaluate = EvaluateConfig.from_params(evaluate_params)
    state, model_config = trained_model
    digest = weights_sha256(state)
    if fit_history.get("weights_sha256") not in (None, digest):
        # fit_history is saved by fit's first node, the model by its second: a run cut off between them
        raise ValueError("fit_history.json is of other weights than the trained model (a fit run cut off between "
                         "its nodes?): run `kedro run --pipelines fit` again; its data version and fit run would "
                         "tag the wrong model in the registry")  # fmt: skip
    cases = cases_in(ingested_cases, gate_split, "gate")
    gate_patients = list(gate_split.get("patients", {}).get("gate", []))
    decision: dict[str, Any] = {
        "weights_sha256": digest,
        "gate_set_hash": set_digest(c for c, _ in cases),
        "n_gate_cases": len(cases),
        "n_gate_patients": len(gate_patients),
        "data_version": fit_history.get("data_version"),
        "plan_id": preprocessing_plan.get("plan_id"),
        "fit_run": fit_history.get("run_name"),
    }
    existing = registry.version_with_weights(digest)
    if existing is not None and existing in registry.unfinished:
        # an earlier run registered these weights and was cut off before setting the aliases its
        # gate decided: finish that decision (the gate does not decide twice on the same weights)
        aliases = registry.unfinished[existing]
        reason = (f"these weights are version {existing}, whose registration was interrupted before its alias(es) "
                  f"were set: finishing it")  # fmt: skip
        judged = registry.gate_champions.get(existing)  # None: registered before the tag existed
        now = registry.champion.version if registry.champion is not None else "none"
        if config.champion_alias in aliases and (
            (judged is not None and judged != now)
            or (judged is None and registry.champion is not None and int(registry.champion.version) > int(existing))
        ):
            # its gate compared these weights with another champion than today's: finishing "champion"
            # would replace a model they were never compared with
            aliases = tuple(dict.fromkeys(config.challenger_alias if a == config.champion_alias else a for a in aliases))
            reason += (f"; its gate compared it with champion version {judged or 'older'}, the champion is now "
                       f"version {now}: finished as {', '.join(aliases)}, not champion (a later run with new "
                       f"weights is gated against today's champion)")  # fmt: skip
        decision |= {"registered": False, "promoted": config.champion_alias in aliases, "alias": aliases[0] if aliases else None,
                     "already_registered_as": existing,
                     "reason": f"{reason} ({', '.join(aliases) or 'no alias'})"}  # fmt: skip
        logger.warning("registry gate: %s", decision["reason"])
        return AlreadyRegistered(existing, finish_aliases=aliases), decision
    if existing is not None:
        decision |= {"registered": False, "promoted": False, "alias": None, "already_registered_as": existing,
                     "reason": f"these weights are already registered as version {existing}: nothing registered"}  # fmt: skip
        logger.info("registry gate: %s", decision["reason"])
        return AlreadyRegistered(existing), decision
    key_id = gate_split.get("key_id")
    gate_cases = [c for c, _ in cases]
    check_no_leakage(model_config, gate_patients, role="gate", model="challenger", key_id=key_id, cases=gate_cases)
    check_plan(model_config, preprocessing_plan, model="challenger")
    challenger_rows = _score(trained_model, preprocessing_plan, cases, llm_cache_dir, evaluate)
    # the patients scored (as the gate pairs them); a held-out patient whose cases left the data stays
    # listed in n_gate_patients, without cases
    scored = {str(r.get("patient_id") or r["case_id"]) for r in challenger_rows}
    decision["n_gate_patients_scored"] = len(scored)
    decision["n_gate_patients_without_cases"] = len(set(gate_patients) - scored)
    champion_rows = None
    if registry.champion is not None:
        champion_weights, champion_plan = registry.champion.load_bundle()
        overlap = check_no_leakage(
            champion_weights[1], gate_patients, role="gate", model=f"champion (version {registry.champion.version})",
            key_id=key_id, cases=gate_cases,
        )  # fmt: skip
        if overlap is None:
            logger.warning("the champion predates the development-patient record: its overlap with the gate set cannot be checked")
        decision["champion_version"] = registry.champion.version
        decision["champion_weights_sha256"] = weights_sha256(champion_weights[0])
        champion_rows = _score(champion_weights, champion_plan, cases, llm_cache_dir, evaluate)
    decision |= decide(challenger_rows, champion_rows, config)
    decision["registered"] = True
    decision["per_case"] = {"challenger": per_case(challenger_rows),
                            "champion": None if champion_rows is None else per_case(champion_rows)}  # fmt: skip
    logger.info("registry gate: %s -> %s", decision["reason"], decision["alias"] or "no alias")
    tags = {
        "weights_sha256": digest,
        "gate_set_hash": decision["gate_set_hash"],
        "gate_dice": f"{decision['challenger_gate_dice']:.4f}",
        "gate": "promoted" if decision["promoted"] else "not promoted",
        "gate_reason": decision["reason"][:500],
        "data_version": str(fit_history.get("data_version")),
        "dvc_data_version": str(lineage.get("dvc_data_version")),
        "dvc_data_status": str(lineage.get("dvc_data_status")),
        "plan_id": str(preprocessing_plan.get("plan_id")),
        "git_commit": str(lineage.get("git_commit")),
        "git_dirty": str(lineage.get("git_dirty")),
        "fit_run": str(fit_history.get("run_name")),
        "preset": str(model_config.get("model", {}).get("preset", "medvisionllama")),
        GATE_CHAMPION: str(registry.champion.version) if registry.champion is not None else "none",
    }
    request = RegistrationRequest(
        weights=trained_model,
        plan=dict(preprocessing_plan),
        aliases=(decision["alias"],) if decision["alias"] else (),
        tags=tags,
        run_name=str(fit_history.get("run_name", "register")),
        num_classes=int(model_config.get("model", {}).get("num_classes", 2)),
        in_channels=int(model_config.get("model", {}).get("in_channels", 1)),
        description=decision["reason"],
    )
    return request, decision


def attach_test_report(
    request: RegistrationRequest | AlreadyRegistered, evaluation_summary: Mapping[str, Any]
) -> RegistrationRequest | AlreadyRegistered:
    """The request with the locked test metrics of THESE weights (tags ``test_<class>_<metric>``
    and the summary as an artifact); a summary of other weights (a stale file) is not attached."""
    if isinstance(request, AlreadyRegistered):
        return request
    digest = request.tags["weights_sha256"]
    if evaluation_summary.get("weights_sha256") != digest:
        logger.warning("the evaluation summary is not of these weights: run evaluate; no test metrics attached")
        return dataclasses.replace(request, tags={**request.tags, "test_report": "missing: evaluate did not run on these weights"})
    tags = dict(request.tags) | {"test_report": "attached", "test_set_hash": str(evaluation_summary.get("test_set_hash"))}
    for name, entry in evaluation_summary["classes"].items():
        for metric in REPORTED:
            value = entry[metric]["mean"]
            if value is not None:
                tags[f"test_{name}_{metric}"] = f"{value:.4f}"
            ci = entry[metric].get("ci95")
            if ci is not None:
                tags[f"test_{name}_{metric}_ci95"] = f"{ci[0]:.4f}-{ci[1]:.4f}"
    extra = dict(request.extra) | {"test_summary": dict(evaluation_summary)}
    return dataclasses.replace(request, tags=tags, extra=extra)


def report_registration(registry: RegistryView, decision: Mapping[str, Any]) -> dict[str, Any]:
    """What the registry holds after this run, and the champion's locked-test performance."""
    champion = registry.champion
    test = {}
    if champion is not None:
        test = {k[len("test_"):]: v for k, v in champion.tags.items() if k.startswith("test_")}
    return {
        **decision,
        "registered_version": registry.latest.version if decision.get("registered") and registry.latest else None,
        "registered_aliases": list(registry.aliases_of_latest) if decision.get("registered") else [],
        "champion_version_now": None if champion is None else champion.version,
        "champion_test_performance": test,
    }
