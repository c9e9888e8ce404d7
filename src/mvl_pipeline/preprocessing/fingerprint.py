"""Dataset fingerprint: what the planner needs to know about a set of cases (nnU-Net style).

Per case (:func:`case_fingerprint`): the case's ``source_hash`` (from ingest; a hash of its
arrays and grid when ingest did not record one), spacing and shape in the planning orientation (RAS axis
order, so a coronal acquisition's slice thickness lands on the axis it really spans), the shape
of the body box, label voxel counts, and the foreground intensity distribution summarised as
mean, standard deviation and ``quantile_points`` evenly spaced quantiles. The foreground is the
label's non-zero voxels (nnU-Net's choice); unlabelled cases fall back to the body mask and say
so in ``foreground_source``. A multi-channel case (``meta["channels"]``) gets the statistics of each
channel over the same foreground, and its body box holds the body of every channel.

Per modality (:func:`aggregate_fingerprint`): every case's spacing and shapes, and foreground
statistics pooled with equal weight per case (nnU-Net samples the same number of foreground
voxels from each case): the pooled percentiles are read from the union of the per-case quantile
points, the pooled mean and standard deviation are those of the equal-weight mixture. Nothing is
random, so a fingerprint is a pure function of its cases. A multi-channel dataset also gets
``channels``: per channel its name, modality, rule and pooled foreground statistics (and, from
4-D sources, where predict finds it: see ``_VOLUME_SOURCE``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mvl_pipeline.core.case import Case
from mvl_pipeline.core.channels import plan_channels
from mvl_pipeline.core.config import ConfigBlock
from mvl_pipeline.core.hashing import json_digest
from mvl_pipeline.core.orientation import orientation_transform
from mvl_pipeline.preprocessing.crop import (
    BodyMaskConfig,
    body_box,
    body_threshold,
    box_shape,
    union_box,
)

FINGERPRINT_VERSION = 1
POOLED_PERCENTILES = (0.5, 50.0, 99.5)


@dataclass(frozen=True)
class FingerprintConfig(ConfigBlock):
    """``preprocess.fingerprint``."""

    WHERE = "preprocess.fingerprint"

    quantile_points: int = 1001  # per-case foreground intensity quantiles kept

    def __post_init__(self) -> None:
        if self.quantile_points < 3:
            raise ValueError("fingerprint.quantile_points must be >= 3")


def _round(value: float, digits: int = 7) -> float:
    return float(f"{float(value):.{digits}g}")


def case_fingerprint(
    case: Case,
    config: FingerprintConfig,
    *,
    orientation: str = "RAS",
    body_mask: BodyMaskConfig | None = None,
) -> dict[str, Any]:
    """The planner's facts about one case (JSON-serialisable; no PHI: pseudonyms only), in the
    plan's ``orientation`` axis order, with the body found by ``body_mask``."""
    body_mask = body_mask or BodyMaskConfig()
    image = case.image
    transform = orientation_transform(image.affine, orientation)
    channels = plan_channels(case.meta)
    if len(channels) != image.n_channels and image.n_channels > 1:
        raise ValueError(f"case {case.case_id}: {image.n_channels} image channels, {len(channels)} recorded")
    arrays = [np.asarray(image.channel(c).array) for c in range(image.n_channels)]
    modalities = [str(c["modality"]) for c in channels] or [case.modality]
    array = arrays[0]  # the reference channel
    label = None if case.label is None else np.asarray(case.label.array)
    box = None
    for values_c, modality in zip(arrays, modalities, strict=True):  # the body of every channel
        box = union_box(box, body_box(values_c, modality, body_mask, label=label))

    foreground_source = "label"
    foreground = label > 0 if label is not None else None
    if foreground is None or not foreground.any():
        foreground_source = "body"
        foreground = array > body_threshold(array, case.modality, body_mask)
    intensities = [_intensity(values_c, foreground, config) for values_c in arrays]
    values = intensities[0][0]

    label_counts: dict[str, int] = {}
    if label is not None:
        if label.min() < 0:
            raise ValueError(f"case {case.case_id}: negative label values")
        counts = np.bincount(label.ravel().astype(np.int64))
        label_counts = {str(v): int(c) for v, c in enumerate(counts) if c}
    record = {
        "case_id": case.case_id,
        "patient_id": case.patient_id,
        "source_hash": str(case.meta.get("source_hash") or content_hash(case)),
        "modality": case.modality,
        "source_orientation": image.orientation,
        "spacing": [_round(s) for s in transform.permute(image.spacing)],
        "shape": list(transform.output_shape(image.shape)),
        "body_box_shape": list(transform.output_shape(box_shape(box))),
        "labelled": label is not None,
        "label_counts": label_counts,
        "label_names": {str(k): v for k, v in case.label_names.items()},
        "foreground_source": foreground_source,
        "foreground_voxels": int(values.size),
        "intensity": intensities[0][1],
    }
    if channels:  # per channel: its statistics over the same foreground (core/channels.py)
        record["channels"] = [
            {**_channel_identity(c), "intensity": intensity} for c, (_, intensity) in zip(channels, intensities, strict=True)
        ]
        record["channel_min_overlap"] = case.meta.get("channel_min_overlap")
    return record


