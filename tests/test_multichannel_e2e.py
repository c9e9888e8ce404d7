"""End to end on multi-channel tasks, as a user runs them: `kedro run --pipelines train` in fresh
copies of the project (tiny parameters in conf/local) on (1) the generated multi-series MR drop
(T1 + T2 series of each study as two channels, declared in ``ingest.channels``) and (2) a 4-D
NIfTI MSD-layout task built from the Hippocampus volumes (its ``dataset.json`` modalities as the
channels); then the predict command on each input kind, and on an input missing a channel. The
copies share the session's LLM cache (``project_copy(..., share_llm_cache=True)``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml

from tests.support.msd4d import build_task

pytestmark = pytest.mark.slow

CHANNELS = {"t1": {"SeriesDescription": "(?i)^t1 "}, "t2": {"SeriesDescription": "(?i)^t2 "}}
TINY = {
    "preprocess": {"split": {"ratios": {"train": 0.5, "validation": 0.2, "gate": 0.15, "test": 0.15}}},
    "model": {
        "embed_dim": 48, "depth": 2, "num_heads": 2, "pos_grid": None, "token_budget": 32,
        "decoder": {"taps": [1], "channels": [16, 8, 8], "stem_channels": 4},
    },
    "fit": {
        "scaling": {"num_workers": 1, "cpus_per_worker": 2},
        "loop": {"epochs": 1, "steps_per_epoch": 3, "val_every": 1},
    },
    "register": {"first_model_floor": 0.0},  # the flow is tested here, not the quality
}  # fmt: skip
MR_DROP = {
    "n_patients": 8, "followup_fraction": 0.0, "image_size": 48, "pixel_spacing_mm": [7.5, 8.0], "n_slices": [16, 18],
    "slice_spacing_mm": 10.0, "thin_slice_studies": 0, "non_axial_studies": 1, "mr_contrasts": ["t1", "t2"],
}  # fmt: skip
HIPPOCAMPUS = ("hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_007", "hippocampus_008",
               "hippocampus_011", "hippocampus_014", "hippocampus_015", "hippocampus_033", "hippocampus_034")  # fmt: skip


def run(project: Path, *args: str, module: str = "kedro") -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env = {**clean, "KEDRO_DISABLE_TELEMETRY": "true", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": ""}
    return subprocess.run([sys.executable, "-m", module, *args], check=False, cwd=project, env=env,
                          capture_output=True, text=True, timeout=1200)  # fmt: skip


def train(project: Path, parameters: dict) -> dict:
    (project / "conf" / "local" / "parameters.yml").write_text(yaml.safe_dump(parameters), encoding="utf-8")
    done = run(project, "run", "--pipelines", "train")
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    registration = json.loads((project / "data" / "08_reporting" / "registration.json").read_text())
    assert registration["promoted"] and registration["registered_aliases"] == ["champion"]
    return json.loads((project / "data" / "04_feature" / "preprocessing_plan.json").read_text())


def predict(project: Path, source: Path, out: Path) -> subprocess.CompletedProcess:
    return run(project, str(source), str(out), module="mvl_pipeline.predict")


def test_multi_series_mr_drop_trains_and_predicts_on_a_study(project_copy):
    project = project_copy("mc-dicom", share_llm_cache=True)
    parameters = {**TINY, "sample_data": MR_DROP, "ingest": {"workers": 1, "progress": False, "channels": CHANNELS}}
    (project / "conf" / "local" / "parameters.yml").write_text(yaml.safe_dump(parameters), encoding="utf-8")
    sample = run(project, "run", "--pipelines", "sample_data")
    assert sample.returncode == 0, sample.stdout[-3000:] + sample.stderr[-3000:]
    plan = train(project, parameters)
    assert [(c["name"], c["modality"]) for c in plan["channels"]] == [("t1", "MR"), ("t2", "MR")]
    assert [c["normalization"]["scheme"] for c in plan["channels"]] == ["zscore_body", "zscore_body"]
    fingerprint = json.loads((project / "data" / "04_feature" / "dataset_fingerprint.json").read_text())
    assert all(len(record["channels"]) == 2 for record in fingerprint["cases"].values())

    from mvl_pipeline.dicom.assemble import assemble_series
    from mvl_pipeline.formats.nifti import decode_nifti

    study = next(p for p in sorted((project / "data/01_raw/sample_drop").glob("*/*")) if p.is_dir())
    series = {pydicom.dcmread(next(d.iterdir())).SeriesDescription: d for d in study.iterdir() if d.is_dir()}
    t1 = series_dir(series, "T1")
    done = predict(project, study, project / "prediction")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    source = assemble_series(sorted(t1.iterdir()))
    prediction = decode_nifti((project / "prediction" / "prediction.nii.gz").read_bytes(), compressed=True, path="p")
    assert prediction.shape == source.shape and np.allclose(prediction.affine, source.affine, atol=1e-3)
    seg = pydicom.dcmread(project / "prediction" / "prediction_seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(next(t1.iterdir())).SeriesInstanceUID

    # the same study without its T2 series: a clear error naming the channel, no output
    partial = project / "partial-study"
    shutil.copytree(study, partial)
    shutil.rmtree(partial / series_dir(series, "T2").name)
    done = predict(project, partial, project / "prediction-partial")
    assert done.returncode == 1
    assert "missing_channel" in done.stderr and "channel 't2' is missing" in done.stderr
    assert not (project / "prediction-partial" / "prediction.nii.gz").exists()


def series_dir(series: dict[str, Path], prefix: str) -> Path:
    return next(d for name, d in series.items() if name.startswith(prefix))


def test_a_4d_msd_task_trains_and_predicts_on_a_4d_nifti(project_copy, shared_data):
    project = project_copy("mc-msd", share_llm_cache=True)
    drop = project / "drop"
    task = build_task(shared_data / "msd" / "Task04_Hippocampus", drop, HIPPOCAMPUS)
    (project / "conf" / "local" / "globals.yml").write_text(yaml.safe_dump({"drop_url": str(drop)}), encoding="utf-8")
    plan = train(project, {**TINY, "ingest": {"workers": 1, "progress": False, "labels": None}})
    assert [(c["name"], c["modality"], c["index"]) for c in plan["channels"]] == [("T1", "MR", 0), ("T2", "MR", 1)]
    assert plan["label_names"] == {"1": "anterior", "2": "posterior"}

    image = task / "imagesTr" / f"{HIPPOCAMPUS[0]}.nii.gz"
    done = predict(project, image, project / "prediction")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    prediction = nib.load(project / "prediction" / "prediction.nii.gz")
    source = nib.load(image)
    assert prediction.shape == source.shape[:3] and np.allclose(prediction.affine, source.affine, atol=1e-3)
    assert set(np.unique(np.asarray(prediction.dataobj))) <= {0, 1, 2}

    # a 3-D image (the T1 volume alone) lacks the T2 channel: a clear error naming it
    t1_only = project / "t1_only.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj)[..., 0], source.affine), t1_only)
    done = predict(project, t1_only, project / "prediction-t1")
    assert done.returncode == 1
    assert "channel 'T2' is missing: the image holds 1 volume(s)" in done.stderr
