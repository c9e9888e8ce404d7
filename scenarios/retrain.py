"""Scheduled retraining, three nights of it, on real processes (``make scenario``).

    python scenarios/retrain.py [--smoke] [--workdir DIR]

What runs, each as its own operating-system process:

- the hospital drop on S3: a ``moto_server`` (bucket ``hospital``, prefix ``drop/``);
- a two-node Ray cluster: ``ray start --head`` (dashboard = Job Submission API) and a second
  ``ray start --address ...`` node, each with its own temp dir and one CPU; Ray Train checkpoints
  go to ``s3://hospital/ray-results``;
- MLflow as ``mlflow server`` with its own sqlite backend and artifact folder;
- each night, the trigger the CronJob pod runs (``python -m mvl_pipeline.k8s submit --slot ...
  --data-version auto --wait``), pointed at the Ray cluster's Job Submission API with
  ``--ray-address``; the RayJob is ``scenarios/rayjob.yaml`` (``kedro run --pipelines train --env
  scenario``; ``conf/scenario`` reads every site setting from the nodes' environment).

Day 0: the first studies -> one job -> the first champion. Day 1: new patients (one study flagged
as burned-in), the follow-ups, a truncated DICOM file, an SR report and a note under a folder
named after a patient, and a re-upload of an ingested study (same bytes) arrive; two triggers
fire for the night (the second re-attaches to the first's job); ingest processes only the new
studies, the unusable files are quarantined, a follow-up keeps its patient's role, the run starts
from the champion's weights (conf/scenario: fit.init champion), the gate decides. Day 2: nothing new -> the trigger submits nothing.

The report (``<workdir>/report.md`` and the last line of stdout, one JSON object) gives per day
what was ingested and quarantined, the job's wall time, the gate's decision and the champion
version, and the cluster seconds spent; then a byte scan of everything the training side wrote
(the cluster volume, MLflow's backend and artifacts, Ray's temp dirs and the checkpoints on S3,
the job logs) for the identifiers planted in the drop. Exit 0 only when every check held.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import http.client
import io
import json
import math
import os
import pickletools
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "hospital"
#: Not a secret: the scenario's data is synthetic. A fixed key makes its patient split repeatable.
SCENARIO_KEY = hashlib.sha256(b"mvl_pipeline retraining scenario").hexdigest()
# MLflow's server starts a job runner and Huey consumers by default, for its GenAI jobs; tracking
# and the registry (all this project uses) need none of them. Measured (2 cores, 2026-12-04): 2
# processes instead of 10, 6 s of CPU instead of 22 by the time the server has answered /health.
NO_SERVER_JOBS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
SLOTS = ("20261206t0300", "20261207t0300", "20261208t0300")
SIZES = {
    #        patients  image  slices   epochs steps
    "smoke": dict(n_patients=10, image_size=32, n_slices=[10, 10], epochs=8, steps=25),
    "full": dict(n_patients=24, image_size=48, n_slices=[14, 18], epochs=12, steps=40),
}


def log(message: str) -> None:
    print(f"[scenario {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)  # noqa: T201


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- processes ----------------------------------------------------------------------------------
class Service:
    """A long-running process in its own session; stopped with its whole process group."""

    def __init__(self, name: str, argv: list[str], logs: Path, env: Mapping[str, str]) -> None:
        self.name = name
        self.log = logs / f"{name}.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=dict(env),
                                         cwd=ROOT, start_new_session=True)  # fmt: skip

    def stop(self) -> None:
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue


def start_ready(
    start: Callable[[], Service], ready: Callable[[], bool], what: str, attempts: int = 3, timeout: float = 120.0
) -> Service:
    """Start a service until ``ready()`` holds, again (up to ``attempts`` times) when its process
    exits first. ``ray start`` gives its raylet a fixed 30 s to register with the GCS and exits
    when that passes ("The current node timed out during startup"), which happens on 2 busy cores
    (seen in CI, with the fault tests running beside the scenario); a second start then succeeds."""
    for attempt in range(1, attempts + 1):
        service = start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and service.proc.poll() is None:
            if ready():
                return service
            time.sleep(1)
        code = service.proc.poll()
        service.stop()
        why = f"exited with code {code}" if code is not None else f"not ready within {timeout:.0f} s"
        log(f"{what} {why} (attempt {attempt} of {attempts}; see {service.log})")
    raise RuntimeError(f"{what} did not start in {attempts} attempts; see {service.log}")


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except (OSError, http.client.HTTPException):  # not HTTP on that port (yet): not our server
        return False


def wait_http(url: str, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not answers(url):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer at {url} within {timeout:.0f} s")
        time.sleep(0.5)


@contextmanager
def cluster(work: Path, env: dict[str, str]) -> Iterator[dict[str, str]]:
    """moto S3, MLflow server, Ray head + second node; yields the nodes' environment."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ray_dirs = ray_root(work)
    s3_port, gcs_port, dash_port = free_port(), free_port(), free_port()
    mlflow_port = 0
    with ExitStack() as stack:
        def start(name: str, argv: list[str], node_env: Mapping[str, str]) -> Service:
            service = Service(name, argv, logs, node_env)
            stack.callback(service.stop)
            return service

        start("moto", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], env)
        wait_http(f"http://127.0.0.1:{s3_port}/moto-api/", "moto S3")
        (work / "mlflow").mkdir(exist_ok=True)

        def start_mlflow() -> Service:  # a free port of its own each attempt
            nonlocal mlflow_port
            mlflow_port = free_port()
            return start("mlflow", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                                    "--workers", "1", "--backend-store-uri", f"sqlite:///{work / 'mlflow' / 'mlflow.db'}",
                                    "--artifacts-destination", str(work / "mlflow" / "artifacts")],
                         env | NO_SERVER_JOBS)  # fmt: skip

        # ready before Ray starts: its port was free when chosen, and a Ray process binding ports of
        # its own while the server started once took it (the health check then read Ray's gRPC)
        start_ready(start_mlflow, lambda: answers(f"http://127.0.0.1:{mlflow_port}/health"), "the mlflow server")
        node_env = env | {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
            "MVL_PSEUDONYM_KEY": SCENARIO_KEY,
            "MVL_DATA_ROOT": str(work / "cluster-volume"),
            "MVL_DROP_URL": f"s3://{BUCKET}/drop",
            "MVL_CHECKPOINT_URL": f"s3://{BUCKET}/ray-results",
        }
        def node_args() -> list[str]:  # own ports for each node's agents: two nodes share this host
            ports = {flag: str(free_port()) for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                                         "--metrics-export-port", "--runtime-env-agent-port")}  # fmt: skip
            return [*(x for pair in ports.items() for x in pair), "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
                    "--disable-usage-stats", "--block"]  # fmt: skip

        head = [str(BIN / "ray"), "start", "--head", "--port", str(gcs_port), "--include-dashboard", "true",
                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
                "--ray-client-server-port", str(free_port()), "--temp-dir", str(ray_dirs / "head")]  # fmt: skip
        start_ready(lambda: start("ray-head", [*head, *node_args()], node_env),
                    lambda: answers(f"http://127.0.0.1:{dash_port}/api/version"), "the Ray head")  # fmt: skip
        node2 = [str(BIN / "ray"), "start", "--address", f"127.0.0.1:{gcs_port}", "--temp-dir", str(ray_dirs / "node2")]
        start_ready(lambda: start("ray-node2", [*node2, *node_args()], node_env),
                    lambda: alive_nodes(dash_port) >= 2, "the second Ray node")  # fmt: skip
        s3_client(node_env).create_bucket(Bucket=BUCKET)
        yield node_env | {"MVL_RAY_JOBS_ADDRESS": f"http://127.0.0.1:{dash_port}"}


