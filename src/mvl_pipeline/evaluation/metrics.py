"""Segmentation metrics in millimetres, per case and per class, through MONAI.

Empty cases are handled explicitly instead of becoming NaN averages. For each class:

- label and prediction both empty: Dice = Jaccard = NSD = 1, HD95 = 0 (a correct "nothing here");
  ``status: both_empty``. Summaries report "Dice where present" beside the plain mean, so such
  cases cannot dominate a rare class;
- exactly one of them empty: Dice = Jaccard = NSD = 0, and HD95 has no surface to measure from:
  it is the worst case, the diagonal of the image in mm (``hd95_worst_case: true``), never 0 and
  never left out (a model that never predicts a lesion must not report lesion HD95 0);
  ``detected`` says whether a class present in the label was predicted at all (the detection
  rate is reported beside HD95).

Distances use the voxel spacing of the grid the arrays live on (anisotropic spacing included).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import (
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
    compute_surface_dice,
    get_confusion_matrix,
)
from monai.metrics.confusion_matrix import compute_confusion_matrix_metric

from mvl_pipeline.evaluation.metric_names import METRICS

__all__ = ["METRICS", "case_metrics", "class_metrics", "dice", "dice_per_class"]


def _one_hot(mask: np.ndarray) -> torch.Tensor:
    """Boolean mask (X, Y, Z) -> MONAI's (B=1, C=2, X, Y, Z) layout (background, class)."""
    tensor = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))
    return torch.stack([1.0 - tensor, tensor])[None]


def dice(pred: np.ndarray, true: np.ndarray) -> float:
    """Hard Dice of two boolean masks (MONAI's ``compute_dice``): both empty = 1.0 (a correct
    "nothing here"), exactly one empty = 0.0. The one Dice of the project: validation, evaluation
    and the registry gate all use it."""
    n_pred, n_true = int(np.count_nonzero(pred)), int(np.count_nonzero(true))
    if n_pred == 0 and n_true == 0:
        return 1.0
    if n_pred == 0 or n_true == 0:
        return 0.0
    return float(compute_dice(_one_hot(pred), _one_hot(true), include_background=False).item())


def dice_per_class(prediction: np.ndarray, label: np.ndarray, classes: Sequence[int]) -> dict[int, float]:
    """Hard Dice per class value of two integer label maps on one grid."""
    return {int(value): dice(prediction == value, label == value) for value in classes}


def class_metrics(
    prediction: np.ndarray,
    label: np.ndarray,
    value: int,
    *,
    spacing: Sequence[float],
    nsd_tolerance_mm: float,
) -> dict[str, Any]:
    """All metrics for one class of one case (integer label arrays on the same grid)."""
    pred = prediction == value
    true = label == value
    n_pred, n_true = int(pred.sum()), int(true.sum())
    y_pred, y = _one_hot(pred), _one_hot(true)
    confusion = get_confusion_matrix(y_pred, y, include_background=False)
    specificity = float(compute_confusion_matrix_metric("specificity", confusion).item())
    accuracy = float(compute_confusion_matrix_metric("accuracy", confusion).item())
    row: dict[str, Any] = {
        "voxels_label": n_true,
        "voxels_pred": n_pred,
        "specificity": specificity,
        "accuracy": accuracy,
    }
    if n_true == 0 and n_pred == 0:
        row.update(status="both_empty", dice=dice(pred, true), jaccard=1.0, precision=1.0, recall=1.0, hd95_mm=0.0,
                   nsd=1.0, detected=None, hd95_worst_case=False)  # fmt: skip
        return row
    row["detected"] = None if n_true == 0 else n_pred > 0
    row["hd95_worst_case"] = False
    if n_true == 0 or n_pred == 0:
        diagonal = float(np.linalg.norm(np.asarray(prediction.shape, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)))
        row.update(
            status="label_empty" if n_true == 0 else "prediction_empty",
            dice=0.0,
            jaccard=0.0,
            precision=0.0 if n_pred else None,
            recall=0.0 if n_true else None,
            hd95_mm=diagonal,
            hd95_worst_case=True,
            nsd=0.0,
        )
        return row
    spacing_list = [float(s) for s in spacing]
    with warnings.catch_warnings():
        # MONAI 1.6 deprecates an argument that its own surface-distance code still passes
        # (get_mask_edges' always_return_as_numpy): nothing a caller can change, so not shown
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        hd95 = compute_hausdorff_distance(y_pred, y, include_background=False, percentile=95, spacing=spacing_list)
        nsd = compute_surface_dice(
            y_pred, y, class_thresholds=[float(nsd_tolerance_mm)], include_background=False, spacing=spacing_list
        )
    row.update(
        status="ok",
        dice=dice(pred, true),
        jaccard=float(compute_iou(y_pred, y, include_background=False).item()),
        precision=float(compute_confusion_matrix_metric("precision", confusion).item()),
        recall=float(compute_confusion_matrix_metric("sensitivity", confusion).item()),
        hd95_mm=float(hd95.item()),
        nsd=float(nsd.item()),
    )
    return row


def case_metrics(
    prediction: np.ndarray,
    label: np.ndarray,
    classes: Mapping[int, str],
    *,
    spacing: Sequence[float],
    nsd_tolerance_mm: float,
) -> list[dict[str, Any]]:
    if prediction.shape != label.shape:
        raise ValueError(f"prediction {prediction.shape} and label {label.shape} are not on one grid")
    return [
        {"class_value": int(value), "class_name": name,
         **class_metrics(prediction, label, int(value), spacing=spacing, nsd_tolerance_mm=nsd_tolerance_mm)}
        for value, name in sorted(classes.items())
    ]  # fmt: skip