def _intensity(array: np.ndarray, foreground: np.ndarray, config: FingerprintConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """The foreground values of one channel and their mean, standard deviation and quantiles."""
    values = array[foreground].astype(np.float64) if foreground.any() else array.astype(np.float64).ravel()
    quantiles = np.quantile(values, np.linspace(0.0, 1.0, config.quantile_points))
    return values, {
        "mean": _round(values.mean()),
        "std": _round(values.std()),
        "quantiles": [_round(q) for q in quantiles],
    }


#: What predict needs to find a channel in a 4-D image, kept when the source was one (and, in
#: the plan, when every case agrees): the source's volume count and the picked volume's name.
_VOLUME_SOURCE = ("n_volumes", "source_name")


def _channel_identity(channel: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies a channel across cases (its name, modality, rule and source index; for a
    4-D source also its volume count and the volume's name)."""
    identity = {key: channel.get(key) for key in ("name", "modality", "match", "index")}
    identity.update({key: channel[key] for key in _VOLUME_SOURCE if channel.get(key) is not None})
    return identity


def _aggregate_channels(cases: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The channels every case shares, with their pooled foreground statistics; [] for a
    single-channel dataset. Cases with other channels (or none) cannot be planned together."""
    records = list(cases.values())
    layouts = {json_digest([(c["name"], c["modality"]) for c in r.get("channels", [])]) for r in records}
    if len(layouts) > 1:
        raise ValueError(
            "the cases do not share one channel layout (names and modalities of ingest.channels): "
            "re-ingest them with the same channels"
        )
    if not records or not records[0].get("channels"):
        return []
    out = []
    for index, first in enumerate(records[0]["channels"]):
        channel = _channel_identity(first)
        if any(r["channels"][index].get("index") != first.get("index") for r in records):
            channel["index"] = None  # the cases' sources disagree: predict needs the volumes' names
        for key in _VOLUME_SOURCE:  # kept only where every case agrees
            if key in channel and any(r["channels"][index].get(key) != channel[key] for r in records):
                del channel[key]
        channel["foreground_intensity"] = _pooled_intensity([{"intensity": r["channels"][index]["intensity"]} for r in records])
        out.append(channel)
    return out


def _pooled_intensity(records: list[Mapping[str, Any]]) -> dict[str, Any]:
    means = np.array([r["intensity"]["mean"] for r in records], dtype=np.float64)
    stds = np.array([r["intensity"]["std"] for r in records], dtype=np.float64)
    points = np.concatenate(
        [np.asarray(r["intensity"]["quantiles"], dtype=np.float64) for r in records]
    )
    mean = float(means.mean())
    variance = float(np.mean(stds**2 + means**2) - mean**2)
    p_lo, p_mid, p_hi = np.percentile(points, POOLED_PERCENTILES)
    return {
        "mean": _round(mean),
        "std": _round(np.sqrt(max(variance, 0.0))),
        "percentile_00_5": _round(p_lo),
        "median": _round(p_mid),
        "percentile_99_5": _round(p_hi),
        "min": _round(points.min()),
        "max": _round(points.max()),
        "n_cases": len(records),
    }


def aggregate_fingerprint(
    records: Iterable[Mapping[str, Any]],
    config: FingerprintConfig,
    *,
    orientation: str = "RAS",
    body_mask: BodyMaskConfig | None = None,
) -> dict[str, Any]:
    """Dataset fingerprint from per-case records (sorted by case id; see module doc)."""
    body_mask = body_mask or BodyMaskConfig()
    cases = {r["case_id"]: dict(r) for r in sorted(records, key=lambda r: r["case_id"])}
    by_modality: dict[str, list[dict[str, Any]]] = {}
    for record in cases.values():
        by_modality.setdefault(record["modality"], []).append(record)
    modalities = {}
    for modality, group in sorted(by_modality.items()):
        label_voxels: dict[str, int] = {}
        label_cases: dict[str, int] = {}
        for record in group:
            for value, count in record["label_counts"].items():
                label_voxels[value] = label_voxels.get(value, 0) + count
                label_cases[value] = label_cases.get(value, 0) + 1
        total = sum(label_voxels.values()) or 1
        modalities[modality] = {
            "case_ids": [r["case_id"] for r in group],
            "spacings": [r["spacing"] for r in group],
            "shapes": [r["shape"] for r in group],
            "body_box_shapes": [r["body_box_shape"] for r in group],
            "median_spacing": [_round(v) for v in np.median([r["spacing"] for r in group], axis=0)],
            "foreground_intensity": _pooled_intensity(group),
            "label_frequencies": {
                value: {
                    "voxels": label_voxels[value],
                    "fraction": _round(label_voxels[value] / total),
                    "cases": label_cases[value],
                }
                for value in sorted(label_voxels, key=int)
            },
        }
    label_names: dict[str, str] = {}
    for record in cases.values():
        label_names.update(record.get("label_names", {}))
    fingerprint = {
        "version": FINGERPRINT_VERSION,
        "orientation": orientation,
        "quantile_points": config.quantile_points,
        "body_mask": body_mask.to_dict(),
        "n_cases": len(cases),
        "label_names": dict(sorted(label_names.items(), key=lambda kv: int(kv[0]))),
        "modalities": modalities,
        "cases": cases,
    }
    channels = _aggregate_channels(cases)
    if channels:  # only multi-channel datasets carry the key (single-channel fingerprints unchanged)
        fingerprint["channels"] = channels
        fingerprint["channel_min_overlap"] = next(iter(cases.values())).get("channel_min_overlap")
    fingerprint["fingerprint_id"] = json_digest(fingerprint)
    return fingerprint


def content_hash(case: Case) -> str:
    """``"content:<sha256>"`` of a case's arrays and grid: the stand-in for a missing
    ``meta["source_hash"]`` (it changes whenever the voxels, labels or geometry change)."""
    digest = hashlib.sha256()
    for volume in (case.image, case.label):
        if volume is None:
            digest.update(b"no-label")
            continue
        array = np.ascontiguousarray(volume.array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.asarray(volume.affine, dtype=np.float64).tobytes())
        digest.update(memoryview(array).cast("B"))
    return f"content:{digest.hexdigest()[:32]}"


