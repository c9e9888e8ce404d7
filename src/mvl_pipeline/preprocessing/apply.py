"""Apply a preprocessing plan to one volume, and map model-space arrays back exactly.

The one code path for training data and for inference:

    preprocess_case(image: Volume, plan: dict, *, label: Volume | None = None,
                    modality: str | None = None, channels: list | None = None)
        -> PreprocessedCase(image, label, record)

1. reorient to ``plan["orientation"]`` (axis permutation and flips only; exact),
2. crop to the body box (plus the label's foreground box when a label is given) grown by
   ``plan["crop_margin_mm"]``; cropping first means only the patient is resampled,
3. resample to ``plan["target_spacing"]`` (image: ``plan["interpolation"]["image"]``, label:
   ``nearest`` or ``onehot_linear``; see :mod:`mvl_pipeline.preprocessing.resample`),
4. normalise with the modality's scheme (:mod:`mvl_pipeline.preprocessing.intensity`).

``image`` is float32 ``(X, Y, Z)`` (``(C, X, Y, Z)`` for a multi-channel image) on the model grid, ``label`` uint8 on the same grid (or None),
and ``record`` a JSON-serialisable dict of everything that was done (original grid, axis
transform, crop box, spacings, model-grid affine, normalisation applied, plan id).

    restore_to_original(array, record, *, is_label, label_mode="nearest", background=None)
        -> np.ndarray on the original grid

inverts steps 1-3 for a model-space array: a label map ``(X, Y, Z)`` (nearest; exact where the
grid allows, e.g. for integer-factor upsampling) or probabilities ``(C, X, Y, Z)`` / a
float map ``(X, Y, Z)`` (linear per channel; the caller takes the argmax). Voxels outside the
crop box get the background: label 0; for ``(C, ...)`` probabilities channel 0 = 1 and the others
0 (for ``C == 1``: 0), unless ``background`` says otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from mvl_pipeline.core.channels import plan_channels
from mvl_pipeline.core.errors import (
    ChannelError,
    ImplausibleGeometryError,
    LabelGridMismatchError,
    MissingChannelError,
    NonFiniteValuesError,
)
from mvl_pipeline.core.orientation import AxisTransform, orientation_transform
from mvl_pipeline.core.volume import Volume
from mvl_pipeline.preprocessing.crop import (
    BodyMaskConfig,
    body_threshold,
    bounding_box,
    box_shape,
    box_slices,
    full_box,
    grow_box,
    margin_voxels,
    union_box,
)
from mvl_pipeline.preprocessing.intensity import Normalization, normalize
from mvl_pipeline.preprocessing.resample import (
    resample_array,
    resample_label,
    resampled_affine,
    resampled_shape,
    spacing_scale,
)

RECORD_VERSION = 1
_SAME_SPACING_RTOL = 1e-6


class PreprocessedCase(NamedTuple):
    image: np.ndarray  # float32 (X, Y, Z) or (C, X, Y, Z), model grid
    label: np.ndarray | None  # uint8 (X, Y, Z), model grid
    record: dict[str, Any]  # what was done; input of restore_to_original


#: The most voxels a preprocessed case may have (1 GiB per channel in float32): more means a
#: spacing far from the plan's, e.g. a header in other units, not a bigger patient.
MAX_RESAMPLED_VOXELS = 2**28

def normalization_for(plan: Mapping[str, Any], modality: str) -> Normalization:
    """The plan's normalisation for ``modality`` (its default for modalities it has not seen)."""
    table = plan.get("normalization", {})
    values = table.get(modality) or table.get(modality.upper()) or plan["default_normalization"]
    return Normalization.from_dict(values)


def _same_spacing(a: Sequence[float], b: Sequence[float]) -> bool:
    return bool(np.allclose(a, b, rtol=_SAME_SPACING_RTOL, atol=0.0))


def _channel_schemes(
    image: Volume, plan: Mapping[str, Any], modality: str, case_channels: Sequence[Mapping[str, Any]] | None = None
) -> tuple[list[str], list[Normalization]]:
    """Per input channel: its modality and normalisation (the plan's ``channels``, or the one
    channel of a single-channel plan); an image with other channels than the plan's is an error,
    and so is a case whose recorded channels (``case_channels``) are others or in another order."""
    channels = plan_channels(plan)
    if not channels and image.n_channels == 1 and not case_channels:
        return [modality], [normalization_for(plan, modality)]
    names = [str(c["name"]) for c in channels] or ["image"]
    if image.n_channels != len(names):
        error = MissingChannelError if image.n_channels < len(names) else ChannelError
        raise error(
            f"the model's plan takes {len(names)} channel(s) {names}, the image holds {image.n_channels}"
        )
    if case_channels is not None and channels and [str(c["name"]) for c in case_channels] != names:
        raise ChannelError(
            f"the case's channels are {[str(c['name']) for c in case_channels]}, the model's plan takes {names} in "
            "that order: the case was ingested under other ingest.channels than the plan was made from. "
            "Re-run ingest and preprocess, so that every case and the plan share one channel layout"
        )
    schemes = [
        Normalization.from_dict(c["normalization"]) if c.get("normalization") else normalization_for(plan, str(c["modality"]))
        for c in channels
    ]
    return [str(c["modality"]) for c in channels], schemes


