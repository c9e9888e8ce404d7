"""The CI smoke grid of the ablation, as a user runs it: `kedro run --pipelines ablation` on a copy
of the project (2 arms x 2 seeds, a few steps, 16 Hippocampus cases from ../shared), with Ray
Tune running trials side by side on the local Ray (``ablation.local_concurrent_trials``: 2 at
once on 2 cores, 1 core each), a REAL interruption (SIGKILL of the run's process group once the
first trial has stored its result), a resume that runs only the unfinished trials (counted:
MLflow child runs that trained vs. adopted), MLflow nesting and tags, the per-case results table
(a new version per run, none overwritten) and the report files. Minutes: marked slow (CI runs it).

Four trials, two at a time: at the kill one or both of the first pair have finished and the
second pair has not (it starts only when a trial of the first pair ends), so the resume always
has finished and unfinished trials (each trial costs seconds of start-up on 2 cores, whatever its
budget). How the seeds of an arm are pooled (per-patient means over seeds, the seed spread)
is tested on constructed results (tests/evaluation/test_ablation_statistics.py), the run names
per seed in tests/training/test_tune_driver.py."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mvl_pipeline.evaluation.ablation import smallest_p

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
CASES = 16
ARMS, SEEDS = ["pretrained", "none"], [0, 1]
ENV = "smoke"
DATA = "data/smoke"


def _task_subset(task: Path, target: Path, n: int) -> Path:
    spec = json.loads((task / "dataset.json").read_text())
    spec["training"] = spec["training"][:n]
    spec["numTraining"] = n
    for entry in spec["training"]:
        for key in ("image", "label"):
            relative = entry[key].lstrip("./")
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(task / relative, target / relative)
    (target / "dataset.json").write_text(json.dumps(spec))
    return target


def _write_env(root: Path, drop: Path, llm_cache_dir: str) -> None:
    conf = root / "conf" / ENV
    conf.mkdir(parents=True)
    (conf / "globals.yml").write_text(yaml.safe_dump({"data_root": DATA, "drop_url": str(drop), "llm_cache_dir": llm_cache_dir}))
    parameters = {
        "ingest": {"labels": None, "workers": 1, "progress": False},
        "preprocess": {"split": {"ratios": {"train": 0.45, "validation": 0.2, "gate": 0.0, "test": 0.35}}},
        "model": {"embed_dim": 48, "depth": 2, "num_heads": 2, "patch_size": [8, 8, 8], "token_budget": 32,
                  "decoder": {"taps": [1], "channels": [16, 8, 8], "stem_channels": 4}},
        "fit": {"scaling": {"num_workers": 1}},
        "ablation": {"arms": ARMS, "seeds": SEEDS, "trial": {"epochs": 2, "steps_per_epoch": 3, "val_every": 1},
                     "statistics": {"n_resamples": 1000}},
    }  # fmt: skip
    (conf / "parameters.yml").write_text(yaml.safe_dump(parameters))


def _kedro(pipelines: str) -> list[str]:
    return [str(BIN / "kedro"), "run", "--pipelines", pipelines, "--env", ENV]


def _env() -> dict[str, str]:
    return {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "RAY_AUTH_MODE": "disabled",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip


def _run(root: Path, pipelines: str, log: Path) -> str:
    with log.open("w") as out:
        done = subprocess.run(_kedro(pipelines), cwd=root, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                              timeout=600, check=False)  # fmt: skip
    text = log.read_text(errors="replace")
    assert done.returncode == 0, f"kedro run --pipelines {pipelines} failed:\n{text[-6000:]}"
    return text


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _results(root: Path) -> list[Path]:
    return sorted((root / DATA / "06_models" / "ablation").glob("*/trials/*/ablation_trial.json"))


def _children(root: Path, parent: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_run(parent).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'")


@pytest.fixture(scope="module")
def smoke(project_copy, shared_data, llm_cache_dir, tmp_path_factory):
    root = project_copy("ablation-smoke")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "smoke"],
                   cwd=root, check=True)  # fmt: skip
    drop = _task_subset(shared_data / "msd" / "Task04_Hippocampus", tmp_path_factory.mktemp("drop"), CASES)
    _write_env(root, drop, llm_cache_dir)
    logs = root.parent
    timings = {}
    started = time.monotonic()
    _run(root, "ingest,preprocess", logs / "prepare.log")
    timings["prepare"] = time.monotonic() - started

    # 1. start the ablation and kill its whole process group once the first trial is stored
    started = time.monotonic()
    with (logs / "killed.log").open("w") as out:
        process = subprocess.Popen(_kedro("ablation"), cwd=root, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        try:
            while not _results(root):
                if process.poll() is not None or time.monotonic() - started > 600:
                    pytest.fail("the ablation ended or hung before its first trial finished:\n"
                                + (logs / "killed.log").read_text(errors="replace")[-6000:])  # fmt: skip
                time.sleep(0.2)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while _group_alive(process.pid):  # Ray's processes went down with the run (same group)
        assert time.monotonic() < deadline, "processes of the killed run are still alive"
        time.sleep(0.5)
    timings["killed_run"] = time.monotonic() - started
    # Ray starts some of its processes in sessions of their own: a trial that had finished
    # training may still store its result a moment after the kill. What the resume finds is what
    # counts, so the finished trials are read once nothing has changed for a few seconds.
    first, settled = _results(root), time.monotonic()
    while time.monotonic() - settled < 5:
        time.sleep(0.5)
        now = _results(root)
        if now != first:
            first, settled = now, time.monotonic()
    assert 1 <= len(first) < len(ARMS) * len(SEEDS), first
    first_bytes = {path: path.read_bytes() for path in first}

    # 2. run it again: the Tuner is restored, the finished trial is kept, the others run
    started = time.monotonic()
    resumed_log = _run(root, "ablation", logs / "resumed.log")
    timings["resumed_run"] = time.monotonic() - started
    resumed_results = sorted((root / DATA / "08_reporting/ablation/results.csv").glob("*/results.csv"))

    # 3. and again, finished: nothing trains, a new version of the results is written beside
    started = time.monotonic()
    finished_log = _run(root, "ablation", logs / "again.log")
    timings["finished_run"] = time.monotonic() - started
    return {"root": root, "first": first, "first_bytes": first_bytes, "resumed_log": resumed_log,
            "finished_log": finished_log, "resumed_results": resumed_results, "timings": timings}  # fmt: skip


def _ablation_parents(root: Path) -> list:
    """The kedro-mlflow runs of `kedro run --pipelines ablation`, oldest first (parents of trials)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["attributes.start_time ASC"])
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags and any(k.startswith("ablation.") for k in r.data.params)]