def ray_root(work: Path) -> Path:
    """``<work>/ray``, or when that path is too long for Ray's Unix sockets (107 bytes with
    ``session_.../sockets/plasma_store`` below it) a short folder under /tmp linked from there."""
    link = work / "ray"
    if len(str(link)) <= 40:
        link.mkdir(exist_ok=True)
        return link
    short = Path(tempfile.mkdtemp(prefix="mvl-ray-", dir="/tmp"))
    link.symlink_to(short, target_is_directory=True)
    return short


def alive_nodes(dash_port: int) -> int:
    """How many raylets the head's dashboard reports ALIVE (0 while it cannot say)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{dash_port}/nodes?view=summary", timeout=5) as answer:
            nodes = json.load(answer)["data"]["summary"]
    except (OSError, KeyError, ValueError):
        return 0
    return sum(1 for node in nodes if node.get("raylet", {}).get("state") == "ALIVE")


def s3_client(env: Mapping[str, str]) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


# -- the hospital drop --------------------------------------------------------------------------
def generate_studies(size: Mapping[str, Any]) -> list[Any]:
    from mvl_pipeline.synthetic.sample_drop import SampleDataConfig, iter_sample_studies

    config = SampleDataConfig(
        n_patients=size["n_patients"] + 2, followup_fraction=0.4, image_size=size["image_size"],
        pixel_spacing_mm=(9.0 * 32 / size["image_size"],) * 2, n_slices=tuple(size["n_slices"]),
        slice_spacing_mm=12.0 * 10 / size["n_slices"][0], thin_slice_studies=0, non_axial_studies=0,
    )  # fmt: skip
    return list(iter_sample_studies(config))


def study_bytes(study: Any, *, burned_in: bool = False) -> dict[str, bytes]:
    """The study's DICOM files under ``drop/``; ``burned_in``: its images flagged as carrying
    burned-in text (BurnedInAnnotation YES), which ingest must quarantine."""
    from mvl_pipeline.datasets.drop import encode_file
    from mvl_pipeline.synthetic.sample_drop import study_files

    files = study_files(study)
    if burned_in:
        for ds in files.values():
            if ds.Modality != "SEG":
                ds.BurnedInAnnotation = "YES"
    return {f"drop/{rel}": encode_file(ds) for rel, ds in files.items()}


def hospital_clutter(study: Any) -> dict[str, bytes]:
    """What else a hospital export holds, under a folder named after the patient: a truncated
    DICOM file named by the record number, and a structured report (SR) carrying the patient's
    identity and the accession number."""
    import pydicom
    from pydicom.data import get_testdata_file

    from mvl_pipeline.datasets.drop import encode_file

    header = study.header
    folder = f"drop/{str(header['PatientName']).replace('^', '_')}_{header['PatientBirthDate']}"
    report = pydicom.dcmread(get_testdata_file("test-SR.dcm"))
    for key in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
                "ReferringPhysicianName"):  # fmt: skip
        setattr(report, key, header[key])
    some_slice = next(iter(study_bytes(study).values()))
    return {
        f"{folder}/{header['PatientID']}_broken.dcm": some_slice[: len(some_slice) // 3],
        f"{folder}/report_{header['AccessionNumber']}.dcm": encode_file(report),
        f"{folder}/notes_{header['PatientID']}.txt": f"{header['PatientName']} {header['PatientID']}".encode(),
    }


def planted_identifiers(studies: list[Any]) -> set[str]:
    """Every identifying value the drop's headers carry (what must never leave ingest)."""
    keys = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
            "InstitutionAddress", "ReferringPhysicianName", "OperatorsName", "StudyID")  # fmt: skip
    found: set[str] = set()
    for study in studies:
        for key in keys:
            value = str(study.header.get(key) or "")
            if len(value) >= 5:
                found.add(value)
        name = str(study.header.get("PatientName") or "")
        found.update(part for part in name.split("^") if len(part) >= 5)
        found.update({study.uids.study, study.patient_folder})
    return found


