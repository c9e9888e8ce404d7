"""End to end, as a user runs it: `kedro run --pipeline sample_data` then `kedro run --pipeline
train` in a fresh copy of the project (tiny parameters in conf/local), then the predict command
on a study of the drop. Leaves a champion in the project's sqlite registry. The copy's LLM cache
is the session's (``project_copy(..., share_llm_cache=True)``): the layer is converted once."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "sample_data": {
        "n_patients": 8, "followup_fraction": 0.0, "image_size": 48, "pixel_spacing_mm": [7.5, 8.0],
        "n_slices": [16, 20], "slice_spacing_mm": 10.0, "thin_slice_studies": 0, "non_axial_studies": 1,
    },
    "ingest": {"workers": 1, "progress": False},
    "preprocess": {"split": {"ratios": {"train": 0.5, "validation": 0.2, "gate": 0.15, "test": 0.15}}},
    "model": {
        "embed_dim": 48, "depth": 2, "num_heads": 2, "pos_grid": [4, 4, 2], "token_budget": 32,
        "decoder": {"taps": [1], "channels": [16, 8, 8], "stem_channels": 4},
    },
    "fit": {
        "scaling": {"num_workers": 1, "cpus_per_worker": 2},
        "loop": {"epochs": 2, "steps_per_epoch": 3, "val_every": 1},
    },
    # a 6-step model is far below any real floor; this test is about the flow, so the first model
    # is deployed whatever its quality (the floor itself: tests/pipelines/register)
    "register": {"first_model_floor": 0.0},
}  # fmt: skip


@pytest.fixture(scope="module")
def project(project_copy) -> Path:
    """A fresh copy of the project (what a clone has), with tiny parameters in conf/local."""
    root = project_copy("e2e", share_llm_cache=True)
    (root / "conf" / "local" / "credentials.yml").unlink()  # the test creates the key itself
    (root / "conf" / "local" / "parameters.yml").write_text(yaml.safe_dump(TINY), encoding="utf-8")
    return root


def kedro(project: Path, *args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env = {**clean, "KEDRO_DISABLE_TELEMETRY": "true", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": ""}
    return subprocess.run([sys.executable, "-m", "kedro", *args], check=False, cwd=project, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip


def test_make_train_flow_leaves_a_champion_and_a_report(project):
    missing_key = kedro(project, "run", "--pipelines", "ingest")
    assert missing_key.returncode != 0  # no key yet: refuse rather than fall back
    subprocess.run([sys.executable, "-m", "mvl_pipeline.commands.secrets", "ensure-key", "conf/local/credentials.yml"],
                   cwd=project, check=True)  # fmt: skip
    sample = kedro(project, "run", "--pipelines", "sample_data")
    assert sample.returncode == 0, sample.stdout[-3000:] + sample.stderr[-3000:]
    train = kedro(project, "run", "--pipelines", "train")
    assert train.returncode == 0, train.stdout[-5000:] + train.stderr[-5000:]
    assert "Replacing dataset" not in train.stdout + train.stderr  # kedro-mlflow keeps the catalog's metrics entries
    # neither MLflow's warning about kedro-mlflow's own pyfunc (settings.py), nor the pickling of
    # ours, nor its advice to log an input example (model_registry.py says why there is none)
    for noise in ("Add type hints", "CloudPickle", "An input example was not provided"):
        assert noise not in train.stdout + train.stderr, noise

    reporting = project / "data" / "08_reporting"
    for name in ("ingest_summary.csv", "fit_history.json", "evaluation_summary.json", "evaluation_per_case.csv",
                 "learning_curves.png", "per_case_boxplot.png", "overlays.png", "registration.json"):
        assert (reporting / name).stat().st_size > 0, name  # fmt: skip
    registration = json.loads((reporting / "registration.json").read_text())
    assert registration["promoted"] and registration["registered_aliases"] == ["champion"]
    assert registration["registered_version"] == "1" and registration["n_gate_patients"] >= 1
    # the split decided first, in the primary layer; each stage's view beside it
    split = json.loads((project / "data" / "03_primary" / "split.json").read_text())
    assert all(split["patients"][role] for role in ("train", "validation", "gate", "test"))
    fingerprint = json.loads((project / "data" / "04_feature" / "dataset_fingerprint.json").read_text())
    assert sorted(fingerprint["cases"]) == sorted(split["train"] + split["validation"])
    # the test report of THESE weights is what the registry shows as the champion's performance
    summary = json.loads((reporting / "evaluation_summary.json").read_text())
    assert summary["weights_sha256"] == registration["weights_sha256"]
    assert registration["champion_test_performance"]["organ_dice"] == f"{summary['classes']['organ']['dice']['mean']:.4f}"
    with sqlite3.connect(project / "mlflow.db") as db:
        aliases = db.execute("select name, alias, version from registered_model_aliases").fetchall()
        run_tags = dict(db.execute("select key, value from tags").fetchall())
        runs = db.execute("select r.status, t.value from runs r left join tags t on t.run_uuid = r.run_uuid "
                          "and t.key = 'mvl.heartbeat_unix' order by r.start_time").fetchall()  # fmt: skip
    assert ("medvisionllama", "champion", 1) in aliases
    assert "mlflow.runName" in run_tags
    # every run beat (core.run_heartbeat), the refused one without a key too, and train's ended
    # FINISHED: its heartbeat thread held nothing up
    assert [status for status, _ in runs] == ["FAILED", "FINISHED"], runs
    assert all(beat and beat.isdigit() for _, beat in runs), runs
    history = json.loads((reporting / "fit_history.json").read_text())
    assert len(history["epochs"]) == 2

    # a second `train` with nothing new: ingest and preprocess recompute nothing, fit resumes the
    # finished run, and the same weights register nothing (no duplicate version, one champion)
    again = kedro(project, "run", "--pipelines", "train")
    assert again.returncode == 0, again.stdout[-5000:] + again.stderr[-5000:]
    log = again.stdout + again.stderr
    assert "0 new or changed to process" in log and "0 to compute" in log
    second = json.loads((reporting / "registration.json").read_text())
    assert second["weights_sha256"] == registration["weights_sha256"]
    assert not second["promoted"] and not second["registered"] and second["already_registered_as"] == "1"
    assert second["champion_version_now"] == "1"
    with sqlite3.connect(project / "mlflow.db") as db:
        versions = db.execute("select version from model_versions where name = 'medvisionllama'").fetchall()
        aliases = db.execute("select alias, version from registered_model_aliases").fetchall()
    assert versions == [(1,)] and aliases == [("champion", 1)]


def test_predict_writes_nifti_and_a_dicom_seg_on_the_source_grid(project):
    from mvl_pipeline.dicom.assemble import assemble_series
    from mvl_pipeline.dicom.labels import read_segmentation
    from mvl_pipeline.formats.nifti import decode_nifti

    if not (project / "mlflow.db").exists():
        pytest.fail("needs the champion registered by the end-to-end test (run the module as a whole)")
    study = next(p for p in sorted((project / "data/01_raw/sample_drop").glob("*/*")) if p.is_dir())
    series = max((d for d in study.iterdir() if d.is_dir()), key=lambda d: len(list(d.iterdir())))
    out = project / "prediction"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-m", "mvl_pipeline.predict", str(study), str(out)], check=False, cwd=project,
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    source = assemble_series(sorted(series.iterdir()))
    prediction = decode_nifti((out / "prediction.nii.gz").read_bytes(), compressed=True, path="prediction")
    assert prediction.shape == source.shape and np.allclose(prediction.affine, source.affine, atol=1e-3)
    seg = pydicom.dcmread(out / "prediction_seg.dcm")
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(next(series.iterdir())).SeriesInstanceUID
    labels, names = read_segmentation(seg, source)
    assert np.array_equal(labels.array, prediction.array)
    assert set(names.values()) <= {"organ", "lesion"}
