"""Nodes of the ``preprocess`` pipeline: fingerprint -> plan -> apply (incremental) -> split.

Pure functions of datasets and parameters; ``params:preprocess`` becomes a
:class:`PreprocessConfig` at the boundary. The array work lives in ``mvl_pipeline.preprocessing``.

Incremental apply: a model-input case is recomputed only when it is missing, its ``plan_id``
differs from the current plan's, or its ``source_hash`` differs from the fingerprint's (ingest's
``meta["source_hash"]``, else a hash of the case's arrays and grid); the
existing cases are read through ``model_input_records`` (the same folder as the output, loaded
memory-mapped: only ``case.json`` is really read). Cases gone upstream are deleted (``None``).

Previous documents (``previous_preprocessing_plan``, ``previous_data_split``) are second catalog
entries on the same files, loading as ``{}`` before the first save (``AtomicJSONDataset`` with
``missing: {}``). ``params:model`` supplies the embedding patch size and token budget
(``model.patch_size``, ``model.token_budget``) unless ``preprocess.plan`` pins them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from mvl_pipeline.core.case import Case
from mvl_pipeline.core.errors import ImagingError
from mvl_pipeline.core.parallel import LazyResults, parallel_map
from mvl_pipeline.preprocessing.apply import model_volume, preprocess_case
from mvl_pipeline.preprocessing.config import PreprocessConfig
from mvl_pipeline.preprocessing.drift import guard, new_case_ids
from mvl_pipeline.preprocessing.fingerprint import aggregate_fingerprint, case_fingerprint
from mvl_pipeline.preprocessing.plan import plan_preprocessing, reconcile_plan
from mvl_pipeline.preprocessing.split import DEVELOPMENT, make_split, role_view

logger = logging.getLogger(__name__)

CaseLoaders = Mapping[str, Callable[[], Case]]


def _previous(document: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A previous document as loaded with ``missing: {}``: None on a first run."""
    return dict(document) if document else None


# -- fingerprint ---------------------------------------------------------------------------
def fingerprint_dataset(
    ingested_cases: CaseLoaders,
    development_split: Mapping[str, Any],
    previous_fingerprint: Mapping[str, Any] | None,
    params: Mapping[str, Any],
) -> dict[str, Any]:
    """The dataset fingerprint (JSON) of the development cases only: the plan (spacing,
    intensity statistics) must not learn anything from the gate or test patients.

    The drift guard (``preprocessing/drift.py``) compares the cases new since the previous
    fingerprint with the previous ones: ``preprocess.drift.action: stop`` fails here, before
    anything is planned or trained; ``replan`` records the findings under ``drift`` for
    ``plan_dataset``."""
    config = PreprocessConfig.from_params(params)
    where = {"orientation": config.plan.orientation, "body_mask": config.body_mask}
    case_ids = sorted(c for role in DEVELOPMENT for c in development_split.get(role, []) if c in ingested_cases)
    if not case_ids:
        raise ValueError("no development cases to fingerprint (is the train split empty?)")

    def one(case_id: str) -> dict[str, Any]:
        return case_fingerprint(ingested_cases[case_id](), config.fingerprint, **where)

    records = parallel_map(
        one,
        case_ids,
        workers=config.apply.workers,
        what="fingerprint",
        progress_every=config.apply.progress_every,
    )
    fingerprint = aggregate_fingerprint(records, config.fingerprint, **where)
    findings = guard(fingerprint, _previous(previous_fingerprint), config.drift)
    if findings:
        logger.warning("drift: %d finding(s); re-planning (preprocess.drift.action: replan):\n  - %s",
                       len(findings), "\n  - ".join(findings))  # fmt: skip
        fingerprint["drift"] = {"findings": findings, "new_cases": len(new_case_ids(fingerprint, previous_fingerprint))}
    logger.info(
        "fingerprint %s: %d cases, modalities %s",
        fingerprint["fingerprint_id"], fingerprint["n_cases"], sorted(fingerprint["modalities"]),
    )  # fmt: skip
    return fingerprint


