"""The ablation driver's pure parts: what each arm changes in the model (and nothing else), the
names that make a re-run resume the same runs, the crop override, the split guard and the
``ablation`` block's validation."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import yaml

from mvl_pipeline.evaluation.leakage import LeakageError
from mvl_pipeline.training import ablation_trial, tune_driver
from mvl_pipeline.training.ablation_config import AblationConfig
from mvl_pipeline.training.config import FitConfig
from tests.pipelines.conftest import ROOT

PLAN = {"patch_size": [40, 56, 40], "embed_patch_size": [8, 8, 8], "label_values": [0, 1, 2],
        "label_names": {"1": "anterior", "2": "posterior"}, "target_spacing": [1.0, 1.0, 1.0], "plan_id": "p1"}  # fmt: skip
MODEL = yaml.safe_load((ROOT / "conf/base/parameters_model.yml").read_text())["model"]


def _without(config: dict, *paths: str) -> dict:
    config = copy.deepcopy(config)
    for path in paths:
        *parents, leaf = path.split(".")
        node = config
        for part in parents:
            node = node[part]
        node.pop(leaf)
    return config


def test_each_arm_changes_only_what_its_entry_names():
    models = tune_driver.arm_models(MODEL, AblationConfig(), PLAN)
    assert list(models) == ["pretrained", "shuffled", "random", "bridge_only", "none", "cnn"]
    assert {arm: models[arm]["llm"]["mode"] for arm in models} == {
        "pretrained": "pretrained", "shuffled": "shuffled", "random": "random", "bridge_only": "bridge_only",
        "none": "none", "cnn": "none",
    }  # fmt: skip
    shared = _without(models["pretrained"], "llm.mode")
    for arm in ("shuffled", "random", "bridge_only", "none"):
        assert _without(models[arm], "llm.mode") == shared, arm  # encoder, decoder, crop grid, precision ...
    assert models["cnn"]["preset"] == "cnn" and models["cnn"]["cnn"]["kernel_sizes"]  # the nnU-Net topology of the plan
    assert models["pretrained"]["pos_grid"] == [5, 7, 5] and models["pretrained"]["num_classes"] == 3


def test_a_trial_trains_with_the_budget_and_peak_lr_of_ablation_trial_and_the_rest_of_fit_loop():
    params = yaml.safe_load((ROOT / "conf/base/parameters_fit.yml").read_text())["fit"]
    fit_cfg = FitConfig.from_params(params)
    loop = tune_driver.trial_loop(fit_cfg, AblationConfig.from_params({"trial": {"epochs": 3, "lr": 0.01}}))
    assert (loop["epochs"], loop["steps_per_epoch"], loop["val_every"], loop["lr"]) == (3, 35, 2, 0.01)
    assert loop["lr"] != params["loop"]["lr"] and loop["min_lr_ratio"] == params["loop"]["min_lr_ratio"]
    assert {k: v for k, v in loop.items() if k not in ("epochs", "steps_per_epoch", "val_every", "lr")} == {
        k: v for k, v in fit_cfg.loop.to_dict().items() if k not in ("epochs", "steps_per_epoch", "val_every", "lr")}


def test_run_names_follow_the_arms_model_so_a_rerun_finds_its_runs():
    config = AblationConfig()
    models = tune_driver.arm_models(MODEL, config, PLAN)
    names = tune_driver.run_names(models, config)
    # a rerun is another process: the names must not depend on anything of this one (hash seeds)
    script = ("import json, sys, yaml; from mvl_pipeline.training import tune_driver;"
              "from mvl_pipeline.training.ablation_config import AblationConfig as A; c = A();"
              "m = yaml.safe_load(open(sys.argv[1]).read())['model'];"
              "print(json.dumps(tune_driver.run_names(tune_driver.arm_models(m, c, json.loads(sys.argv[2])), c)))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script, str(ROOT / "conf/base/parameters_model.yml"), json.dumps(PLAN)],
                          capture_output=True, text=True, timeout=120, check=True, cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": "123"})  # fmt: skip
    elsewhere = json.loads(done.stdout.strip().splitlines()[-1])
    assert {arm: {int(seed): name for seed, name in arm_names.items()} for arm, arm_names in elsewhere.items()} == names
    assert names["none"][2].startswith("none-seed2-") and len({n for arm in names.values() for n in arm.values()}) == 18
    changed = AblationConfig(arm_models={**config.arm_models, "random": {"llm": {"mode": "random", "layer_index": -2}}})
    other = tune_driver.run_names(tune_driver.arm_models(MODEL, changed, PLAN), changed)
    assert other["random"][0] != names["random"][0] and other["pretrained"] == names["pretrained"]
    identity = {"data_version": "abc123abc123", "plan": "x"}
    assert tune_driver.experiment_name(identity, config).startswith("ablation-abc123abc123-")
    assert tune_driver.experiment_name(identity, config) != tune_driver.experiment_name(identity | {"plan": "y"}, config)
    assert tune_driver.experiment_name(identity, AblationConfig(name="mine")) == "mine"


def test_the_crop_override_changes_the_training_crop_and_the_token_grid():
    config = AblationConfig(crop_size=(48, 64, 48))
    plan = tune_driver.trial_plan(PLAN, config)
    assert plan["patch_size"] == [48, 64, 48] and PLAN["patch_size"] == [40, 56, 40]
    assert tune_driver.arm_models(MODEL, config, plan)["none"]["pos_grid"] == [6, 8, 6]
    assert tune_driver.trial_plan(PLAN, AblationConfig()) == PLAN
    with pytest.raises(ValueError, match="not whole tokens"):
        tune_driver.arm_models(MODEL, AblationConfig(crop_size=(44, 64, 48)), tune_driver.trial_plan(PLAN, AblationConfig(crop_size=(44, 64, 48))))


def test_a_test_patient_among_the_development_patients_is_refused():
    development = {"patients": {"train": ["pt-a", "pt-b"], "validation": ["pt-c"]}}
    tune_driver.check_disjoint(development, {"patients": {"test": ["pt-d"]}})
    with pytest.raises(LeakageError, match="1 test patient"):
        tune_driver.check_disjoint(development, {"patients": {"test": ["pt-d", "pt-c"]}})


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"arms": ["pretrained"]}, "at least two distinct arms"),
        ({"arms": ["pretrained", "nope"]}, r"\['nope'\] have no entry in ablation.arm_models"),
        ({"reference": "cnn", "arms": ["pretrained", "none"]}, "ablation.reference 'cnn' is not one of"),
        ({"seeds": [1, 1]}, "distinct"),
        ({"trial": {"epochs": 0}}, "ablation.trial"),
        ({"trial": {"lr": 0}}, r"ablation.trial.lr must be > 0"),
        ({"crop_size": [1, 2]}, "needs 3 values"),
        ({"arms": ["pretrained", "a/b"], "arm_models": {"pretrained": {}, "a/b": {}}}, "letters, digits"),
        ({"local_concurrent_trials": 0}, "local_concurrent_trials must be >= 1"),
        ({"local_engine": "ray"}, r"ablation.local_engine must be one of \['tune', 'ray_train'\]"),
    ],
)
def test_the_ablation_block_refuses_a_grid_it_cannot_run(params, message):
    with pytest.raises(ValueError, match=message):
        AblationConfig.from_params(params)


@pytest.mark.parametrize(
    ("asked", "scaling", "cpus", "at_once"),
    [
        (2, {}, 2, 2),  # the default on 2 cores: two trials of 1 core each
        (2, {}, 16, 2),
        (2, {}, 1, 1),  # one core: one trial at a time
        (4, {"num_workers": 2}, 4, 2),  # every worker of every trial gets a core
        (2, {"cpus_per_worker": 2}, 3, 1),  # as many cores a worker as asked for
        (1, {}, 16, 1),
    ],
)
def test_a_local_ray_runs_as_many_trials_at_once_as_its_cores_hold(asked, scaling, cpus, at_once):
    fit = FitConfig.from_params({"scaling": scaling})
    assert tune_driver.local_trials(AblationConfig.from_params({"local_concurrent_trials": asked}), fit, cpus) == at_once


def test_a_trial_result_round_trips_locally_and_on_s3(tmp_path, s3_bucket):
    import numpy as np

    from mvl_pipeline.training.ablation_trial import join_url, read_result, write_result

    document = {"arm": "none", "seed": 1, "rows": [{"dice": np.float32(0.5), "voxels_label": np.int64(7)}]}
    for directory, options in ((str(tmp_path / "trials" / "none-seed1-abc"), {}),
                               (f"s3://{s3_bucket['bucket']}/ablation/trials/none-seed1-abc", s3_bucket["credentials"])):  # fmt: skip
        assert read_result(directory, **options) is None
        write_result(directory, document, **options)
        assert read_result(directory, **options) == {"arm": "none", "seed": 1, "rows": [{"dice": 0.5, "voxels_label": 7}]}
    assert join_url("s3://bucket/a/", "trials", "x") == "s3://bucket/a/trials/x"


def test_the_tune_experiment_on_s3_uses_the_bounded_filesystem_and_is_found_again(tmp_path, s3_bucket, monkeypatch):
    """The Tune state on S3 goes through core.storage.train_storage (the endpoint from
    AWS_ENDPOINT_URL, bounded retries), as every Ray Train run does: a saved experiment is seen
    there (resume), an empty prefix is not."""
    from pyarrow import fs as arrow_fs
    from ray import tune

    from mvl_pipeline.training.tune_driver import tune_storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket["endpoint_url"])
    bucket = s3_bucket["bucket"]
    storage_path, filesystem, path = tune_storage(f"s3://{bucket}/ablation/exp", "tune-abc")
    assert (storage_path, path) == (f"{bucket}/ablation/exp", f"{bucket}/ablation/exp/tune-abc")
    assert isinstance(filesystem, arrow_fs.S3FileSystem)
    assert not tune.Tuner.can_restore(path, storage_filesystem=filesystem)
    with filesystem.open_output_stream(f"{path}/tuner.pkl") as handle:  # what a started Tuner leaves
        handle.write(b"state")
    assert tune.Tuner.can_restore(path, storage_filesystem=filesystem)
    local = str(tmp_path / "exp")
    assert tune_storage(local, "tune-abc") == (local, None, f"{local}/tune-abc")


def test_the_grid_starts_every_cnn_trial_first_then_the_other_arms_seed_by_seed():
    from ray import tune
    from ray.tune.search.variant_generator import generate_variants

    models = tune_driver.arm_models(MODEL, AblationConfig(), PLAN)
    order = tune_driver.trial_order(models, list(models), [0, 1])
    others = ["pretrained", "shuffled", "random", "bridge_only", "none"]
    expected = [("cnn", 0), ("cnn", 1), *((arm, 0) for arm in others), *((arm, 1) for arm in others)]
    assert [(t["arm"], t["seed"]) for t in order] == expected
    # ... and Tune starts them in that order (a grid over two keys, it ordered them itself)
    started = [ablation_trial.trial_of(config) for _, config in generate_variants({"trial": tune.grid_search(order)})]
    assert started == expected
    assert tune_driver.trial_order(models, ["none", "pretrained"], [3]) == [{"arm": "none", "seed": 3}, {"arm": "pretrained", "seed": 3}]


def test_a_trial_config_from_a_tune_experiment_started_before_the_one_grid_still_reads():
    assert ablation_trial.trial_of({"arm": "cnn", "seed": 2}) == ("cnn", 2)
    assert ablation_trial.trial_of({"trial": {"arm": "none", "seed": "1"}}) == ("none", 1)


def test_another_scoring_of_the_same_grid_gets_its_own_tune_experiment():
    """An audit (2026-12-05): after a finished grid, a changed ``evaluate`` setting (or other test
    patients) restored the old Tune experiment, whose trials had all ended: nothing ran, and every
    later run failed with "left no result". The scoring is part of the Tune experiment's name: the
    new one re-scores each finished Ray run without training it again."""
    from types import SimpleNamespace

    config = AblationConfig.from_params({"arms": ["pretrained", "none"], "seeds": [0, 1]})
    names = {arm: {seed: f"{arm}-seed{seed}-x" for seed in (0, 1)} for arm in ("pretrained", "none")}
    scaling = {"cpus_per_worker": 1, "use_gpu": False, "gpus_per_worker": 1}

    def named(scoring_id: str = "s1", concurrent: int = 2, train_in_trial: bool = True, **resized) -> str:
        context = SimpleNamespace(run_names=names, scoring_id=scoring_id, train_in_trial=train_in_trial, scaling=scaling | resized)
        return tune_driver.tune_name(context, config, concurrent)

    name = named()
    assert name == named()  # resumable
    assert name != named(scoring_id="s2")
    assert name != named(concurrent=1)
    # the engine and what its trials reserve too: a restored experiment keeps its trials' resources
    assert name != named(train_in_trial=False)
    assert name != named(cpus_per_worker=2) and name != named(use_gpu=True)
    assert named(train_in_trial=False) == named(train_in_trial=False, cpus_per_worker=2)  # a Ray Train run's trial holds none


@pytest.mark.parametrize(
    ("local", "engine", "scaling", "trials_dir", "in_trial"),
    [
        (True, "tune", {}, "data/06_models/ablation/x/trials", True),  # the default on one machine
        (True, "ray_train", {}, "data/06_models/ablation/x/trials", False),  # asked for
        (False, "tune", {}, "data/06_models/ablation/x/trials", False),  # a cluster (RAY_ADDRESS)
        (True, "tune", {"num_workers": 2}, "data/06_models/ablation/x/trials", False),  # DDP over workers
        (True, "tune", {}, "s3://bucket/ablation/x/trials", False),  # an object store: Ray Train's storage
    ],
)
def test_a_trial_trains_in_its_tune_process_only_on_a_local_ray_with_one_worker(local, engine, scaling, trials_dir, in_trial):
    from types import SimpleNamespace

    fit = FitConfig.from_params({"scaling": {"cpus_per_worker": 1, **scaling}})
    config = AblationConfig.from_params({"local_engine": engine})
    context = SimpleNamespace(trials_dir=trials_dir)
    assert tune_driver.trains_in_trial(context, config, fit, local=local) is in_trial


def test_a_trial_that_trains_in_its_process_holds_its_workers_cpus_and_gpus():
    from types import SimpleNamespace

    scaling = {"cpus_per_worker": 1, "use_gpu": False, "gpus_per_worker": 1}
    assert tune_driver.trial_resources(SimpleNamespace(train_in_trial=False, scaling=scaling)) == tune_driver.TRIAL_RESOURCES
    assert tune_driver.TRIAL_RESOURCES["cpu"] == 0  # a Ray Train run's workers and its scoring task hold them
    held = tune_driver.trial_resources(SimpleNamespace(train_in_trial=True, scaling=scaling))
    assert held == {**tune_driver.TRIAL_RESOURCES, "cpu": 1}
    with_gpu = tune_driver.trial_resources(SimpleNamespace(train_in_trial=True, scaling={**scaling, "cpus_per_worker": 4, "use_gpu": True}))
    assert with_gpu == {**tune_driver.TRIAL_RESOURCES, "cpu": 4, "gpu": 1}


def test_the_report_names_the_commits_that_trained_the_trials_not_the_one_that_read_them_back(caplog):
    """An audit (2026-12-05): a rerun after a commit reused every finished trial and the report
    named the new commit. Each trial now records the commit that trained it."""
    import logging

    trials = [{"trained_at_commit": "aaa", "trained_at_dirty": "False"}, {"trained_at_commit": "aaa", "trained_at_dirty": "False"}]
    assert tune_driver.trained_at(trials, "aaa") == {"git_commit": "aaa", "git_dirty": "False", "summarised_at_commit": "aaa"}
    with caplog.at_level(logging.WARNING, logger="mvl_pipeline.training.tune_driver"):
        mixed = tune_driver.trained_at([*trials, {"trained_at_commit": "bbb", "trained_at_dirty": "True"}, {}], "ccc")
    assert mixed == {"git_commit": "aaa, bbb, unrecorded", "git_dirty": "False, True", "summarised_at_commit": "ccc"}
    assert "trained at git commit(s) aaa, bbb, unrecorded, not at this run's ccc" in caplog.text