def test_an_interrupted_ablation_resumes_only_its_unfinished_trials(smoke):
    root = smoke["root"]
    assert "restoring the Tune experiment" in smoke["resumed_log"]
    assert len(list((root / DATA / "06_models" / "ablation").glob("*/tune-*"))) == 1  # restored, not a new one
    assert all(path.read_bytes() == data for path, data in smoke["first_bytes"].items())  # finished trials not redone
    assert len(_results(root)) == len(ARMS) * len(SEEDS)
    parents = _ablation_parents(root)
    assert len(parents) == 3, [p.info.run_id for p in parents]  # killed, resumed, finished
    killed, resumed, finished = parents
    trained = lambda runs: sorted((r.data.tags["arm"], r.data.tags["seed"]) for r in runs if "resumed_from_run" not in r.data.tags)  # noqa: E731
    adopted = lambda runs: sorted((r.data.tags["arm"], r.data.tags["seed"]) for r in runs if "resumed_from_run" in r.data.tags)  # noqa: E731
    stored = [json.loads(path.read_text()) for path in smoke["first"]]
    first_trials = sorted((d["arm"], str(d["seed"])) for d in stored)
    # the killed run trained the finished trials (and had started others when it died)
    assert set(first_trials) <= set(trained(_children(root, killed.info.run_id)))
    # the resumed run trained exactly the unfinished trials and adopted the finished ones
    resumed_children = _children(root, resumed.info.run_id)
    assert len(trained(resumed_children)) == len(ARMS) * len(SEEDS) - len(first_trials)
    assert not set(first_trials) & set(trained(resumed_children)) and adopted(resumed_children) == first_trials
    # a finished ablation run again trains nothing, and starts no Ray to find that out
    finished_children = _children(root, finished.info.run_id)
    assert trained(finished_children) == [] and len(adopted(finished_children)) == len(ARMS) * len(SEEDS)
    assert f"{len(ARMS)} arms x {len(SEEDS)} seeds = " in smoke["resumed_log"] and "epoch 2/2" in smoke["resumed_log"]
    assert "seeds = " not in smoke["finished_log"]
    # a local Ray trains each 1-worker trial in its Tune process (ablation.local_engine: tune)
    assert "each trial trains in its Tune process" in smoke["resumed_log"] and "(RayTrainWorker pid=" not in smoke["resumed_log"]
    assert "every trial was finished by an earlier run of the ablation: nothing to train" in smoke["finished_log"]
    # no child of the killed run is left RUNNING: a trial killed mid-training is marked KILLED when
    # it trains again, one killed after storing its result (the kill comes as the first result
    # appears) is completed when the resumed run adopts that result
    statuses = {r.info.status for r in _children(root, killed.info.run_id)}
    assert "RUNNING" not in statuses, statuses
    # and the killed run itself is marked KILLED by the run that recovered its run lock
    assert (killed.info.status, resumed.info.status, finished.info.status) == ("KILLED", "FINISHED", "FINISHED")


