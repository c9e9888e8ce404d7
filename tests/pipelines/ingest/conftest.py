"""Fixtures of the ingest tests (helpers live in ``ingest_support``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from ingest_support import SAMPLE_PARAMS, SampleStudyFiles, build_sample_studies


@pytest.fixture(scope="session")
def sample_studies() -> list[SampleStudyFiles]:
    """Five small phantom studies (DICOM CT series + SEG), generated once per session."""
    studies = build_sample_studies(SAMPLE_PARAMS)
    assert [s.orientation for s in studies].count("oblique") == 1
    return studies


@pytest.fixture
def count_processed(monkeypatch) -> Callable[[], list[str]]:
    """Wrap ``process_unit`` as the ingest node calls it; returns a getter of the units' raw
    source ids (StudyInstanceUID or path; test memory only) processed so far."""
    from mvl_pipeline.ingestion import run as nodes

    calls: list[str] = []
    original = nodes.process_unit

    def counting(drop, unit, key, settings):
        calls.append(unit.source_id)
        return original(drop, unit, key, settings)

    monkeypatch.setattr(nodes, "process_unit", counting)
    return lambda: list(calls)
