"""Apply a model to original cases and score it on their original grid, in millimetres.

One function serves the ``evaluate`` pipeline and the registry gate: each case is preprocessed
with the *model's own* plan (so a champion trained under an older plan is scored correctly),
predicted by sliding window, mapped back to the original grid, and compared with the original
label at the original spacing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from mvl_pipeline.core.case import Case
from mvl_pipeline.core.config import ConfigBlock
from mvl_pipeline.evaluation.inference import predict_many, predict_probabilities
from mvl_pipeline.evaluation.metrics import case_metrics
from mvl_pipeline.evaluation.postprocessing import apply_postprocessing, decide_postprocessing
from mvl_pipeline.preprocessing.apply import preprocess_case, restore_to_original

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateConfig(ConfigBlock):
    """``params:evaluate`` (conf/base/parameters_evaluate.yml)."""

    WHERE = "evaluate"

    overlap: float = 0.5  # sliding-window overlap (Gaussian weighting)
    sw_batch_size: int = 2
    case_batch: int = 4  # cases that fit in one window, predicted together (evaluation/inference.py)
    nsd_tolerance_mm: float = 2.0  # surface Dice tolerance
    bootstrap_seed: int = 0
    overlay_cases: int = 3


def cases_in(
    loaders: Mapping[str, Callable[[], Case]], split: Mapping[str, Any], role: str
) -> list[tuple[str, Callable[[], Case]]]:
    """``(case id, loader)`` of every case the split puts in ``role`` (e.g. ``test``), sorted;
    a missing case or an empty role is an error (a model is never scored on nothing)."""
    ids = sorted(split.get(role, []))
    missing = [c for c in ids if c not in loaders]
    if missing:
        raise ValueError(f"{len(missing)} {role} case(s) are not among the ingested cases")
    if not ids:
        raise ValueError(f"the {role} split is empty: preprocess's split gave it no patient (its log says so; too "
                         "few patients for preprocess.split.ratios)")  # fmt: skip
    return [(c, loaders[c]) for c in ids]


def _restore(probs: np.ndarray, prepared: Any, postprocessing: Mapping[str, Any] | None) -> np.ndarray:
    """Probabilities on the plan's grid -> integer labels on the case's original grid, with the
    model's post-processing decision applied there."""
    restored = restore_to_original(probs, prepared.record, is_label=False)
    return apply_postprocessing(restored.argmax(axis=0).astype(np.uint8), postprocessing)


