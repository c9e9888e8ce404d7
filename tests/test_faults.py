"""Faults under real processes and real signals (issue 15): each test runs ``kedro run`` (or a
moto S3 server, or a Ray Train worker) as an operating-system process, kills or stops it with a
signal at a chosen point, and ends with the same three checks: nothing lost (what was saved is
still there, unchanged), nothing half-written that a later run would load, and a rerun of the same
command completes doing only what was left undone.

Killing at a chosen point without a race: :func:`run_until` lets a run advance in slices of a few
milliseconds (SIGCONT ... SIGSTOP of its process group) and looks at the disk while it is stopped,
so a SIGKILL lands exactly after, say, the first saved batch, and usually in the middle of the
next save. A run that finishes before the point is reached fails the test (it could not test
anything). No exception is monkeypatched; nothing in src/ knows it is being tested.

The Ray Train worker to kill is found with Ray's state API (the run's job, its live
``RayTrainWorker`` actor) on a Ray cluster the test process owns and `kedro run` joins through
RAY_ADDRESS; the driver is killed with its own local Ray, as a laptop runs it. "The same losses"
compares with an uninterrupted run of the same data and configuration.

The project copies are tiny (16 phantom studies of 32 x 32 x 10 voxels, a 2-block ViT without
the LLM layer, 4 short epochs of one Ray worker) and start from one prepared copy (drop, MLflow store,
ingested and preprocessed data) to stay within minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.net import free_port
from tests.support.procs import cmdline, descendants

pytestmark = pytest.mark.slow

N_STUDIES = 16
EPOCHS = 6  # with 50 steps: ~1 s epochs, so a fault after the first checkpoint leaves epochs to resume
TINY = {
    "sample_data": {
        "n_patients": N_STUDIES, "followup_fraction": 0.0, "image_size": 32, "pixel_spacing_mm": [9.0, 9.0],
        "n_slices": [10, 10], "slice_spacing_mm": 12.0, "thin_slice_studies": 0, "non_axial_studies": 0,
    },
    "ingest": {"workers": 1, "progress": False, "batch_size": 2},
    "preprocess": {"apply": {"workers": 1}, "split": {"ratios": {"train": 0.5, "validation": 0.25, "test": 0.25}}},
    "model": {
        "embed_dim": 32, "depth": 2, "num_heads": 2, "token_budget": 64, "pos_grid": [4, 4, 2], "precision": "fp32",
        "llm": {"mode": "none"}, "decoder": {"taps": [1, 2], "channels": [8, 8, 8], "stem_channels": 4},
    },
    "fit": {
        "scaling": {"num_workers": 1, "cpus_per_worker": 1}, "ray_num_cpus": 2, "max_failures": 1,
        "stream_to_mlflow": False,
        "loop": {"epochs": EPOCHS, "steps_per_epoch": 50, "batch_size": 1, "val_every": 1, "warmup_epochs": 0,
                 "torch_threads": 1},
    },
}  # fmt: skip

MANIFEST = "data/02_intermediate/ingest_manifest.json"
INGESTED = "data/02_intermediate/cases"
MODEL_INPUT = "data/05_model_input/cases"
RAY_RESULTS = "data/06_models/ray_results"
#: Everything the prepared copy has under data/ (drop, ingest, preprocess outputs).
ALL_DATA = ("*",)


# -- processes ------------------------------------------------------------------------------
def clean_env(**extra: str) -> dict[str, str]:
    """A user's shell: none of the caller's MLflow, Ray, AWS or Python path settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "AWS_"))}
    env.update(KEDRO_DISABLE_TELEMETRY="true", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH="", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")  # fmt: skip
    env.update(extra)
    return env


#: Every run started, so that none outlives its test (see `no_run_left_behind`).
STARTED: list[Run] = []


@pytest.fixture(autouse=True)
def no_run_left_behind():
    yield
    while STARTED:
        run = STARTED.pop()
        if run.proc.poll() is None:
            run.kill()
        run.signal_group(signal.SIGKILL)  # what it started and left (Ray's agents)


class Run:
    """``kedro run ARGS`` in ``root`` as its own process group, output to a file."""

    def __init__(self, root: Path, *args: str, env: dict[str, str] | None = None, name: str = "run") -> None:
        self.root = root
        self.log = root.parent / f"{name}-{time.monotonic_ns()}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kedro", "run", *args], cwd=root, env=env or clean_env(),
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.pid = self.proc.pid
        STARTED.append(self)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait(self, timeout: float = 900) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"kedro run did not end within {timeout} s:\n{self.output()[-4000:]}")

    def succeeded(self, timeout: float = 900) -> str:
        rc = self.wait(timeout)
        assert rc == 0, f"kedro run failed ({rc}):\n{self.output()[-6000:]}"
        return self.output()

    def signal_group(self, sig: int) -> None:
        """``sig`` to every process the run started: its process group and every process of its
        session (Ray's workers and actors each lead a process group of their own)."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        for pid in session_pids(self.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def kill(self, *, group: bool = True) -> None:
        """SIGKILL the kedro process itself (the fault), then (``group``) whatever it started."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        if group:
            self.signal_group(signal.SIGKILL)

    def wait_for_line(self, pattern: str, timeout: float = 600) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.output())
            if found:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        pytest.fail(f"no line matching {pattern!r} (rc {self.proc.poll()}):\n{self.output()[-4000:]}")


def _threads(pid: int) -> list[tuple[str, str]]:
    """(state, wait channel) of each thread of ``pid``."""
    threads = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii") as stat:
                state = stat.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{pid}/task/{tid}/wchan", encoding="ascii") as wchan:
                threads.append((state, wchan.read()))
        except FileNotFoundError:  # a thread that just ended
            pass
    return threads