class Drop:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.s3 = s3_client(env)

    def put(self, files: Mapping[str, bytes]) -> None:
        for key, data in files.items():
            self.s3.put_object(Bucket=BUCKET, Key=key, Body=data)


# -- one night ----------------------------------------------------------------------------------
def trigger(slot: str, env: Mapping[str, str], work: Path, name: str) -> subprocess.Popen:
    """The CronJob pod's command, against the Ray cluster's Job Submission API."""
    out = (work / "logs" / f"{name}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "mvl_pipeline.k8s", "submit", "--manifest", str(work / "rayjob.yaml"),
         "--slot", slot, "--data-version", "auto", "--drop-url", env["MVL_DROP_URL"], "--wait", "--timeout", "3600"],
        cwd=ROOT, env=dict(env), stdout=subprocess.PIPE, stderr=out,
    )  # fmt: skip


def jobs(env: Mapping[str, str]) -> list[Any]:
    from ray.job_submission import JobSubmissionClient

    return list(JobSubmissionClient(env["MVL_RAY_JOBS_ADDRESS"]).list_jobs())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def night(day: int, env: Mapping[str, str], work: Path, *, duplicate: bool) -> dict[str, Any]:
    volume = work / "cluster-volume"
    jobs_before = {job.submission_id for job in jobs(env)}
    started = time.monotonic()
    first = trigger(SLOTS[day], env, work, f"day{day}-trigger")
    second = None
    if duplicate:  # a second pod for the same night (a retry, a manual trigger) once the job exists
        while len({job.submission_id for job in jobs(env)} - jobs_before) == 0 and first.poll() is None:
            time.sleep(0.5)
        second = trigger(SLOTS[day], env, work, f"day{day}-trigger-duplicate")
    # stdout: the run's name, then (with --wait) its final state line
    name = (first.communicate()[0].decode().splitlines() or [""])[0].strip()
    other = (second.communicate()[0].decode().splitlines() or [""])[0].strip() if second else None
    wall = time.monotonic() - started
    new_jobs = [job for job in jobs(env) if job.submission_id not in jobs_before]
    result: dict[str, Any] = {
        "day": day, "slot": SLOTS[day], "trigger_exit": first.returncode, "job": name,
        "jobs_submitted": len(new_jobs), "trigger_wall_s": round(wall, 1),
    }  # fmt: skip
    if second is not None:
        result["duplicate_trigger"] = {"exit": second.returncode, "job": other}
    if new_jobs:
        from ray.job_submission import JobSubmissionClient

        job = new_jobs[0]
        result["job_status"] = str(getattr(job.status, "value", job.status))
        result["cluster_s"] = round(((job.end_time or 0) - (job.start_time or 0)) / 1000.0, 1)
        (work / "logs" / f"day{day}-job.log").write_text(
            JobSubmissionClient(env["MVL_RAY_JOBS_ADDRESS"]).get_job_logs(job.submission_id), encoding="utf-8")
        registration = read_json(volume / "08_reporting" / "registration.json") or {}
        history = read_json(volume / "08_reporting" / "fit_history.json") or {}
        result["fit"] = {"init": history.get("init"), "epochs": len(history.get("epochs", [])),
                         "best_val_dice": history.get("best_val_dice")}  # fmt: skip
        result["registration"] = {k: registration.get(k) for k in ("reason", "promoted", "alias", "registered_version",
                                                                  "challenger_gate_dice", "champion_gate_dice", "champion_version")}  # fmt: skip
    else:
        result["cluster_s"] = 0.0
    result["champion_version"] = champion_version(env)
    return result


