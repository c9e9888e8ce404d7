"""Batch prediction (``python -m mvl_pipeline.predict``): what ``discover`` makes of an input, what
``predict_study`` writes (NIfTI on the input's own grid, a DICOM SEG for DICOM input), and ``run``
end to end against a registered champion in a sqlite MLflow registry, with one corrupt input.

The model is tiny and untrained (``llm.mode: none``): these tests are about plumbing, not quality.
The plan is the real planner's, from an ingest + preprocess of three real Hippocampus cases.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
from argparse import Namespace
from pathlib import Path

import mlflow
import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
import torch
import yaml
from scipy import ndimage

from mvl_pipeline.commands.predict import discover, predict_studies, predict_study, run
from mvl_pipeline.core.volume import Volume
from mvl_pipeline.datasets.model_registry import MlflowRegistryDataset, RegistrationRequest
from mvl_pipeline.dicom.assemble import assemble_series
from mvl_pipeline.dicom.labels import read_segmentation, referenced_series_uids
from mvl_pipeline.dicom.read import SEGMENTATION_STORAGE
from mvl_pipeline.dicom.write import dataset_bytes, series_uids, write_image_series
from mvl_pipeline.evaluation.scoring import EvaluateConfig
from mvl_pipeline.formats.volumes import read_volume
from mvl_pipeline.model import MedVisionLlamaConfig, build_model, model_weights
from mvl_pipeline.serving.segmenter import Segmenter
from tests.support.workspace import local_catalog, prepare

PROJECT = Path(__file__).resolve().parents[2]
TASK = "Task04_Hippocampus"
PLANNED_ON = ("hippocampus_001", "hippocampus_003", "hippocampus_004")
INPUTS = ("hippocampus_034", "hippocampus_035", "hippocampus_036")  # never seen by the planner
TINY = {"embed_dim": 32, "depth": 1, "num_heads": 2, "precision": "fp32", "llm": {"mode": "none"},
        "decoder": {"taps": [], "channels": [16, 8, 8], "stem_channels": 4}}  # fmt: skip
POSTPROCESSING = {"largest_component": [1, 2], "validation_dice": {}, "n_cases": 0}
ARGS = Namespace(modality=None, series_index=None)
URI = "models:/tiny@champion"


def base_block(name: str) -> dict:
    return yaml.safe_load((PROJECT / "conf" / "base" / f"parameters_{name}.yml").read_text())[name]


@pytest.fixture(scope="module")
def task_dir(shared_data) -> Path:
    task = shared_data / "msd" / TASK
    if not (task / "dataset.json").is_file():
        pytest.fail(f"the MSD Hippocampus task is missing at {task}: tests need ../shared/data")
    return task


@pytest.fixture(scope="module")
def bundle(task_dir, tmp_path_factory, llm_cache_dir):
    """``(weights, plan)``: a tiny model (with a stored post-processing decision) for the plan the
    real ingest + preprocess make of three Hippocampus cases copied into an MSD drop."""
    root = tmp_path_factory.mktemp("predict-plan")
    drop = root / "drop" / TASK
    for kind in ("imagesTr", "labelsTr"):
        (drop / kind).mkdir(parents=True)
        for name in PLANNED_ON:
            shutil.copyfile(task_dir / kind / f"{name}.nii.gz", drop / kind / f"{name}.nii.gz")
    descriptor = json.loads((task_dir / "dataset.json").read_text())
    descriptor["training"] = [
        {"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in PLANNED_ON
    ]
    (drop / "dataset.json").write_text(json.dumps(descriptor))
    preprocess = base_block("preprocess")
    preprocess["apply"]["workers"] = 1
    model_params = base_block("model") | TINY
    blocks = {"ingest": base_block("ingest") | {"labels": None, "workers": 1, "progress": False},
              "preprocess": preprocess, "model": model_params}  # fmt: skip
    # a fixed key: the split of three patients depends on their pseudonyms, and some keys leave
    # none of them in train (nothing to plan from)
    plan = prepare(local_catalog(root, blocks, key_hex=hashlib.sha256(b"predict-plan").hexdigest()))["preprocessing_plan"]
    assert plan["patch_size"] == [40, 56, 40] and plan["label_names"] == {"1": "anterior", "2": "posterior"}
    torch.manual_seed(0)
    model = build_model(MedVisionLlamaConfig.from_params(model_params).for_plan(plan), llm_cache_dir=llm_cache_dir)
    state, config = model_weights(model)
    return (state, {**config, "postprocessing": POSTPROCESSING}), plan


@pytest.fixture(scope="module")
def segmenter(bundle, llm_cache_dir) -> Segmenter:
    weights, plan = bundle
    return Segmenter(weights, plan, llm_cache_dir=llm_cache_dir)


def hippocampus_volume(task_dir: Path, name: str) -> Volume:
    path = task_dir / "imagesTr" / f"{name}.nii.gz"
    return read_volume(path.read_bytes(), str(path))


def write_dicom_study(volume: Volume, folder: Path, seed: str) -> list[str]:
    """``volume`` as an MR series of one study (real pixels, generated headers); its files."""
    folder.mkdir(parents=True, exist_ok=True)
    uids = series_uids("predict-test", seed, n_slices=volume.shape[2])
    datasets = write_image_series(volume, header={"Modality": "MR", "PatientID": f"P-{seed}"}, uids=uids)
    for k, ds in enumerate(datasets):
        (folder / f"slice{k:03d}.dcm").write_bytes(dataset_bytes(ds))
    return [str(uids.series)]


def n_components(mask: np.ndarray) -> int:
    return int(ndimage.label(mask, structure=np.ones((3, 3, 3), bool))[1])


# -- discover ---------------------------------------------------------------------------------------
def test_a_single_nifti_file_is_one_study_not_a_batch(task_dir, tmp_path):
    path = tmp_path / "scan.nii.gz"
    shutil.copyfile(task_dir / "imagesTr" / f"{INPUTS[0]}.nii.gz", path)
    studies, batch = discover(path)
    assert not batch
    assert [(s.name, s.kind, s.paths, s.source) for s in studies] == [("scan", "volume", [path], "scan.nii.gz")]


def test_a_folder_of_nifti_files_is_a_batch_that_keeps_their_names(task_dir, tmp_path):
    for name in INPUTS:
        shutil.copyfile(task_dir / "imagesTr" / f"{name}.nii.gz", tmp_path / f"{name}.nii.gz")
    (tmp_path / "README.txt").write_text("not an image")
    studies, batch = discover(tmp_path)
    assert batch
    assert [(s.name, s.kind, s.source) for s in studies] == [(n, "volume", f"{n}.nii.gz") for n in INPUTS]


def test_a_folder_with_one_dicom_study_is_not_a_batch(task_dir, tmp_path):
    volume = hippocampus_volume(task_dir, INPUTS[0])
    write_dicom_study(volume, tmp_path / "study" / "series", "one")
    (tmp_path / "notes.txt").write_text("not an image")  # see the report: some texts crash read_header
    studies, batch = discover(tmp_path)
    assert not batch
    [study] = studies
    assert study.kind == "dicom" and study.name == "study-001"
    assert sorted(study.paths) == sorted((tmp_path / "study" / "series").glob("*.dcm"))
    assert len(study.paths) == volume.shape[2]


def test_a_folder_with_two_dicom_studies_and_nifti_files_is_a_batch(task_dir, tmp_path):
    write_dicom_study(hippocampus_volume(task_dir, INPUTS[0]), tmp_path / "a", "a")
    write_dicom_study(hippocampus_volume(task_dir, INPUTS[1]), tmp_path / "b", "b")
    for name in INPUTS[1:]:
        shutil.copyfile(task_dir / "imagesTr" / f"{name}.nii.gz", tmp_path / f"{name}.nii.gz")
    studies, batch = discover(tmp_path)
    assert batch
    assert [(s.name, s.kind) for s in studies] == [
        (INPUTS[1], "volume"), (INPUTS[2], "volume"), ("study-001", "dicom"), ("study-002", "dicom")
    ]  # fmt: skip
    dicom = {s.source: {p.parent.name for p in s.paths} for s in studies if s.kind == "dicom"}
    assert dicom == {"a": {"a"}, "b": {"b"}}  # one study per folder, nothing mixed


def test_an_input_with_nothing_to_segment_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(ValueError, match="no DICOM study and no NIfTI/NRRD file"):
        discover(tmp_path)
    with pytest.raises(FileNotFoundError):
        discover(tmp_path / "missing")


# -- predict_study ----------------------------------------------------------------------------------
def test_the_segmenter_applies_the_models_stored_post_processing(segmenter, task_dir):
    assert segmenter.postprocessing == POSTPROCESSING
    assert segmenter.classes == {1: "anterior", 2: "posterior"}
    labels = segmenter.segment(hippocampus_volume(task_dir, INPUTS[0]), "MR")
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2}
    assert all(n_components(labels == c) <= 1 for c in (1, 2))


def test_a_nifti_prediction_lies_on_the_inputs_own_grid(segmenter, task_dir, tmp_path):
    image = hippocampus_volume(task_dir, INPUTS[0])
    # the same anatomy stored flipped on x and y (an LPS-style affine) and a resampled-grid copy
    nx, ny = image.shape[:2]
    flip = np.array([[-1, 0, 0, nx - 1], [0, -1, 0, ny - 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float64)
    flipped_affine = image.affine @ flip
    coarse_affine = image.affine @ np.diag([1.5, 1.0, 1.25, 1.0])
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copyfile(task_dir / "imagesTr" / f"{INPUTS[0]}.nii.gz", inputs / "original.nii.gz")
    flipped = np.ascontiguousarray(image.array[::-1, ::-1, :])
    nib.save(nib.Nifti1Image(flipped, flipped_affine), inputs / "flipped.nii.gz")
    coarse = np.ascontiguousarray(image.array[::2, :, ::2])
    nib.save(nib.Nifti1Image(coarse, coarse_affine), inputs / "coarse.nii.gz")

    studies, batch = discover(inputs)
    out = tmp_path / "out"
    written = {s.name: predict_study(segmenter, s, out, batch=batch, uri=URI, args=ARGS) for s in studies}
    assert written == {n: f"{n}.nii.gz" for n in ("coarse", "flipped", "original")}
    predictions = {}
    for name, relpath in written.items():
        source = read_volume((inputs / f"{name}.nii.gz").read_bytes(), f"{name}.nii.gz")
        prediction = read_volume((out / relpath).read_bytes(), relpath)
        assert prediction.shape == source.shape, name
        np.testing.assert_allclose(prediction.affine, source.affine, atol=1e-6, err_msg=name)
        assert prediction.meta["model_uri"] == URI and prediction.meta["plan_id"] == segmenter.plan["plan_id"]
        predictions[name] = prediction.array
    assert (predictions["original"] > 0).any()
    # on its own grid: the flipped file's prediction is the original's, flipped the same way
    np.testing.assert_array_equal(predictions["flipped"], predictions["original"][::-1, ::-1, :])


def test_a_nifti_whose_sform_and_qform_disagree_gets_a_prediction_with_both_as_given(segmenter, task_dir, tmp_path, caplog):
    """An audit (2026-12-04): the prediction was written with the sform in both fields (code 1),
    so a viewer that reads the qform (ITK's, where they disagree) put it 10 mm off the image."""
    image = hippocampus_volume(task_dir, INPUTS[0])
    qform = image.affine.copy()
    qform[0, 3] += 10.0
    source = nib.Nifti1Image(image.array, image.affine)
    source.header.set_sform(image.affine, code=2)
    source.header.set_qform(qform, code=1)
    inputs = tmp_path / "in"
    inputs.mkdir()
    nib.save(source, inputs / "scan.nii.gz")
    [study], batch = discover(inputs / "scan.nii.gz")
    with caplog.at_level(logging.WARNING, logger="mvl_pipeline.commands.predict"):
        relpath = predict_study(segmenter, study, tmp_path / "out", batch=batch, uri=URI, args=ARGS)
    written = nib.load(tmp_path / "out" / relpath).header
    assert (int(written["sform_code"]), int(written["qform_code"])) == (2, 1)
    np.testing.assert_allclose(written.get_sform(), image.affine, atol=1e-4)
    np.testing.assert_allclose(written.get_qform(), qform, atol=1e-4)
    assert any("sform and qform put its grid up to 10 mm apart" in r.getMessage() for r in caplog.records)
    assert not any("scan" in r.getMessage() for r in caplog.records)


def test_a_dicom_study_gets_a_nifti_on_its_grid_and_a_seg_that_references_it(segmenter, task_dir, tmp_path):
    [series_uid] = write_dicom_study(hippocampus_volume(task_dir, INPUTS[1]), tmp_path / "in", "seg")
    [study], batch = discover(tmp_path / "in")
    out = tmp_path / "out"
    assert predict_study(segmenter, study, out, batch=batch, uri=URI, args=ARGS) == "prediction.nii.gz"
    reference = assemble_series(sorted(study.paths))
    prediction = read_volume((out / "prediction.nii.gz").read_bytes(), "prediction.nii.gz")
    assert prediction.shape == reference.shape
    np.testing.assert_allclose(prediction.affine, reference.affine, atol=1e-5)
    np.testing.assert_array_equal(prediction.array, segmenter.segment(reference, "MR"))

    seg = pydicom.dcmread(out / "prediction_seg.dcm")
    assert seg.SOPClassUID == SEGMENTATION_STORAGE and referenced_series_uids(seg) == [series_uid]
    assert "not for diagnosis" in seg.SeriesDescription
    # a model's output, identified as such: a viewer must never show it as a reader's labels
    for segment in seg.SegmentSequence:
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        [algorithm] = segment.SegmentationAlgorithmIdentificationSequence
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("MedVisionLlama", URI)
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    restored, names = read_segmentation(seg, reference)
    assert names == {1: "anterior", 2: "posterior"}
    np.testing.assert_array_equal(restored.array, prediction.array)


def test_a_multi_frame_study_with_a_localizer_gets_its_seg_on_the_multi_frame_series(segmenter, task_dir, tmp_path):
    """An audit (2026-12-04): an Enhanced (multi-frame) MR source failed when its SEG was written
    (a single-frame position was read) after its NIfTI was already out, and beside a 3-file
    localizer the localizer was segmented (the series with the most files was taken)."""
    import highdicom as hd

    volume = hippocampus_volume(task_dir, INPUTS[1])
    single = tmp_path / "single"
    write_dicom_study(volume, single, "enhanced")
    legacy = [pydicom.dcmread(p) for p in sorted(single.glob("*.dcm"))]
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=legacy, series_instance_uid=hd.UID(), series_number=7, sop_instance_uid=hd.UID(), instance_number=1,
    )  # fmt: skip
    study_dir = tmp_path / "in"
    study_dir.mkdir()
    enhanced.save_as(study_dir / "enhanced.dcm", enforce_file_format=True)
    localizer_uid = hd.UID()
    for n in range(3):  # three single-frame localizer images of the same study
        ds = pydicom.dcmread(sorted(single.glob("*.dcm"))[n])
        ds.SeriesInstanceUID, ds.SeriesNumber = localizer_uid, 1
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = hd.UID()
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(study_dir / f"loc{n}.dcm", enforce_file_format=True)

    [study], batch = discover(study_dir)
    out = tmp_path / "out"
    assert predict_study(segmenter, study, out, batch=batch, uri=URI, args=ARGS) == "prediction.nii.gz"
    prediction = read_volume((out / "prediction.nii.gz").read_bytes(), "prediction.nii.gz")
    assert prediction.shape == volume.shape  # the multi-frame series, not the 3-slice localizer
    reference = assemble_series(sorted(single.glob("*.dcm")))  # the same pixels, one file a slice
    np.testing.assert_allclose(prediction.affine, reference.affine, atol=1e-5)
    np.testing.assert_array_equal(prediction.array, segmenter.segment(reference, "MR"))
    seg = pydicom.dcmread(out / "prediction_seg.dcm")
    assert referenced_series_uids(seg) == [str(enhanced.SeriesInstanceUID)]
    restored, _ = read_segmentation(seg, reference)
    np.testing.assert_array_equal(restored.array, prediction.array)