def session_pids(sid: int) -> list[int]:
    """The processes of session ``sid`` (a run is started as a session leader)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[3]) == sid:  # state, ppid, pgrp, session
            pids.append(int(entry))
    return pids


def _frozen(pid: int) -> bool:
    """No thread of ``pid`` can run: stopped, or in vfork() waiting for a (stopped) child."""
    try:
        return all(state in "tTZX" or (state == "D" and wchan == "kernel_clone") for state, wchan in _threads(pid))
    except FileNotFoundError:  # the process is gone
        return True


def freeze(run: Run) -> None:
    """Stop every process of ``run`` (SIGSTOP to its group) and wait until none can run.

    A stop can hang: a process whose main thread is in vfork() waits for its child to exec, the
    child is stopped with the group before it does, and the SIGSTOP meant for the parent stays
    pending on that main thread while another thread sleeps on a futex, never stopping (seen in
    CI, ingest, 2026-12-04: [('D', 'kernel_clone'), ('S', 'futex_do_wait')] for 10 s). So when a
    stop has not taken within a second, the group is continued for a moment and stopped again."""
    deadline, retry = time.monotonic() + 30, time.monotonic() + 1
    while True:
        run.signal_group(signal.SIGSTOP)  # again: a thread started during the stop may not have it
        if all(_frozen(pid) for pid in [run.pid, *session_pids(run.pid)]):
            return
        assert time.monotonic() < deadline, f"SIGSTOP did not stop the run: threads {_threads(run.pid)}"
        if time.monotonic() > retry:
            run.signal_group(signal.SIGCONT)
            time.sleep(0.01)
            retry = time.monotonic() + 1
        time.sleep(0.001)


def lock_taken(run: Run) -> bool:
    """The run holds its data root's run lock (it is about to run its first node)."""
    try:
        return json.loads((run.root / "data" / ".run.lock").read_text())["pid"] == run.pid
    except (FileNotFoundError, ValueError, KeyError):
        return False


def run_until(run: Run, point: Callable[[], bool], what: str, *, slice_s: float = 0.005, timeout: float = 180) -> None:
    """Let ``run`` start freely, then, once it holds the run lock, advance in slices; return with
    it stopped (SIGSTOP) right after the slice in which ``point()`` became true. Fails if the run
    ends first."""
    deadline = time.monotonic() + timeout
    while not lock_taken(run) and run.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    while True:
        freeze(run)
        if point():
            return
        if run.proc.poll() is not None:
            pytest.fail(f"the run ended (rc {run.proc.returncode}) before {what}:\n{run.output()[-4000:]}")
        if time.monotonic() > deadline:
            run.kill()
            pytest.fail(f"{what} not reached within {timeout} s:\n{run.output()[-4000:]}")
        run.signal_group(signal.SIGCONT)
        time.sleep(slice_s)


# -- project copies -------------------------------------------------------------------------
#: What a run leaves at the top of a project besides its data: not carried into a clone.
RUN_LEFTOVERS = {"data", ".viz", "info.log", "mlruns"}


def clone(tmp_path_factory, prepared: Path, name: str, *, data: tuple[str, ...] = ()) -> Path:
    """A copy of the prepared project (its code as copied once, conf/local with the key and the
    tiny parameters, its MLflow store) with the named data folders only."""
    base = tmp_path_factory.mktemp(name)
    root = base / "project"
    shutil.copytree(prepared, root, symlinks=True,
                    ignore=lambda folder, names: RUN_LEFTOVERS & set(names) if Path(folder) == prepared else set())  # fmt: skip
    if (prepared.parent / "shared").exists():
        (base / "shared").symlink_to((prepared.parent / "shared").resolve(), target_is_directory=True)
    folders = {p.name for p in (prepared / "data").iterdir() if p.is_dir()}
    for folder in sorted(folders):
        if data == ALL_DATA or folder in data:
            shutil.copytree(prepared / "data" / folder, root / "data" / folder, symlinks=True)
        else:  # the empty layer folder a clone has
            (root / "data" / folder).mkdir(parents=True)
    return root


@pytest.fixture(scope="module")
def prepared(project_copy) -> Path:
    """The tiny project: a drop of N_STUDIES studies, ingested and preprocessed by `kedro run`."""
    from mvl_pipeline.datasets.drop import DropFolderDataset
    from mvl_pipeline.pipelines.sample_data.nodes import generate_sample_drop

    root = project_copy("faults-prepared")
    (root / "conf" / "local" / "parameters.yml").write_text(yaml.safe_dump(TINY), encoding="utf-8")
    base = yaml.safe_load((root / "conf/base/parameters_sample_data.yml").read_text(encoding="utf-8"))
    drop = generate_sample_drop(base["sample_data"] | TINY["sample_data"])
    DropFolderDataset(filepath=str(root / "data/01_raw/sample_drop")).save(drop)
    Run(root, "--pipelines", "ingest,preprocess", name="prepare").succeeded()
    return root


# -- what is on disk --------------------------------------------------------------------------
def manifest_cases(root: Path) -> dict[str, list[str]]:
    """unit key -> case ids, from the saved ingest manifest ({} when there is none yet)."""
    path = root / MANIFEST
    if not path.exists():
        return {}
    return {unit: entry["cases"] for unit, entry in json.loads(path.read_text())["units"].items()}


def assert_store_consistent(root: Path, store: str, fmt: str, expected: set[str] | None = None) -> set[str]:
    """Every completely written case loads; every other entry of the folder (a case folder killed
    mid-write, a temporary) is refused by the loader. Returns the loadable ids."""
    from kedro.io import DatasetError

    from mvl_pipeline.datasets.case_store import CaseStoreDataset

    dataset = CaseStoreDataset(path=str(root / store), format=fmt)
    ids = set(dataset.case_ids())
    for case_id in sorted(ids):
        case = dataset.load_case(case_id)
        assert case.case_id == case_id and case.image.array.size > 0
    folder = root / store
    for entry in sorted(folder.iterdir()) if folder.exists() else []:
        if entry.name not in ids:
            with pytest.raises(DatasetError):
                dataset.load_case(entry.name)
    if expected is not None:
        assert expected <= ids, f"listed but not loadable: {sorted(expected - ids)}"
    return ids


def stamps(root: Path, store: str, ids: set[str]) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of each case's record: unchanged means not rewritten."""
    return {c: ((s := (root / store / c / "case.json").stat()).st_ino, s.st_mtime_ns) for c in ids}


def temporaries(root: Path) -> list[str]:
    from mvl_pipeline.core.storage import TEMPORARY

    return sorted(str(p.relative_to(root)) for p in (root / "data").rglob("*") if TEMPORARY.match(p.name))


def assert_rerun_recovered_lock(output: str, killed_pid: int, root: Path) -> None:
    """The rerun reported the lock the killed run left, and closed that run's MLflow run (KILLED):
    nothing in the project's MLflow is left RUNNING."""
    from mlflow.tracking import MlflowClient

    assert re.search(rf"recovered the run lock left by PID {killed_pid} on host ", output), output[-3000:]
    closed = re.findall(r"MLflow run (\w+) of the run that died holding the run lock marked KILLED", output)
    assert len(closed) == 1, output[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs][-2:] == ["KILLED", "FINISHED"] and runs[-2].info.run_id == closed[0]
    assert "RUNNING" not in {r.info.status for r in runs}