def test_trials_are_child_runs_with_their_tags_and_metrics(smoke):
    root = smoke["root"]
    resumed = _ablation_parents(root)[1]
    children = _children(root, resumed.info.run_id)
    assert sorted((r.data.tags["arm"], int(r.data.tags["seed"])) for r in children) == sorted((a, s) for a in ARMS for s in SEEDS)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    plan = json.loads((root / DATA / "04_feature/preprocessing_plan.json").read_text())
    for run in children:
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == resumed.info.run_id
        assert tags["git_commit"] == commit and tags["plan_id"] == plan["plan_id"]
        assert len(tags["data_version"]) == 12 and tags["ablation"].startswith(f"ablation-{tags['data_version']}-")
        assert run.info.status == "FINISHED"
        assert {"test.dice", "test.hd95_mm", "test.nsd", "best_val_dice"} <= set(run.data.metrics)
        if "resumed_from_run" not in tags:
            assert "fit.train_loss" in run.data.metrics  # streamed by the training loop
        assert not any("case" in key or "pt-" in value for key, value in tags.items())  # no PHI / ids


def test_the_results_table_has_one_row_per_arm_seed_case_class_and_no_run_overwrites_another(smoke):
    root = smoke["root"]
    versions = sorted((root / DATA / "08_reporting/ablation/results.csv").glob("*/results.csv"))
    assert len(smoke["resumed_results"]) == 1 and len(versions) == 2  # the resumed run's, then the last run's
    assert smoke["resumed_results"][0] in versions
    test_split = json.loads((root / DATA / "03_primary/split_test.json").read_text())
    first, second = (pd.read_csv(v) for v in versions)
    assert len(first) == len(ARMS) * len(SEEDS) * len(test_split["test"]) * 2  # 2 foreground classes
    assert {"arm", "seed", "case_id", "patient_id", "class_name", "dice", "hd95_mm", "nsd"} <= set(first.columns)
    assert not first.duplicated(["arm", "seed", "case_id", "class_value"]).any()
    assert set(first["case_id"]) == set(test_split["test"])
    pd.testing.assert_frame_equal(first, second)  # the same finished trials, read back, both kept


