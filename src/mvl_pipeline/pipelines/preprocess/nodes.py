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
from mvl_pipeline.preprocessing.fingerprint import aggregate_fingerprint, case_fingerprint
from mvl_pipeline.preprocessing.plan import plan_preprocessing, reconcile_plan
from mvl_pipeline.preprocessing.split import make_split

logger = logging.getLogger(__name__)

CaseLoaders = Mapping[str, Callable[[], Case]]


def _previous(document: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A previous document as loaded with ``missing: {}``: None on a first run."""
    return dict(document) if document else None


# -- fingerprint ---------------------------------------------------------------------------
def fingerprint_dataset(ingested_cases: CaseLoaders, params: Mapping[str, Any]) -> dict[str, Any]:
    """The dataset fingerprint (JSON) of all ingested cases."""
    config = PreprocessConfig.from_params(params)
    where = {"orientation": config.plan.orientation, "body_mask": config.body_mask}
    case_ids = sorted(ingested_cases)
    if not case_ids:
        raise ValueError("no ingested cases to fingerprint")

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
    result = preprocess_case(case.image, plan, label=case.label, modality=case.modality)
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
    """Model-input cases to (re)write, lazily and in parallel; ``None`` deletes a stale case.

    Unchanged cases under an unchanged plan are not in the result (nothing is recomputed).
    The work runs when the dataset saves (calls) the entries; a case that fails with an
    :class:`ImagingError` is logged with its reason and the error propagates (cases saved
    before it are kept: each case is written atomically).
    """
    config = PreprocessConfig.from_params(params).apply
    plan_id = str(preprocessing_plan["plan_id"])
    hashes = {cid: str(r.get("source_hash", "")) for cid, r in dataset_fingerprint["cases"].items()}
    missing = sorted(set(ingested_cases) - set(hashes))
    if missing:
        raise ValueError(
            f"{len(missing)} ingested case(s) are not in the fingerprint: re-run fingerprint_node"
        )

    todo = []
    for case_id in sorted(ingested_cases):
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
    stale = sorted(set(model_input_records) - set(ingested_cases))
    logger.info(
        "preprocess with plan %s: %d to compute, %d up to date, %d removed",
        plan_id, len(todo), len(ingested_cases) - len(todo), len(stale),
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
    dataset_fingerprint: Mapping[str, Any],
    previous_split: Mapping[str, Any] | None,
    params: Mapping[str, Any],
) -> dict[str, Any]:
    """Train / validation / test case ids by patient pseudonym (see ``split.py``)."""
    config = PreprocessConfig.from_params(params).split
    case_patients = {cid: r["patient_id"] for cid, r in dataset_fingerprint["cases"].items()}
    split = make_split(case_patients, config, _previous(previous_split))
    logger.info(
        "split: %d train, %d validation, %d test patients",
        *(len(split["patients"][s]) for s in ("train", "validation", "test")),
    )
    return split