# -- SIGKILL mid-ingest and mid-preprocess ------------------------------------------------------
def test_sigkill_mid_ingest_keeps_the_saved_batches_and_the_rerun_ingests_only_the_rest(tmp_path_factory, prepared):
    root = clone(tmp_path_factory, prepared, "faults-ingest", data=("01_raw",))
    run = Run(root, "--pipelines", "ingest", name="ingest-killed")
    run_until(run, (root / MANIFEST).exists, "the first batch was saved")
    run.kill()

    saved = manifest_cases(root)
    assert 0 < len(saved) < N_STUDIES, f"not killed mid-ingest: {len(saved)} of {N_STUDIES} units saved"
    listed = {case for cases in saved.values() for case in cases}
    before = assert_store_consistent(root, INGESTED, "nifti", expected=listed)
    kept = stamps(root, INGESTED, listed)

    output = Run(root, "--pipelines", "ingest", name="ingest-rerun").succeeded()
    assert_rerun_recovered_lock(output, run.pid, root)
    # the units the manifest recorded are not processed again; cases saved after the manifest's
    # last save (the batch being written at the kill) are redone
    assert f"{N_STUDIES - len(saved)} new or changed to process, {len(saved)} unchanged" in output
    after = manifest_cases(root)
    assert len(after) == N_STUDIES and all(len(cases) == 1 for cases in after.values())
    final = {case for cases in after.values() for case in cases}
    assert assert_store_consistent(root, INGESTED, "nifti", expected=final) == final >= before
    assert stamps(root, INGESTED, listed) == kept  # what was saved is untouched
    assert temporaries(root) == []  # the killed save's leftovers were swept
    assert json.loads((root / "data/02_intermediate/quarantine.json").read_text()) == []


def test_sigkill_mid_reingest_under_new_settings_then_the_rerun_redoes_the_units_not_reached(tmp_path_factory, prepared):
    """New ingest settings re-ingest every unit. Each batch's manifest holds the new settings and
    every file's fingerprint, so a run killed after its first batch left the other units looking
    done under the new settings, their old cases kept for good (an audit, 2026-12-07). The
    manifest lists them as pending until done; the rerun does exactly those."""
    root = clone(tmp_path_factory, prepared, "faults-reingest", data=("01_raw",))
    Run(root, "--pipelines", "ingest", name="ingest-first").succeeded()
    first = json.loads((root / MANIFEST).read_text())
    changed = ("--pipelines", "ingest", "--params", "ingest.spacing_tolerance=0.06")  # part of the settings id
    run = Run(root, *changed, name="ingest-reingest-killed")

    def pending_saved() -> bool:
        try:
            return bool(json.loads((root / MANIFEST).read_text()).get("pending"))
        except (OSError, ValueError):
            return False

    run_until(run, pending_saved, "the first batch of the re-ingest was saved")
    run.kill()
    killed = json.loads((root / MANIFEST).read_text())
    assert killed["settings_id"] != first["settings_id"]
    assert 0 < len(killed["pending"]) < N_STUDIES, f"not killed mid-run: {len(killed['pending'])} pending"

    output = Run(root, *changed, name="ingest-reingest-rerun").succeeded()
    assert f"{len(killed['pending'])} new or changed to process" in output, output[-3000:]
    final = json.loads((root / MANIFEST).read_text())
    assert "pending" not in final and final["settings_id"] == killed["settings_id"]
    assert len(manifest_cases(root)) == N_STUDIES
    output = Run(root, *changed, name="ingest-reingest-again").succeeded()
    assert f"0 new or changed to process, {N_STUDIES} unchanged" in output


def test_sigkill_mid_preprocess_keeps_the_written_cases_and_the_rerun_computes_only_the_rest(tmp_path_factory, prepared):
    root = clone(tmp_path_factory, prepared, "faults-preprocess", data=("01_raw", "02_intermediate"))
    done = root / MODEL_INPUT

    def some_case_written() -> bool:  # a case in place: not a temporary, complete before its rename
        from mvl_pipeline.core.storage import TEMPORARY

        return done.is_dir() and any((d / "_COMPLETE").exists() for d in done.iterdir() if not TEMPORARY.match(d.name))

    run = Run(root, "--pipelines", "preprocess", name="preprocess-killed")
    run_until(run, some_case_written, "the first model-input case was written", slice_s=0.003)
    run.kill()

    planned = int(run.wait_for_line(r"preprocess with plan \w+: (\d+) to compute").group(1))
    written = assert_store_consistent(root, MODEL_INPUT, "npy")
    assert 0 < len(written) < planned, f"not killed mid-preprocess: {len(written)} of {planned} cases written"
    kept = stamps(root, MODEL_INPUT, written)

    output = Run(root, "--pipelines", "preprocess", name="preprocess-rerun").succeeded()
    assert_rerun_recovered_lock(output, run.pid, root)
    # the cases written before the kill are kept, not recomputed
    assert f"{planned - len(written)} to compute, {len(written)} up to date" in output, output[-3000:]
    ingested = {case for cases in manifest_cases(root).values() for case in cases}
    final = assert_store_consistent(root, MODEL_INPUT, "npy")
    assert len(final) == planned and written <= final <= ingested
    assert stamps(root, MODEL_INPUT, written) == kept
    assert temporaries(root) == []


def test_a_run_killed_where_no_lock_record_survives_is_closed_by_the_next_run_once_silent(tmp_path_factory, prepared):
    """A RayJob's pod, or a run on an s3:// data root: the next run finds no lock record of the
    killed one (here removed, as a new pod has none), so only the heartbeat can show it died."""
    from mlflow.tracking import MlflowClient

    root = clone(tmp_path_factory, prepared, "faults-silent", data=("01_raw", "02_intermediate"))
    run = Run(root, "--pipelines", "preprocess", name="preprocess-killed")
    run_until(run, lambda: (root / MODEL_INPUT).is_dir() and any((root / MODEL_INPUT).iterdir()), "preprocess writes")
    run.kill()
    (root / "data" / ".run.lock").unlink()
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    (killed,) = client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'")
    assert killed.data.tags["mvl.heartbeat_unix"].isdigit()
    while time.time() - int(killed.data.tags["mvl.heartbeat_unix"]) <= 3:  # silent longer than stale_after_s
        time.sleep(0.2)

    output = Run(root, "--pipelines", "preprocess", "--params", "run.heartbeat_s=1,run.stale_after_s=3",
                 name="preprocess-rerun").succeeded()  # fmt: skip
    assert "recovered the run lock" not in output  # nothing but the heartbeat told
    assert re.search(rf"MLflow run {killed.info.run_id}: no heartbeat for \d+ s \(run.stale_after_s 3 s\), marked KILLED",
                     output), output[-3000:]  # fmt: skip
    runs = client.search_runs(experiments, order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs][-2:] == ["KILLED", "FINISHED"] and runs[-2].info.run_id == killed.info.run_id
    assert "RUNNING" not in {r.info.status for r in runs}


