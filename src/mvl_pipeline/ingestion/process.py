"""Turn one unit of a drop into de-identified cases, or into quarantine records.

Runs in worker processes: everything here is a plain function of picklable arguments. A unit is
a DICOM study (:mod:`.dicom_study`), an image/label pair or MSD entry (:mod:`.volume_unit`), or a
file that could not be read; whatever happens, :func:`process_unit` returns a result and never
raises for bad data. An unreachable store (:class:`StorageUnavailableError`) is not bad data: it
propagates and stops the run, and the unit is processed by the rerun.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any

from mvl_pipeline.core import pseudonyms
from mvl_pipeline.core.errors import ImagingError
from mvl_pipeline.core.storage import StorageUnavailableError
from mvl_pipeline.ingestion.config import IngestConfig
from mvl_pipeline.ingestion.dicom_study import process_dicom_study
from mvl_pipeline.ingestion.result import UnitResult, record, scrub
from mvl_pipeline.ingestion.units import Unit
from mvl_pipeline.ingestion.volume_unit import process_volume_unit

logger = logging.getLogger(__name__)

def process_bad_file(unit: Unit, key: bytes) -> UnitResult:
    result = UnitResult(unit=pseudonyms.unit_key(key, unit.kind, unit.source_id))
    result.quarantined.append(
        record(unit.error_reason or "unreadable_file", scrub(unit.error_detail or "", list(unit.files)),
                case_id=None, n_files=len(unit.files), kind="file")  # fmt: skip
    )
    return result


def process_unit(drop: Any, unit: Unit, key: bytes, config: IngestConfig) -> UnitResult:
    """Entry point for worker processes: never raises for bad data."""
    try:
        if unit.kind == "dicom":
            return process_dicom_study(drop, unit, key, config)
        if unit.kind == "volume":
            return process_volume_unit(drop, unit, key, config)
        return process_bad_file(unit, key)
    except StorageUnavailableError:  # an outage, not the data: stop; the rerun processes the unit
        raise
    except ImagingError as exc:  # anything not caught closer to its source
        result = UnitResult(unit=pseudonyms.unit_key(key, unit.kind, unit.source_id))
        result.quarantined.append(
            record(exc.reason, scrub(exc.detail, list(unit.files)), case_id=None,
                    n_files=len(unit.files), kind=unit.kind)  # fmt: skip
        )
        return result
    except Exception as exc:  # a bug or an unforeseen file: quarantine, keep the run going
        # Neither the message nor the traceback, in the log or the record: either can quote a
        # header value or a path ("invalid literal for int(): 'Kowalczyk'"). The exception's
        # type and the line of this package it came through are enough to find the bug.
        where = raised_in(exc)
        logger.error("unexpected %s (%s) in a %s unit; see its quarantine record", type(exc).__name__, where, unit.kind)
        result = UnitResult(unit=pseudonyms.unit_key(key, unit.kind, unit.source_id))
        result.quarantined.append(
            record("internal_error", f"{type(exc).__name__} ({where})", case_id=None,
                   n_files=len(unit.files), kind=unit.kind)  # fmt: skip
        )
        return result


def raised_in(exc: BaseException) -> str:
    """The innermost line of this package an exception went through, as ``module.py:line``
    (a path inside the installed package, never a drop's): the place to look for the bug."""
    package = Path(__file__).resolve().parents[1]
    where = "outside mvl_pipeline"
    for frame, line in traceback.walk_tb(exc.__traceback__):
        path = Path(frame.f_code.co_filename).resolve()
        if path.is_relative_to(package):
            where = f"{path.relative_to(package.parent).as_posix()}:{line}"
    return where
