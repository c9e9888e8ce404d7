"""`dvc repro` end to end on a tiny copy of the project (minutes: marked slow, CI runs it).

A copy of the project's tracked files becomes its own git repository, with parameters shrunk
(5 phantom patients of 48x48x16, a ViT of width 32 without the LLM layer, 1 Ray worker, one epoch
of 2 steps). Its .venv is a link to the checkout's, and no virtual environment is on PATH, as in a
fresh shell: the stage commands must find .venv themselves. Then, in order:

1. ``dvc repro`` runs every stage once, in dependency order; a second ``dvc repro`` runs none.
2. The kedro-mlflow runs and the registered model version carry the git commit and the DVC data
   version that dvc.lock records for data/02_intermediate/cases.
3. A changed evaluate parameter reruns exactly fit (its post-processing decision uses evaluate's
   settings), evaluate and register; a changed register parameter or shared module marks exactly
   the stages that depend on it.
4. ``dvc push`` to the default local remote and to S3 (moto_server on 127.0.0.1, the endpoint
   and credentials from the environment, none in .dvc/config), then ``dvc pull`` from S3 after
   deleting the cache and every output restores byte-identical data.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

TRAIN_STAGES = ["ingest", "preprocess", "fit", "evaluate", "register"]
STAGES = ["sample_data", *TRAIN_STAGES]
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")


def _edit_yaml(path: Path, edit) -> None:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def shrink(root: Path) -> None:
    """Tiny parameters, written into the copy's conf/base (what DVC tracks)."""
    base = root / "conf/base"
    _edit_yaml(base / "parameters_sample_data.yml", lambda d: d["sample_data"].update(
        n_patients=5, followup_fraction=0.0, image_size=48, n_slices=[16, 16], pixel_spacing_mm=[6.0, 6.0],
        slice_spacing_mm=8.0, thin_slice_studies=0, non_axial_studies=0,
    ))  # fmt: skip
    _edit_yaml(base / "parameters_ingest.yml", lambda d: d["ingest"].update(workers=1, progress=False))
    _edit_yaml(base / "parameters_preprocess.yml", lambda d: d["preprocess"]["apply"].update(workers=1))

    def model(d):
        d["model"].update(embed_dim=32, depth=2, num_heads=2, token_budget=64, pos_grid=[4, 4, 2], precision="fp32")
        d["model"]["llm"]["mode"] = "none"
        d["model"]["decoder"].update(taps=[1, 2], channels=[8, 8, 8], stem_channels=4)

    def fit(d):
        d["fit"]["scaling"]["num_workers"] = 1
        d["fit"]["ray_num_cpus"] = 1
        d["fit"]["loop"].update(epochs=1, steps_per_epoch=2, batch_size=1, val_every=1, warmup_epochs=0)

    _edit_yaml(base / "parameters_model.yml", model)
    _edit_yaml(base / "parameters_fit.yml", fit)
    _edit_yaml(base / "parameters_evaluate.yml", lambda d: d["evaluate"].update(overlay_cases=1, sw_batch_size=1))


class Project:
    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: int = 900, stdout: bool = False) -> str:
        """stdout + stderr of a command that must succeed (stdout only with ``stdout=True``)."""
        done = subprocess.run(
            args, cwd=self.root, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=timeout,
            check=False,
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}):\n{output[-6000:]}"
        return done.stdout if stdout else output

    def dvc(self, *args: str, **kwargs) -> str:
        return self.run(DVC, *args, **kwargs)

    def dvc_json(self, *args: str) -> dict:
        return json.loads(self.dvc(*args, "--json", stdout=True))

    def repro(self) -> list[str]:
        """Run ``dvc repro``; the stages that ran, in order."""
        output = self.dvc("repro")
        ran = re.findall(r"Running stage '([^']+)'", output)
        skipped = re.findall(r"Stage '([^']+)' didn't change, skipping", output)
        assert sorted(ran + skipped) == sorted(STAGES), output[-3000:]
        return ran

    def status(self) -> dict:
        return self.dvc_json("status")

    def lock(self) -> dict:
        return yaml.safe_load((self.root / "dvc.lock").read_text(encoding="utf-8"))

    def head(self) -> str:
        return self.run("git", "rev-parse", "HEAD").strip()

    def out_paths(self) -> list[str]:
        return sorted(out["path"] for stage in self.lock()["stages"].values() for out in stage.get("outs", []))

    def digest_outputs(self) -> dict[str, str]:
        """sha256 of every file under every DVC out."""
        digests = {}
        for out in self.out_paths():
            path = self.root / out
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            for file in files:
                digests[str(file.relative_to(self.root))] = hashlib.sha256(file.read_bytes()).hexdigest()
        return digests