# -- S3 outage during ingest -------------------------------------------------------------------
S3_KEY, S3_SECRET = "AKIAFAULTTESTKEY0001", "fault-test-secret-never-logged"
BUCKET = "hospital-drop"


class MotoServer:
    """``moto_server`` as a real process on a fixed port: stopped and started like a real outage."""

    def __init__(self, port: int) -> None:
        self.port, self.endpoint, self.proc = port, f"http://127.0.0.1:{port}", None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_KEY,
                            aws_secret_access_key=S3_SECRET, region_name="us-east-1")  # fmt: skip

    def start(self, drop: Path | None = None, objects: dict[str, bytes] | None = None) -> None:
        """Start an empty server with the bucket, then put ``drop``'s files under ``drop/`` and
        ``objects`` (key -> bytes): a server that comes back with what it held."""
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.1)
        client = self.client()
        client.create_bucket(Bucket=BUCKET)
        files = sorted(p for p in drop.rglob("*") if p.is_file()) if drop else []
        for path in files:  # the same bytes, the same ETags
            client.put_object(Bucket=BUCKET, Key=f"drop/{path.relative_to(drop).as_posix()}", Body=path.read_bytes())
        for key, body in (objects or {}).items():
            client.put_object(Bucket=BUCKET, Key=key, Body=body)

    def objects(self, prefix: str) -> dict[str, bytes]:
        """Every object under ``prefix``: key -> bytes."""
        client, found = self.client(), {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            for item in page.get("Contents", []):
                found[item["Key"]] = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
        return found

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)  # a frozen server dies too
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def freeze(self, frozen: bool = True) -> None:
        """SIGSTOP (or SIGCONT) the server: it keeps its port, the kernel still accepts
        connections, and nothing answers: a hung store, not a refused one."""
        os.killpg(self.proc.pid, signal.SIGSTOP if frozen else signal.SIGCONT)