def preprocess_case(
    image: Volume,
    plan: Mapping[str, Any],
    *,
    label: Volume | None = None,
    modality: str | None = None,
    channels: Sequence[Mapping[str, Any]] | None = None,
) -> PreprocessedCase:
    """Preprocess one volume (and its label) with ``plan``; see the module doc. A multi-channel
    image ``(C, X, Y, Z)`` gets one crop box (the body of every channel) and one grid, and each
    channel its own normalisation (``plan["channels"]``). ``channels``: what an ingested case
    records of its channels (``meta["channels"]``): they must be the plan's, in its order."""
    modality = str(modality or image.meta.get("modality", "OT"))
    if label is not None and not image.same_grid(label):
        raise LabelGridMismatchError(
            f"label grid {label.shape} does not match image grid {image.shape}"
        )
    modalities, normalizations = _channel_schemes(image, plan, modality, channels)
    orientation = str(plan["orientation"])
    transform = orientation_transform(image.affine, orientation)
    reoriented = transform.apply(np.asarray(image.array))
    arrays = [reoriented] if reoriented.ndim == 3 else list(reoriented)
    affine = transform.apply_to_affine(image.affine, image.shape)
    spacing = transform.permute(image.spacing)

    # 2. crop to the body (+ label foreground) box, on the reoriented source grid
    mask_config = BodyMaskConfig.from_params(plan.get("body_mask"))
    thresholds = [body_threshold(a, m, mask_config) for a, m in zip(arrays, modalities, strict=True)]
    box = None
    for array, threshold in zip(arrays, thresholds, strict=True):
        box = union_box(box, bounding_box(array > threshold, mask_config.min_voxels_per_slice))
    label_array = None
    if label is not None:
        label_array = transform.apply(np.asarray(label.array))
        box = union_box(box, bounding_box(label_array > 0))
    shape = arrays[0].shape
    box = (
        full_box(shape)
        if box is None
        else grow_box(box, margin_voxels(float(plan["crop_margin_mm"]), spacing), shape)
    )
    crop_affine = affine.copy()
    crop_affine[:3, 3] = (
        affine[:3, :3] @ np.array([lo for lo, _ in box], dtype=np.float64) + affine[:3, 3]
    )

    # 3. resample to the target spacing, 4. normalise (the body mask on the model grid uses the
    # source grid's threshold), channel by channel
    target = tuple(float(v) for v in plan["target_spacing"])
    same = _same_spacing(spacing, target)
    out_shape = box_shape(box) if same else resampled_shape(box_shape(box), spacing, target)
    if int(np.prod(out_shape, dtype=np.int64)) > MAX_RESAMPLED_VOXELS:  # refused before any allocation
        raise ImplausibleGeometryError(
            f"resampling to the plan's spacing {list(target)} mm would make {list(out_shape)} voxels "
            f"(more than {MAX_RESAMPLED_VOXELS:,}) from a spacing of {[round(s, 4) for s in spacing]} mm: "
            "is the header's spacing in other units?"
        )
    scale = (1.0, 1.0, 1.0) if same else spacing_scale(spacing, target)
    outputs, applied = [], []
    for array, threshold, normalization in zip(arrays, thresholds, normalizations, strict=True):
        cropped = np.asarray(array[box_slices(box)], dtype=np.float32)
        if not np.isfinite(cropped).all():
            raise NonFiniteValuesError("image holds NaN or Inf values inside the body box")
        if same:  # normalisation works in place: never on the caller's memory
            resampled = cropped.copy() if np.may_share_memory(cropped, image.array) else cropped
        else:
            resampled = resample_array(cropped, out_shape, scale, plan["interpolation"]["image"])
        mask = resampled > threshold if normalization.scheme == "zscore_body" else None
        normalized, done = normalize(resampled, normalization, body_mask=mask, inplace=True)
        outputs.append(normalized)
        applied.append(done)
    normalized = outputs[0] if len(outputs) == 1 and reoriented.ndim == 3 else np.stack(outputs)
    model_affine = resampled_affine(crop_affine, spacing, target)

    out_label = None
    if label_array is not None:
        cropped_label = label_array[box_slices(box)]
        if cropped_label.size and (cropped_label.min() < 0 or cropped_label.max() > 255):
            raise ValueError("label values must lie in 0..255 for the uint8 model input")
        cropped_label = np.ascontiguousarray(cropped_label, dtype=np.uint8)
        out_label = (
            cropped_label
            if same
            else resample_label(cropped_label, out_shape, scale, plan["interpolation"]["label"])
        )
    multi = reoriented.ndim == 4
    record = {
        "version": RECORD_VERSION,
        "plan_id": plan.get("plan_id"),
        "modality": modality,
        "orientation": orientation,
        "original_shape": list(image.shape),
        "original_affine": np.asarray(image.affine).tolist(),
        "axis_transform": transform.to_list(),
        "reoriented_shape": list(shape),
        "crop_box": [list(b) for b in box],
        "source_spacing": [float(s) for s in spacing],
        "target_spacing": list(target),
        "model_shape": list(normalized.shape[-3:]),
        "model_affine": model_affine.tolist(),
        "body_threshold": [float(t) for t in thresholds] if multi else float(thresholds[0]),
        "normalization": applied if multi else applied[0],
    }
    if multi:
        record["channels"] = [str(c["name"]) for c in plan_channels(plan)]
    return PreprocessedCase(np.ascontiguousarray(normalized), out_label, record)