def test_a_study_whose_seg_cannot_be_made_leaves_no_output_behind(segmenter, task_dir, tmp_path, monkeypatch):
    from mvl_pipeline.commands import predict as command

    write_dicom_study(hippocampus_volume(task_dir, INPUTS[1]), tmp_path / "in", "no-seg")
    [study], batch = discover(tmp_path / "in")

    def failing(*args, **kwargs):
        raise ValueError("the SEG cannot be made")

    monkeypatch.setattr(command, "seg_bytes", failing)
    with pytest.raises(ValueError, match="the SEG cannot be made"):
        predict_study(segmenter, study, tmp_path / "out", batch=batch, uri=URI, args=ARGS)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


class _Refusing(Segmenter):
    """The real segmenter, except that it refuses images with ``refused_shape`` (a study whose
    segmentation fails), shared pass or not."""

    refused_shape: tuple[int, ...] = ()

    def segment(self, image, modality):
        if image.shape == self.refused_shape:
            raise RuntimeError("this study cannot be segmented")
        return super().segment(image, modality)

    def segment_many(self, inputs):
        inputs = list(inputs)
        if any(image.shape == self.refused_shape for _, image, _ in inputs):
            raise RuntimeError("one study of the shared pass cannot be segmented")
        self.passes.append(len(inputs))
        yield from super().segment_many(inputs)


