"""Dataset fingerprint: RAS-ordered geometry, label frequencies, foreground statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mvl_pipeline.core.case import Case
from mvl_pipeline.core.volume import Volume
from mvl_pipeline.preprocessing.fingerprint import (
    FingerprintConfig,
    aggregate_fingerprint,
    case_fingerprint,
    content_hash,
)
from mvl_pipeline.synthetic.phantom import acquisition_affine

CONFIG = FingerprintConfig(quantile_points=101)


def _case(case_id, plane="axial", *, labelled=True, modality="CT", value=100.0) -> Case:
    shape = (20, 16, 12)
    affine = acquisition_affine(
        shape=shape, spacing=(2.0, 2.0, 5.0), orientation=plane, centre=(0, 0, 0)
    )
    rng = np.random.default_rng(len(case_id))
    image = np.full(shape, -1000.0, np.float32)
    image[3:17, 3:13, :] = 40.0
    label = np.zeros(shape, np.uint8)
    label[6:12, 5:10, 2:9] = 1
    label[8:10, 6:8, 4:6] = 2
    image[label > 0] = value + rng.normal(0, 5, int((label > 0).sum()))
    meta = {"modality": modality, "label_names": {"1": "organ", "2": "lesion"}}
    return Case(
        case_id,
        f"p-{case_id}",
        Volume(image, affine),
        Volume(label, affine) if labelled else None,
        meta,
    )


def test_case_fingerprint_records_ras_geometry_labels_and_foreground():
    record = case_fingerprint(_case("a", "coronal"), CONFIG)
    assert record["spacing"] == [2.0, 5.0, 2.0]  # coronal slices span anterior-posterior (y)
    assert record["shape"] == [20, 12, 16]
    assert record["label_counts"] == {"0": 20 * 16 * 12 - 6 * 5 * 7, "1": 6 * 5 * 7 - 8, "2": 8}
    assert record["foreground_source"] == "label" and record["foreground_voxels"] == 6 * 5 * 7
    assert record["intensity"]["mean"] == pytest.approx(100.0, abs=2.0)
    assert len(record["intensity"]["quantiles"]) == 101
    assert record["source_hash"].startswith("content:")  # no source_hash from ingest
    json.dumps(record)


def test_unlabelled_cases_fall_back_to_the_body_mask():
    record = case_fingerprint(_case("b", labelled=False), CONFIG)
    assert record["foreground_source"] == "body" and record["label_counts"] == {}
    assert record["foreground_voxels"] == 14 * 10 * 12


def test_aggregate_pools_per_modality_with_equal_weight():
    records = [
        case_fingerprint(_case(n, value=v), CONFIG) for n, v in (("a", 100.0), ("bb", 200.0))
    ]
    records.append(case_fingerprint(_case("ccc", modality="MR", value=500.0), CONFIG))
    fingerprint = aggregate_fingerprint(records, CONFIG)
    assert sorted(fingerprint["modalities"]) == ["CT", "MR"]
    ct = fingerprint["modalities"]["CT"]
    assert ct["case_ids"] == ["a", "bb"]
    assert ct["foreground_intensity"]["mean"] == pytest.approx(150.0, abs=2.0)
    assert ct["foreground_intensity"]["std"] == pytest.approx(np.sqrt(50.0**2 + 25.0), rel=0.05)
    assert ct["label_frequencies"]["2"]["cases"] == 2
    assert fingerprint["n_cases"] == 3 and fingerprint["label_names"] == {
        "1": "organ",
        "2": "lesion",
    }
    assert aggregate_fingerprint(list(reversed(records)), CONFIG) == fingerprint  # order-free


def test_content_hash_changes_with_voxels_labels_or_grid():
    case = _case("a")
    same = _case("a")
    assert content_hash(case) == content_hash(same)
    image = case.image.with_array(case.image.array + 1)
    assert content_hash(Case("a", "p", image, case.label)) != content_hash(case)
    shifted = case.image.affine.copy()
    shifted[0, 3] += 0.5
    moved = Volume(case.image.array, shifted)
    assert content_hash(Case("a", "p", moved, None)) != content_hash(
        Case("a", "p", case.image, None)
    )