def predict_case(
    model: nn.Module,
    case: Case,
    plan: Mapping[str, Any],
    *,
    num_classes: int,
    params: EvaluateConfig,
    postprocessing: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Integer label map of ``case`` on its original grid, with the model's post-processing
    decision (``postprocessing``, stored in its config) applied there."""
    prepared = preprocess_case(case.image, plan, modality=case.modality, channels=case.meta.get("channels"))
    probs = predict_probabilities(
        model, prepared.image, roi_size=plan["patch_size"], num_classes=num_classes,
        overlap=params.overlap, sw_batch_size=params.sw_batch_size,
    )  # fmt: skip
    return _restore(probs, prepared, postprocessing)


def predict_cases(
    model: nn.Module,
    cases: Iterable[tuple[str, Callable[[], Case]]],
    plan: Mapping[str, Any],
    *,
    num_classes: int,
    params: EvaluateConfig,
    postprocessing: Mapping[str, Any] | None = None,
) -> Iterator[tuple[str, Case, np.ndarray]]:
    """``(case id, case, label map)`` for every case, in order, as :func:`predict_case` gives
    them, with cases that fit in one window predicted ``params.case_batch`` at a time."""

    def prepared() -> Iterator[tuple[str, Case, Any]]:
        for case_id, loader in cases:
            case = loader()
            yield case_id, case, preprocess_case(case.image, plan, modality=case.modality, channels=case.meta.get("channels"))

    for (case_id, case, ready), probs in predict_many(
        model, prepared(), lambda item: item[2].image, roi_size=plan["patch_size"], num_classes=num_classes,
        overlap=params.overlap, sw_batch_size=params.sw_batch_size, case_batch=params.case_batch,
    ):  # fmt: skip
        yield case_id, case, _restore(probs, ready, postprocessing)


def score_cases(
    model: nn.Module,
    cases: Iterable[tuple[str, Callable[[], Case]]],
    plan: Mapping[str, Any],
    classes: Mapping[int, str],
    *,
    num_classes: int,
    params: EvaluateConfig,
    keep_overlays: int = 0,
    postprocessing: Mapping[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-case, per-class metric rows, and up to ``keep_overlays`` slices for plots."""
    rows: list[dict[str, Any]] = []
    overlays: list[dict[str, Any]] = []
    predictions = predict_cases(
        model, cases, plan, num_classes=num_classes, params=params, postprocessing=postprocessing
    )
    for index, (case_id, case, prediction) in enumerate(predictions):
        if case.label is None:
            raise ValueError(f"holdout case {case_id} has no label")
        label = np.asarray(case.label.array)
        for row in case_metrics(
            prediction, label, classes, spacing=case.image.spacing, nsd_tolerance_mm=params.nsd_tolerance_mm
        ):
            rows.append({"case_id": case_id, "patient_id": case.patient_id, **row})
        if len(overlays) < keep_overlays:
            overlays.append(_overlay(case, prediction))
        logger.info("evaluated case %d: %s", index + 1, case_id)
    return rows, overlays


def _overlay(case: Case, prediction: np.ndarray) -> dict[str, Any]:
    """The axial slice through the label's largest cross-section, for an overlay plot, with a
    display window of the case's own 1st-99th intensity percentiles inside the label's box (so
    MR, whose intensities have no fixed scale, and CT both read well)."""
    label = np.asarray(case.label.array)
    per_slice = (label > 0).reshape(-1, label.shape[2]).sum(axis=0)
    k = int(per_slice.argmax()) if per_slice.any() else label.shape[2] // 2
    image = np.asarray(case.image.channel(0).array, dtype=np.float32)  # a multi-channel case: its reference
    where = np.argwhere(label > 0)
    if where.size:
        low, high = where.min(axis=0), where.max(axis=0) + 1
        margin = np.maximum(4, (high - low) // 2)
        box = tuple(slice(max(0, lo - m), hi + m) for lo, hi, m in zip(low, high, margin, strict=True))
        region = image[box]
    else:
        region = image
    vmin, vmax = (float(v) for v in np.percentile(region, [1.0, 99.0]))
    return {
        "case_id": case.case_id,
        "window": [vmin, vmax if vmax > vmin else vmin + 1.0],
        "image": image[:, :, k].copy(),
        "label": label[:, :, k].copy(),
        "prediction": prediction[:, :, k].copy(),
        "spacing": case.image.spacing[:2],
    }


def decide_postprocessing_on(
    model: nn.Module,
    cases: Iterable[tuple[str, Callable[[], Case]]],
    plan: Mapping[str, Any],
    classes: Mapping[int, str],
    *,
    params: EvaluateConfig,
) -> dict[str, Any]:
    """The post-processing decision for ``model`` from its predictions of ``cases`` (validation
    cases, on their original grid): see ``evaluation.postprocessing``."""
    pairs = [
        (prediction, np.asarray(case.label.array))
        for _, case, prediction in predict_cases(model, cases, plan, num_classes=model.cfg.num_classes, params=params)
        if case.label is not None
    ]
    decision = decide_postprocessing(pairs, sorted(classes))
    for value, scores in decision["validation_dice"].items():
        logger.info(
            "post-processing, class %s: validation Dice %.4f raw, %.4f largest component -> %s",
            classes.get(int(value), value), scores["raw"], scores["largest_component"],
            "keep the largest component" if int(value) in decision["largest_component"] else "as predicted",
        )  # fmt: skip
    return decision
