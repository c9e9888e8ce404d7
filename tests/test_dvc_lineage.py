"""The data version in MLflow: LineageDataset against a real DVC repository, and the run-tag hook.

A toy repository (git + ``dvc init`` + a one-stage dvc.yaml that writes
``data/02_intermediate/cases`` like the real ingest stage) walks the dataset through every status:
no dvc.lock yet, recorded by ``dvc repro``, modified afterwards, inside ``dvc repro`` of a later
stage (trusted) and of the producing stage itself (not known yet).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from kedro.io import DataCatalog, DatasetError
from kedro.pipeline import Pipeline, node

from mvl_pipeline.datasets.lineage import LineageDataset
from mvl_pipeline.hooks import LineageTagsHook, lineage_tags

DVC = str(Path(sys.executable).with_name("dvc"))
TOY_DVC_YAML = {
    "stages": {
        "ingest": {
            "cmd": "mkdir -p data/02_intermediate/cases/c1 && cp drop.txt data/02_intermediate/cases/c1/image.txt",
            "deps": ["drop.txt"],
            "outs": ["data/02_intermediate/cases"],
        }
    }
}


def _run(*args: str, cwd: Path) -> str:
    # no usage report: `dvc init` sends one before the repository's config can say no (it wrote its
    # report to a file in /tmp and started a process to post it to dvc.org, for every toy repo)
    env = os.environ | {"DVC_NO_ANALYTICS": "1"}
    return subprocess.run(args, cwd=cwd, env=env, check=True, capture_output=True, text=True, timeout=120).stdout


@pytest.fixture
def toy_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    _run("git", "init", "-q", cwd=repo)
    _run(DVC, "init", "-q", cwd=repo)
    _run(DVC, "config", "core.analytics", "false", cwd=repo)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(TOY_DVC_YAML), encoding="utf-8")
    (repo / "drop.txt").write_text("study 1\n", encoding="utf-8")
    _run("git", "add", "-A", cwd=repo)
    _run("git", "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", "toy", cwd=repo)
    return repo


def _lock_md5(repo: Path) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))
    (out,) = lock["stages"]["ingest"]["outs"]
    return out["md5"]


def test_lineage_status_follows_dvc_lock_and_the_workspace(toy_repo, monkeypatch):
    monkeypatch.delenv("DVC_STAGE", raising=False)
    dataset = LineageDataset(project_path=str(toy_repo))
    head = _run("git", "rev-parse", "HEAD", cwd=toy_repo).strip()

    before = dataset.load()
    assert before == {
        "git_commit": head, "git_dirty": False, "dvc_data_version": None,
        "dvc_data_status": "unrecorded", "dvc_stage": "ingest",
    }  # fmt: skip

    _run(DVC, "repro", cwd=toy_repo)
    md5 = _lock_md5(toy_repo)
    assert md5.endswith(".dir")
    recorded = dataset.load()
    assert (recorded["dvc_data_version"], recorded["dvc_data_status"]) == (md5, "recorded")

    # a plain `kedro run` that changes the data: dvc.lock no longer describes it
    (toy_repo / "data/02_intermediate/cases/c1/image.txt").write_text("study 1, re-ingested\n")
    modified = dataset.load()
    assert (modified["dvc_data_version"], modified["dvc_data_status"]) == (None, "modified")

    # inside `dvc repro` of a later stage the workspace is still checked: `dvc repro -s fit`
    # (--single-item) or `--downstream` do not bring ingest up to date, so dvc.lock may be stale
    monkeypatch.setenv("DVC_STAGE", "fit")
    stale = dataset.load()
    assert (stale["dvc_data_version"], stale["dvc_data_status"]) == (None, "modified")
    (toy_repo / "data/02_intermediate/cases/c1/image.txt").write_text("study 1\n")
    assert (dataset.load()["dvc_data_version"], dataset.load()["dvc_data_status"]) == (md5, "recorded")
    # ... except in the stage that produces the data, whose version is not known yet
    monkeypatch.setenv("DVC_STAGE", "ingest")
    assert dataset.load()["dvc_data_version"] is None
    assert dataset.load()["dvc_data_status"] == "being_produced"


def test_lineage_without_dvc_or_git_is_unknown_not_wrong(tmp_path, toy_repo, monkeypatch):
    monkeypatch.delenv("DVC_STAGE", raising=False)
    _run(DVC, "repro", cwd=toy_repo)
    bare = tmp_path / "bare"  # a dvc.lock but no DVC repository and no git (like a copied image)
    bare.mkdir()
    (bare / "dvc.lock").write_bytes((toy_repo / "dvc.lock").read_bytes())
    lineage = LineageDataset(project_path=str(bare)).load()
    assert lineage["dvc_data_version"] is None
    assert lineage["dvc_data_status"] == "unknown"
    assert lineage["git_commit"] is None and lineage["git_dirty"] is None
    assert LineageDataset(project_path=str(bare), verify=False).load()["dvc_data_version"] == _lock_md5(toy_repo)
    with pytest.raises(DatasetError, match="read-only"):
        LineageDataset(project_path=str(bare)).save({})


def test_lineage_tags_are_strings_and_unknown_when_the_run_produces_the_data():
    lineage = {"git_commit": "abc", "git_dirty": False, "dvc_data_version": "d.dir", "dvc_data_status": "recorded"}
    assert lineage_tags(lineage, produces_data=False) == {
        "git_commit": "abc", "git_dirty": "False", "dvc_data_version": "d.dir", "dvc_data_status": "recorded",
    }  # fmt: skip
    produced = lineage_tags(lineage, produces_data=True)
    assert produced["dvc_data_version"] == "None" and produced["dvc_data_status"] == "being_produced"
    assert produced["git_commit"] == "abc"


def _identity(x):
    return x


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A sqlite MLflow store as the global tracking URI, restored afterwards (no set_experiment:
    it would leave MLFLOW_EXPERIMENT_ID in the environment of later tests' subprocesses)."""
    monkeypatch.delenv("DVC_STAGE", raising=False)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = mlflow.tracking.MlflowClient(uri)
    try:
        yield client, client.create_experiment("lineage-hook")
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)  # also unsets MLFLOW_TRACKING_URI
        if previous is not None:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def test_hook_tags_the_active_run_with_code_and_data_version(toy_repo, mlflow_store):
    client, experiment = mlflow_store
    _run(DVC, "repro", cwd=toy_repo)
    catalog = DataCatalog({"lineage": LineageDataset(project_path=str(toy_repo))})
    downstream = Pipeline([node(_identity, "model_input_cases", "trained_model", name="fit_node")])
    ingest = Pipeline([node(_identity, "hospital_drop", "ingested_cases", name="ingest_node")])
    head = _run("git", "rev-parse", "HEAD", cwd=toy_repo).strip()
    hook = LineageTagsHook()

    with mlflow.start_run(experiment_id=experiment) as run:
        hook.before_pipeline_run({"project_path": str(toy_repo)}, downstream, catalog)
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["git_commit"] == head and tags["git_dirty"] == "False"
    assert tags["dvc_data_version"] == _lock_md5(toy_repo) and tags["dvc_data_status"] == "recorded"

    with mlflow.start_run(experiment_id=experiment) as run:
        hook.before_pipeline_run({"project_path": str(toy_repo)}, ingest, catalog)
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["dvc_data_version"] == "None" and tags["dvc_data_status"] == "being_produced"

    # no active run (MLflow disabled for the pipeline, e.g. sample_data): nothing is started
    runs_before = len(client.search_runs([experiment]))
    hook.before_pipeline_run({"project_path": str(toy_repo)}, downstream, catalog)
    assert mlflow.active_run() is None
    assert len(client.search_runs([experiment])) == runs_before