@pytest.fixture(scope="module")
def project(project_copy) -> Project:
    root = project_copy("dvc-repro")
    shrink(root)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DVC_STAGE", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "VIRTUAL_ENV")}
    # Nothing activated: no virtual environment on PATH. The stages' commands must find the
    # project's .venv themselves (dvc.yaml: PATH="$PWD/.venv/bin:$PATH" kedro run ...).
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and Path(p) != BIN and not (Path(p).parent / "pyvenv.cfg").is_file()]
    env.update(
        PATH=os.pathsep.join(path), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
        KEDRO_DISABLE_TELEMETRY="true", MLFLOW_ENABLE_TELEMETRY="false", HF_HUB_OFFLINE="1",
        DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(root.parent / "dvc-site-cache"),
    )  # fmt: skip
    assert shutil.which("kedro", path=env["PATH"]) is None, "kedro must not be on the stages' PATH"
    project = Project(root, env)
    project.run("git", "init", "-q")
    project.run("git", "add", "-A")
    project.run("git", "-c", "user.name=ci", "-c", "user.email=ci@example.org", "commit", "-qm", "copy")
    # the environment `make setup` makes in a clone, here the checkout's own; ignored like .venv/
    (root / ".venv").symlink_to(BIN.parent, target_is_directory=True)
    with (root / ".git/info/exclude").open("a", encoding="utf-8") as exclude:
        exclude.write("/.venv\n")
    return project


def readme_blocks() -> list[str]:
    """The README blocks this file runs as written (marked ``run-by tests/test_dvc_repro.py``;
    tests/test_readme.py checks the marker and this list agree)."""
    from tests.test_readme import SHELL

    return [b.source for b in SHELL if b.marker == ("run-by", "tests/test_dvc_repro.py")]


@pytest.fixture(scope="module")
def first_repro(project) -> dict:
    """The README's `make repro` block as written, in a shell with nothing activated: `make repro`
    (every stage, in order), `dvc repro` again (nothing), `dvc status`, one stage, the dvc.lock
    commit, `dvc metrics show/diff`, `dvc plots show`. The git commit the runs were tagged with
    is the one before the block's own commit of dvc.lock."""
    (block,) = readme_blocks()
    head = project.head()
    identity = {"GIT_AUTHOR_NAME": "README reader", "GIT_AUTHOR_EMAIL": "reader@example.org",
                "GIT_COMMITTER_NAME": "README reader", "GIT_COMMITTER_EMAIL": "reader@example.org"}  # fmt: skip
    output = project.run("bash", "-e", "-o", "pipefail", "-c", block, env=identity)
    assert "KedroDeprecationWarning" not in output, output[-6000:]
    return {"ran": re.findall(r"Running stage '([^']+)'", output), "head": head, "output": output}


