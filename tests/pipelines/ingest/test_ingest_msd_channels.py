"""A 4-D NIfTI MSD task (two contrasts per image, ``dataset.json`` modality {0: T1, 1: T2}) built
from the real Hippocampus volumes, through the real ingest pipeline: the task's modalities are
the channels; a case missing a channel or with an empty one is quarantined with its reason while
the good cases beside it are ingested; declared channels pick and order the volumes by name."""

from __future__ import annotations

import json
import shutil
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


def test_a_modality_name_that_is_no_contrast_term_becomes_the_channels_index(task, tmp_path_factory, caplog):
    """An audit (2026-12-07): a task's ``modality`` names are free text typed where it was made,
    and a second one ("T2 St Elsewhere Kowalczyk") became the channel's name, kept in the cases,
    the plan, the model bundle and predict's errors. Names that are no contrast term become
    ``channel<index>``; predict names the input's volumes by the same rule, so it still finds them."""
    from mvl_pipeline.formats.msd import read_task

    site = tmp_path_factory.mktemp("msd-site") / "drop"
    copy = site / task.name
    shutil.copytree(task, copy)
    descriptor = json.loads((copy / "dataset.json").read_text())
    descriptor["modality"] = {"0": "T1", "1": "T2 St Elsewhere Kowalczyk"}
    (copy / "dataset.json").write_text(json.dumps(descriptor))
    caplog.set_level("INFO")
    root = tmp_path_factory.mktemp("msd-site-data")
    run = run_ingest(site, root, ingest_params(labels=None))
    assert run.case_ids() == sorted(case_id(n) for n in GOOD)
    case = run.case(case_id(GOOD[0]))
    assert [(c["name"], c["source_name"], c["modality"]) for c in case.meta["channels"]] == [("T1", "T1", "MR"), ("channel1", "channel1", "MR")]
    written = b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file() and p.suffix in (".json", ".csv"))
    assert b"elsewhere" not in written.lower() and b"kowalczyk" not in written.lower()
    assert "elsewhere" not in caplog.text.lower()
    assert read_task((copy / "dataset.json").read_bytes()).channel_names == ("T1", "channel1")  # predict's names