def test_studies_are_segmented_a_group_at_a_time_as_each_alone_and_a_failure_stays_with_its_study(
    bundle, task_dir, tmp_path, llm_cache_dir
):
    weights, plan = bundle
    names = [f"hippocampus_{n:03d}" for n in (34, 35, 36, 37, 40, 41)]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in names:
        shutil.copyfile(task_dir / "imagesTr" / f"{name}.nii.gz", inputs / f"{name}.nii.gz")
    whole = (inputs / f"{names[1]}.nii.gz").read_bytes()
    (inputs / f"{names[1]}.nii.gz").write_bytes(whole[: len(whole) // 2])  # unreadable
    studies, batch = discover(inputs)
    assert [s.name for s in studies] == names and batch

    grouped = _Refusing(weights, plan, llm_cache_dir=llm_cache_dir, config=EvaluateConfig(case_batch=3))
    grouped.passes = []
    grouped.refused_shape = hippocampus_volume(task_dir, names[4]).shape  # in the second group
    assert all(hippocampus_volume(task_dir, n).shape != grouped.refused_shape for n in names if n != names[4])
    results = list(predict_studies(grouped, studies, tmp_path / "grouped", batch=batch, uri=URI, args=ARGS))

    assert [study.name for study, _, _ in results] == names  # in input order
    outcome = {study.name: (output, getattr(exc, "reason", None) or (exc and str(exc))) for study, output, exc in results}
    assert outcome[names[1]] == (None, "unreadable_file")
    assert outcome[names[4]] == (None, "this study cannot be segmented")  # found when each went alone
    ok = [n for n in names if n not in (names[1], names[4])]
    assert all(outcome[n] == (f"{n}.nii.gz", None) for n in ok), outcome
    assert grouped.passes == [2]  # group 1: two readable studies in one pass; group 2 failed, each alone

    alone = Segmenter(weights, plan, llm_cache_dir=llm_cache_dir, config=EvaluateConfig(case_batch=1))
    for study in studies:
        if study.name in ok:
            predict_study(alone, study, tmp_path / "alone", batch=batch, uri=URI, args=ARGS)
            grouped_labels = read_volume((tmp_path / "grouped" / f"{study.name}.nii.gz").read_bytes(), "g.nii.gz")
            alone_labels = read_volume((tmp_path / "alone" / f"{study.name}.nii.gz").read_bytes(), "a.nii.gz")
            # the same labels, but for a voxel where bf16 rounds a tie otherwise: oneDNN blocks a pass of
            # 2 cases unlike one of 1 when it has 2 threads (1 of 65988 voxels flipped, 2026-12-07)
            assert grouped_labels.shape == alone_labels.shape, study.name
            assert np.mean(grouped_labels.array != alone_labels.array) <= 1e-4, study.name
            np.testing.assert_allclose(grouped_labels.affine, alone_labels.affine)
    assert not (tmp_path / "grouped" / f"{names[4]}.nii.gz").exists()


# -- run, end to end ---------------------------------------------------------------------------------
@pytest.fixture
def registry(bundle, tmp_path, llm_cache_dir, monkeypatch):
    """The tiny bundle registered as ``tiny@champion`` in a sqlite registry under tmp_path; the
    process's MLflow state is put back afterwards (``mlflow.set_*_uri`` export env vars)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) stays in tmp_path
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    weights, plan = bundle
    dataset = MlflowRegistryDataset(model_name="tiny", tracking_uri=uri, registry_uri=uri, llm_cache_dir=llm_cache_dir)
    request = RegistrationRequest(weights=weights, plan=plan, aliases=("champion",),
                                  tags={"plan_id": plan["plan_id"]}, run_name="predict-test", num_classes=3)  # fmt: skip
    dataset.save(request)
    # predict runs as a fresh process would: only --tracking-uri says where the registry is
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    yield uri
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def test_run_segments_a_batch_with_the_champion_and_reports_the_one_corrupt_input(
    registry, task_dir, tmp_path, llm_cache_dir
):
    inputs = tmp_path / "studies"
    inputs.mkdir()
    for name in INPUTS[:2]:
        shutil.copyfile(task_dir / "imagesTr" / f"{name}.nii.gz", inputs / f"{name}.nii.gz")
    whole = (task_dir / "imagesTr" / f"{INPUTS[2]}.nii.gz").read_bytes()
    (inputs / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
    write_dicom_study(hippocampus_volume(task_dir, INPUTS[2]), inputs / "dicom_study", "run")
    out = tmp_path / "predictions"

    status = run([str(inputs), str(out), "--model-uri", "models:/tiny@champion", "--tracking-uri", registry,
                  "--llm-cache-dir", llm_cache_dir])  # fmt: skip

    assert status == 1  # one input failed
    with (out / "predictions.csv").open(newline="", encoding="utf-8") as handle:
        rows = {row["input"]: row for row in csv.DictReader(handle)}
    assert {k: (r["status"], r["reason"], r["output"]) for k, r in rows.items()} == {
        f"{INPUTS[0]}.nii.gz": ("ok", "", f"{INPUTS[0]}.nii.gz"),
        f"{INPUTS[1]}.nii.gz": ("ok", "", f"{INPUTS[1]}.nii.gz"),
        "truncated.nii.gz": ("failed", "unreadable_file", ""),
        "dicom_study": ("ok", "", "study-001/prediction.nii.gz"),
    }
    for name in INPUTS[:2]:
        source = hippocampus_volume(task_dir, name)
        prediction = read_volume((out / f"{name}.nii.gz").read_bytes(), f"{name}.nii.gz")
        assert prediction.shape == source.shape and prediction.meta["model_uri"] == "models:/tiny@champion"
        assert all(n_components(prediction.array == c) <= 1 for c in (1, 2))  # the registered decision
    assert (out / "study-001" / "prediction_seg.dcm").is_file()
    assert not (out / "truncated.nii.gz").exists()


def test_the_log_never_repeats_an_input_path(bundle, llm_cache_dir, tmp_path, monkeypatch, caplog):
    """A path the user typed may name the patient ("Kowalska_Anna_1961/..."): the log of a study
    that failed, of a missing input and of the end gives no path (an audit, 2026-12-04: the
    error's own text ends in "[path]")."""
    from mvl_pipeline.commands import predict as command

    weights, plan = bundle
    monkeypatch.setattr(command, "load_registered", lambda uri, tracking: (weights, plan, "models:/test@champion"))
    study = tmp_path / "Kowalska_Anna_1961" / "Kowalska_Anna.nii.gz"
    study.parent.mkdir()
    study.write_bytes(b"\x1f\x8b" + b"not really gzip")
    caplog.set_level(logging.INFO)
    store = tmp_path / "mlflow.db"  # predict refuses a store that is not there (not the test's cwd's)
    store.touch()
    argv = ["--llm-cache-dir", str(llm_cache_dir), "--tracking-uri", f"sqlite:///{store}"]
    assert command.run([str(study), str(tmp_path / "out"), *argv]) == 1
    assert command.run([str(tmp_path / "Kowalska_missing"), str(tmp_path / "out"), *argv]) == 2
    assert "not a readable gzip file" in caplog.text  # the reason is there
    # an NRRD without 'space' (what a plain nrrd.write gives) is read with a warning, and that
    # warning names no path either (it did: an audit, 2026-12-07)
    nrrd_study = tmp_path / "Kowalska_Anna_1961" / "Kowalska_Anna.nrrd"
    nrrd.write(str(nrrd_study), np.zeros((12, 12, 8), np.float32), {"spacings": [1.0, 1.0, 1.0]})
    assert command.run([str(nrrd_study), str(tmp_path / "out-nrrd"), *argv]) == 0
    assert "NRRD without 'space'" in caplog.text
    # the operating system's own errors quote the path: an output folder that cannot be made
    (tmp_path / "Kowalska_file").write_bytes(b"")
    assert command.run([str(study), str(tmp_path / "Kowalska_file" / "out"), *argv]) == 2
    assert "NotADirectoryError" in caplog.text or "FileExistsError" in caplog.text
    assert "kowalska" not in caplog.text.lower()


def test_an_msd_folder_names_its_volumes_and_predict_takes_each_channel_by_its_name(tmp_path, monkeypatch):
    """An audit (2026-12-04): an MSD test folder whose dataset.json lists T2 before T1 had its
    channels swapped at predict, silently. Its names now reach the channel picking."""
    from mvl_pipeline.commands import predict as command
    from mvl_pipeline.core.volume import affine_from_geometry

    folder = tmp_path / "TaskP"
    (folder / "imagesTs").mkdir(parents=True)
    t1, t2 = np.full((8, 8, 6), 100.0, np.float32), np.full((8, 8, 6), 900.0, np.float32)
    nib.save(nib.Nifti1Image(np.stack([t2, t1], axis=-1), affine_from_geometry((1.0, 1.0, 2.0))), folder / "imagesTs" / "c1.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({
        "name": "P", "modality": {"0": "T2", "1": "T1"}, "labels": {"0": "background", "1": "a"},
        "numTraining": 0, "numTest": 1, "training": [], "test": ["./imagesTs/c1.nii.gz"],
    }))  # fmt: skip
    (study,), _ = discover(folder)
    assert study.channel_names == ("T2", "T1")
    channels = [{"name": "T1", "modality": "MR", "match": {"index": "^0$"}, "index": 0, "n_volumes": 2, "source_name": "T1"},
                {"name": "T2", "modality": "MR", "match": {"index": "^1$"}, "index": 1, "n_volumes": 2, "source_name": "T2"}]  # fmt: skip
    image, datasets, modality = command.read_input(study, channels, {"channels": channels}, Namespace(series_index=None, modality=None))
    assert [float(image.array[c].mean()) for c in range(2)] == [100.0, 900.0]  # T1 first, as the model was trained
    assert (datasets, modality) == ([], "MR")

    # a DICOM study: the overlap ingest required travels in the plan; 0 (none required) is kept as 0
    seen = []
    monkeypatch.setattr(command, "read_dicom_channels", lambda paths, chans, min_overlap: seen.append(min_overlap) or (image, [None]))
    dicom = command.Study("study-001", "dicom", [tmp_path / "x.dcm"])
    for recorded, used in ((0.0, 0.0), (0.3, 0.3), (None, 0.5)):
        command.read_input(dicom, channels, {"channels": channels, "channel_min_overlap": recorded}, Namespace())
        assert seen[-1] == used


# -- refusals before the model is loaded -----------------------------------------------------------
def test_what_predict_cannot_use_is_one_error_line_and_exit_status_2(tmp_path, monkeypatch, caplog):
    """A first try used to end in tracebacks: a text file as input ("ValueError" and nothing
    else, after loading the model), a file where the output folder goes (FileExistsError), a
    model the registry does not hold (MlflowException), and outside the project folder an empty
    mlflow.db created in passing."""
    image = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), image)
    monkeypatch.chdir(tmp_path)  # no mlflow.db here
    caplog.set_level(logging.ERROR)
    assert run([str(image), str(tmp_path / "out")]) == 2
    assert "no MLflow store at sqlite:///mlflow.db" in caplog.text
    assert "a project has one after its first training run (`make train`)" in caplog.text
    assert not (tmp_path / "mlflow.db").exists()

    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    assert run([str(notes), str(tmp_path / "out")]) == 2
    assert "the input file is not NIfTI/NRRD" in caplog.text

    (tmp_path / "taken").write_text("a file")
    assert run([str(image), str(tmp_path / "taken")]) == 2
    assert "the output must be a folder" in caplog.text

    store = f"sqlite:///{tmp_path / 'empty.db'}"
    mlflow.MlflowClient(store).search_experiments()  # an empty store: no model registered
    assert run([str(image), str(tmp_path / "out"), "--tracking-uri", store]) == 2
    assert "cannot load models:/medvisionllama@champion" in caplog.text
    assert not (tmp_path / "out").exists()