def test_repro_runs_every_stage_in_order_then_none(project, first_repro):
    # the block's later `dvc repro` and `dvc repro evaluate` ran nothing: each stage ran once
    assert first_repro["ran"] == STAGES, first_repro["output"][-3000:]
    assert project.run("git", "log", "-1", "--format=%s").strip() == "data + model version"
    lock = project.lock()
    assert list(lock["stages"]) == STAGES
    for out in project.out_paths():
        assert (project.root / out).exists(), out
    assert any((project.root / "data/02_intermediate/cases").iterdir())
    model_versions = list((project.root / "data/06_models/medvisionllama").iterdir())
    assert len(model_versions) == 1  # the Kedro-versioned folder holds the current model only

    assert project.repro() == []  # nothing changed: nothing runs
    assert project.status() == {}
    assert "up to date" in project.dvc("status")

    metrics = project.dvc_json("metrics", "show")[""]["data"]["data/08_reporting/evaluation_summary.json"]["data"]
    assert 0.0 <= metrics["classes"]["organ"]["dice"]["mean"] <= 1.0
    plots = project.dvc_json("plots", "show", "-o", str(project.root.parent / "dvc_plots"))["data"]
    assert set(plots) == {f"data/08_reporting/{name}.png" for name in ("learning_curves", "per_case_boxplot", "overlays")}
    assert all(entry[0]["type"] == "image" for entry in plots.values())


def test_mlflow_runs_and_model_version_carry_code_and_data_version(project, first_repro):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project.root / 'mlflow.db'}", registry_uri=f"sqlite:///{project.root / 'mlflow.db'}")
    (cases_out,) = [o for o in project.lock()["stages"]["ingest"]["outs"] if o["path"] == "data/02_intermediate/cases"]
    data_version = cases_out["md5"]
    head = first_repro["head"]
    runs = {}
    for run in client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time ASC"]):
        runs.setdefault(run.info.run_name, run.data.tags)  # the first repro's run of each stage
    assert set(runs) >= set(TRAIN_STAGES)  # sample_data has MLflow disabled
    for stage in TRAIN_STAGES:
        tags = runs[stage]
        assert tags["git_commit"] == head and tags["git_dirty"] == "False", stage
        if stage == "ingest":  # it produces the data: no version yet
            assert (tags["dvc_data_version"], tags["dvc_data_status"]) == ("None", "being_produced")
        else:
            assert (tags["dvc_data_version"], tags["dvc_data_status"]) == (data_version, "recorded"), stage
    (version,) = client.search_model_versions("name='medvisionllama'")
    assert version.tags["dvc_data_version"] == data_version
    assert version.tags["dvc_data_status"] == "recorded"
    assert version.tags["git_commit"] == head


def test_a_change_reruns_exactly_the_stages_that_depend_on_it(project, first_repro):
    register = project.root / "conf/base/parameters_register.yml"
    original = register.read_text(encoding="utf-8")
    _edit_yaml(register, lambda d: d["register"].update(margin=0.01))
    assert set(project.status()) == {"register"}
    register.write_text(original, encoding="utf-8")

    # the one Dice: validation (fit), evaluate and the gate (register) all use it
    shared = project.root / "src/mvl_pipeline/evaluation/metrics.py"
    code = shared.read_text(encoding="utf-8")
    shared.write_text(code + "\n# touched\n", encoding="utf-8")
    assert set(project.status()) == {"fit", "evaluate", "register"}
    shared.write_text(code, encoding="utf-8")
    assert project.status() == {}

    # evaluate's settings also decide fit's post-processing (on the validation cases)
    evaluate = project.root / "conf/base/parameters_evaluate.yml"
    _edit_yaml(evaluate, lambda d: d["evaluate"].update(nsd_tolerance_mm=3.0))
    status = project.status()
    assert set(status) == {"fit", "evaluate", "register"}
    assert "conf/base/parameters_evaluate.yml" in json.dumps(status["evaluate"])
    history = project.root / "data/08_reporting/fit_history.json"
    trained = json.loads(history.read_text(encoding="utf-8"))
    assert project.repro() == ["fit", "evaluate", "register"]
    # the rerun fit resumed the finished training (the same run, no new epoch) and only decided
    # the post-processing again, as the README says
    again = json.loads(history.read_text(encoding="utf-8"))
    assert again["run_name"] == trained["run_name"] and again["epochs"] == trained["epochs"]
    assert again["global_step"] == trained["global_step"]
    assert project.lock()["stages"]["evaluate"]["params"]["conf/base/parameters_evaluate.yml"]["evaluate"][
        "nsd_tolerance_mm"
    ] == 3.0
    assert project.status() == {}
    assert project.repro() == []