def champion_version(env: Mapping[str, str]) -> str | None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(env["MLFLOW_TRACKING_URI"]).get_model_version_by_alias("medvisionllama", "champion").version
    except MlflowException:
        return None


def markdown(report: Mapping[str, Any]) -> str:
    """The per-day table an operator reads."""
    rows = ["| day | slot | jobs submitted | cases / quarantined (total) | fit | cluster s | gate | champion |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for d in report["days"]:
        counts = d.get("counts") or {}
        fit = d.get("fit") or {}
        init = (fit.get("init") or {}).get("from", "-")
        reg = d.get("registration") or {}
        rows.append(
            f"| {d['day']} | {d['slot']} | {d['jobs_submitted']} | {counts.get('cases', '-')} / {counts.get('quarantined', '-')} "
            f"| {init + ', ' + str(fit.get('epochs')) + ' epochs' if fit else '-'} | {d['cluster_s']} "
            f"| {(reg.get('reason') or 'no job: nothing new').replace('|', '/')} | {d.get('champion_version') or '-'} |"
        )
    checks = [f"- {'ok' if ok else 'FAILED'}: {name}" for name, ok in report["checks"].items()]
    return "\n".join([f"# Retraining scenario ({report['size']})", "", *rows, "",
                      f"Cluster seconds: {report['cluster_seconds']}; day-1 retrain / day-0 first fit: "
                      f"{report['retrain_vs_first']}; wall: {report['wall_s']} s.", "", *checks, ""])  # fmt: skip


def case_records(volume: Path) -> dict[str, str]:
    """case id -> sha256 of its ingested record (a case rewritten changes it)."""
    return {p.parent.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((volume / "02_intermediate" / "cases").glob("*/case.json"))}  # fmt: skip


def ingest_counts(volume: Path) -> dict[str, int]:
    manifest = read_json(volume / "02_intermediate" / "ingest_manifest.json") or {"units": {}}
    n_quarantined = len(read_json(volume / "02_intermediate" / "quarantine.json") or [])  # a list of records
    cases = {case for unit in manifest["units"].values() for case in unit.get("cases", [])}
    return {"units": len(manifest["units"]), "cases": len(cases), "quarantined": n_quarantined}


# -- the PHI scan -------------------------------------------------------------------------------
def scan(paths: list[Path], identifiers: set[str]) -> list[str]:
    """``file: identifier`` for every planted identifier found in a file (gzip'd ones unpacked),
    in any letter case (a name lower-cased by a tool is still the name)."""
    needles = sorted({value.lower().encode() for value in identifiers})
    hits = []
    for root in paths:
        for path in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if data[:2] == b"\x1f\x8b":
                try:
                    data = gzip.decompress(data)
                except (OSError, EOFError):
                    pass
            data = textual(path, data).lower()
            hits += [f"{path}: {needle.decode()}" for needle in needles if contains_word(data, needle)]
    return hits


def is_project_file(path: Path) -> bool:
    """A file of Ray's copy of the job's working_dir that is byte-identical to the project's own
    (the image's code: the sample-data generator's word lists are in it by design). What the job
    wrote there (kedro-viz run events, logs) is not, and is scanned."""
    parts = path.parts
    if "working_dir_files" not in parts:
        return False
    relative = Path(*parts[parts.index("working_dir_files") + 2 :])
    own = ROOT / relative
    return own.is_file() and own.read_bytes() == path.read_bytes()


TORCH_STORAGE = re.compile(r"(?:[^/]+/)?data/\d+")  # a tensor's raw bytes in a torch.save archive


def textual(path: Path, data: bytes) -> bytes:
    """The bytes of a file that can hold text: the whole file, except the raw numbers of a
    tensor or array format, of which only the header, the keys and the metadata are kept (and a
    zip archive's members are read unpacked).

    Raw float data is not text, yet it holds digit bytes far more often than chance: the top byte
    of every float32 between 5e-10 and 4.8e-4 (Adam's moments, for one) is an ASCII digit. A
    scenario run found a planted 5-digit StudyID among the numbers of an ``optimizer.pt`` that
    way; a name or ID written as text (a dict key, a tag, metadata) is still found."""
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                names = archive.namelist()
                torch_archive = any(n.rsplit("/", 1)[-1] == "data.pkl" for n in names)
                parts = [n.encode() for n in names]
                for name in names:
                    if torch_archive and TORCH_STORAGE.fullmatch(name):
                        continue
                    member = archive.read(name)
                    parts += [member, pickled_strings(member)] if name.endswith(".pkl") else [member]
                return b"\n".join(parts)
        except (zipfile.BadZipFile, OSError, EOFError):
            return data
    if path.suffix in (".pkl", ".pickle"):
        return data + b"\n" + pickled_strings(data)
    if path.suffix == ".safetensors" and len(data) >= 8:
        return data[: 8 + int.from_bytes(data[:8], "little")]  # the JSON header: names, shapes, metadata
    if data[:6] == b"\x93NUMPY" and len(data) >= 12 and data[6] in (1, 2, 3) and data[7] == 0:
        size, width = (int.from_bytes(data[8:10], "little"), 10) if data[6] == 1 else (int.from_bytes(data[8:12], "little"), 12)
        return data[: width + size]
    if len(data) >= 352 and data[344:347] in (b"n+1", b"ni1"):  # NIfTI-1: header and extensions
        (offset,) = struct.unpack("<f" if data[:4] == (348).to_bytes(4, "little") else ">f", data[108:112])
        if math.isfinite(offset) and 352 <= offset <= len(data):
            return data[: int(offset)]
    return data


def pickled_strings(data: bytes) -> bytes:
    """The strings of a pickle, one a line (read with pickletools: nothing is executed). In the
    pickle's own bytes a string runs into the next opcode (``case_81317q``: 'q' is BINPUT), so
    an identifier at a string's end would not stand as a word there. Unreadable: the bytes."""
    try:
        found = [arg.encode() if isinstance(arg, str) else arg
                 for _, arg, _ in pickletools.genops(data) if isinstance(arg, (str, bytes))]  # fmt: skip
    except Exception:  # noqa: BLE001 - not a pickle after all: scan it as it is
        return data
    return b"\n".join(found)


def contains_word(data: bytes, needle: bytes) -> bool:
    """``needle`` in ``data`` with no letter or digit right before or after it (a birth date
    inside a longer run of digits is not a birth date)."""
    start = data.find(needle)
    while start >= 0:
        before = data[start - 1 : start] if start else b""
        after = data[start + len(needle) : start + len(needle) + 1]
        if not (before.isalnum() or after.isalnum()):
            return True
        start = data.find(needle, start + 1)
    return False


def download_prefix(env: Mapping[str, str], prefix: str, dest: Path) -> None:
    s3 = s3_client(env)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for item in page.get("Contents", []):
            target = dest / item["Key"]
            if target.name == "" or item["Key"].endswith("/"):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(BUCKET, item["Key"], str(target))


# -- the scenario -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CI size: fewer, smaller studies, shorter fits")
    parser.add_argument("--workdir", type=Path, default=ROOT / "data" / "scenario")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the cluster on the way out
    size = SIZES["smoke" if args.smoke else "full"]
    work = args.workdir.resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    rayjob = work / "rayjob.yaml"
    shutil.copy(ROOT / "scenarios" / "rayjob.yaml", rayjob)

    log(f"generating the hospital's studies ({size['n_patients'] + 2} patients, with follow-ups)")
    studies = generate_studies(size)
    identifiers = planted_identifiers(studies)
    by_patient: dict[int, list[Any]] = {}
    for study in studies:
        by_patient.setdefault(study.plan.patient, []).append(study)
    patients = sorted(by_patient)
    late_patients = patients[-2:]  # arrive on day 1
    day0 = [s for p in patients[:-2] for s in by_patient[p] if s.plan.visit == 0]
    followups = [s for p in patients[:-2] for s in by_patient[p] if s.plan.visit == 1]
    day1_new = [s for p in late_patients for s in by_patient[p] if s.plan.visit == 0]

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_", "AWS_", "MVL_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH="", KEDRO_DISABLE_TELEMETRY="true",
        RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
        # the scenario's cluster is private to this machine: without this, a token left in
        # ~/.ray/auth_token by any earlier Ray run turns token auth on and the Jobs API answers 401
        RAY_AUTH_MODE="disabled",
        AWS_ACCESS_KEY_ID="scenario", AWS_SECRET_ACCESS_KEY="scenario", AWS_DEFAULT_REGION="us-east-1",
    )  # fmt: skip
    entry = "kedro run --pipelines train --env scenario"
    params = f"fit.loop.epochs={size['epochs']},fit.loop.steps_per_epoch={size['steps']}"
    rayjob.write_text(rayjob.read_text().replace(entry, f"{entry} --params {params}"), encoding="utf-8")
    checks: dict[str, bool] = {}
    days: list[dict[str, Any]] = []
    started = time.monotonic()
    with cluster(work, env) as node_env:
        drop = Drop(node_env)
        trigger_env = node_env
        log(f"day 0: {len(day0)} studies into s3://{BUCKET}/drop")
        drop.put({k: v for s in day0 for k, v in study_bytes(s).items()})
        days.append(night(0, trigger_env, work, duplicate=False) | {"counts": ingest_counts(work / "cluster-volume")})
        log(f"day 0: {json.dumps(days[-1].get('registration'))}")
        split0 = read_json(work / "cluster-volume" / "03_primary" / "split.json")
        cases0 = case_records(work / "cluster-volume")

        log(f"day 1: {len(day1_new)} new studies (one burned-in), {len(followups)} follow-up(s), a truncated file, "
            "an SR report and a note under a folder named after a patient, a re-upload")
        drop.put({k: v for s in [*day1_new, *followups] for k, v in study_bytes(s).items()})
        drop.put(hospital_clutter(day1_new[0]))
        drop.put(study_bytes(day1_new[1], burned_in=True))
        drop.put(study_bytes(day0[0]))  # the same bytes again: nothing changes
        days.append(night(1, trigger_env, work, duplicate=True) | {"counts": ingest_counts(work / "cluster-volume")})
        log(f"day 1: {json.dumps(days[-1].get('registration'))}")
        split1 = read_json(work / "cluster-volume" / "03_primary" / "split.json")

        log("day 2: nothing new")
        days.append(night(2, trigger_env, work, duplicate=False))
        download_prefix(node_env, "ray-results/", work / "s3-ray-results")

    # -- checks ---------------------------------------------------------------------------
    d0, d1, d2 = days
    checks["day 0: one job, it succeeded"] = d0["jobs_submitted"] == 1 and d0.get("job_status") == "SUCCEEDED"
    checks["day 0: a first champion"] = bool(d0.get("registration", {}).get("promoted"))
    checks["day 1: one job for two triggers"] = d1["jobs_submitted"] == 1 and d1["duplicate_trigger"]["job"] == d1["job"]
    checks["day 1: both triggers ended with the job (exit 0)"] = d1["trigger_exit"] == 0 and d1["duplicate_trigger"]["exit"] == 0
    checks["day 1: the corrupt file and the burned-in study quarantined"] = (
        d0["counts"]["quarantined"] == 0 and d1["counts"]["quarantined"] >= 2)  # fmt: skip
    # the new patients' studies (one of them burned-in: quarantined) and the follow-ups, nothing else
    checks["day 1: only new studies ingested"] = d1["counts"]["cases"] == d0["counts"]["cases"] + len(day1_new) - 1 + len(followups)
    checks["day 1: every day-0 case left byte-identical"] = bool(cases0) and all(
        case_records(work / "cluster-volume").get(case) == digest for case, digest in cases0.items())  # fmt: skip
    checks["day 1: the gate decided"] = bool(d1.get("registration", {}).get("reason"))
    checks["day 2: nothing submitted"] = d2["jobs_submitted"] == 0 and d2["trigger_exit"] == 0
    roles0, roles1 = role_of(split0), role_of(split1)
    checks["every day-0 patient kept its role"] = all(roles1.get(p) == r for p, r in roles0.items())
    checks["day 1: a follow-up joined its patient's gate/test role"] = followup_held_out(split0, split1)
    phi = scan([work / "cluster-volume", work / "mlflow", work / "s3-ray-results",
                *(p for p in (work / "ray").resolve().rglob("*") if p.is_file() and not is_project_file(p)),
                *sorted((work / "logs").glob("day*.log"))], identifiers)  # fmt: skip
    checks["PHI scan: no planted identifier in what training wrote"] = not phi
    report = {
        "size": "smoke" if args.smoke else "full", "days": days, "checks": checks, "phi_hits": phi[:20],
        "identifiers_scanned": len(identifiers), "cluster_seconds": round(sum(d["cluster_s"] for d in days), 1),
        "wall_s": round(time.monotonic() - started, 1),
        "retrain_vs_first": round(d1["cluster_s"] / d0["cluster_s"], 3) if d0["cluster_s"] else None,
    }  # fmt: skip
    (work / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (work / "report.md").write_text(markdown(report), encoding="utf-8")
    if (work / "ray").is_symlink():  # the short folder under /tmp: scanned, now removed
        shutil.rmtree((work / "ray").resolve(), ignore_errors=True)
    else:  # Ray's copies of the project (scanned): not left for git to list; its logs stay
        for copies in list((work / "ray").rglob("runtime_resources")):
            shutil.rmtree(copies, ignore_errors=True)
    for name, ok in checks.items():
        log(f"{'ok  ' if ok else 'FAIL'} {name}")
    print(json.dumps(report))  # noqa: T201
    return 0 if all(checks.values()) else 1


def followup_held_out(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> bool:
    """A held-out role (gate, test) gained more cases than patients: a follow-up of a patient
    already there joined it (a new patient brings one case)."""
    for role in ("gate", "test"):
        new_cases = len((after or {}).get(role, [])) - len((before or {}).get(role, []))
        new_patients = len((after or {}).get("patients", {}).get(role, [])) - len((before or {}).get("patients", {}).get(role, []))
        if new_cases > new_patients:
            return True
    return False


def role_of(split: Mapping[str, Any] | None) -> dict[str, str]:
    patients = (split or {}).get("patients", {})
    return {p: role for role, members in patients.items() for p in members}


if __name__ == "__main__":
    sys.exit(main())