def s3_drop_project(tmp_path_factory, prepared: Path, name: str, server: MotoServer) -> tuple[Path, dict[str, str]]:
    """A clone of the prepared project whose drop is ``s3://BUCKET/drop`` on ``server``, and a
    user's environment that reaches it."""
    root = clone(tmp_path_factory, prepared, name)
    (root / "conf/local/globals.yml").write_text(f"drop_url: s3://{BUCKET}/drop\n", encoding="utf-8")
    env = clean_env(AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET, AWS_ENDPOINT_URL=server.endpoint,
                    AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    return root, env


def fails_mid_ingest(run: Run, root: Path, fault: Callable[[], None]) -> tuple[str, float]:
    """Stop ``run`` right after it saved its first batch, apply ``fault``, let it go on; it must
    fail. Its output, and the seconds from the fault to its end."""
    run_until(run, (root / MANIFEST).exists, "the first batch was saved")
    fault()  # while the run is stopped mid-ingest
    started = time.monotonic()
    run.signal_group(signal.SIGCONT)
    assert run.wait(timeout=300) != 0
    return run.output(), time.monotonic() - started


def test_s3_outage_mid_ingest_fails_naming_the_endpoint_after_bounded_retries_and_the_rerun_completes(
    tmp_path_factory, prepared
):
    drop = prepared / "data/01_raw/sample_drop"
    server = MotoServer(free_port())
    server.start(drop)
    try:
        root, env = s3_drop_project(tmp_path_factory, prepared, "faults-s3", server)
        run = Run(root, "--pipelines", "ingest", env=env, name="ingest-s3-outage")
        output, failed_after = fails_mid_ingest(run, root, server.stop)  # the outage
        from mvl_pipeline.core.storage import S3_RETRY

        attempts = S3_RETRY["total_max_attempts"]
        expected = f"s3 storage at {server.endpoint} is unreachable (EndpointConnectionError) after {attempts} attempts"
        assert f"StorageUnavailableError: {expected}" in output, output[-4000:]
        assert S3_SECRET not in output and S3_KEY not in output
        keys = {part for f in drop.rglob("*") for part in f.relative_to(drop).parts}  # UIDs: identifying
        assert not [k for k in keys if k in output]  # no object key or folder name of the drop
        assert failed_after < 120, f"no bound on the retries: failed {failed_after:.0f} s after the outage"

        saved = manifest_cases(root)
        assert 0 < len(saved) < N_STUDIES
        manifest = json.loads((root / MANIFEST).read_text())
        assert not [u for u in manifest["units"].values() if u.get("quarantined")]  # an outage is no verdict
        listed = {case for cases in saved.values() for case in cases}
        assert_store_consistent(root, INGESTED, "nifti", expected=listed)
        kept = stamps(root, INGESTED, listed)

        server.start(drop)  # the store is back, with the same drop
        output = Run(root, "--pipelines", "ingest", env=env, name="ingest-s3-rerun").succeeded()
        assert "recovered the run lock" not in output  # the failed run released it
        assert f"{N_STUDIES - len(saved)} new or changed to process, {len(saved)} unchanged" in output
        final = {case for cases in manifest_cases(root).values() for case in cases}
        assert len(manifest_cases(root)) == N_STUDIES
        assert assert_store_consistent(root, INGESTED, "nifti", expected=final) == final
        assert stamps(root, INGESTED, listed) == kept
        assert json.loads((root / "data/02_intermediate/quarantine.json").read_text()) == []
    finally:
        server.stop()


def test_a_frozen_s3_store_mid_ingest_fails_after_the_read_timeouts_and_the_rerun_completes(tmp_path_factory, prepared):
    """The store hangs (SIGSTOP: connections accepted, no answer) instead of refusing: each
    request fails after its read timeout, at most ``S3_RETRY`` times, then the run stops naming
    the endpoint. The site's catalog shortens the timeouts (``fs_args.config_kwargs``, as a site
    would set them) so that the bound is seconds here, not the default minutes."""
    from mvl_pipeline.core.storage import S3_RETRY

    drop = prepared / "data/01_raw/sample_drop"
    server = MotoServer(free_port())
    server.start(drop)
    read_timeout = 2
    try:
        root, env = s3_drop_project(tmp_path_factory, prepared, "faults-s3-frozen", server)
        (root / "conf/local/catalog_drop.yml").write_text(yaml.safe_dump({"hospital_drop": {
            "type": "mvl_pipeline.datasets.drop.DropFolderDataset", "filepath": "${globals:drop_url}",
            "fs_args": {"config_kwargs": {"read_timeout": read_timeout, "connect_timeout": read_timeout}},
        }}), encoding="utf-8")  # fmt: skip
        run = Run(root, "--pipelines", "ingest", env=env, name="ingest-s3-frozen")
        output, failed_after = fails_mid_ingest(run, root, server.freeze)  # the hang
        attempts = S3_RETRY["total_max_attempts"]
        found = re.search(rf"StorageUnavailableError: s3 storage at {re.escape(server.endpoint)} is unreachable "
                          rf"\((\w+)\) after {attempts} attempts", output)  # fmt: skip
        assert found and "Timeout" in found.group(1), output[-4000:]
        # each attempt waits its read timeout, the backoff adds at most 1 + 2 + 4 s
        assert failed_after < attempts * read_timeout + 7 + 30, f"failed {failed_after:.0f} s after the hang"
        # and it did wait them out: the attempts of the last request, one of them perhaps sent
        # before the hang (the count in the message is the setting, this is the time it took)
        assert failed_after >= (attempts - 1) * read_timeout, f"failed {failed_after:.1f} s after the hang: fewer attempts than {attempts}?"
        assert S3_SECRET not in output and S3_KEY not in output
        saved = manifest_cases(root)
        assert 0 < len(saved) < N_STUDIES
        listed = {case for cases in saved.values() for case in cases}
        assert_store_consistent(root, INGESTED, "nifti", expected=listed)
        kept = stamps(root, INGESTED, listed)

        server.freeze(False)  # the store answers again, with what it held
        output = Run(root, "--pipelines", "ingest", env=env, name="ingest-s3-thawed").succeeded()
        assert f"{N_STUDIES - len(saved)} new or changed to process, {len(saved)} unchanged" in output
        assert len(manifest_cases(root)) == N_STUDIES
        assert stamps(root, INGESTED, listed) == kept
    finally:
        server.stop()


# -- two runs on one project: the run lock ------------------------------------------------------
def test_a_second_run_on_one_project_waits_refuses_or_gives_up_as_configured(tmp_path_factory, prepared):
    root = clone(tmp_path_factory, prepared, "faults-lock", data=("01_raw",))
    first = Run(root, "--pipelines", "ingest", name="lock-first")
    run_until(first, lambda: lock_taken(first), "the first run took the lock")  # and stays stopped there
    holder = rf"PID {first.pid} on host \S+ \(pipeline 'ingest', started \d{{4}}-\d\d-\d\dT[\d:]+\+00:00\)"

    waiting = Run(root, "--pipelines", "ingest", name="lock-waiting")
    refused = Run(root, "--pipelines", "train", "--params", "run.lock=refuse", name="lock-refused")
    timed_out = Run(root, "--pipelines", "train", "--params", "run.lock_timeout_s=2", name="lock-timeout")
    assert refused.wait() != 0
    message = re.search(r"RunLockedError: another run writes this project's data: (.*)", refused.output())
    assert message and re.match(holder, message.group(1)), refused.output()[-3000:]
    assert "/" not in message.group(0)  # the holder by PID, host and time: no path
    assert timed_out.wait() != 0
    assert re.search(rf"gave up after waiting 2 s \(run.lock_timeout_s\) for the run lock held by {holder}", timed_out.output())
    waiting.wait_for_line(rf"another run writes this project's data: {holder}; waiting up to 3600 s")
    for run in (waiting, refused, timed_out):  # none of them touched the data
        assert "Running node" not in run.output()
    assert not (root / MANIFEST).exists()

    first.signal_group(signal.SIGCONT)
    first.succeeded()
    output = waiting.succeeded()  # went on once the first run had finished
    assert re.search(r"the other run finished: waited [\d.]+ s", output)
    assert f"0 new or changed to process, {N_STUDIES} unchanged" in output  # ran after, not alongside
    ingested = {case for cases in manifest_cases(root).values() for case in cases}
    assert len(ingested) == N_STUDIES
    assert assert_store_consistent(root, INGESTED, "nifti", expected=ingested) == ingested
    # (a holder killed with SIGKILL: the ingest and preprocess tests above, the fit-driver test below)


# -- Ray Train: a worker killed mid-epoch, the driver killed mid-fit -------------------------------
def latest_checkpoint(root: Path) -> int | None:
    """Epoch of the newest checkpoint Ray Train has registered (its manager snapshot), if any."""
    for snapshot in (root / RAY_RESULTS).glob("*/checkpoint_manager_snapshot.json"):
        try:
            return int(json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["epoch"])
        except (ValueError, KeyError, TypeError):  # being written
            return None
    return None


def wait_for(condition: Callable[[], object], run: Run, what: str, timeout: float = 600) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value is not None and value is not False:
            return value
        if run.proc.poll() is not None:
            pytest.fail(f"the run ended (rc {run.proc.returncode}) before {what}:\n{run.output()[-4000:]}")
        time.sleep(0.02)
    run.kill()
    pytest.fail(f"{what} not reached within {timeout} s:\n{run.output()[-4000:]}")


def fit_history(root: Path) -> dict:
    return json.loads((root / "data/08_reporting/fit_history.json").read_text())


def curve(history: dict) -> list[tuple[int, float, float]]:
    return [(e["epoch"], e["train_loss"], e["val_dice"]) for e in history["epochs"]]


def assert_fit_outputs_whole(root: Path) -> None:
    """Every checkpoint Ray registered and the saved model load; nothing else is half there."""
    from mvl_pipeline.datasets.torch_weights import TorchWeightsDataset
    from mvl_pipeline.formats.model_bundle import read_weights

    (run_dir,) = (root / RAY_RESULTS).iterdir()
    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    registered = {result["checkpoint_dir_name"] for result in snapshot["checkpoint_results"]}
    assert registered, "Ray registered no checkpoint"
    for name in registered:
        state, config = read_weights(run_dir / name / "model")
        assert state and config, name
    # Ray resumes only from its snapshot's list; besides it, at most the one folder a killed
    # worker was writing (Ray never registers nor prunes it): more would mean pruning stopped
    unregistered = {p.name for p in run_dir.glob("checkpoint_*")} - registered
    assert len(unregistered) <= 1, sorted(unregistered)
    from kedro.io.core import Version

    model = TorchWeightsDataset(filepath=str(root / "data/06_models/medvisionllama"), version=Version(None, None))
    state, config = model.load()
    assert state and config


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


class RayNode:
    """One ``ray start ... --block`` as its own process group: a node of the test's cluster."""

    def __init__(self, name: str, argv: list[str], temp_dir: Path, env: dict[str, str]) -> None:
        self.name, self.log, self.starts = name, temp_dir.parent / f"{name}.log", 0
        self.argv, self.temp_dir, self.env = argv, temp_dir, env
        temp_dir.mkdir(parents=True)
        self.start()

    def start(self) -> None:
        self.starts += 1
        ports = [
            x
            for flag in (
                "--dashboard-agent-listen-port",
                "--dashboard-agent-grpc-port",
                "--metrics-export-port",
                "--runtime-env-agent-port",
                "--node-manager-port",
                "--object-manager-port",
            )
            for x in (flag, str(free_port()))
        ]  # fmt: skip  (two nodes share this host: own ports each)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "ray"), "start", *self.argv, "--temp-dir", str(self.temp_dir),
                 *ports, "--node-ip-address", "127.0.0.1", "--disable-usage-stats", "--block"],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def kill(self) -> None:
        """SIGKILL of the whole node at once: every process below `ray start` (raylet, object
        store, agents, the Ray Train worker) and its process group. Ray gives each worker a process
        group of its own, so killing the group alone left the worker training until it noticed
        its raylet was gone (a fast machine finished the fit in that time: nothing left to fail
        over)."""
        for pid in descendants(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


class RayCluster:
    """A head without CPUs (it holds the controller, as a KubeRay head does) and two 1-CPU worker
    nodes, each tagged with a custom resource named after it, all real ``ray start`` processes."""

    def __init__(self, root: Path) -> None:
        env = clean_env(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25", RAY_worker_niceness="0")
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self.nodes = {"head": RayNode("head", ["--head", "--port", str(port), "--num-cpus", "0",
                                               "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                                               "--dashboard-port", str(free_port()),
                                               "--ray-client-server-port", str(free_port())],
                                      root / "head", env)}  # fmt: skip
        self.wait_nodes(1)
        for name in ("node-b", "node-c"):
            self.nodes[name] = RayNode(name, ["--address", self.address, "--num-cpus", "1", "--resources",
                                              json.dumps({name: 1})], root / name, env)  # fmt: skip
        self.wait_nodes(3)

    def alive(self) -> list:
        from ray.util.state import list_nodes

        return [n for n in list_nodes(address=self.address, detail=True) if n.state == "ALIVE"]

    def wait_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if len(self.alive()) >= n:
                    return
            except Exception:  # noqa: BLE001 - the head is still starting
                pass
            for node in self.nodes.values():
                # `ray start` gives its raylet a fixed 30 s to register with the GCS and exits when
                # that passes; on 2 busy cores it does now and then: start that node once more
                if node.proc.poll() is not None and node.starts < 3:
                    node.kill()
                    node.start()
                    deadline = max(deadline, time.monotonic() + 60)
            if time.monotonic() > deadline:
                logs = {
                    name: node.log.read_text(errors="replace")[-1500:]
                    for name, node in self.nodes.items()
                }
                pytest.fail(f"the Ray cluster did not reach {n} nodes within {timeout} s: {logs}")
            time.sleep(0.5)

    def node_of(self, node_id: str) -> str | None:
        """Our name of the live node with Ray's ``node_id``."""
        for node in self.alive():
            if node.node_id == node_id:
                return next((name for name in node.resources_total if name in self.nodes), "head")
        return None

    def stop(self) -> None:
        for node in reversed(self.nodes.values()):
            node.kill()


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory) -> RayCluster:
    """A multi-node Ray cluster on this machine: `kedro run` joins it through RAY_ADDRESS (as on a
    cluster), and the test reads its workers from Ray's state API."""
    root = Path(tempfile.mkdtemp(prefix="mvl-faults-ray-", dir="/tmp"))  # Ray's socket paths: short
    cluster = RayCluster(root)
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, prepared, ray_cluster) -> Run:
    """An uninterrupted fit on the prepared data, started (it runs beside the worker test)."""
    root = clone(tmp_path_factory, prepared, "faults-fit-reference", data=ALL_DATA)
    return Run(root, "--pipelines", "fit", env=clean_env(RAY_ADDRESS=ray_cluster.address), name="fit-reference")


