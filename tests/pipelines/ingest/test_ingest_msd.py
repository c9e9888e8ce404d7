"""An MSD task folder as the hospital drop, with ``ingest.labels: null`` (the task's own label map,
as ``--env msd`` sets it): real Hippocampus cases, copied from ../shared into tmp_path, through the
real ingest pipeline. Good cases ingest; ``imagesTs`` is skipped; each broken pair is quarantined
with its own reason while the good cases next to it are still ingested."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from ingest_support import KEY, ingest_params, run_ingest

from mvl_pipeline.core import pseudonyms
from mvl_pipeline.ingestion.config import IngestConfig

TASK = "Task04_Hippocampus"
GOOD = ("hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_007", "hippocampus_008")
UNLABELLED = ("hippocampus_020", "hippocampus_024")  # imagesTs: listed in "test", no labels
MISSING_LABEL = "hippocampus_011"
OTHER_SHAPE = "hippocampus_014"  # label one slice short
SHIFTED = "hippocampus_015"  # label of the same shape, 5 mm off the image's grid
VALUE_3 = "hippocampus_033"  # one voxel labelled 3: not in dataset.json
FOUR_D = "hippocampus_019"  # image (X, Y, Z, 2)
PROJECT = Path(__file__).resolve().parents[3]


def tr(kind: str, name: str) -> str:
    return f"{TASK}/{kind}/{name}.nii.gz"


def write_like(source: Path, target: Path, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    """A NIfTI at ``target`` with ``source``'s header, the given array (and affine)."""
    original = nib.load(source)
    header = original.header.copy()
    header.set_data_dtype(array.dtype)
    target.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, original.affine if affine is None else affine, header), target)


