"""Ingest a drop incrementally: scan it against the previous manifest, process the new or
changed units (in worker processes), and hand out the cases in batches with the manifest.

:func:`ingest` is a generator: it yields ``(cases, manifest)`` every ``batch_size`` cases, so
cases are written while later ones are still being processed, memory stays bounded, and a crash
loses at most one batch (the manifest saved with each batch records what is done; a re-run
resumes). A case id mapped to ``None`` is a case to delete (its study changed).
"""

from __future__ import annotations

import logging
import multiprocessing
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from dataclasses import replace
from typing import Any

from tqdm.auto import tqdm

from mvl_pipeline.core import pseudonyms
from mvl_pipeline.core.case import Case
from mvl_pipeline.dicom.deid import DEID_METHOD
from mvl_pipeline.ingestion.config import IngestConfig
from mvl_pipeline.ingestion.manifest import MANIFEST_VERSION, empty_manifest, unit_entry
from mvl_pipeline.ingestion.process import process_unit
from mvl_pipeline.ingestion.result import UnitResult
from mvl_pipeline.ingestion.scan import DropScan, scan_drop

logger = logging.getLogger(__name__)

def _executor(workers: int) -> Executor | None:
    if workers <= 1:
        return None
    # spawn: workers must not inherit the driver's threads (MLflow, Kedro hooks) or locks.
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def ingest(
    drop: Any,
    previous_manifest: Mapping[str, Any],
    key: bytes,
    config: IngestConfig,
) -> Iterator[tuple[dict[str, Case | None], dict[str, Any]]]:
    """Ingest new or changed units of the drop; yield ``(cases, manifest)`` batches."""
    manifest = dict(previous_manifest) if previous_manifest else empty_manifest()
    if manifest.get("version") != MANIFEST_VERSION:
        logger.warning("ingest manifest has another version: re-ingesting everything")
        manifest = empty_manifest()
    key_id = pseudonyms.key_id(key)
    recorded = manifest.get("key_id")
    if manifest.get("units") and recorded is not None and recorded != key_id:
        raise pseudonyms.KeyChangedError(
            f"the cases in this project were ingested under another pseudonymisation key ({recorded}; this key "
            f"is {key_id}). Ingesting now would give every study a second pseudonym and mix two patients' "
            "identities in one split. Restore the earlier key, or re-ingest everything under the new one: "
            "delete data/02_intermediate/cases and data/02_intermediate/ingest_manifest.json (and the later "
            "layers) first. A champion trained under the earlier key cannot then be re-scored on the new split."
        )
    settings_id = config.settings_id()
    force = bool(manifest.get("units")) and manifest.get("settings_id") != settings_id
    if force:
        logger.info("ingest settings changed since the last run: every study in the drop is ingested again")
    elif manifest.get("units") and manifest.get("deid_method") != DEID_METHOD:
        # a de-identification that changed (a fix) is applied to every study still in the drop
        force = True
        logger.info("the de-identification method changed since the last run: every study in the drop is "
                    "ingested again")  # fmt: skip
    workers = config.n_workers()
    pool = _executor(workers)
    try:
        scan: DropScan = scan_drop(drop, manifest, key, config, pool, force=force)
        logger.info(
            "drop: %d files, %d units; %d new or changed to process, %d unchanged",
            scan.n_files, scan.n_units, len(scan.todo), scan.n_units - len(scan.todo),
        )  # fmt: skip
        # Units whose files left the drop stay: their cases were collected and remain valid.
        units_state = {k: u for k, u in manifest.get("units", {}).items() if k not in scan.superseded_units}
        if scan.superseded_units:
            logger.info("%d quarantine or skip record(s) cleared: their files now read", len(scan.superseded_units))
        gone = [key for key, entry in units_state.items() if key not in scan.live_units and entry.get("cases")]
        if gone:  # a drop pointed elsewhere (MVL_MSD_TASK, drop_url) went on with the old cases in silence
            logger.warning(
                "%d of the %d ingested unit(s) with cases are not in this drop (%d unit(s)): their cases stay in "
                "the data set and are trained on. If the drop was meant to replace the earlier one, ingest it "
                "into a fresh data root (delete %s and the layers after it first)", len(gone), len(units_state),
                scan.n_units, "02_intermediate/cases and 02_intermediate/ingest_manifest.json",
            )  # fmt: skip
        new_manifest = {
            "version": MANIFEST_VERSION,
            "settings_id": settings_id,
            "deid_method": DEID_METHOD,
            "key_id": key_id,
            "files": scan.files,
            "units": units_state,
        }
        if not scan.todo:
            yield {}, new_manifest
            return
        yield from _process(drop, scan, key, config, pool, new_manifest, key_id)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _process(
    drop: Any,
    scan: DropScan,
    key: bytes,
    config: IngestConfig,
    pool: Executor | None,
    manifest: dict[str, Any],
    key_id: str,
) -> Iterator[tuple[dict[str, Case | None], dict[str, Any]]]:
    todo = scan.todo
    # Each batch's manifest already carries every file's new fingerprint and the new settings: the
    # units not yet processed are listed, so that a run cut off between batches redoes them
    # (without the list, the next scan saw them as unchanged and kept their old results).
    pending = {ukey for _, ukey, _ in todo}
    manifest["pending"] = sorted(pending)
    progress = tqdm(total=len(todo), desc="ingest", unit="unit", disable=not config.progress, mininterval=1.0)
    counts: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    batch: dict[str, Case | None] = {}

    def results() -> Iterator[tuple[Any, UnitResult]]:
        if pool is None:
            for unit, ukey, source_hash in todo:
                yield (unit, ukey, source_hash), process_unit(drop, unit, key, config)
            return
        futures = {
            pool.submit(process_unit, drop, unit, key, config): (unit, ukey, source_hash)
            for unit, ukey, source_hash in todo
        }
        for future in as_completed(futures):
            yield futures[future], future.result()

    for (unit, ukey, source_hash), result in results():
        previous_cases = set(manifest["units"].get(ukey, {}).get("cases", []))
        entry = unit_entry(result, source_hash, unit.kind)
        manifest["units"][ukey] = entry
        for case in result.cases:
            # downstream (preprocess) recomputes a case only when its source changed
            batch[case.case_id] = replace(case, meta={**case.meta, "source_hash": source_hash, "key_id": key_id})
        for stale in previous_cases - set(entry["cases"]):
            batch[stale] = None  # the study changed and no longer yields this case
        counts["cases"] += len(result.cases)
        counts["quarantined"] += len(result.quarantined)
        skipped.update(str(record.get("reason", "other")) for record in result.skipped)  # fixed reasons, no text of the drop
        counts["units"] += 1
        pending.discard(ukey)
        progress.update(1)
        progress.set_postfix(cases=counts["cases"], quarantined=counts["quarantined"], refresh=False)
        if len(batch) >= config.batch_size:
            manifest["pending"] = sorted(pending)
            yield batch, manifest
            batch = {}
    progress.close()
    logger.info(
        "ingest: %d units processed -> %d cases ingested, %d quarantine records, %d skipped%s",
        counts["units"], counts["cases"], counts["quarantined"], sum(skipped.values()),
        f" ({', '.join(f'{reason}: {n}' for reason, n in sorted(skipped.items()))})" if skipped else "",
    )  # fmt: skip
    if skipped.get("unlabelled_image") or skipped.get("unlabelled_series"):
        logger.warning("ingest: images with no label beside them are skipped (a folder of images alone, or a label "
                       "file named other than ingest.label_suffixes expects?); ingest.keep_unlabelled: true keeps "
                       "them (for inference drops)")  # fmt: skip
    manifest.pop("pending")  # all done: the manifest of a whole run has no such list
    yield batch, manifest
