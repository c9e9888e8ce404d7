"""The ingest manifest: what every unit of the drop became, keyed by pseudonyms only.

``{"version", "settings_id", "files": {file key: {fingerprint, content, unit}}, "units": {unit
key: {kind, source_hash, status, modality, cases, quarantined, skipped}}}``. It is what makes
ingest incremental, what the quarantine report and summary are read from, and what the data
version that fit and register tag their runs with is a hash of.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from typing import Any

import pandas as pd

from mvl_pipeline.core import pseudonyms
from mvl_pipeline.ingestion.result import UnitResult

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1


def empty_manifest() -> dict[str, Any]:
    return {"version": MANIFEST_VERSION, "files": {}, "units": {}}


def unit_entry(result: UnitResult, source_hash: str, kind: str) -> dict[str, Any]:
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


def report(manifest: Mapping[str, Any]) -> tuple[list[dict[str, Any]], pd.DataFrame]:
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