def _default_background(array: np.ndarray, is_label: bool) -> np.ndarray:
    if is_label or array.ndim == 3:
        return np.zeros(1, dtype=array.dtype)
    background = np.zeros(array.shape[0], dtype=np.float32)
    if array.shape[0] > 1:
        background[0] = 1.0
    return background


def restore_to_original(
    array: np.ndarray,
    record: Mapping[str, Any],
    *,
    is_label: bool,
    label_mode: str = "nearest",
    background: float | Sequence[float] | None = None,
) -> np.ndarray:
    """Map a model-grid array back onto the original grid of the case ``record`` describes.

    ``array``: ``(X, Y, Z)`` (label map when ``is_label``, else a float map) or ``(C, X, Y, Z)``
    float channels (probabilities). Returns the same layout on the original grid: integer labels
    keep their dtype; floats come back as float32.
    """
    model_shape = tuple(record["model_shape"])
    spatial = tuple(array.shape[-3:])
    if spatial != model_shape or array.ndim not in (3, 4):
        raise ValueError(f"array shape {array.shape} does not match the model grid {model_shape}")
    if is_label and array.ndim != 3:
        raise ValueError(
            "a label map must be (X, Y, Z); argmax probabilities first or pass is_label=False"
        )
    box = tuple((int(lo), int(hi)) for lo, hi in record["crop_box"])
    crop_shape = box_shape(box)
    source, target = record["source_spacing"], record["target_spacing"]
    inverse_scale = spacing_scale(target, source)  # model index per source index: s / t

    def back(channel: np.ndarray) -> np.ndarray:
        if _same_spacing(source, target):
            return channel
        if is_label:
            return resample_label(channel, crop_shape, inverse_scale, label_mode)
        return resample_array(channel, crop_shape, inverse_scale, "linear")

    channels = [array] if array.ndim == 3 else list(array)
    out_dtype = array.dtype if is_label else np.float32
    if background is None:
        fill = _default_background(array, is_label)
    else:
        fill = np.broadcast_to(np.asarray(background, dtype=out_dtype), (len(channels),))
    reoriented_shape = tuple(record["reoriented_shape"])
    restored = np.empty((len(channels), *reoriented_shape), dtype=out_dtype)
    for c, channel in enumerate(channels):
        restored[c] = fill[c] if fill.size > 1 else fill[0]
        restored[c][box_slices(box)] = back(channel)
    inverse = AxisTransform.from_list(record["axis_transform"]).inverse()
    result = inverse.apply(restored if array.ndim == 4 else restored[0])
    if tuple(result.shape[-3:]) != tuple(record["original_shape"]):
        raise ValueError("record is inconsistent: restored shape differs from the original shape")
    return np.ascontiguousarray(result)


def model_volume(result: PreprocessedCase) -> tuple[Volume, Volume | None]:
    """The preprocessed arrays as Volumes on the model grid (affine from the record)."""
    affine = np.asarray(result.record["model_affine"])
    image = Volume(result.image, affine, {"modality": result.record["modality"]})
    label = None if result.label is None else Volume(result.label, affine.copy(), {})
    return image, label
