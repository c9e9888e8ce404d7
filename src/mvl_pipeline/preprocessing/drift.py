"""The drift guard: do the cases new since the last plan still fit it?

A nightly retrain adds cases to a task whose plan (spacing, normalisation, classes) was made from
the cases before them. The plan is re-made from every development case on each run, but a few
odd cases barely move pooled statistics: one MR study dropped into a CT task, or a scanner that
changed its slice thickness, would be resampled and normalised by a plan made for other data and
trained on in silence. So the new development cases (in the fingerprint now, not in the previous
one; or the same case id with other content) are compared with the previous fingerprint, the one
the plan was made from:

- ``modality``: a modality the previous cases did not have;
- ``spacing``: per axis, the median spacing of the new cases of a modality against the previous
  cases' median, relative difference above ``spacing_tolerance``;
- ``intensity``: for modalities whose intensities are absolute (``intensity_modalities``, CT in
  Hounsfield units), the new cases' pooled foreground median against the previous pooled
  distribution, in previous standard deviations, above ``intensity_tolerance_sd``;
- ``labels``: a label value the previous cases did not have; or, once there are at least
  ``min_new_cases`` new cases (one case's lesion load says little), a class whose share of the
  foreground voxels changed by more than a factor ``1 + label_fraction_tolerance``.

On findings, ``preprocess.drift.action`` says what happens: ``stop`` (the default) fails the run
with a :class:`DataDriftError` listing every finding, before any training; ``replan`` discards the
previous plan even where the re-plan is within the stability tolerance: the plan is made afresh
from all development cases (a new plan id, and every case preprocessed again, unless it comes out
identical) with the findings in its provenance. Only development cases are fingerprinted (the plan
must learn nothing from gate or test patients), so only they are checked. Findings name
modalities, axes, label values and counts of cases, never a patient.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mvl_pipeline.core.config import ConfigBlock

ACTIONS = ("stop", "replan")


class DataDriftError(ValueError):
    """New cases do not fit the plan, and ``preprocess.drift.action`` is ``stop``."""


@dataclass(frozen=True)
class DriftConfig(ConfigBlock):
    """``preprocess.drift``: the drift guard's tolerances and what a finding does."""

    WHERE = "preprocess.drift"

    action: str = "stop"  # stop | replan
    spacing_tolerance: float = 0.2  # relative, per axis, new cases' median vs previous median
    intensity_tolerance_sd: float = 1.0  # new foreground median vs previous, in previous SDs
    intensity_modalities: tuple[str, ...] = ("CT",)  # absolute intensity scales only
    label_fraction_tolerance: float = 2.0  # a class's foreground share may change by x (1 + this)
    min_new_cases: int = 5  # new cases needed before class shares are compared

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"{self.WHERE}.action must be one of {list(ACTIONS)}; got {self.action!r}")
        for name in ("spacing_tolerance", "intensity_tolerance_sd", "label_fraction_tolerance"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{self.WHERE}.{name} must be > 0; got {getattr(self, name)!r}")
        object.__setattr__(self, "intensity_modalities", tuple(str(m).upper() for m in self.intensity_modalities))


def new_case_ids(fingerprint: Mapping[str, Any], previous: Mapping[str, Any] | None) -> list[str]:
    """Cases of ``fingerprint`` that ``previous`` did not hold, or held with other content."""
    before = (previous or {}).get("cases", {})
    return sorted(
        case_id
        for case_id, record in fingerprint.get("cases", {}).items()
        if case_id not in before or before[case_id].get("source_hash") != record.get("source_hash")
    )


def _label_shares(records: list[Mapping[str, Any]]) -> dict[str, float]:
    voxels: dict[str, int] = {}
    for record in records:
        for value, count in record.get("label_counts", {}).items():
            if value != "0":
                voxels[value] = voxels.get(value, 0) + int(count)
    total = sum(voxels.values())
    return {v: c / total for v, c in voxels.items()} if total else {}


def _case_median(record: Mapping[str, Any]) -> float | None:
    quantiles = record.get("intensity", {}).get("quantiles") or []
    return float(quantiles[len(quantiles) // 2]) if len(quantiles) % 2 == 1 else None


def _median_of_medians(records: list[Mapping[str, Any]]) -> float | None:
    """The median over cases of each case's foreground median (the middle of its quantiles)."""
    values = [m for m in (_case_median(r) for r in records) if m is not None]
    return float(np.median(values)) if values else None


def drift_findings(
    fingerprint: Mapping[str, Any], previous: Mapping[str, Any] | None, config: DriftConfig
) -> list[str]:
    """What about the new cases does not fit the previous fingerprint (empty: nothing, or no
    previous fingerprint: a first plan has nothing to drift from)."""
    if not previous or not previous.get("cases"):
        return []
    new_ids = new_case_ids(fingerprint, previous)
    if not new_ids:
        return []
    cases = fingerprint["cases"]
    old = [r for case_id, r in previous["cases"].items() if case_id not in new_ids]
    findings: list[str] = []
    by_modality: dict[str, list[Mapping[str, Any]]] = {}
    for case_id in new_ids:
        by_modality.setdefault(str(cases[case_id]["modality"]), []).append(cases[case_id])
    old_by_modality: dict[str, list[Mapping[str, Any]]] = {}
    for record in old:
        old_by_modality.setdefault(str(record["modality"]), []).append(record)

    for modality, group in sorted(by_modality.items()):
        before = old_by_modality.get(modality)
        if not before:
            known = ", ".join(sorted(old_by_modality)) or "none"
            findings.append(f"modality: {len(group)} new case(s) of modality {modality}; the plan's cases are {known}")
            continue
        new_spacing = np.median([r["spacing"] for r in group], axis=0)
        old_spacing = np.median([r["spacing"] for r in before], axis=0)
        for axis, (now, then) in enumerate(zip(new_spacing, old_spacing, strict=True)):
            if then > 0 and abs(now - then) / then > config.spacing_tolerance:
                findings.append(
                    f"spacing: {modality} axis {axis}: the {len(group)} new case(s) have median {now:.3g} mm, "
                    f"the plan's cases {then:.3g} mm (tolerance {config.spacing_tolerance:.0%})"
                )
        if modality.upper() in config.intensity_modalities:
            pooled = fingerprint.get("modalities", {}).get(modality, {}).get("foreground_intensity", {})
            prev_pooled = previous.get("modalities", {}).get(modality, {}).get("foreground_intensity", {})
            sd = prev_pooled.get("std") or pooled.get("std")
            now_median, then_median = _median_of_medians(group), _median_of_medians(before)
            if sd and now_median is not None and then_median is not None:
                shift = abs(now_median - then_median) / float(sd)
                if shift > config.intensity_tolerance_sd:
                    findings.append(
                        f"intensity: {modality} foreground median {now_median:.4g} in the {len(group)} new case(s), "
                        f"{then_median:.4g} before: {shift:.2f} SD (tolerance {config.intensity_tolerance_sd:g} SD)"
                    )

    new_shares, old_shares = _label_shares([cases[c] for c in new_ids]), _label_shares(old)
    for value in sorted(set(new_shares) - set(old_shares), key=int):
        findings.append(f"labels: label value {value} in the new case(s); the plan's cases have {sorted(old_shares, key=int)}")
    factor = 1.0 + config.label_fraction_tolerance
    compared = set(new_shares) & set(old_shares) if len(new_ids) >= config.min_new_cases else set()
    for value in sorted(compared, key=int):
        now, then = new_shares[value], old_shares[value]
        if then > 0 and not (then / factor <= now <= then * factor):
            findings.append(
                f"labels: label {value} is {now:.1%} of the new cases' foreground, {then:.1%} before "
                f"(tolerance x{factor:g})"
            )
    return findings


def guard(fingerprint: Mapping[str, Any], previous: Mapping[str, Any] | None, config: DriftConfig) -> list[str]:
    """The findings; raises :class:`DataDriftError` listing them when the action is ``stop``."""
    findings = drift_findings(fingerprint, previous, config)
    if findings and config.action == "stop":
        n_new = len(new_case_ids(fingerprint, previous))
        raise DataDriftError(
            f"{n_new} new development case(s) do not fit the preprocessing plan "
            f"(preprocess.drift.action: stop; nothing was trained):\n  - " + "\n  - ".join(findings) +
            "\nCheck the new data (a study of another task or protocol in the drop?). Taking its files out of the "
            "drop does not take out the cases already ingested from them (ingest keeps them): to go on without "
            "them, delete the data root's 02_intermediate folder and the layers after it and ingest again. To "
            "re-plan on all cases instead: --params preprocess.drift.action=replan (make train "
            "KEDRO_ARGS='--params preprocess.drift.action=replan'), or preprocess.drift.action: replan in conf."
        )
    return findings
