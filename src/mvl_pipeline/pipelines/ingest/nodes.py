"""Ingest nodes: hospital drop -> de-identified cases, a manifest, a quarantine report.

``ingest_drop`` is a generator node: it yields ``(cases, manifest)`` every few units, so cases
are written while later ones are still being processed, memory stays bounded, and a crash loses
at most one batch (the manifest saved with each batch records what is done; a re-run resumes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from mvl_pipeline.core import pseudonyms
from mvl_pipeline.core.case import Case
from mvl_pipeline.core.config import known_only
from mvl_pipeline.dicom.deid import DeidKeyError, require_key
from mvl_pipeline.ingestion.process import IngestSettings, UnitResult, process_unit
from mvl_pipeline.ingestion.scan import DropScan, scan_drop

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class IngestParams:
    labels: Mapping[str, int]
    label_aliases: Mapping[str, str] = field(default_factory=dict)
    label_suffixes: tuple[str, ...] = ("_label", "_labels", "_seg", "_mask")
    image_suffixes: tuple[str, ...] = ("_image", "_img", "_ct", "_0000")
    workers: int = 0
    batch_size: int = 8
    min_slices: int = 8
    spacing_tolerance: float = 0.1
    retain_longitudinal_temporal: bool = False
    quarantine_burned_in: bool = True
    keep_unlabelled: bool = False
    volume_modality: str = "auto"
    progress: bool = True

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> IngestParams:
        values = known_only(cls, params, "ingest parameters")
        for name in ("label_suffixes", "image_suffixes"):
            if name in values:
                values[name] = tuple(values[name])
        if not values.get("labels"):
            raise ValueError("params:ingest.labels must map label names to values, e.g. {organ: 1}")
        return cls(**values)

    def settings(self) -> IngestSettings:
        return IngestSettings(
            labels=dict(self.labels),
            label_aliases={k.lower(): v.lower() for k, v in self.label_aliases.items()},
            min_slices=self.min_slices,
            spacing_tolerance=self.spacing_tolerance,
            retain_longitudinal_temporal=self.retain_longitudinal_temporal,
            quarantine_burned_in=self.quarantine_burned_in,
            keep_unlabelled=self.keep_unlabelled,
            volume_modality=self.volume_modality,
        )

    def settings_id(self) -> str:
        """Hash of everything that shapes a unit's result: a change re-ingests every unit."""
        shaping = {**asdict(self.settings()), "label_suffixes": self.label_suffixes,
                   "image_suffixes": self.image_suffixes}  # fmt: skip
        return hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def n_workers(self) -> int:
        return self.workers if self.workers > 0 else max(1, os.cpu_count() or 1)


def _empty_manifest() -> dict[str, Any]:
    return {"version": MANIFEST_VERSION, "files": {}, "units": {}}


def checked_key(pseudonymisation_key: bytes) -> bytes:
    """The key, refused up front when de-identification would refuse it.

    SecretKeyDataset checks length and hex only; ``deid.require_key`` also refuses keys with too
    few distinct bytes. Checking late would quarantine every DICOM study as ``internal_error``.
    """
    try:
        return require_key(pseudonymisation_key)
    except DeidKeyError as exc:
        raise DeidKeyError(
            f"refusing to ingest: {exc}. Replace pseudonymisation.key in conf/local/credentials.yml "
            "with a random one, e.g. from `python -c 'import secrets; print(secrets.token_hex(32))'` "
            "(or delete it and run `python -m mvl_pipeline.cli.secrets ensure-key "
            "conf/local/credentials.yml`)."
        ) from None


def _executor(workers: int) -> Executor | None:
    if workers <= 1:
        return None
    # spawn: workers must not inherit the driver's threads (MLflow, Kedro hooks) or locks.
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def _unit_entry(result: UnitResult, source_hash: str, kind: str) -> dict[str, Any]:
    if result.cases and not result.quarantined:
        status = "ingested"
    elif result.cases:
        status = "partial"
    elif result.quarantined:
        status = "quarantined"
    else:
        status = "skipped"
    return {
        "kind": kind,
        "source_hash": source_hash,
        "status": status,
        "modality": result.modality,
        "cases": sorted(c.case_id for c in result.cases),
        "quarantined": result.quarantined,
        "skipped": result.skipped,
    }