@pytest.fixture(scope="module")
def reference(reference_run) -> dict:
    """The fit history of the uninterrupted run."""
    reference_run.succeeded()
    history = fit_history(reference_run.root)
    assert [e["epoch"] for e in history["epochs"]] == list(range(EPOCHS)) and history["resumed_after_epochs"] == []
    return history


def train_workers(run: Run, address: str, *, alive: bool = True) -> list:
    """The Ray Train worker actors of ``run``'s Ray job (from Ray's state API; ``alive=False``:
    the ended ones too), each with its ``pid`` and ``node_id``."""
    from ray.util.state import list_actors, list_jobs

    jobs = [j.job_id for j in list_jobs(address=address) if j.driver_info and str(j.driver_info.pid) == str(run.pid)]
    if len(jobs) != 1:
        return []
    filters = [("class_name", "=", "RayTrainWorker"), ("job_id", "=", jobs[0])] + ([("state", "=", "ALIVE")] if alive else [])
    return list_actors(address=address, filters=filters)


def train_worker(run: Run, address: str) -> Any:
    """The one live Ray Train worker actor of ``run``'s Ray job: its ``pid`` and ``node_id``."""
    actors = train_workers(run, address)
    return actors[0] if len(actors) == 1 and actors[0].pid else None


def test_sigkill_of_a_ray_train_worker_mid_epoch_resumes_from_the_last_checkpoint_with_the_same_losses(
    tmp_path_factory, prepared, ray_cluster, reference_run, request
):
    root = clone(tmp_path_factory, prepared, "faults-fit-worker", data=ALL_DATA)
    run = Run(root, "--pipelines", "fit", env=clean_env(RAY_ADDRESS=ray_cluster.address), name="fit-worker-killed")
    worker = wait_for(lambda: train_worker(run, ray_cluster.address), run, "the Ray Train worker started").pid
    epoch = wait_for(lambda: latest_checkpoint(root), run, "the first checkpoint")
    os.kill(worker, signal.SIGKILL)  # the worker is training the epoch after `epoch`
    assert epoch < EPOCHS - 1, "the worker was killed after its last epoch: nothing to resume"

    output = run.succeeded()
    assert not process_alive(worker)
    replaced = rf"\(RayTrainWorker pid=(?!{worker}\b)\d+\).*worker 0: resumed after epoch \d"
    assert re.search(replaced, output), "no replacement worker resumed the run"
    history = fit_history(root)
    # resumed once, from the last checkpoint: the one seen at the kill (or one registered just after)
    (resumed,) = history["resumed_after_epochs"]
    assert epoch <= resumed < EPOCHS - 1, output[-3000:]
    reference = request.getfixturevalue("reference")
    assert curve(history) == curve(reference)  # the same losses and Dice as without the failure
    assert history["global_step"] == reference["global_step"]
    assert_fit_outputs_whole(root)


