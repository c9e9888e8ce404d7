"""`python -m mvl_pipeline.k8s` against kmock's in-memory Kubernetes API over real HTTP."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from mvl_pipeline.k8s import naming
from mvl_pipeline.k8s.cli import cli
from mvl_pipeline.k8s.drop_listing import drop_fingerprint
from mvl_pipeline.k8s.manifests import render_kustomization, select_object

NS = "mvl-pipeline"
SLOT_TEXT = "20261129t0300"
SLOT = datetime(2026, 11, 29, 3, 0, tzinfo=UTC)


@pytest.fixture
def drop(tmp_path: Path) -> Path:
    """A small local hospital drop (file names as a hospital might write them)."""
    root = tmp_path / "drop"
    for rel, size in {
        "CT_0001/1.2.840.1/IM0001.dcm": 512,
        "CT_0001/1.2.840.1/IM0002.dcm": 512,
        "MR_0002/seg.nrrd": 64,
    }.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * size)
    return root


def granted(role: dict) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


@pytest.fixture(scope="module")
def operator_rights(kubectl: str, project_root: Path) -> set[tuple[str, str, str]]:
    """What the shipped operator Role (k8s/user-rbac) grants a person running this CLI."""
    return granted(select_object(render_kustomization(project_root / "k8s/user-rbac", kubectl=kubectl), "Role"))


@pytest.fixture
def kubeconfig(fake_cluster, tmp_path: Path, operator_rights) -> Iterator[Path]:
    """The fake cluster's kubeconfig; after the test, every request the CLI made must be one the
    shipped operator Role allows (kmock allows everything: a real API server answers 403)."""
    yield fake_cluster.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS)
    missing = fake_cluster.rights_used() - operator_rights
    assert not missing, f"the CLI needs rights the shipped operator Role lacks: {sorted(missing)}"


def invoke(kubeconfig: Path, *args: str, env: dict | None = None):
    runner = CliRunner()
    return runner.invoke(
        cli, ["--kubeconfig", str(kubeconfig), *args], env=env, catch_exceptions=False
    )


def run_module(kubeconfig: Path, *args: str) -> subprocess.Popen:
    """The real entry point in a child process (PYTHONPATH carries src/)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parents[2] / "src"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "mvl_pipeline.k8s", "--kubeconfig", str(kubeconfig), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def stored_rayjob(rendered: dict, name: str, status: dict | None = None) -> dict:
    """A RayJob as if created earlier by `submit` (namespace set, optional status)."""
    body = copy.deepcopy(select_object(rendered["gpu"], "RayJob"))
    body["metadata"]["name"] = name
    body["spec"].pop("suspend")
    if status:
        body["status"] = status
    return body


# ----------------------------------------------------------------------------- submit
def test_submit_creates_the_rayjob_from_an_overlay(
    fake_cluster, kubeconfig: Path, drop: Path, project_root: Path
) -> None:
    result = invoke(
        kubeconfig,
        "submit",
        "--overlay",
        str(project_root / "k8s/overlays/gpu"),
        "--slot",
        SLOT_TEXT,
        "--drop-url",
        str(drop),
    )
    assert result.exit_code == 0, result.output
    expected = naming.rayjob_name(SLOT, drop_fingerprint(str(drop)).sha256)
    assert result.stdout.strip() == expected  # only the name on stdout

    stored = fake_cluster.stored("rayjobs", NS)
    assert list(stored) == [expected]
    rayjob = stored[expected]
    assert rayjob["kind"] == "RayJob" and rayjob["apiVersion"] == "ray.io/v1"
    assert "suspend" not in rayjob["spec"]
    assert rayjob["spec"]["entrypoint"] == "kedro run --pipelines train --env cluster"
    labels = rayjob["metadata"]["labels"]
    assert labels["mvl-pipeline/slot"] == SLOT_TEXT
    assert labels["mvl-pipeline/data-version"] == expected.rsplit("-", 1)[1]
    annotations = rayjob["metadata"]["annotations"]
    assert annotations == {"mvl-pipeline/data-fingerprint": drop_fingerprint(str(drop)).sha256}
    # no PHI: nothing of the drop's file names in names, labels or annotations
    text = str(rayjob["metadata"])
    assert not any(part in text for part in ("CT_0001", "MR_0002", "IM0001", "1.2.840"))


