"""A 4-D NIfTI MSD task (two contrasts per image, ``dataset.json`` modality {0: T1, 1: T2}) built
from the real Hippocampus volumes, through the real ingest pipeline: the task's modalities are
the channels; a case missing a channel or with an empty one is quarantined with its reason while
the good cases beside it are ingested; declared channels pick and order the volumes by name."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from ingest_support import KEY, ingest_params, run_ingest

from mvl_pipeline.core import pseudonyms
from tests.support.msd4d import TASK, build_task, second_contrast

GOOD = ("hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_011")
MISSING = "hippocampus_007"  # a 3-D image: the T2 volume is missing
EMPTY = "hippocampus_008"  # the T2 volume holds one value


@pytest.fixture(scope="module")
def task(shared_data, tmp_path_factory) -> Path:
    return build_task(shared_data / "msd" / "Task04_Hippocampus", tmp_path_factory.mktemp("msd-4d") / "drop",
                      GOOD + (MISSING, EMPTY), missing=(MISSING,), empty=(EMPTY,))  # fmt: skip


def case_id(name: str) -> str:
    return pseudonyms.case_pseudonym(KEY, "volume", f"{TASK}/imagesTr/{name}.nii.gz")


def test_the_tasks_modalities_are_the_channels_and_broken_cases_are_quarantined(task, tmp_path):
    run = run_ingest(task.parent, tmp_path / "data", ingest_params(labels=None))
    assert run.case_ids() == sorted(case_id(n) for n in GOOD)
    for name in GOOD:
        case = run.case(case_id(name))
        t1 = np.asarray(nib.load(task / "imagesTr" / f"{name}.nii.gz").dataobj)[..., 0]
        assert case.image.array.shape == (2, *t1.shape)
        np.testing.assert_array_equal(case.image.array[0], t1)
        np.testing.assert_allclose(case.image.array[1], second_contrast(t1))
        assert [(c["name"], c["modality"], c["index"]) for c in case.meta["channels"]] == [("T1", "MR", 0), ("T2", "MR", 1)]
        # where predict finds each channel in a 4-D input: the volume's task name, and the count
        assert [(c["source_name"], c["n_volumes"]) for c in case.meta["channels"]] == [("T1", 2), ("T2", 2)]
        assert case.label_names == {1: "anterior", 2: "posterior"} and case.label.shape == t1.shape

    def reasons(name: str) -> list[tuple[str, str]]:
        entry = run.unit_of(f"{TASK}/imagesTr/{name}.nii.gz")
        return [(q["reason"], q["detail"]) for q in entry["quarantined"]]

    assert reasons(MISSING) == [("missing_channel", "channel 'T2' is missing: none of the 1 volumes of the image matches its rule")]
    assert reasons(EMPTY) == [("empty_image", "every voxel of channel 'T2' of the image has the same value")]
    assert "hippocampus" not in json.dumps(run.quarantine)


def test_declared_channels_pick_and_order_the_volumes_by_their_task_names(task, tmp_path):
    channels = {"t2": {"name": "(?i)^t2$"}, "t1": {}}
    run = run_ingest(task.parent, tmp_path / "data", ingest_params(labels=None, channels=channels))
    assert run.case_ids() == sorted(case_id(n) for n in GOOD)
    case = run.case(case_id(GOOD[0]))
    t1 = np.asarray(nib.load(task / "imagesTr" / f"{GOOD[0]}.nii.gz").dataobj)[..., 0]
    np.testing.assert_allclose(case.image.array[0], second_contrast(t1))
    np.testing.assert_array_equal(case.image.array[1], t1)
    assert [(c["name"], c["index"]) for c in case.meta["channels"]] == [("t2", 1), ("t1", 0)]