def test_loss_of_the_ray_node_that_trains_mid_fit_fails_over_to_the_other_node_with_the_same_losses(
    tmp_path_factory, prepared, ray_cluster, reference
):
    root = clone(tmp_path_factory, prepared, "faults-fit-node", data=ALL_DATA)
    run = Run(
        root,
        "--pipelines",
        "fit",
        env=clean_env(RAY_ADDRESS=ray_cluster.address),
        name="fit-node-lost",
    )
    worker = wait_for(
        lambda: train_worker(run, ray_cluster.address), run, "the Ray Train worker started"
    )
    lost = ray_cluster.node_of(worker.node_id)
    assert lost in ("node-b", "node-c"), f"the worker runs on {lost}, not on a worker node"
    epoch = wait_for(lambda: latest_checkpoint(root), run, "the first checkpoint")
    ray_cluster.nodes[lost].kill()  # the node goes, with the worker training the next epoch on it
    assert epoch < EPOCHS - 1, "the node was lost after the last epoch: nothing to fail over"

    output = run.succeeded()
    assert not process_alive(worker.pid)
    survivor = {"node-b": "node-c", "node-c": "node-b"}[lost]
    assert re.search(r"\(RayTrainWorker pid=\d+.*\).*worker 0: resumed after epoch \d", output), (
        output[-3000:]
    )
    history = fit_history(root)
    (resumed,) = history["resumed_after_epochs"]  # one failure, within fit.max_failures (1)
    assert epoch <= resumed < EPOCHS - 1, output[-3000:]
    assert curve(history) == curve(
        reference
    )  # the same losses and Dice as on an undisturbed cluster
    assert history["global_step"] == reference["global_step"]
    assert_fit_outputs_whole(root)
    # the run went on on the other node: every worker Ray started after the loss ran there
    replacements = [a for a in train_workers(run, ray_cluster.address, alive=False) if a.pid != worker.pid]
    assert replacements, "Ray's state API lists no replacement worker"
    assert {ray_cluster.node_of(a.node_id) for a in replacements} == {survivor}, replacements


def test_sigkill_of_the_kedro_driver_mid_fit_then_the_same_command_resumes_from_the_last_checkpoint(
    tmp_path_factory, prepared, reference
):
    root = clone(tmp_path_factory, prepared, "faults-fit-driver", data=ALL_DATA)
    command = ("--pipelines", "fit")  # with its own local Ray, as on a laptop
    run = Run(root, *command, name="fit-driver-killed")
    wait_for(lambda: latest_checkpoint(root) is not None, run, "the first checkpoint")
    below = descendants(run.pid)
    training = [p for p in below if re.match(r"ray::(RayTrainWorker|TrainController)", cmdline(p))]
    assert training, "no Ray Train process found under the driver"
    ray_core = [p for p in below if re.search(r"\b(raylet|gcs_server)\b", cmdline(p).split(" ", 1)[0])]
    assert ray_core, "no raylet or GCS process found under the driver"
    # The training processes are held (SIGSTOP) as soon as the first checkpoint is seen: seeing it
    # and finding them take a while, and short epochs went on meanwhile (seen in CI with 0.5 s
    # epochs: the whole fit done, nothing left to resume).
    for pid in training:
        os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while not all(_frozen(pid) for pid in training):  # a signal is delivered, not acted on, at once
        assert time.monotonic() < deadline, "SIGSTOP did not stop the Ray Train processes"
        time.sleep(0.001)
    run.kill(group=False)  # the driver alone, as the OOM killer or a closed laptop would
    # The rerun may start at once (the run lock goes with the driver), so nothing of the killed run
    # may write into the run's folder after it: Ray's fate sharing (PR_SET_PDEATHSIG, driver ->
    # raylet and GCS -> workers) kills them with it, stopped or not (within 0.02 s in 3 timed runs).
    deadline = time.monotonic() + 10
    while [p for p in training + ray_core if process_alive(p)] and time.monotonic() < deadline:
        time.sleep(0.01)
    outlived = [cmdline(p)[:40] for p in training + ray_core if process_alive(p)]
    assert not outlived, f"processes of the killed run's Ray outlived its driver by 10 s: {outlived}"
    run.signal_group(signal.SIGKILL)  # clean-up: Ray's idle agents linger in the group for a while
    epoch = latest_checkpoint(root)  # the last checkpoint Ray registered
    assert epoch is not None and epoch < EPOCHS - 1, f"nothing left to resume after epoch {epoch}"
    assert not (root / "data/08_reporting/fit_history.json").exists()
    assert not list((root / "data/06_models").glob("medvisionllama/*/*/_COMPLETE"))

    output = Run(root, *command, name="fit-driver-rerun").succeeded()
    assert_rerun_recovered_lock(output, run.pid, root)
    history = fit_history(root)
    assert history["resumed_after_epochs"] == [epoch], output[-3000:]
    assert curve(history) == curve(reference)
    assert_fit_outputs_whole(root)


# -- S3 outage during checkpointing --------------------------------------------------------------
def s3_latest_checkpoint(server: MotoServer, prefix: str) -> int | None:
    """Epoch of the newest checkpoint Ray Train registered on S3 (its manager snapshot), if any."""
    client = server.client()
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    for item in listing:
        if item["Key"].endswith("/checkpoint_manager_snapshot.json"):
            return snapshot_epoch(client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read())
    return None


def snapshot_epoch(body: bytes) -> int:
    return int(json.loads(body)["latest_checkpoint_result"]["metrics"]["epoch"])


def registered_epoch(objects: dict[str, bytes]) -> int:
    """Epoch of the checkpoint registered in ``objects`` (a listing of the store, by key)."""
    return next(snapshot_epoch(body) for key, body in objects.items() if key.endswith("/checkpoint_manager_snapshot.json"))


