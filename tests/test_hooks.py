"""The fit node's data version, plan and Ray run land on the MLflow run as tags."""

from types import SimpleNamespace

import mlflow
import pytest
from kedro.config import MissingConfigException, OmegaConfigLoader

from mvl_pipeline.hooks import LineageTagsHook, RunLockHook
from mvl_pipeline.settings import CONFIG_LOADER_ARGS


def test_fit_history_tags_the_active_run(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        hook = LineageTagsHook()
        with mlflow.start_run() as run:
            hook.after_node_run(node=None, outputs={"fit_history": {"data_version": "65bfe89362b8",
                                                                    "plan_id": "0e4e", "run_name": "mvl-x"}})  # fmt: skip
            hook.after_node_run(node=None, outputs={"evaluation_summary": {"mean_dice": 1.0}})  # not fit: ignored
        tags = mlflow.get_run(run.info.run_id).data.tags
        assert (tags["data_version"], tags["plan_id"], tags["fit_run"]) == ("65bfe89362b8", "0e4e", "mvl-x")
        hook.after_node_run(node=None, outputs={"fit_history": {"data_version": "v"}})  # no active run: no-op
    finally:
        mlflow.set_tracking_uri(None)


def test_a_missing_kedro_environment_is_named_before_kedro_mlflow_reads_its_config(tmp_path):
    # `kedro run --env mds` failed in kedro-mlflow's hook, which read no mlflow.yml and fell back to
    # a ./mlruns file store: the error was MLflow refusing file stores, not the missing environment
    for env in ("base", "local", "msd"):
        (tmp_path / "conf" / env).mkdir(parents=True)
    loader = OmegaConfigLoader(str(tmp_path / "conf"), env="mds", **CONFIG_LOADER_ARGS)
    context = SimpleNamespace(project_path=tmp_path, config_loader=loader, env="mds")
    with pytest.raises(MissingConfigException, match=r"conf/mds.*environment 'mds'; the environments here: local, msd"):
        RunLockHook().after_context_created(context)
    assert RunLockHook.after_context_created.kedro_impl["tryfirst"]  # runs before kedro-mlflow's hook


def test_a_params_name_the_project_does_not_have_is_refused_before_the_run(tmp_path):
    # `--params epochs=1` was merged as a new top-level parameter nothing reads: the run trained
    # its 72 epochs without a word (a first-try audit, 2026-12-05)
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for runtime, refused in (({"epochs": 1}, r"epochs \(did you mean .*fit\.loop\.epochs.*\?\)"),
                             ({"fitt": {"loop": {"epochs": 1}}}, r"fitt \(did you mean fit\?\)")):  # fmt: skip
        # as `kedro run` makes it: the run's loader merges --params into "parameters"
        loader = OmegaConfigLoader(str(root / "conf"), env="msd", runtime_params=runtime, **CONFIG_LOADER_ARGS)
        hook = RunLockHook()
        hook.after_context_created(SimpleNamespace(project_path=tmp_path, config_loader=loader, env="msd"))
        with pytest.raises(ValueError, match=f"no parameter named {refused}"):
            hook.before_pipeline_run({"runtime_params": runtime}, pipeline=None, catalog=None)


def test_a_nested_params_typo_or_bad_value_is_refused_before_the_run_not_when_its_stage_starts(tmp_path):
    # `--params fit.loop.lrr=0.1` passed the top-level check (fit exists) and failed only when fit
    # started, after ingest and preprocessing; with `--pipeline ingest` it was never refused at all
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def before_run(env, runtime):
        loader = OmegaConfigLoader(str(root / "conf"), env=env, runtime_params=runtime, **CONFIG_LOADER_ARGS)
        hook = RunLockHook()
        hook.after_context_created(SimpleNamespace(project_path=tmp_path, config_loader=loader, env=env))
        # a pipeline that writes nothing: the hook checks the parameters and takes no lock
        hook.before_pipeline_run({"runtime_params": runtime}, pipeline=SimpleNamespace(all_outputs=list, inputs=set), catalog={})

    refused = (({"fit": {"loop": {"lrr": 0.1}}}, r"unknown key\(s\) \['lrr'\] in fit\.loop; known keys: .*'lr'"),
               ({"fit": {"loop": {"epochs": 0}}}, r"fit\.loop\.epochs must be a whole number >= 1, got 0"),
               ({"model": {"llm": {"layer_indx": 3}}}, r"unknown key\(s\) \['layer_indx'\] in model\.llm"),
               ({"ingest": {"spacing_range_mm": 3}}, r"ingest\.spacing_range_mm must be \[low, high\] with 0 < low < high; got 3"),
               ({"run": {"lock": "maybe"}}, r"run\.lock"))  # fmt: skip
    for env in ("local", "msd"):
        for runtime, message in refused:
            with pytest.raises(ValueError, match=rf"^--params: .*{message}"):
                before_run(env, runtime)
        # valid overrides, and new entries of the free-form mappings (labels, arms), still run
        for runtime in ({"fit": {"loop": {"epochs": 2, "lr": 0.01}}}, {"model": {"preset": "cnn"}},
                        {"ingest": {"labels": {"organ": 1, "vessel": 3}}},
                        {"ablation": {"arm_models": {"lora": {"llm": {"lora": {"rank": 4}}}}}},
                        {"evaluate": {}}, {}):  # fmt: skip
            before_run(env, runtime)


def test_a_typo_in_a_parameters_file_is_refused_before_a_run_whose_pipeline_reads_that_block(tmp_path):
    # `lrr: 0.1` under fit.loop in conf/local/parameters.yml was refused only when the fit started,
    # after ingest and preprocessing; a typo inside ablation.arm_models named model.llm, not the arm
    import shutil
    from pathlib import Path

    conf = tmp_path / "conf"
    shutil.copytree(Path(__file__).resolve().parents[1] / "conf", conf, ignore=shutil.ignore_patterns("credentials*"))

    def before_run(local_parameters, reads):
        (conf / "local" / "parameters.yml").write_text(local_parameters, encoding="utf-8")
        loader = OmegaConfigLoader(str(conf), env="local", **CONFIG_LOADER_ARGS)
        hook = RunLockHook()
        hook.after_context_created(SimpleNamespace(project_path=tmp_path, config_loader=loader, env="local"))
        pipeline = SimpleNamespace(inputs=lambda: {*reads, "model_input_cases"}, all_outputs=list)
        hook.before_pipeline_run({"runtime_params": {}}, pipeline=pipeline, catalog={})

    typo = "fit:\n  loop:\n    lrr: 0.1\n"
    with pytest.raises(ValueError, match=r"^parameters: unknown key\(s\) \['lrr'\] in fit\.loop; known keys: .*'lr'"):
        before_run(typo, {"params:fit", "params:model"})
    before_run(typo, {"params:ingest", "params:fit.llm_cache_dir"})  # a run that does not read fit goes on
    before_run("fit:\n  loop:\n    lr: 0.1\n", {"params:fit"})
    arm_typo = "ablation:\n  arm_models:\n    none: {llm: {mdoe: none}}\n"
    with pytest.raises(ValueError, match=r"^parameters: ablation\.arm_models\.none: unknown key\(s\) \['mdoe'\] in model\.llm"):
        before_run(arm_typo, {"params:ablation", "params:model"})
    # a typo in the shared model block is named as such, not as the first arm's change
    with pytest.raises(ValueError, match=r"^parameters: model\.depth must be a whole number"):
        before_run("model:\n  depth: abc\n", {"params:ablation", "params:model"})


@pytest.mark.slow  # two `kedro run`s in a copy of the project
def test_a_stage_run_before_what_it_reads_exists_names_the_pipelines_to_run_first_in_order(project_copy):
    # `kedro run --pipelines register` on a fresh clone failed with "Did not find any versions for
    # TorchWeightsDataset(...)" and nothing about which runs make what it reads
    import os
    import subprocess
    import sys

    root = project_copy("missing-inputs")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))},
           "KEDRO_DISABLE_TELEMETRY": "true", "PYTHONPATH": ""}  # fmt: skip

    def kedro_run(pipeline):
        done = subprocess.run([sys.executable, "-m", "kedro", "run", "--pipelines", pipeline], cwd=root, env=env, check=False,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert done.returncode != 0
        return " ".join((done.stdout + done.stderr).split())  # the log wraps long lines

    assert ("this run reads what no run has made yet. Run first, in this order: `kedro run --pipelines ingest` "
            "(ingested_cases), then `kedro run --pipelines preprocess` (gate_split, preprocessing_plan), then "
            "`kedro run --pipelines fit` (fit_history, trained_model), then `kedro run --pipelines evaluate` "
            "(evaluation_summary); or `kedro run --pipelines train` for the whole chain.") in kedro_run("register")  # fmt: skip
    # the drop comes from outside the project: no run of it makes it, and its own error says where it comes from
    ingest = kedro_run("ingest")
    assert "drop folder not found (it is drop_url" in ingest and "no run has made" not in ingest


def test_the_missing_inputs_hint_never_asks_a_store_that_did_not_answer_and_never_waits_long(monkeypatch, caplog):
    import time

    from kedro.io import DatasetError

    from mvl_pipeline import hooks
    from mvl_pipeline.core.storage import StorageUnavailableError
    from mvl_pipeline.hooks import MissingInputsHook

    asked = []
    pipeline = SimpleNamespace(inputs=lambda: {"trained_model", "test_split", "params:evaluate", "hospital_drop"})
    run_params = {"pipeline_names": ["evaluate"]}
    # an outage: the error already says the store did not answer, and asking again would wait its retries
    try:
        try:
            raise StorageUnavailableError("s3 endpoint http://127.0.0.1:1 did not answer (ConnectTimeoutError)")
        except StorageUnavailableError as outage:
            raise DatasetError("trained_model: the store did not answer") from outage
    except DatasetError as error:
        MissingInputsHook().on_pipeline_error(error, run_params, pipeline, SimpleNamespace(exists=asked.append))
    assert asked == []
    # absent inputs another pipeline writes are named; the drop, which none writes, is not even asked
    caplog.set_level("ERROR")
    MissingInputsHook().on_pipeline_error(DatasetError("x"), run_params, pipeline,
                                          SimpleNamespace(exists=lambda n: asked.append(n) or n == "test_split"))  # fmt: skip
    assert sorted(asked) == ["test_split", "trained_model"]
    assert "Run first, in this order: `kedro run --pipelines fit` (trained_model); or" in caplog.text
    # a store that answers slowly: no hint rather than a wait
    caplog.clear()
    monkeypatch.setattr(hooks, "HINT_TIMEOUT_S", 0.5)
    started = time.monotonic()
    MissingInputsHook().on_pipeline_error(DatasetError("x"), run_params, pipeline,
                                          SimpleNamespace(exists=lambda n: time.sleep(30)))  # fmt: skip
    assert time.monotonic() - started < 10 and "no run has made" not in caplog.text


@pytest.mark.slow  # a tiny drop generated, ingested and preprocessed in a copy of the project
def test_a_run_that_fails_after_several_nodes_closes_its_mlflow_run_once(project_copy):
    # kedro-mlflow re-enters the run at every node; with `tracking.run.nested: True` each node put
    # it once more on MLflow's stack, and a failure then logged "The run ... was closed because of an
    # error" once per node that had run (5 times for a run whose fifth node failed)
    import os
    import subprocess
    import sys

    import yaml

    root = project_copy("mlflow-once")
    tiny = {"sample_data": {"n_patients": 4, "followup_fraction": 0.0, "image_size": 32, "n_slices": [8, 8],
                            "pixel_spacing_mm": [8.0, 8.0], "slice_spacing_mm": 10.0, "thin_slice_studies": 0,
                            "non_axial_studies": 0},
            "ingest": {"workers": 1, "progress": False}}  # fmt: skip
    (root / "conf/local/parameters.yml").write_text(yaml.safe_dump(tiny), encoding="utf-8")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MVL_"))},
           "KEDRO_DISABLE_TELEMETRY": "true", "PYTHONPATH": ""}  # fmt: skip

    def kedro_run(pipeline):
        return subprocess.run([sys.executable, "-m", "kedro", "run", "--pipelines", pipeline], cwd=root, env=env,
                              check=False, capture_output=True, text=True, timeout=600)  # fmt: skip

    for pipeline in ("sample_data", "ingest"):
        done = kedro_run(pipeline)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    # the preprocessed cases' folder is a file: split, fingerprint and plan run, then the fourth node fails
    (root / "data/05_model_input").mkdir(parents=True, exist_ok=True)
    (root / "data/05_model_input/cases").write_text("not a folder")
    done = kedro_run("preprocess")
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "Completed 3 out of" in output, output[-3000:]
    assert output.count("was closed because of an error in the pipeline") == 1, output[-3000:]
