"""What a case keeps of a source's label names when the project has no label map: a few words of
letters, else "label <value>". A segment's label is free text typed at the hospital, and the
name travels into the plan, the model bundle, MLflow metric names and every later prediction's
DICOM SEG (an audit, 2026-12-04, sent "liver (kowalczyk, read 2024-03-05)" all the way through)."""

from __future__ import annotations

import pytest

from mvl_pipeline.ingestion.config import IngestConfig
from mvl_pipeline.ingestion.labels import case_label_names, map_label_names, safe_label_name


@pytest.mark.parametrize(
    ("source", "kept"),
    [
        ("Anterior", "anterior"), ("non-enhancing tumor", "non-enhancing tumor"), ("Left Atrium", "left atrium"),
        ("hepatic_vessel", "hepatic_vessel"), ("Liver (Kowalczyk, read 2024-03-05)", "label 1"),
        ("Lesion 2", "label 1"), ("Müller liver", "label 1"), ("MRN-4711", "label 1"),
        ("a very long name of six words", "label 1"), ("x" * 40, "label 1"), ("", "label 1"),
    ],
)  # fmt: skip
def test_without_a_project_map_a_case_keeps_a_source_name_only_if_it_is_a_few_words_of_letters(source, kept):
    assert case_label_names({0: "background", 1: source}, IngestConfig.from_params({"labels": None})) == {1: kept}


def test_with_a_project_map_the_source_names_are_matched_and_the_projects_are_kept():
    config = IngestConfig.from_params({"labels": {"organ": 1}, "label_aliases": {"liver (dr x)": "organ"}})
    assert map_label_names({1: "Liver (Dr X)"}, config) == {1: 1}
    assert case_label_names({1: "Liver (Dr X)"}, config) == {1: "organ"}
    assert safe_label_name(3, "organ") == "organ" and safe_label_name(3, "organ 2") == "label 3"