def s3_checkpoint_project(tmp_path_factory, prepared: Path, name: str, server: MotoServer,
                          **fit: Any) -> tuple[Path, dict[str, str]]:  # fmt: skip
    """A clone of the prepared project whose Ray Train checkpoints go to ``s3://BUCKET/ray-results``
    on ``server`` (plus the ``fit`` overrides given), and a user's environment that reaches it."""
    root = clone(tmp_path_factory, prepared, name, data=ALL_DATA)
    params = yaml.safe_load((root / "conf/local/parameters.yml").read_text(encoding="utf-8"))
    params["fit"] |= {"storage_path": f"s3://{BUCKET}/ray-results", **fit}
    (root / "conf/local/parameters.yml").write_text(yaml.safe_dump(params), encoding="utf-8")
    env = clean_env(AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET, AWS_ENDPOINT_URL=server.endpoint,
                    AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    return root, env


def settled_objects(server: MotoServer, prefix: str, *, quiet_s: float = 1.0, timeout: float = 30) -> dict[str, bytes]:
    """What the store holds under ``prefix`` once it has stopped changing. A frozen (SIGSTOPped)
    client can still have a request in the kernel's socket buffers that the server completes after
    the stop, so one listing right after the freeze may miss an object that lands a moment later."""
    deadline = time.monotonic() + timeout
    before = server.objects(prefix)
    while True:
        time.sleep(quiet_s)
        after = server.objects(prefix)
        if after == before:
            return after
        assert time.monotonic() < deadline, "the store kept changing after the run was frozen"
        before = after


def test_s3_outage_during_checkpointing_fails_naming_the_endpoint_and_the_rerun_resumes_with_the_same_losses(
    tmp_path_factory, prepared, reference
):
    server = MotoServer(free_port())
    server.start()
    try:
        root, env = s3_checkpoint_project(tmp_path_factory, prepared, "faults-s3-checkpoints", server)
        command = ("--pipelines", "fit")  # its own local Ray, checkpoints on S3
        run = Run(root, *command, env=env, name="fit-s3-outage")
        wait_for(lambda: s3_latest_checkpoint(server, "ray-results/"), run, "the first checkpoint on S3")
        freeze(run)  # the driver, its Ray and the worker: nothing moves while the store goes down
        held = settled_objects(server, "ray-results/")  # what the store holds at the outage, and will again
        # the checkpoint the rerun must resume from: the one registered in what the store holds
        epoch = registered_epoch(held)
        server.stop()
        outage = time.monotonic()
        run.signal_group(signal.SIGCONT)
        assert epoch is not None and epoch < EPOCHS - 1, f"nothing left to checkpoint after epoch {epoch}"
        assert run.wait(timeout=300) != 0
        failed_after = time.monotonic() - outage
        output = run.output()
        assert f"StorageUnavailableError: s3 storage at {server.endpoint} is unreachable" in output, output[-5000:]
        assert S3_SECRET not in output and S3_KEY not in output
        assert failed_after < 180, f"no bound on the retries: failed {failed_after:.0f} s after the outage"
        # nothing of the failed run that a later step would load
        assert not (root / "data/08_reporting/fit_history.json").exists()
        assert not list((root / "data/06_models").glob("medvisionllama/*/*/_COMPLETE"))

        server.start(objects=held)  # the store is back, with what it held
        output = Run(root, *command, env=env, name="fit-s3-rerun").succeeded()
        assert "recovered the run lock" not in output  # the failed run released it
        history = fit_history(root)
        assert history["resumed_after_epochs"] == [epoch], output[-3000:]
        assert curve(history) == curve(reference)
        assert history["global_step"] == reference["global_step"]
    finally:
        server.stop()


def test_a_frozen_s3_store_during_checkpointing_fails_after_the_storage_timeouts_and_the_rerun_resumes(
    tmp_path_factory, prepared, reference
):
    """The checkpoint store hangs (moto_server SIGSTOPped: connections accepted, never answered)
    instead of refusing. Every request of Ray Train's client then fails after
    ``fit.storage_timeouts`` (2 s here, as a site would shorten them; 60 s by default), at most 4
    attempts, and the run stops naming the endpoint and the timeout. When the store answers again
    it also serves the requests the failed run left queued in it; the rerun resumes from the
    checkpoint the store then has registered, with the losses of an undisturbed run."""
    from mvl_pipeline.core.storage import S3_RETRY

    server = MotoServer(free_port())
    server.start()
    read_timeout = 2
    try:
        root, env = s3_checkpoint_project(
            tmp_path_factory, prepared, "faults-s3-frozen-checkpoints", server,
            storage_timeouts={"connect_timeout": read_timeout, "read_timeout": read_timeout},
        )  # fmt: skip
        command = ("--pipelines", "fit")
        run = Run(root, *command, env=env, name="fit-s3-frozen")
        wait_for(lambda: s3_latest_checkpoint(server, "ray-results/"), run, "the first checkpoint on S3")
        freeze(run)  # nothing moves while the store starts to hang
        held = settled_objects(server, "ray-results/")
        epoch = registered_epoch(held)
        assert epoch < EPOCHS - 1, f"nothing left to checkpoint after epoch {epoch}"
        server.freeze()
        hang = time.monotonic()
        run.signal_group(signal.SIGCONT)
        assert run.wait(timeout=600) != 0
        failed_after = time.monotonic() - hang
        output = run.output()
        expected = f"StorageUnavailableError: s3 storage at {server.endpoint} is unreachable (Timeout: no answer within fit.storage_timeouts)"
        assert expected in output, output[-5000:]
        assert S3_SECRET not in output and S3_KEY not in output
        # bounded by the timeouts: 4 attempts x 2 s + backoff per request, per worker-group start
        # (fit.max_failures + 1 = 2) and the controller's own writes; minutes at the 60 s default
        assert failed_after < 240, f"failed {failed_after:.0f} s after the store hung"
        # and waited them out: at least the attempts of one request (51 s measured, 2026-12-07)
        assert failed_after >= (S3_RETRY["total_max_attempts"] - 1) * read_timeout, f"failed {failed_after:.1f} s after the store hung"
        assert not (root / "data/08_reporting/fit_history.json").exists()
        assert not list((root / "data/06_models").glob("medvisionllama/*/*/_COMPLETE"))

        server.freeze(False)  # the store answers again, late requests of the failed run included
        registered = registered_epoch(settled_objects(server, "ray-results/"))
        assert epoch <= registered < EPOCHS - 1
        output = Run(root, *command, env=env, name="fit-s3-frozen-rerun").succeeded()
        history = fit_history(root)
        assert history["resumed_after_epochs"] == [registered], output[-3000:]
        assert curve(history) == curve(reference)
        assert history["global_step"] == reference["global_step"]
    finally:
        server.stop()