def test_push_then_pull_from_s3_restores_identical_data(project, first_repro, s3_bucket):
    import boto3

    tracked_config = (project.root / ".dvc/config").read_bytes()
    s3_env = {
        "AWS_ENDPOINT_URL": s3_bucket["endpoint_url"], "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    }  # fmt: skip
    # the bucket of this site goes into the untracked .dvc/config.local, like on the cluster
    project.dvc("remote", "modify", "--local", "s3", "url", f"s3://{s3_bucket['bucket']}/dvc")
    assert (project.root / ".dvc/config").read_bytes() == tracked_config

    project.dvc("push")  # default remote: ../mvl-dvc-store beside the project
    local_store = project.root.parent / "mvl-dvc-store"
    assert sum(1 for p in local_store.rglob("*") if p.is_file()) > 50
    pushed = project.dvc("push", "-r", "s3", env=s3_env)
    assert re.search(r"\d+ files? pushed", pushed), pushed
    client = boto3.client(
        "s3", endpoint_url=s3_bucket["endpoint_url"], aws_access_key_id="testing",
        aws_secret_access_key="testing", region_name="us-east-1",
    )  # fmt: skip
    keys = client.list_objects_v2(Bucket=s3_bucket["bucket"], Prefix="dvc/").get("KeyCount", 0)
    assert keys > 50

    before = project.digest_outputs()
    assert len(before) > 50
    shutil.rmtree(project.root / ".dvc/cache")
    for out in project.out_paths():
        path = project.root / out
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert project.status() != {}  # outputs are gone

    project.dvc("pull", "-r", "s3", env=s3_env)
    assert project.digest_outputs() == before
    assert project.status() == {}


#: DICOM attributes a hospital puts identity in (what de-identification must keep out).
IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
               "InstitutionAddress", "ReferringPhysicianName", "OperatorsName", "StudyID",
               "StudyInstanceUID", "SeriesInstanceUID")  # fmt: skip


def drop_identifiers(drop: Path) -> set[str]:
    """Every identifying value in the drop's DICOM headers (names also by part) and every folder
    and file name of the drop (the hospital's UIDs)."""
    import pydicom

    found: set[str] = set()
    for path in drop.rglob("*"):
        found.update(part for part in path.relative_to(drop).parts if len(part) >= 5)
        if path.is_file():
            header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            for key in IDENTIFYING:
                value = str(header.get(key, "") or "")
                found.update(v for v in {value, *value.split("^")} if len(v) >= 5)
    return found


def test_nothing_the_training_side_wrote_holds_an_identifier_of_the_drop(project, first_repro):
    """PHI audit (issue 15) after `dvc repro` and its reruns, and a kedro-viz export with every
    dataset preview: dvc.lock, data/02-08, the MLflow store, the run logs and the kedro-viz files
    hold no identifying value of the drop (gzip'd files unpacked)."""
    from scenarios.retrain import scan

    drop = project.root / "data/01_raw/sample_drop"
    identifiers = drop_identifiers(drop)
    assert len(identifiers) > 20, sorted(identifiers)
    assert scan([drop], identifiers), "the scan finds nothing even in the drop: it cannot find anything"
    project.run(str(BIN / "kedro"), "viz", "build", "--include-previews")
    written = [project.root / p for p in ("dvc.lock", "mlflow.db", "mlruns", "mlartifacts", "info.log", "logs", "build")]
    written += [project.root / "data" / layer for layer in ("02_intermediate", "03_primary", "04_feature",
                                                          "05_model_input", "06_models", "07_model_output", "08_reporting")]  # fmt: skip
    assert (project.root / "build").is_dir() and (project.root / "dvc.lock").is_file()
    assert scan([p for p in written if p.exists()], identifiers) == []