def test_a_nifti_input_takes_the_model_s_one_modality_and_says_when_its_intensities_disagree(caplog):
    # a guess (air in the image: CT) used to pick the normalisation in silence, even for a model
    # that knows MR only (a first-try audit, 2026-12-05)
    import logging

    import numpy as np

    from mvl_pipeline.commands.predict import input_modality
    from mvl_pipeline.core.volume import Volume

    air = Volume(np.full((16, 16, 16), -1000.0, np.float32), np.eye(4))
    soft = Volume(np.full((16, 16, 16), 300.0, np.float32), np.eye(4))
    mr_only = {"normalization": {"MR": {"scheme": "zscore"}}}
    with caplog.at_level(logging.WARNING, logger="mvl_pipeline.commands.predict"):
        assert input_modality(soft, mr_only, None) == "MR" and not caplog.records
        assert input_modality(air, mr_only, None) == "MR"
        assert "looks like CT by its intensities, but the model knows MR only" in caplog.text
        caplog.clear()
        assert input_modality(air, mr_only, "ct") == "CT" and not caplog.records  # --modality decides
        assert input_modality(air, {"normalization": {"CT": {}, "MR": {}}}, None) == "CT" and not caplog.records


def test_a_2d_image_is_refused_as_one_slice_not_as_channels():
    import numpy as np
    import pytest

    from mvl_pipeline.formats.codec import NotA3DVolumeError, as_3d

    with pytest.raises(NotA3DVolumeError, match=r"fewer than 3 axes"):
        as_3d(np.zeros((40, 56), np.float32), path="x")


def test_a_one_slice_volume_is_refused_alone_and_the_studies_beside_it_are_written(segmenter, task_dir, tmp_path):
    # a 2-D image saved as a volume (64x64x1) was segmented as if it were one; ingest keeps no
    # series under 8 slices, and predict assembles no DICOM series under 3
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copyfile(task_dir / "imagesTr" / "hippocampus_034.nii.gz", inputs / "a_real.nii.gz")
    nib.save(nib.Nifti1Image(np.full((64, 64, 1), 300.0, np.float32), np.eye(4)), inputs / "b_flat.nii.gz")
    studies, batch = discover(inputs)
    results = {s.name: (out, exc) for s, out, exc in predict_studies(segmenter, studies, tmp_path / "out", batch=batch,
                                                                      uri=URI, args=ARGS)}  # fmt: skip
    assert results["a_real"] == ("a_real.nii.gz", None)
    output, error = results["b_flat"]
    assert output is None and str(error) == (
        "the image is 64x64x1 voxels: the model segments 3-D volumes of at least 3 voxels along every axis "
        "(a 2-D image saved as a volume?)")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_real.nii.gz"]