def test_hook_is_registered_and_runs_after_kedro_mlflow_starts_its_run():
    from mvl_pipeline import settings

    assert any(isinstance(hook, LineageTagsHook) for hook in settings.HOOKS)
    # pluggy calls trylast implementations after kedro-mlflow's before_pipeline_run (which starts
    # the run); the end-to-end check is tests/test_dvc_repro.py (tags on real kedro-mlflow runs)
    assert LineageTagsHook.before_pipeline_run.kedro_impl["trylast"] is True


def test_git_dirty_ignores_the_dvc_lock_that_dvc_repro_rewrites_but_not_code(toy_repo, monkeypatch):
    """An audit (2026-12-05): DVC rewrites dvc.lock stage by stage during `dvc repro`, so from a
    clean, committed tree every model after the first stage was tagged git_dirty=True: the flag
    no longer said whether the code was committed."""
    monkeypatch.delenv("DVC_STAGE", raising=False)
    _run(DVC, "repro", cwd=toy_repo)
    _run("git", "add", "-A", cwd=toy_repo)
    _run("git", "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", "lock", cwd=toy_repo)
    (toy_repo / "drop.txt").write_text("study 1\nstudy 2\n", encoding="utf-8")
    _run("git", "add", "drop.txt", cwd=toy_repo)
    _run("git", "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", "new data", cwd=toy_repo)
    _run(DVC, "repro", cwd=toy_repo)  # dvc.lock rewritten, not committed yet
    assert "dvc.lock" in _run("git", "status", "--porcelain", cwd=toy_repo)
    assert LineageDataset(project_path=str(toy_repo)).load()["git_dirty"] is False
    (toy_repo / "dvc.yaml").write_text((toy_repo / "dvc.yaml").read_text() + "\n", encoding="utf-8")  # code
    assert LineageDataset(project_path=str(toy_repo)).load()["git_dirty"] is True


