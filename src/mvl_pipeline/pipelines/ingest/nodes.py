"""Ingest nodes: hospital drop -> de-identified cases, a manifest, a quarantine report.

``ingest_drop`` is a generator node (Kedro saves each batch as it comes): the work is
:func:`mvl_pipeline.ingestion.run.ingest`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pandas as pd

from mvl_pipeline.core.case import Case
from mvl_pipeline.ingestion import manifest as ingest_manifest
from mvl_pipeline.ingestion.config import IngestConfig
from mvl_pipeline.ingestion.run import ingest


def ingest_drop(
    drop: Any,
    previous_manifest: Mapping[str, Any],
    pseudonymisation_key: bytes,
    params: Mapping[str, Any],
) -> Iterator[tuple[dict[str, Case | None], dict[str, Any]]]:
    """New or changed units of the drop as ``(cases, manifest)`` batches."""
    yield from ingest(drop, previous_manifest, pseudonymisation_key, IngestConfig.from_params(params))


def report_ingest(manifest: Mapping[str, Any]) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """Quarantine report (one PHI-free record per problem) and the summary table."""
    return ingest_manifest.report(manifest)