@pytest.fixture(scope="module")
def msd_run(shared_data, tmp_path_factory):
    source = shared_data / "msd" / TASK
    if not (source / "dataset.json").is_file():
        pytest.fail(f"the MSD Hippocampus task is missing at {source}: tests need ../shared/data")
    tmp = tmp_path_factory.mktemp("msd-ingest")
    task = tmp / "drop" / TASK
    descriptor = json.loads((source / "dataset.json").read_text())
    copied = [*GOOD, MISSING_LABEL, OTHER_SHAPE, SHIFTED, VALUE_3, FOUR_D]
    for name in copied:
        for kind in ("imagesTr", "labelsTr"):
            (task / kind).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / kind / f"{name}.nii.gz", task / kind / f"{name}.nii.gz")
    for name in UNLABELLED:
        (task / "imagesTs").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / "imagesTr" / f"{name}.nii.gz", task / "imagesTs" / f"{name}.nii.gz")

    (task / "labelsTr" / f"{MISSING_LABEL}.nii.gz").unlink()
    label = np.asarray(nib.load(source / "labelsTr" / f"{OTHER_SHAPE}.nii.gz").dataobj)
    write_like(source / "labelsTr" / f"{OTHER_SHAPE}.nii.gz", task / "labelsTr" / f"{OTHER_SHAPE}.nii.gz",
               np.ascontiguousarray(label[:, :, :-1]))  # fmt: skip
    shifted = nib.load(source / "labelsTr" / f"{SHIFTED}.nii.gz")
    affine = shifted.affine.copy()
    affine[:3, 3] += 5.0
    write_like(source / "labelsTr" / f"{SHIFTED}.nii.gz", task / "labelsTr" / f"{SHIFTED}.nii.gz",
               np.asarray(shifted.dataobj), affine)  # fmt: skip
    label = np.asarray(nib.load(source / "labelsTr" / f"{VALUE_3}.nii.gz").dataobj).copy()
    label[tuple(np.argwhere(label == 1)[0])] = 3
    write_like(source / "labelsTr" / f"{VALUE_3}.nii.gz", task / "labelsTr" / f"{VALUE_3}.nii.gz", label)
    image = np.asarray(nib.load(source / "imagesTr" / f"{FOUR_D}.nii.gz").dataobj)
    write_like(source / "imagesTr" / f"{FOUR_D}.nii.gz", task / "imagesTr" / f"{FOUR_D}.nii.gz",
               np.stack([image, image], axis=-1))  # fmt: skip

    descriptor["training"] = [
        {"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in copied
    ]
    descriptor["test"] = [f"./imagesTs/{n}.nii.gz" for n in UNLABELLED]
    descriptor["numTraining"], descriptor["numTest"] = len(copied), len(UNLABELLED)
    (task / "dataset.json").write_text(json.dumps(descriptor, indent=1))

    run = run_ingest(tmp / "drop", tmp / "data", ingest_params(labels=None))
    return {"run": run, "source": source, "task": task, "shape": image.shape}


def case_id_of(name: str, kind: str = "imagesTr") -> str:
    return pseudonyms.case_pseudonym(KEY, "volume", tr(kind, name))


def quarantined(run, name: str) -> list[tuple[str, str]]:
    return [(q["reason"], q["detail"]) for q in run.unit_of(tr("imagesTr", name))["quarantined"]]


def test_msd_env_asks_for_the_tasks_own_label_map():
    overrides = yaml.safe_load((PROJECT / "conf" / "msd" / "parameters.yml").read_text())
    assert overrides["ingest"]["labels"] is None
    assert IngestConfig.from_params({"labels": None}).labels == {}


def test_good_cases_ingest_as_mr_with_the_tasks_label_names_one_patient_per_case(msd_run):
    run, source = msd_run["run"], msd_run["source"]
    expected = {case_id_of(name): name for name in GOOD}
    assert run.case_ids() == sorted(expected)
    patients = set()
    for case_id, name in expected.items():
        case = run.case(case_id)
        assert case.modality == "MR" and case.meta["source_kind"] == "volume"
        assert case.label_names == {1: "anterior", 2: "posterior"}
        assert case.patient_id == pseudonyms.patient_pseudonym(KEY, "volume", name)  # patient = case id
        patients.add(case.patient_id)
        original_image = nib.load(source / "imagesTr" / f"{name}.nii.gz")
        original_label = np.asarray(nib.load(source / "labelsTr" / f"{name}.nii.gz").dataobj)
        np.testing.assert_array_equal(case.image.array, np.asarray(original_image.dataobj, dtype=np.float32))
        np.testing.assert_allclose(case.image.affine, original_image.affine, atol=1e-4)
        np.testing.assert_array_equal(case.label.array, original_label)
        assert case.meta["present_labels"] == [1, 2]
    assert len(patients) == len(GOOD)


def test_images_ts_without_labels_are_skipped_and_never_become_cases(msd_run):
    run = msd_run["run"]
    for name in UNLABELLED:
        unit = run.unit_of(tr("imagesTs", name))
        assert unit["status"] == "skipped"
        assert [s["reason"] for s in unit["skipped"]] == ["unlabelled_image"]
        assert case_id_of(name, "imagesTs") not in run.case_ids()
    assert run.summary_counts()[("skipped", "unlabelled_image")] == len(UNLABELLED)


def test_each_broken_pair_is_quarantined_with_its_own_reason_and_a_detail_that_says_what_is_wrong(msd_run):
    run, (x, y, z) = msd_run["run"], msd_run["shape"]
    assert quarantined(run, MISSING_LABEL) == [("missing_file", "1 file(s) listed in dataset.json are missing")]
    [(reason, detail)] = quarantined(run, OTHER_SHAPE)
    assert reason == "label_grid_mismatch" and "label grid" in detail and "differs from image grid" in detail
    [(reason, _)] = quarantined(run, SHIFTED)
    assert reason == "label_grid_mismatch"
    assert quarantined(run, VALUE_3) == [
        ("label_values_not_in_label_map", "label values [3] have no entry in the label map")
    ]
    # A 4-D image: its own reason, and the detail says what it is (several channels)
    [(reason, detail)] = quarantined(run, FOUR_D)
    assert reason == "not_3d_volume"
    assert detail.startswith(f"not a 3-D volume (shape ({x}, {y}, {z}, 2)): a 4-D image holds several channels")

    broken = {MISSING_LABEL, OTHER_SHAPE, SHIFTED, VALUE_3, FOUR_D}
    assert not {case_id_of(n) for n in broken} & set(run.case_ids())
    reasons = sorted(r["reason"] for r in run.quarantine)
    assert reasons == sorted(["missing_file", "label_grid_mismatch", "label_grid_mismatch",
                              "label_values_not_in_label_map", "not_3d_volume"])  # fmt: skip
    # nothing of the drop's names leaks into the quarantine report
    assert "hippocampus" not in json.dumps(run.quarantine)
    counts = run.summary_counts()
    assert counts[("quarantined", "label_grid_mismatch")] == 2
    assert sum(c for (status, _), c in counts.items() if status == "ingested") == len(GOOD)