def ingest_drop(
    drop: Any,
    previous_manifest: Mapping[str, Any],
    pseudonymisation_key: bytes,
    params: Mapping[str, Any],
) -> Iterator[tuple[dict[str, Case | None], dict[str, Any]]]:
    """Ingest new or changed units of the drop; yield ``(cases, manifest)`` batches."""
    key = checked_key(pseudonymisation_key)
    config = IngestParams.from_params(params)
    manifest = dict(previous_manifest) if previous_manifest else _empty_manifest()
    if manifest.get("version") != MANIFEST_VERSION:
        logger.warning("ingest manifest has another version: re-ingesting everything")
        manifest = _empty_manifest()
    settings_id = config.settings_id()
    force = bool(manifest.get("units")) and manifest.get("settings_id") != settings_id
    if force:
        logger.info("ingest settings changed since the last run: every study in the drop is ingested again")
    workers = config.n_workers()
    pool = _executor(workers)
    try:
        scan: DropScan = scan_drop(drop, manifest, key, config, pool, force=force)
        logger.info(
            "drop: %d files, %d units; %d new or changed to process, %d unchanged",
            scan.n_files, scan.n_units, len(scan.todo), scan.n_units - len(scan.todo),
        )  # fmt: skip
        # Units whose files left the drop stay: their cases were collected and remain valid.
        units_state = dict(manifest.get("units", {}))
        new_manifest = {
            "version": MANIFEST_VERSION,
            "settings_id": settings_id,
            "files": scan.files,
            "units": units_state,
        }
        if not scan.todo:
            yield {}, new_manifest
            return
        yield from _process(drop, scan, key, config, pool, new_manifest)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _process(
    drop: Any,
    scan: DropScan,
    key: bytes,
    config: IngestParams,
    pool: Executor | None,
    manifest: dict[str, Any],
) -> Iterator[tuple[dict[str, Case | None], dict[str, Any]]]:
    settings = config.settings()
    todo = scan.todo
    progress = tqdm(total=len(todo), desc="ingest", unit="unit", disable=not config.progress, mininterval=1.0)
    counts: Counter[str] = Counter()
    batch: dict[str, Case | None] = {}

    def results() -> Iterator[tuple[Any, UnitResult]]:
        if pool is None:
            for unit, ukey, source_hash in todo:
                yield (unit, ukey, source_hash), process_unit(drop, unit, key, settings)
            return
        futures = {
            pool.submit(process_unit, drop, unit, key, settings): (unit, ukey, source_hash)
            for unit, ukey, source_hash in todo
        }
        for future in as_completed(futures):
            yield futures[future], future.result()

    for (unit, ukey, source_hash), result in results():
        previous_cases = set(manifest["units"].get(ukey, {}).get("cases", []))
        entry = _unit_entry(result, source_hash, unit.kind)
        manifest["units"][ukey] = entry
        for case in result.cases:
            # downstream (preprocess) recomputes a case only when its source changed
            batch[case.case_id] = replace(case, meta={**case.meta, "source_hash": source_hash})
        for stale in previous_cases - set(entry["cases"]):
            batch[stale] = None  # the study changed and no longer yields this case
        counts["cases"] += len(result.cases)
        counts["quarantined"] += len(result.quarantined)
        counts["units"] += 1
        progress.update(1)
        progress.set_postfix(cases=counts["cases"], quarantined=counts["quarantined"], refresh=False)
        if len(batch) >= config.batch_size:
            yield batch, manifest
            batch = {}
    progress.close()
    logger.info(
        "ingest: %d units processed -> %d cases ingested, %d quarantine records",
        counts["units"], counts["cases"], counts["quarantined"],
    )  # fmt: skip
    yield batch, manifest


def report_ingest(manifest: Mapping[str, Any]) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """Quarantine report (one PHI-free record per problem) and a summary table.

    The summary counts cases and quarantine/skip records per status, reason and modality.
    """
    records = []
    rows: Counter[tuple[str, str, str]] = Counter()
    for ukey, unit in sorted(manifest.get("units", {}).items()):
        modality = unit.get("modality", "unknown")
        rows[("ingested", "ok", modality)] += len(unit.get("cases", []))
        for index, record in enumerate(unit.get("quarantined", [])):
            records.append({"record_id": f"q-{ukey[2:14]}-{index}", "unit": ukey, "modality": modality, **record})
            rows[("quarantined", record["reason"], modality)] += 1
        for record in unit.get("skipped", []):
            rows[("skipped", record["reason"], modality)] += 1
    summary = pd.DataFrame(
        [{"status": s, "reason": r, "modality": m, "count": n} for (s, r, m), n in sorted(rows.items()) if n],
        columns=["status", "reason", "modality", "count"],
    )
    for row in summary.itertuples(index=False):
        logger.info("ingest summary: %-11s %-28s %-6s %d", row.status, row.reason, row.modality, row.count)
    return records, summary


def data_version(manifest: Mapping[str, Any]) -> str:
    """A short content version of the ingested data (what fit/register tag runs with when DVC
    has not recorded one): a hash over the units' source hashes and statuses."""
    parts = [f"{k}:{u['source_hash']}:{u['status']}" for k, u in sorted(manifest.get("units", {}).items())]
    return pseudonyms.keyed_digest(b"mvl-data-version", *parts)[:12]
