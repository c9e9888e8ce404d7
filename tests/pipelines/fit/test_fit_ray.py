"""Ray Train `fit` with 2 CPU workers: trains, reports per epoch, and a re-run of the same run
name resumes instead of retraining. (A worker's failure, SIGKILLed, is tests/test_faults.py's.)"""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from mvl_pipeline.pipelines.fit.nodes import fit_model

pytestmark = pytest.mark.slow


def run_fit(data, fit, registry=None):
    return fit_model(
        data["model_input_cases"], data["development_split"], data["preprocessing_plan"], data["ingest_manifest"],
        registry, data["model"], fit,
    )  # fmt: skip


def worker_stderr(ray) -> str:
    """What this session's Ray workers wrote to stderr (their logging and warnings)."""
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    return "".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(logs.glob("worker-*.err")))


def test_two_worker_fit_trains_and_reports_every_epoch(tiny_training_data, ray_local, ray_worker_tmp, tiny_fit):
    fit = tiny_fit()
    (state, config), history = run_fit(tiny_training_data, fit)
    # DDP over the two workers takes every gradient in its parameter's layout: no copy, no warning
    # (the class heads' 1x1x1 convs on channels_last inputs used to give "Grad strides do not match")
    stderr = worker_stderr(ray_local)
    assert "AdamW:" in stderr  # the workers' own log lines are here: the check reads the right files
    assert "Grad strides" not in stderr
    # one line an epoch, the loop's own; not Ray's second copy of it with the whole metrics dict
    assert "epoch 3/3" in stderr and "Reporting training result" not in stderr
    epochs = history["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert all("val_dice" in e and "train_loss" in e for e in epochs)
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert history["num_workers"] == 2
    assert history["best_val_dice"] == max(e["val_dice"] for e in epochs)
    # the kept model is the one with the best validation Dice, not the last or lowest-loss one
    assert history["best_epoch"] == max(epochs, key=lambda e: e["val_dice"])["epoch"]
    assert config["model"]["num_classes"] == 3 and state

    # Same data, plan and configuration -> same run name -> resumes the finished run: no step.
    _, again = run_fit(tiny_training_data, fit)
    assert again["run_name"] == history["run_name"]
    assert again["global_step"] == history["global_step"]
    assert again["resumed_after_epochs"] == [2]
    # the workers copied the checkpoint they resumed from into their temporary folder, and removed
    # it: before, every resume left a copy of the model and optimizer there
    assert ray_local.get(ray_local.remote(tempfile.gettempdir).remote()) == str(ray_worker_tmp)
    assert not list(ray_worker_tmp.glob("mvl-restore-*"))
    assert [e["train_loss"] for e in again["epochs"]] == [e["train_loss"] for e in epochs]

    # fit.init champion: the registered champion's weights (here: this fit's) start a shorter run
    # of its own name, which begins where the champion ended, not where a fresh model does.
    registry = SimpleNamespace(champion=SimpleNamespace(
        version="7", load_bundle=lambda: ((state, config), tiny_training_data["preprocessing_plan"])))  # fmt: skip
    _, tuned = run_fit(tiny_training_data, fit | {"init": "champion", "champion_epochs": 1}, registry)
    assert tuned["init"]["from"] == "champion" and tuned["init"]["version"] == "7"
    assert [e["epoch"] for e in tuned["epochs"]] == [0] and tuned["run_name"] != history["run_name"]
    assert tuned["epochs"][0]["train_loss"] < epochs[0]["train_loss"]
    assert history["init"] == {"from": "scratch", "epochs": 3}


def test_champion_init_falls_back_to_scratch_without_a_champion_or_on_another_plan(tiny_training_data):
    import torch

    from mvl_pipeline.model import MedVisionLlamaConfig
    from mvl_pipeline.pipelines.fit.nodes import champion_start

    plan = tiny_training_data["preprocessing_plan"]
    cfg = MedVisionLlamaConfig.from_params(tiny_training_data["model"]).for_plan(plan)
    assert champion_start(SimpleNamespace(champion=None), cfg, plan) is None
    other_grid = {**plan, "plan_id": "other", "target_spacing": [9.9, 9.9, 9.9]}
    other_plan = SimpleNamespace(champion=SimpleNamespace(version="3", load_bundle=lambda: (({}, {}), other_grid)))
    assert champion_start(other_plan, cfg, plan) is None
    # new intensity statistics only (a grown drop): the champion's weights still fit
    restats = {**plan, "plan_id": "restats", "provenance": {"n_cases": 99},
               "normalization": {m: {**n, "mean": 1.0} for m, n in (plan.get("normalization") or {}).items()}}  # fmt: skip
    same_grid = SimpleNamespace(champion=SimpleNamespace(version="4", load_bundle=lambda: (({"w": torch.ones(2)}, {}), restats)))
    assert champion_start(same_grid, cfg, plan).version == "4"


def test_worker_sizing_follows_the_ray_cluster_and_refuses_what_a_local_ray_cannot_hold():
    from mvl_pipeline.training.config import FitConfig
    from mvl_pipeline.training.ray_driver import size_workers

    auto = FitConfig.from_params({"scaling": {"num_workers": 2, "cpus_per_worker": 0}})
    assert size_workers(auto, {"CPU": 8.0}, local=True).scaling.cpus_per_worker == 4
    with pytest.raises(ValueError, match="2 CPUs but the Ray cluster has 1"):
        size_workers(auto, {"CPU": 1.0}, local=True)  # 2 workers need at least 2 CPUs
    too_many = FitConfig.from_params({"scaling": {"num_workers": 1, "cpus_per_worker": 2}})
    with pytest.raises(ValueError, match="needs 1 worker"):
        size_workers(too_many, {"CPU": 1.0}, local=True)
    assert size_workers(too_many, {"CPU": 1.0}, local=False).scaling.cpus_per_worker == 2  # a cluster may scale
