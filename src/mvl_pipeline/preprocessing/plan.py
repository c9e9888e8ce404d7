"""Preprocessing plan: every choice :func:`~mvl_pipeline.preprocessing.apply.preprocess_case`
makes, derived from a saved dataset fingerprint the way nnU-Net plans, and overridable.

- Target spacing: the per-axis median of the case spacings. When the median grid is strongly
  anisotropic (the coarsest axis more than ``anisotropy_threshold`` times coarser than the
  finest other axis, and its median voxel count that many times smaller), the coarse axis gets
  the 10th percentile of its spacings instead (but never finer than the other axes), as nnU-Net's
  ``determine_fullres_target_spacing`` does: fewer cases are then interpolated across thick slices.
- Patch size: whole tokens of the model's embedding patch (``embed_patch_size``), starting from
  the median body-box shape on the target grid and taking one token at a time off the axis with
  the largest physical extent until the token count fits ``token_budget`` (so the patch is as
  close to isotropic in millimetres as the budget and the image allow).
- Normalisation per modality (``ct`` with the pooled foreground percentiles and mean/std for CT,
  ``zscore_body`` otherwise; see :mod:`mvl_pipeline.preprocessing.intensity`); for a
  multi-channel dataset also per channel (``channels``: a CT phase gets ``ct`` with its own pooled
  statistics, an MR contrast its per-case z-score), with one target spacing and crop for all.
- Orientation, interpolation modes, body mask and crop margin: copied from the configuration.

The plan is a JSON document with a ``plan_id``: a content hash of everything except ``plan_id``
and ``provenance``. :func:`reconcile_plan` keeps the previous plan (same id) when a re-plan only
drifts within ``stability_tolerance`` (and its planned patch size is still valid), so adding or
changing a few cases does not invalidate every preprocessed case; any changed parameter, label
set or discrete choice makes a new plan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mvl_pipeline.core.config import ConfigBlock
from mvl_pipeline.core.hashing import json_digest
from mvl_pipeline.preprocessing.crop import BodyMaskConfig
from mvl_pipeline.preprocessing.intensity import SCHEMES, Normalization
from mvl_pipeline.preprocessing.resample import IMAGE_MODES, LABEL_MODES

PLAN_VERSION = 1
DEFAULT_TOKEN_BUDGET = 256  # model.token_budget's default
_NOT_HASHED = ("plan_id", "provenance")


def _triple(value: Any, name: str, cast: type = float) -> tuple | None:
    if value is None:
        return None
    values = [value] * 3 if np.isscalar(value) else list(value)
    if len(values) != 3:
        raise ValueError(f"{name} must be one number or three, got {value!r}")
    return tuple(cast(v) for v in values)


@dataclass(frozen=True)
class InterpolationConfig(ConfigBlock):
    """``preprocess.plan.interpolation``: never linear on label values."""

    WHERE = "preprocess.plan.interpolation"

    image: str = "linear"  # linear | cubic | nearest
    label: str = "nearest"  # nearest | onehot_linear

    def __post_init__(self) -> None:
        if self.image not in IMAGE_MODES:
            raise ValueError(f"preprocess.plan.interpolation.image must be one of {IMAGE_MODES}")
        if self.label not in LABEL_MODES:
            raise ValueError(f"preprocess.plan.interpolation.label must be one of {LABEL_MODES}")


@dataclass(frozen=True)
class NormalizationConfig(ConfigBlock):
    """``preprocess.plan.normalization``: a scheme per modality (keys upper-cased)."""

    WHERE = "preprocess.plan.normalization"

    schemes: Mapping[str, str] = field(default_factory=lambda: {"CT": "ct"})
    default_scheme: str = "zscore_body"
    ct_clip_percentiles: tuple[float, float] = (0.5, 99.5)
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "schemes", {str(k).upper(): str(v) for k, v in self.schemes.items()})
        object.__setattr__(self, "overrides", {str(k).upper(): dict(v) for k, v in self.overrides.items()})
        for scheme in [*self.schemes.values(), self.default_scheme]:
            if scheme not in SCHEMES:
                raise ValueError(f"normalisation scheme must be one of {SCHEMES}, got {scheme!r}")
        lo, hi = (float(v) for v in self.ct_clip_percentiles)
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(
                f"ct_clip_percentiles must satisfy 0 <= lo < hi <= 100, got {list(self.ct_clip_percentiles)}"
            )


@dataclass(frozen=True)
class PlanConfig(ConfigBlock):
    """Planning parameters (``preprocess.plan`` in parameters_preprocess.yml); None = planned."""

    WHERE = "preprocess.plan"

    orientation: str = "RAS"
    target_spacing: tuple[float, float, float] | None = None
    anisotropy_threshold: float = 3.0
    coarse_axis_percentile: float = 10.0
    token_budget: int | None = None  # None: the model's (model.token_budget)
    embed_patch_size: tuple[int, int, int] | None = None
    patch_size: tuple[int, int, int] | None = None
    interpolation: InterpolationConfig = field(default_factory=InterpolationConfig)
    normalization: NormalizationConfig = field(default_factory=NormalizationConfig)
    crop_margin_mm: float = 10.0
    stability_tolerance: float = 0.05

    def __post_init__(self) -> None:
        object.__setattr__(self, "orientation", str(self.orientation).upper())
        for name, cast in (("target_spacing", float), ("embed_patch_size", int), ("patch_size", int)):
            object.__setattr__(self, name, _triple(getattr(self, name), name, cast))
        if self.token_budget is not None and self.token_budget < 1:
            raise ValueError("token_budget must be >= 1")
        if not 0.0 <= self.coarse_axis_percentile <= 100.0:
            raise ValueError("coarse_axis_percentile must be in [0, 100]")
        if self.target_spacing is not None and min(self.target_spacing) <= 0:
            raise ValueError("target_spacing must be positive")


def nnunet_target_spacing(
    spacings: Sequence[Sequence[float]],
    shapes: Sequence[Sequence[float]],
    *,
    anisotropy_threshold: float = 3.0,
    coarse_axis_percentile: float = 10.0,
) -> tuple[tuple[float, float, float], int | None]:
    """nnU-Net's full-resolution target spacing; returns ``(spacing, coarse axis or None)``.

    ``shapes`` are the cases' (cropped) voxel counts, used for the anisotropic-voxels test.
    """
    spacings_ = np.asarray(spacings, dtype=np.float64)
    target = np.percentile(spacings_, 50, axis=0)
    target_size = np.percentile(np.asarray(shapes, dtype=np.float64), 50, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    max_other_spacing = max(target[a] for a in others)
    anisotropic_spacing = target[worst] > anisotropy_threshold * max_other_spacing
    anisotropic_voxels = target_size[worst] * anisotropy_threshold < min(
        target_size[a] for a in others
    )
    if not (anisotropic_spacing and anisotropic_voxels):
        return tuple(float(v) for v in target), None  # type: ignore[return-value]
    coarse = float(np.percentile(spacings_[:, worst], coarse_axis_percentile))
    if coarse < max_other_spacing:
        coarse = max(max_other_spacing, coarse) + 1e-5
    target[worst] = coarse
    return tuple(float(v) for v in target), worst  # type: ignore[return-value]


def patch_size_for_budget(
    median_shape: Sequence[float],
    spacing: Sequence[float],
    embed_patch_size: Sequence[int],
    token_budget: int,
) -> tuple[int, int, int]:
    """Largest whole-token patch, at most the median image, with ``prod(tokens) <= budget``.

    Shrinks, one token at a time, the axis whose patch spans the most millimetres.
    """
    embed = np.asarray(embed_patch_size, dtype=np.int64)
    tokens = np.maximum(1, np.ceil(np.asarray(median_shape, dtype=np.float64) / embed)).astype(
        np.int64
    )
    spacing_ = np.asarray(spacing, dtype=np.float64)
    while int(np.prod(tokens)) > token_budget:
        extent = np.where(tokens > 1, tokens * embed * spacing_, -np.inf)
        if not np.isfinite(extent).any():
            break
        tokens[int(np.argmax(extent))] -= 1
    if int(np.prod(tokens)) > token_budget:
        raise ValueError(f"token_budget {token_budget} is below one token")
    return tuple(int(v) for v in tokens * embed)  # type: ignore[return-value]


def _pooled_ct_statistics(
    records: list[Mapping[str, Any]], percentiles: tuple[float, float]
) -> dict[str, Any]:
    labelled = [r for r in records if r.get("foreground_source") == "label"]
    group = labelled or records
    points = np.concatenate(
        [np.asarray(r["intensity"]["quantiles"], dtype=np.float64) for r in group]
    )
    means = np.array([r["intensity"]["mean"] for r in group], dtype=np.float64)
    stds = np.array([r["intensity"]["std"] for r in group], dtype=np.float64)
    mean = float(means.mean())
    std = float(np.sqrt(max(float(np.mean(stds**2 + means**2)) - mean**2, 0.0)))
    lo, hi = (float(v) for v in np.percentile(points, percentiles))
    return {
        "clip": [round(lo, 4), round(hi, 4)],
        "mean": round(mean, 4),
        "std": round(max(std, 1e-6), 4),
    }


def _normalizations(
    fingerprint: Mapping[str, Any], config: PlanConfig
) -> dict[str, dict[str, Any]]:
    cases = list(fingerprint["cases"].values())
    out: dict[str, dict[str, Any]] = {}
    for modality in sorted(fingerprint["modalities"]):
        scheme = config.normalization.schemes.get(modality.upper(), config.normalization.default_scheme)
        override = dict(config.normalization.overrides.get(modality.upper(), {}))
        scheme = str(override.pop("scheme", scheme))
        values: dict[str, Any] = {"scheme": scheme}
        if scheme == "ct":
            group = [r for r in cases if r["modality"] == modality]
            values |= _pooled_ct_statistics(group, config.normalization.ct_clip_percentiles)
            values |= override
        out[modality] = Normalization.from_dict(values).to_dict()
    return out


def _channel_normalizations(fingerprint: Mapping[str, Any], config: PlanConfig) -> list[dict[str, Any]]:
    """Each channel of a multi-channel dataset with its own normalisation: the scheme of its
    name or else of its modality (``ct`` with the channel's pooled foreground statistics)."""
    cases = list(fingerprint["cases"].values())
    schemes, overrides = config.normalization.schemes, config.normalization.overrides
    out = []
    for index, channel in enumerate(fingerprint.get("channels") or []):
        name, modality = str(channel["name"]).upper(), str(channel["modality"]).upper()
        scheme = schemes.get(name, schemes.get(modality, config.normalization.default_scheme))
        override = dict(overrides.get(name, overrides.get(modality, {})))
        values: dict[str, Any] = {"scheme": str(override.pop("scheme", scheme))}
        if values["scheme"] == "ct":
            group = [{"intensity": r["channels"][index]["intensity"], "foreground_source": r.get("foreground_source")}
                     for r in cases]  # fmt: skip
            values |= _pooled_ct_statistics(group, config.normalization.ct_clip_percentiles) | override
        out.append(
            {key: channel.get(key) for key in ("name", "modality", "match", "index")}
            | {key: channel[key] for key in ("n_volumes", "source_name") if key in channel}  # predict finds it by them
            | {"normalization": Normalization.from_dict(values).to_dict()}
        )
    return out


def plan_preprocessing(
    fingerprint: Mapping[str, Any],
    config: PlanConfig,
    *,
    body_mask: BodyMaskConfig | None = None,
    embed_patch_size: Sequence[int] | int | None = None,
    token_budget: int | None = None,
) -> dict[str, Any]:
    """The plan (JSON document with ``plan_id``) for ``fingerprint`` under ``config``.

    ``embed_patch_size`` and ``token_budget`` are the model's (``model.patch_size``,
    ``model.token_budget``); the configuration's values, when set, win. The budget defaults to
    :data:`DEFAULT_TOKEN_BUDGET`.
    """
    cases = list(fingerprint["cases"].values())
    if not cases:
        raise ValueError("cannot plan from an empty fingerprint")
    orientation = str(fingerprint.get("orientation", "RAS")).upper()
    if orientation != config.orientation:
        raise ValueError(
            f"the fingerprint was taken in {orientation} axis order but the plan asks for "
            f"{config.orientation}: recompute the fingerprint with the same orientation"
        )
    embed = config.embed_patch_size or _triple(embed_patch_size, "embed_patch_size", int)
    if embed is None:
        raise ValueError(
            "embed_patch_size is unknown: set preprocess.plan.embed_patch_size or model.patch_size"
        )
    budget = int(config.token_budget or token_budget or DEFAULT_TOKEN_BUDGET)
    if budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {budget}")
    spacings = [r["spacing"] for r in cases]
    box_shapes = [r["body_box_shape"] for r in cases]
    planned_spacing, coarse_axis = nnunet_target_spacing(
        spacings,
        box_shapes,
        anisotropy_threshold=config.anisotropy_threshold,
        coarse_axis_percentile=config.coarse_axis_percentile,
    )
    target = config.target_spacing or planned_spacing
    resampled = np.asarray(box_shapes, dtype=np.float64) * np.asarray(spacings) / np.asarray(target)
    median_shape = np.median(resampled, axis=0)
    patch = config.patch_size or patch_size_for_budget(median_shape, target, embed, budget)
    if any(p % e for p, e in zip(patch, embed, strict=True)):
        raise ValueError(f"patch_size {patch} is not a multiple of the embedding patch {embed}")
    tokens = int(np.prod([p // e for p, e in zip(patch, embed, strict=True)]))
    if tokens > budget:
        raise ValueError(f"patch_size {patch} needs {tokens} tokens, over the budget {budget}")

    label_names = dict(fingerprint.get("label_names", {}))
    label_values = sorted(
        {0}
        | {int(v) for r in cases for v in r.get("label_counts", {})}
        | {int(k) for k in label_names}
    )
    if label_values[-1] > 255:
        raise ValueError("label values above 255 do not fit the uint8 model-input labels")
    plan: dict[str, Any] = {
        "version": PLAN_VERSION,
        "orientation": config.orientation,
        "target_spacing": [round(float(v), 6) for v in target],
        "coarse_axis": coarse_axis if config.target_spacing is None else None,
        "interpolation": config.interpolation.to_dict(),
        "normalization": _normalizations(fingerprint, config),
        "default_normalization": {"scheme": config.normalization.default_scheme},
        "body_mask": (body_mask or BodyMaskConfig()).to_dict(),
        "crop_margin_mm": config.crop_margin_mm,
        "embed_patch_size": list(embed),
        "token_budget": budget,
        "patch_size": list(patch),
        "patch_size_source": "configured" if config.patch_size else "planned",
        "tokens": tokens,
        "label_values": label_values,
        "label_names": label_names,
        "provenance": {
            "fingerprint_id": fingerprint.get("fingerprint_id"),
            "n_cases": len(cases),
            "planned_spacing": [round(float(v), 6) for v in planned_spacing],
            "median_shape_on_target_grid": [round(float(v), 2) for v in median_shape],
        },
    }
    channels = _channel_normalizations(fingerprint, config)
    if channels:  # several input channels: one normalisation each, one grid and crop for all
        plan["channels"] = channels
        plan["channel_min_overlap"] = fingerprint.get("channel_min_overlap")
    plan["plan_id"] = json_digest(plan, exclude=_NOT_HASHED)
    return plan


def _close(a: Any, b: Any, tolerance: float) -> bool:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tolerance) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_close(x, y, tolerance) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
            return a == b
        return abs(float(a) - float(b)) <= tolerance * max(abs(float(a)), abs(float(b)), 1.0)
    return a == b


def plans_close(a: Mapping[str, Any], b: Mapping[str, Any], tolerance: float) -> bool:
    """Whether plan ``b`` can stand in for plan ``a``.

    Same structure and values, floats within ``tolerance`` (relative, floor 1.0). A *planned*
    patch size is not compared (it jumps by whole tokens when the median shape crosses a token
    boundary): ``b``'s patch only has to be valid for ``a``'s embedding patch and token budget,
    which are compared exactly.
    """
    skip = set(_NOT_HASHED)
    if a.get("patch_size_source") == "planned" == b.get("patch_size_source"):
        skip |= {"patch_size", "tokens"}
        patch, embed = b.get("patch_size") or [], a.get("embed_patch_size") or []
        if len(patch) != len(embed) or any(p % e for p, e in zip(patch, embed, strict=True)):
            return False
        if int(np.prod([p // e for p, e in zip(patch, embed, strict=True)])) > a["token_budget"]:
            return False
    strip = {k: v for k, v in a.items() if k not in skip}
    other = {k: v for k, v in b.items() if k not in skip}
    return _close(strip, other, tolerance)


def reconcile_plan(
    new: Mapping[str, Any], previous: Mapping[str, Any] | None, tolerance: float
) -> tuple[dict[str, Any], bool]:
    """``(plan to use, reused previous?)``: the previous plan when ``new`` is within tolerance."""
    if (
        previous
        and previous.get("version") == PLAN_VERSION
        and previous.get("plan_id") == json_digest(previous, exclude=_NOT_HASHED)
        and plans_close(new, previous, tolerance)
    ):
        return dict(previous), True
    return dict(new), False


def plan_classes(plan: Mapping[str, Any]) -> dict[int, str]:
    """Foreground label value -> name of the classes a model trained under ``plan`` predicts
    (from the data the plan was made from: the label map that ingest recorded)."""
    names = {int(k): str(v) for k, v in (plan.get("label_names") or {}).items()}
    values = [int(v) for v in plan.get("label_values", []) if int(v) != 0] or sorted(names)
    if not values:
        raise ValueError("the preprocessing plan lists no foreground label: were the cases labelled?")
    return {v: names.get(v, f"label {v}") for v in sorted(values)}