# -- plan ----------------------------------------------------------------------------------
def plan_dataset(
    dataset_fingerprint: Mapping[str, Any],
    previous_plan: Mapping[str, Any] | None,
    params: Mapping[str, Any],
    model_params: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The preprocessing plan; the previous one is kept when a re-plan only drifts slightly."""
    preprocess = PreprocessConfig.from_params(params)
    config = preprocess.plan
    model_params = model_params or {}
    new = plan_preprocessing(
        dataset_fingerprint,
        config,
        body_mask=preprocess.body_mask,
        embed_patch_size=model_params.get("patch_size"),
        token_budget=model_params.get("token_budget"),
    )
    drift = dataset_fingerprint.get("drift") or {}
    if drift.get("findings"):  # the new cases do not fit the previous plan: never keep it
        new["provenance"] = {**new.get("provenance", {}), "drift": list(drift["findings"])}
        previous_plan = None
    plan, reused = reconcile_plan(new, _previous(previous_plan), config.stability_tolerance)
    if reused:
        how = "identical" if new["plan_id"] == plan["plan_id"] else "within the stability tolerance"
        logger.info("plan %s kept (the re-plan is %s)", plan["plan_id"], how)
    else:
        logger.info(
            "plan %s: spacing %s, patch %s (%d tokens)",
            plan["plan_id"], plan["target_spacing"], plan["patch_size"], plan["tokens"],
        )  # fmt: skip
    return plan


# -- apply ---------------------------------------------------------------------------------
def _is_current(record_case: Case, plan_id: str, source_hash: str) -> bool:
    meta = record_case.meta
    return (
        bool(source_hash)
        and meta.get("plan_id") == plan_id
        and meta.get("source_hash") == source_hash
    )


def _to_model_input(case: Case, plan: Mapping[str, Any], source_hash: str) -> Case:
    result = preprocess_case(case.image, plan, label=case.label, modality=case.modality, channels=case.meta.get("channels"))
    image, label = model_volume(result)
    label_names = {str(k): v for k, v in case.label_names.items()}
    if label is not None:
        label = label.with_array(label.array, label_names=label_names)
    meta = {
        "modality": case.modality,
        "label_names": label_names,
        "source_hash": source_hash,
        "plan_id": plan["plan_id"],
        "preprocess": result.record,
    }
    return Case(case.case_id, case.patient_id, image, label, meta)


def preprocess_dataset(
    ingested_cases: CaseLoaders,
    dataset_fingerprint: Mapping[str, Any],
    preprocessing_plan: Mapping[str, Any],
    model_input_records: CaseLoaders,
    params: Mapping[str, Any],
) -> dict[str, Callable[[], Case] | None]:
    """Model-input cases of the development patients (the fingerprint's cases) to (re)write,
    lazily and in parallel; ``None`` deletes a stale case (gone upstream, or now held out).

    Unchanged cases under an unchanged plan are not in the result (nothing is recomputed).
    The work runs when the dataset saves (calls) the entries; a case that fails with an
    :class:`ImagingError` is logged with its reason and the error propagates (cases saved
    before it are kept: each case is written atomically).
    """
    config = PreprocessConfig.from_params(params).apply
    plan_id = str(preprocessing_plan["plan_id"])
    hashes = {cid: str(r.get("source_hash", "")) for cid, r in dataset_fingerprint["cases"].items()}
    missing = sorted(set(hashes) - set(ingested_cases))
    if missing:
        raise ValueError(f"{len(missing)} fingerprinted case(s) are no longer ingested: re-run fingerprint_node")

    todo = []
    for case_id in sorted(hashes):
        existing = model_input_records.get(case_id)
        if existing is not None:
            try:
                if _is_current(existing(), plan_id, hashes[case_id]):
                    continue
            except Exception as exc:  # an unreadable old record just means: recompute
                logger.warning(
                    "model-input record %s unreadable (%s): recomputing",
                    case_id,
                    type(exc).__name__,
                )
        todo.append(case_id)
    stale = sorted(set(model_input_records) - set(hashes))
    logger.info(
        "preprocess with plan %s: %d to compute, %d up to date, %d removed",
        plan_id, len(todo), len(hashes) - len(todo), len(stale),
    )  # fmt: skip

    def one(case_id: str) -> Case:
        try:
            return _to_model_input(ingested_cases[case_id](), preprocessing_plan, hashes[case_id])
        except ImagingError as exc:
            logger.error("case %s could not be preprocessed: %s", case_id, exc.reason)
            raise

    lazy = LazyResults(
        one,
        todo,
        workers=config.workers,
        window=config.window,
        what="preprocess",
        progress_every=config.progress_every,
    )
    outputs: dict[str, Callable[[], Case] | None] = dict(lazy.callables())
    outputs.update({case_id: None for case_id in stale})
    return outputs


# -- split ---------------------------------------------------------------------------------
def split_dataset(
    ingested_case_index: Mapping[str, Mapping[str, Any]],
    previous_split: Mapping[str, Any] | None,
    legacy_split: Mapping[str, Any] | None,
    params: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Patients to roles (see ``preprocessing/split.py``), from the ingested cases' records alone
    (no voxel is read): the whole split document, and the view each stage may read: development
    (fit), gate (the registry gate), test (evaluate)."""
    config = PreprocessConfig.from_params(params).split
    case_patients = {cid: record["patient_id"] for cid, record in ingested_case_index.items()}
    if not case_patients:
        raise ValueError(
            "no ingested cases to split: ingest kept no case from the drop. Its log line 'ingest: ... units "
            "processed' counts what it skipped and why, 02_intermediate/quarantine.json in the data root holds what it "
            "refused; "
            "a drop with no DICOM study, NIfTI/NRRD image or MSD task (dataset.json) in it gives no unit at all"
        )
    if not previous_split and legacy_split:
        logger.info("migrating the project's earlier train/validation/test split: its test patients stay held out")
    key_ids = sorted({str(r["meta"]["key_id"]) for r in ingested_case_index.values() if r.get("meta", {}).get("key_id")})
    if len(key_ids) > 1:
        raise ValueError(
            f"the ingested cases were made under {len(key_ids)} pseudonymisation keys ({', '.join(key_ids)}): one "
            "patient may appear under two pseudonyms. Re-ingest everything under one key"
        )
    split = make_split(case_patients, config, _previous(previous_split) or _previous(legacy_split))
    if key_ids:
        split["key_id"] = key_ids[0]
    counts = {role: len(split["patients"][role]) for role in ("train", "validation", "gate", "test")}
    logger.info("split: %d train, %d validation, %d gate, %d test patients", *counts.values())
    if empty := [role for role, count in counts.items() if not count]:
        # said here, not first when evaluate refuses an empty test split after a whole training
        logger.warning("split: no %s patient among %d: fit needs train and validation patients, the registry gate "
                       "needs gate patients, evaluate needs test patients (none scores on nothing). Add patients, "
                       "or change preprocess.split.ratios", " and no ".join(empty), sum(counts.values()))  # fmt: skip
    return split, role_view(split, DEVELOPMENT), role_view(split, ("gate",)), role_view(split, ("test",))