def test_duplicate_submit_reattaches_instead_of_creating_a_second_job(
    fake_cluster, kubeconfig: Path, drop: Path, project_root: Path
) -> None:
    args = [
        "submit",
        "--overlay",
        str(project_root / "k8s/overlays/cpu"),
        "--slot",
        SLOT_TEXT,
        "--drop-url",
        str(drop),
    ]
    first = invoke(kubeconfig, *args)
    second = invoke(kubeconfig, *args)
    assert first.exit_code == 0 and second.exit_code == 0, second.output
    assert first.stdout == second.stdout
    assert list(fake_cluster.stored("rayjobs", NS)) == [first.stdout.strip()]
    assert len(fake_cluster.requests("POST", "rayjobs")) == 2  # the second POST got 409
    assert "already exists" in second.stderr

    # new data in the drop = a new data version = a new run for the same slot, but never beside
    # a run still going (a slow run and the next tick, a retried pod after new studies arrived)
    (drop / "CT_0003").mkdir()
    (drop / "CT_0003" / "IM0001.dcm").write_bytes(b"\1" * 10)
    while_going = invoke(kubeconfig, *args)
    assert while_going.exit_code == 0 and while_going.stdout == first.stdout
    assert "a training run is still going" in while_going.stderr
    assert list(fake_cluster.stored("rayjobs", NS)) == [first.stdout.strip()]
    fake_cluster.patch_status(NS, first.stdout.strip(), {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"})
    third = invoke(kubeconfig, *args)
    assert third.exit_code == 0
    assert third.stdout != first.stdout
    assert sorted(fake_cluster.stored("rayjobs", NS)) == sorted(
        [first.stdout.strip(), third.stdout.strip()]
    )


def test_submit_in_the_cronjob_pod_uses_the_cluster_template_and_the_job_slot(
    fake_cluster, kubeconfig: Path, drop: Path, rendered: dict
) -> None:
    """What the CronJob's pod runs: --template, --slot auto (from its Job name), --data-version auto."""
    fake_cluster.put_object(
        "ray.io/v1/rayjobs", copy.deepcopy(select_object(rendered["gpu"], "RayJob"))
    )
    minutes = int((SLOT - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() // 60)
    env = {
        "MVL_JOB_NAME": f"mvl-retrain-{minutes}",
        "MVL_DROP_URL": str(drop),
        "MVL_K8S_NAMESPACE": NS,
    }
    result = invoke(
        kubeconfig,
        "submit",
        "--template=mvl-train-template",
        "--slot=auto",
        "--data-version=auto",
        env=env,
    )
    assert result.exit_code == 0, result.output
    # everything the pod asked the API server for, its own Role (k8s/base/rbac.yaml) grants: the
    # Role lacked `list` once, and every scheduled retrain ended in 403 Forbidden
    pod_role = select_object(rendered["base"], "Role", "mvl-retrain-submit-rayjobs")
    assert fake_cluster.rights_used() <= granted(pod_role), sorted(fake_cluster.rights_used() - granted(pod_role))
    name = result.stdout.strip()
    assert name == naming.rayjob_name(SLOT, drop_fingerprint(str(drop)).sha256)
    stored = fake_cluster.stored("rayjobs", NS)
    assert set(stored) == {"mvl-train-template", name}
    assert stored["mvl-train-template"]["spec"]["suspend"] is True  # the template is untouched
    assert "suspend" not in stored[name]["spec"]
    assert (
        stored[name]["spec"]["rayClusterSpec"]
        == stored["mvl-train-template"]["spec"]["rayClusterSpec"]
    )


def test_submit_fingerprints_an_s3_drop(
    fake_cluster, kubeconfig: Path, s3_bucket: dict, project_root: Path
) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_bucket["endpoint_url"], region_name="us-east-1")
    s3.put_object(Bucket=s3_bucket["bucket"], Key="drop/CT_1/IM1.dcm", Body=b"dicom")
    result = invoke(
        kubeconfig,
        "submit",
        "--overlay",
        str(project_root / "k8s/overlays/cpu"),
        "--slot",
        SLOT_TEXT,
        "--drop-url",
        f"s3://{s3_bucket['bucket']}/drop",
        "--endpoint-url",
        s3_bucket["endpoint_url"],
    )
    assert result.exit_code == 0, result.output
    assert "drop listing of 1 files" in result.stderr
    assert result.stdout.strip() in fake_cluster.stored("rayjobs", NS)


def test_submit_auto_slot_outside_a_cronjob_is_a_usage_error(
    kubeconfig: Path, drop: Path, project_root: Path
) -> None:
    result = invoke(
        kubeconfig,
        "submit",
        "--overlay",
        str(project_root / "k8s/overlays/cpu"),
        "--slot",
        "auto",
        "--drop-url",
        str(drop),
        env={"MVL_JOB_NAME": "", "MVL_SCHEDULE_SLOT": ""},
    )
    assert result.exit_code == 2
    assert "--slot auto needs" in result.stderr


def test_submit_without_the_template_in_the_cluster_fails_clearly(
    fake_cluster, kubeconfig: Path
) -> None:
    result = invoke(kubeconfig, "submit", "--slot", SLOT_TEXT, "--data-version", "dvc-rev-1")
    assert result.exit_code == 2
    assert "kubectl apply -k" in result.stderr
    assert fake_cluster.stored("rayjobs", NS) == {}


def test_submit_wait_reattaches_to_a_finished_run(
    fake_cluster, kubeconfig: Path, rendered: dict, project_root: Path
) -> None:
    name = naming.rayjob_name(SLOT, "dvc-rev-1")
    fake_cluster.put_object(
        "ray.io/v1/rayjobs",
        stored_rayjob(
            rendered,
            name,
            {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "message": "OOM"},
        ),
    )
    result = invoke(
        kubeconfig,
        "submit",
        "--overlay",
        str(project_root / "k8s/overlays/gpu"),
        "--slot",
        SLOT_TEXT,
        "--data-version",
        "dvc-rev-1",
        "--wait",
        "--timeout",
        "30",
    )
    assert result.exit_code == 1, result.output  # the run failed
    assert result.stdout.splitlines()[0] == name
    assert "deployment=Failed" in result.stdout
    assert len(fake_cluster.stored("rayjobs", NS)) == 1


@pytest.mark.parametrize("earlier_status,submits", [
    ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, False),  # trained: nothing new
    ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, False),  # still going: follow it
    ({"jobDeploymentStatus": "Failed", "jobStatus": "FAILED"}, True),  # failed: tonight retries
])  # fmt: skip
def test_a_night_without_new_data_submits_nothing_unless_the_last_run_of_it_failed(
    fake_cluster, kubeconfig: Path, rendered: dict, project_root: Path, earlier_status: dict, submits: bool
) -> None:
    earlier = naming.rayjob_name(SLOT, "dvc-rev-1")  # last night's run of the same data
    body = stored_rayjob(rendered, earlier, earlier_status)
    body["metadata"]["labels"] |= naming.run_labels(SLOT, "dvc-rev-1")
    fake_cluster.put_object("ray.io/v1/rayjobs", body)
    tonight = ["submit", "--overlay", str(project_root / "k8s/overlays/gpu"), "--slot", "20261130t0300",
               "--data-version", "dvc-rev-1"]  # fmt: skip
    result = invoke(kubeconfig, *tonight)
    assert result.exit_code == 0, result.output
    stored = sorted(fake_cluster.stored("rayjobs", NS))
    if submits:
        assert result.stdout.strip() == naming.rayjob_name(datetime(2026, 11, 30, 3, 0, tzinfo=UTC), "dvc-rev-1")
        assert len(stored) == 2
    else:
        assert result.stdout.strip() == earlier and stored == [earlier]
        assert ("nothing new" if earlier_status["jobStatus"] == "SUCCEEDED" else "attaching") in result.stderr
        # --always trains regardless (e.g. after a change of code or parameters), but never beside
        # a run still going
        forced = invoke(kubeconfig, *tonight, "--always")
        assert forced.exit_code == 0
        if earlier_status["jobStatus"] == "SUCCEEDED":
            assert forced.stdout.strip() != earlier and len(fake_cluster.stored("rayjobs", NS)) == 2
        else:
            assert forced.stdout.strip() == earlier and len(fake_cluster.stored("rayjobs", NS)) == 1
            assert "a training run is still going" in forced.stderr


# ----------------------------------------------------------------------------- status / watch
@pytest.mark.parametrize(
    "status,code",
    [
        ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, 0),
        ({"jobDeploymentStatus": "Failed", "jobStatus": "FAILED"}, 1),
        ({"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}, 1),
        ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, 2),
        (None, 2),
    ],
)
def test_status_exit_codes(
    fake_cluster, kubeconfig: Path, rendered: dict, status: dict | None, code: int
) -> None:
    fake_cluster.put_object("ray.io/v1/rayjobs", stored_rayjob(rendered, "mvl-train-x", status))
    result = invoke(kubeconfig, "status", "mvl-train-x")
    assert result.exit_code == code, result.output
    assert result.stdout.startswith("mvl-train-x: deployment=")


def test_status_of_a_missing_rayjob(fake_cluster, kubeconfig: Path) -> None:
    result = invoke(kubeconfig, "status", "mvl-train-missing")
    assert result.exit_code == 2
    assert "not found" in result.stdout


def test_watch_follows_the_rayjob_to_complete(
    fake_cluster, kubeconfig: Path, rendered: dict
) -> None:
    name = "mvl-train-20261129t0300-abcdef12"
    fake_cluster.put_object(
        "ray.io/v1/rayjobs", stored_rayjob(rendered, name, {"jobDeploymentStatus": "Initializing"})
    )
    process = run_module(kubeconfig, "watch", name, "--timeout", "60")
    try:
        deadline = time.monotonic() + 30
        while not any(
            r.params.get("watch") == "true" for r in fake_cluster.requests("GET", "rayjobs")
        ):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "watch never started"
            time.sleep(0.1)
        fake_cluster.patch_status(
            NS, name, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
        )
        time.sleep(0.3)
        assert process.poll() is None  # Running is not the end
        fake_cluster.patch_status(
            NS, name, {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}
        )
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert stdout.strip() == f"{name}: deployment=Complete job=SUCCEEDED"
    assert "deployment=Running" in stderr  # transitions are logged


def test_watch_times_out_with_exit_2(fake_cluster, kubeconfig: Path, rendered: dict) -> None:
    fake_cluster.put_object(
        "ray.io/v1/rayjobs",
        stored_rayjob(
            rendered, "mvl-train-slow", {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
        ),
    )
    started = time.monotonic()
    result = invoke(kubeconfig, "watch", "mvl-train-slow", "--timeout", "1")
    assert result.exit_code == 2
    assert time.monotonic() - started < 15
    assert "did not finish" in result.stderr


# ----------------------------------------------------------------------------- trigger-retrain
def test_trigger_retrain_creates_a_job_from_the_cronjob(
    fake_cluster, kubeconfig: Path, rendered: dict
) -> None:
    cronjob = copy.deepcopy(select_object(rendered["gpu"], "CronJob"))
    cronjob["metadata"]["uid"] = "0b5e7a3c-1111-2222-3333-444455556666"
    fake_cluster.put_object("batch/v1/cronjobs", cronjob)

    result = invoke(kubeconfig, "trigger-retrain", "--slot", "2026-11-29T12:00:00Z")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "mvl-retrain-manual-20261129t1200"

    jobs = fake_cluster.stored("jobs", NS)
    job = jobs["mvl-retrain-manual-20261129t1200"]
    assert job["kind"] == "Job"
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == (
        "CronJob",
        "mvl-retrain",
        cronjob["metadata"]["uid"],
    )
    assert job["metadata"]["annotations"]["cronjob.kubernetes.io/instantiate"] == "manual"
    # the Job runs the CronJob's pod, told its slot
    expected_spec = copy.deepcopy(cronjob["spec"]["jobTemplate"]["spec"])
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "MVL_SCHEDULE_SLOT", "value": "20261129t1200"} in container["env"]
    container["env"] = [e for e in container["env"] if e["name"] != "MVL_SCHEDULE_SLOT"]
    assert job["spec"] == expected_spec

    again = invoke(kubeconfig, "trigger-retrain", "--slot", "2026-11-29T12:00:59Z")
    assert again.exit_code == 0 and again.stdout == result.stdout
    assert list(fake_cluster.stored("jobs", NS)) == ["mvl-retrain-manual-20261129t1200"]


def test_trigger_retrain_without_the_cronjob_fails_with_exit_2(
    fake_cluster, kubeconfig: Path
) -> None:
    result = invoke(kubeconfig, "trigger-retrain")
    assert result.exit_code == 2
    assert "404" in result.stderr
    assert fake_cluster.stored("jobs", NS) == {}


def test_module_entry_point_help() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    result = subprocess.run(
        [sys.executable, "-m", "mvl_pipeline.k8s", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for command in ("submit", "status", "watch", "trigger-retrain"):
        assert command in result.stdout


def test_unreachable_api_server_exits_2(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port with nothing listening on it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: k, cluster: {{server: 'http://127.0.0.1:{port}'}}}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u, namespace: ns}}]\n",
        encoding="utf-8",
    )
    result = invoke(kubeconfig, "status", "mvl-train-x")
    assert result.exit_code == 2
    assert "cannot reach the Kubernetes API" in result.stderr


def test_wait_retries_transient_api_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubernetes.client.exceptions import ApiException

    from mvl_pipeline.k8s import client as k8s_client

    answers = [
        ApiException(status=503, reason="Service Unavailable"),
        {
            "metadata": {"name": "j"},
            "status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"},
        },
    ]

    def get_rayjob(name: str) -> dict:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(k8s_client, "_RETRY_PAUSE_S", 0.0)
    runs = k8s_client.TrainingRuns.__new__(k8s_client.TrainingRuns)
    monkeypatch.setattr(runs, "get_rayjob", get_rayjob, raising=False)
    state = runs.wait("j", timeout_s=30)
    assert state is not None and state.outcome is k8s_client.Outcome.COMPLETE
    assert answers == []

    answers[:] = [ApiException(status=403, reason="Forbidden")]  # not transient: raised at once
    with pytest.raises(ApiException):
        runs.wait("j", timeout_s=30)