def test_the_report_summary_and_plots_are_written_and_logged_to_the_parent_run(smoke):
    from mlflow.tracking import MlflowClient

    root = smoke["root"]
    folder = root / DATA / "08_reporting/ablation"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["design"]["arms"] == ARMS and summary["design"]["reference"] == "pretrained"
    assert set(summary["comparisons"]) == {"dice", "hd95_mm", "nsd"} and set(summary["comparisons"]["dice"]) == {"none"}
    none = summary["comparisons"]["dice"]["none"]
    if smallest_p(none["n_patients"]) >= 0.05:  # too few test patients for any verdict: said so
        assert none["verdict"] == "not testable" and "no difference of any size" in none["not_testable_because"]
    else:
        assert none["verdict"] in ("better", "worse", "no detectable difference", "inconclusive")
    # the commit that trained the trials (all in this clone's one commit), and the one reading them
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    assert (summary["design"]["git_commit"], summary["design"]["summarised_at_commit"]) == (commit, commit)
    report = (folder / "report.md").read_text()
    assert "## Conclusion" in report and "`none`" in report and "Holm" in report
    assert "per trial 2 epochs x 3 steps, peak learning rate 0.004, validation every 1." in report  # ablation.trial.lr
    for png in ("forest.png", "learning_curves.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    parent = _ablation_parents(root)[-1]
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"forest.png", "learning_curves.png", "report.md", "summary.json"} <= artifacts
    metrics = client.get_run(parent.info.run_id).data.metrics
    assert {"ablation_metrics.none.dice.mean_difference", "ablation_metrics.pretrained.dice"} <= set(metrics)
    # the README section comes out of this summary (the command on a copy of the README)
    readme = folder / "README.copy.md"
    readme.write_text("# t\n\n<!-- ablation:begin -->\nold\n<!-- ablation:end -->\n")
    subprocess.run([sys.executable, "-m", "mvl_pipeline.commands.ablation_readme", str(folder / "summary.json"), str(readme)],
                   cwd=root, check=True, capture_output=True)  # fmt: skip
    assert "old" not in readme.read_text() and "`none`" in readme.read_text()


def test_a_local_ray_runs_trials_side_by_side_with_the_cores_shared_out(smoke):
    cores = os.cpu_count() or 1
    at_once = min(2, cores)  # ablation.local_concurrent_trials: 2 (default), 1 worker a trial
    assert f"seeds = {len(ARMS) * len(SEEDS)} trials, {at_once} at a time, 1 worker(s) x {cores // at_once} CPU each" in smoke["resumed_log"]
    if at_once < 2:
        pytest.fail(f"this machine has {cores} core(s): trials side by side need 2")
    # the trials the resumed run trained (2 or 3): two of them trained at the same time. A trial the
    # killed run had trained to its last epoch (its result not yet stored) only scores when resumed,
    # in a second or two: it trained nothing in the resumed run and is left out. One resumed with an
    # epoch to go may still end before its partner has started, so any two may be the pair; run one
    # after the other, no two overlap.
    stored = [json.loads(path.read_text()) for path in _results(smoke["root"])]
    killed_run_ended = max(json.loads(data)["finished_unix"] for data in smoke["first_bytes"].values())
    trained_here = lambda d: not d["resumed_after_epochs"] or d["resumed_after_epochs"][-1] + 1 < len(d["history"])  # noqa: E731
    resumed = sorted((d["finished_unix"] - d["wall_s"], d["finished_unix"]) for d in stored
                     if d["finished_unix"] > killed_run_ended and trained_here(d))  # fmt: skip
    assert len(resumed) >= 2, resumed
    overlapping = [(a, b) for a, b in itertools.combinations(resumed, 2) if b[0] < a[1]]
    assert overlapping, f"the resumed trials ran one after the other: {resumed}"