def test_the_readme_way_from_a_data_version_back_to_its_data(toy_repo, monkeypatch):
    """README "Data versions": the commit whose dvc.lock first records a model's
    dvc_data_version, then `dvc checkout` of the ingest stage from it. An audit (2026-12-05) found
    the earlier advice (`git checkout <git_commit> && dvc pull`) restored the data before: `dvc
    repro` writes dvc.lock during the run, so it is committed after the model's commit."""
    monkeypatch.delenv("DVC_STAGE", raising=False)

    def commit(message: str) -> None:
        _run("git", "add", "-A", cwd=toy_repo)
        _run("git", "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", message, cwd=toy_repo)

    _run(DVC, "repro", cwd=toy_repo)
    first = LineageDataset(project_path=str(toy_repo)).load()["dvc_data_version"]  # the model's tag
    commit("data v1")
    (toy_repo / "drop.txt").write_text("study 1\nstudy 2\n", encoding="utf-8")
    _run(DVC, "repro", cwd=toy_repo)
    commit("data v2")
    assert LineageDataset(project_path=str(toy_repo)).load()["dvc_data_version"] != first

    (toy_repo / ".venv/bin").mkdir(parents=True)  # the README's .venv/bin/dvc
    (toy_repo / ".venv/bin/dvc").symlink_to(DVC)
    (block,) = readme_blocks()
    subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=toy_repo, check=True, capture_output=True, text=True,
                   timeout=120, env={**os.environ, "DVC_DATA_VERSION": first})  # fmt: skip
    assert (toy_repo / "data/02_intermediate/cases/c1/image.txt").read_text() == "study 1\n"
    assert _lock_md5(toy_repo) != first  # the current lock is back ...
    status = _run(DVC, "status", "ingest", cwd=toy_repo)
    assert "modified" in status  # ... and the workspace holds the older data it recorded before


def readme_blocks() -> list[str]:
    """The README blocks this file runs as written (marked ``run-by tests/test_dvc_lineage.py``;
    tests/test_readme.py checks the marker and this list agree)."""
    from tests.test_readme import SHELL

    return [b.source for b in SHELL if b.marker == ("run-by", "tests/test_dvc_lineage.py")]
