"""Post-processing decided on validation data, as nnU-Net does: per class, keep only the largest
connected component, and only for the classes where that raised the mean validation Dice.

The decision is stored with the model (``config["postprocessing"]`` of its bundle) and applied
by every user of the model alike: evaluate, the registry gate and predict (``scoring``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from mvl_pipeline.evaluation.metrics import dice

#: 26-connectivity: voxels touching at a corner belong to one component (nnU-Net's choice).
_STRUCTURE = np.ones((3, 3, 3), dtype=bool)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (an empty mask stays empty)."""
    components, count = ndimage.label(mask, structure=_STRUCTURE)
    if count <= 1:
        return mask.astype(bool, copy=True)
    sizes = np.bincount(components.ravel())[1:]
    return components == int(np.argmax(sizes)) + 1


def apply_postprocessing(prediction: np.ndarray, spec: Mapping[str, Any] | None) -> np.ndarray:
    """``prediction`` (integer labels) with the stored decision applied: for each class in
    ``spec["largest_component"]`` voxels outside its largest component become background."""
    classes = [int(c) for c in (spec or {}).get("largest_component", [])]
    if not classes:
        return prediction
    result = prediction.copy()
    for value in classes:
        mask = prediction == value
        result[mask & ~largest_component(mask)] = 0
    return result


def decide_postprocessing(
    cases: Sequence[tuple[np.ndarray, np.ndarray]], classes: Sequence[int], *, min_gain: float = 0.0
) -> dict[str, Any]:
    """The decision from ``(prediction, label)`` pairs of validation cases: a class keeps its
    largest component only when that raises its mean Dice by more than ``min_gain``. Returns
    ``{"largest_component": [...], "validation_dice": {class: {"raw", "largest_component"}},
    "n_cases"}`` (JSON-ready)."""
    if not cases:
        raise ValueError("post-processing is decided on validation cases: none were given")
    chosen, scores = [], {}
    for value in classes:
        raw = [dice(p == value, t == value) for p, t in cases]
        kept = [dice(largest_component(p == value), t == value) for p, t in cases]
        scores[str(value)] = {"raw": float(np.mean(raw)), "largest_component": float(np.mean(kept))}
        if np.mean(kept) > np.mean(raw) + min_gain:
            chosen.append(int(value))
    return {"largest_component": chosen, "validation_dice": scores, "n_cases": len(cases)}
