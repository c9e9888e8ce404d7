"""python -m mvl_pipeline.commands.fetch_msd: an MSD task tar downloaded (file://, http with
Range, s3://), resumed after a SIGKILL, MD5-checked and unpacked safely and atomically.

The tar is built from a few cases of the real ../shared/data/msd/Task04_Hippocampus (read only),
with a dataset.json that lists only those, so every test stays fast.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath

import pytest

from mvl_pipeline.commands import fetch_msd
from mvl_pipeline.commands.fetch_msd import TASKS, FetchError, download, fetch, main

TASK = "Task04_Hippocampus"
N_TRAINING = 4
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def task_tar(shared_data, tmp_path_factory) -> dict:
    """``{"path", "md5", "size", "files": {relpath: bytes}}`` of a small real MSD task tar."""
    src = shared_data / "msd" / TASK
    spec = json.loads((src / "dataset.json").read_bytes())
    training = spec["training"][:N_TRAINING]
    test_source = spec["training"][N_TRAINING]["image"]  # a further case's image plays imagesTs
    test_image = f"./imagesTs/{PurePosixPath(test_source).name}"
    spec.update(training=training, test=[test_image], numTraining=N_TRAINING, numTest=1)
    files = {"dataset.json": json.dumps(spec, indent=1).encode()}
    for entry in training:
        for key in ("image", "label"):
            files[entry[key][2:]] = (src / entry[key]).read_bytes()
    files[test_image[2:]] = (src / test_source).read_bytes()
    path = tmp_path_factory.mktemp("msd-tar") / f"{TASK}.tar"
    _write_tar(path, {f"{TASK}/{name}": data for name, data in files.items()})
    data = path.read_bytes()
    return {"path": path, "md5": hashlib.md5(data).hexdigest(), "size": len(data), "files": files}


def _write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _assert_task_folder(folder: Path, task_tar: dict) -> None:
    found = {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }
    assert sorted(found) == sorted(task_tar["files"])
    assert found == task_tar["files"]  # byte for byte the sources (and the dataset.json written)
    assert {p.name for p in folder.iterdir()} == {"dataset.json", "imagesTr", "labelsTr", "imagesTs"}


def _hidden_leftovers(dest: Path) -> list[str]:
    """Temporary folders and partial downloads (the lock file is allowed to stay)."""
    names = (p.name for p in dest.iterdir())
    return sorted(n for n in names if n.startswith(".") and not n.endswith(".lock"))


def _run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mvl_pipeline.commands.fetch_msd", *args],
        check=False, capture_output=True, text=True, timeout=60, env=env, cwd=PROJECT_ROOT,
    )  # fmt: skip


class _TarServer:
    """A local HTTP server for one file: HEAD, GET with ``Range``, optional throttling, optional
    dropped connections (of range requests); it counts the body bytes it sent and the offsets it
    was asked for."""

    def __init__(self, data: bytes):
        self.data, self.rate, self.drop = data, None, 0
        self.sent, self.starts, self.active, self.lock = 0, [], 0, threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def _answer(self, body: bool):
                size, start, end = len(server.data), 0, len(server.data) - 1
                ranged = self.headers.get("Range", "").startswith("bytes=")
                with server.lock:
                    if server.drop > 0 and body and ranged:
                        server.drop -= 1
                        self.close_connection = True
                        return  # the connection closes without an answer
                if ranged:
                    first, _, last = self.headers["Range"][6:].partition("-")
                    start, end = int(first), min(int(last) if last else size - 1, size - 1)
                self.send_response(206 if ranged else 200)
                self.send_header("Content-Length", str(end - start + 1))
                self.send_header("Accept-Ranges", "bytes")
                if ranged:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.end_headers()
                if not body:
                    return
                with server.lock:
                    server.starts.append(start)
                    server.active += 1
                try:
                    for offset in range(start, end + 1, 4096):
                        piece = server.data[offset : min(offset + 4096, end + 1)]
                        self.wfile.write(piece)
                        self.wfile.flush()
                        with server.lock:
                            server.sent += len(piece)
                        if server.rate:
                            time.sleep(len(piece) / server.rate)
                except OSError:
                    self.close_connection = True  # the client is gone (killed)
                finally:
                    with server.lock:
                        server.active -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{TASK}.tar"


@pytest.fixture
def tar_server(task_tar):
    server = _TarServer(task_tar["path"].read_bytes())
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


def test_the_task_table_is_monais():
    """URLs and MD5s equal monai.apps.DecathlonDataset's (read from its source: no torch import)."""
    spec = importlib.util.find_spec("monai")
    source = Path(spec.submodule_search_locations[0], "apps", "datasets.py").read_text()
    [cls] = [
        n for n in ast.walk(ast.parse(source))
        if isinstance(n, ast.ClassDef) and n.name == "DecathlonDataset"
    ]  # fmt: skip
    attrs = {
        t.id: ast.literal_eval(n.value)
        for n in cls.body if isinstance(n, ast.Assign)
        for t in n.targets if isinstance(t, ast.Name) and t.id in ("resource", "md5")
    }  # fmt: skip
    assert TASKS == {task: (attrs["resource"][task], attrs["md5"][task]) for task in attrs["resource"]}
    assert len(TASKS) == 10


def test_file_url_download_verifies_and_unpacks_the_task(task_tar, tmp_path):
    dest = tmp_path / "data" / "01_raw" / "msd"
    url = task_tar["path"].as_uri()
    result = _run_cli(TASK, "--dest", str(dest), "--url", url, "--md5", task_tar["md5"])
    assert result.returncode == 0, result.stderr
    assert "MD5" in result.stderr and "verified" in result.stderr
    assert result.stdout == ""  # logs go to stderr, nothing is printed
    _assert_task_folder(dest / TASK, task_tar)
    assert _hidden_leftovers(dest) == []


def test_a_second_run_on_a_complete_task_does_nothing(task_tar, tmp_path, caplog):
    dest = tmp_path / "msd"
    fetch(TASK, dest=dest, url=str(task_tar["path"]), md5=task_tar["md5"])  # a plain local path
    before = {p: p.stat().st_mtime_ns for p in (dest / TASK).rglob("*")}
    caplog.set_level(logging.INFO, logger=fetch_msd.__name__)
    # the source is gone: a second run must not even look at it
    assert main([TASK, "--dest", str(dest), "--url", str(tmp_path / "gone.tar")]) == 0
    assert "nothing to do" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in (dest / TASK).rglob("*")} == before
    _assert_task_folder(dest / TASK, task_tar)


def test_wrong_md5_fails_with_both_sums_and_leaves_no_task_and_no_part(task_tar, tmp_path, caplog):
    dest = tmp_path / "msd"
    wrong = "0" * 32
    assert main([TASK, "--dest", str(dest), "--url", task_tar["path"].as_uri(), "--md5", wrong]) == 1
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert wrong in error.getMessage() and task_tar["md5"] in error.getMessage()
    assert "\n" not in error.getMessage()
    assert not (dest / TASK).exists()
    assert _hidden_leftovers(dest) == []


def test_md5_none_skips_the_check_with_a_warning(task_tar, tmp_path, caplog):
    dest = tmp_path / "msd"
    assert main([TASK, "--dest", str(dest), "--url", task_tar["path"].as_uri(), "--md5", "none"]) == 0
    assert any(r.levelno == logging.WARNING and "NOT verified" in r.getMessage() for r in caplog.records)
    _assert_task_folder(dest / TASK, task_tar)


def _download_until(args: list[str], part: Path, size: int) -> subprocess.Popen:
    """fetch_msd running in its own process, once its partial file holds ``size`` bytes. Its
    SIGINT is Python's KeyboardInterrupt as in a terminal, also where the tests themselves run in
    the background (a shell's background job inherits SIGINT ignored, and Python keeps that)."""
    command = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
               "sys.argv[0] = 'fetch_msd'; runpy.run_module('mvl_pipeline.commands.fetch_msd', run_name='__main__')")  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", command, *args],
        cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not (part.exists() and part.stat().st_size >= size):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, stderr = proc.communicate()
            raise AssertionError(f"the download ended or never got going before the signal: {stderr}")
        time.sleep(0.02)
    return proc


def test_a_killed_download_resumes_from_the_partial_file(task_tar, tar_server, tmp_path):
    dest = tmp_path / "msd"
    part = dest / f".{TASK}.tar.part"
    args = [TASK, "--dest", str(dest), "--url", tar_server.url, "--md5", task_tar["md5"]]
    args += ["--block-size", "32768"]  # ~13 range requests for the ~400 kB tar
    tar_server.rate = 80_000  # bytes/s: the ~400 kB tar takes ~5 s
    proc = _download_until(args, part, 3 * 32768)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    kept = part.stat().st_size
    assert 0 < kept < task_tar["size"]
    assert not (dest / TASK).exists()
    tar_server.rate = None
    deadline = time.monotonic() + 10
    while tar_server.active:  # the killed client's answer in flight must end before counting
        assert time.monotonic() < deadline, "the server still sends to the killed client"
        time.sleep(0.02)

    tar_server.sent, tar_server.starts = 0, []
    result = _run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert f"from byte {kept}" in result.stderr
    assert tar_server.starts[0] == kept  # the first range asked for starts where the part ended
    assert tar_server.sent == task_tar["size"] - kept  # not one byte fetched twice
    _assert_task_folder(dest / TASK, task_tar)
    assert _hidden_leftovers(dest) == []


def test_ctrl_c_ends_the_download_with_one_line_and_keeps_the_partial_file(task_tar, tar_server, tmp_path):
    """Ctrl-C (a real SIGINT) printed a traceback from deep in the HTTP client; now the command
    says it was interrupted and how to go on, exits 130, and the downloaded bytes stay."""
    dest = tmp_path / "msd"
    part = dest / f".{TASK}.tar.part"
    args = [TASK, "--dest", str(dest), "--url", tar_server.url, "--md5", task_tar["md5"], "--block-size", "32768"]
    tar_server.rate = 80_000
    proc = _download_until(args, part, 2 * 32768)
    proc.send_signal(signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].endswith(
        "fetch_msd: interrupted; run the same command again to go on from the bytes downloaded so far")
    assert 0 < part.stat().st_size < task_tar["size"]
    assert not (dest / TASK).exists()


def test_transient_errors_are_retried_then_fail_naming_the_url_without_credentials(
    task_tar, tar_server, tmp_path, caplog
):
    part = tmp_path / "x.tar.part"
    tar_server.drop = 3  # three dropped connections, then it answers
    download(tar_server.url, part, retries=3, block_size=65536, backoff=0.01)
    assert part.read_bytes() == task_tar["path"].read_bytes()
    assert sum("transient error" in r.getMessage() for r in caplog.records) >= 1

    tar_server.drop = 10**6  # never answers
    url = tar_server.url.replace("http://", "http://someone:s3cr3t@") + "?X-Amz-Signature=abc"
    with pytest.raises(FetchError, match="failed after 2 retries") as caught:
        download(url, tmp_path / "y.tar.part", retries=2, backoff=0.01)
    assert tar_server.url in str(caught.value)
    assert "s3cr3t" not in str(caught.value) and "abc" not in str(caught.value)
    assert "s3cr3t" not in caplog.text and "X-Amz-Signature=abc" not in caplog.text


@pytest.mark.parametrize("partial", [0, 100_000])
def test_a_server_without_range_requests_streams_the_whole_file(task_tar, tmp_path, caplog, partial):
    """`python -m http.server` answers every GET with the whole file: the download used to fail
    after its first block ("doesn't appear to support range requests"), as did every re-run."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(task_tar["path"].parent))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    dest = tmp_path / "msd"
    dest.mkdir()
    if partial:  # an earlier run got this far
        (dest / f".{TASK}.tar.part").write_bytes(task_tar["path"].read_bytes()[:partial])
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/{TASK}.tar"
        args = [TASK, "--dest", str(dest), "--url", url, "--md5", task_tar["md5"], "--block-size", "32768"]
        assert main(args) == 0, caplog.text
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert "does not answer range requests" in caplog.text
    _assert_task_folder(dest / TASK, task_tar)
    assert _hidden_leftovers(dest) == []


def test_an_s3_url_works_and_resumes_with_the_standard_aws_variables(task_tar, s3_bucket, tmp_path):
    import boto3

    key = f"mirror/{TASK}.tar"
    boto3.client(
        "s3", endpoint_url=s3_bucket["endpoint_url"], region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    ).upload_file(str(task_tar["path"]), s3_bucket["bucket"], key)  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=s3_bucket["endpoint_url"], AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
    )  # fmt: skip
    dest = tmp_path / "msd"
    dest.mkdir()
    # an earlier run got this far: the rest comes as byte ranges of the object
    (dest / f".{TASK}.tar.part").write_bytes(task_tar["path"].read_bytes()[:100_000])
    url = f"s3://{s3_bucket['bucket']}/{key}"
    result = _run_cli(TASK, "--dest", str(dest), "--url", url, "--md5", task_tar["md5"], env=env)
    assert result.returncode == 0, result.stderr
    assert "from byte 100000" in result.stderr
    _assert_task_folder(dest / TASK, task_tar)
    assert _hidden_leftovers(dest) == []


def _bad_tar(tmp_path: Path, members: dict[str, bytes]) -> tuple[str, str]:
    path = tmp_path / "bad.tar"
    _write_tar(path, members)
    return path.as_uri(), hashlib.md5(path.read_bytes()).hexdigest()


def test_a_tar_member_leaving_the_folder_is_refused_and_nothing_is_written_outside(
    task_tar, tmp_path
):
    dest = tmp_path / "out" / "msd"
    dest.mkdir(parents=True)
    (dest / "Task02_Heart").mkdir()
    (dest / "Task02_Heart" / "keep.txt").write_text("good data alongside")
    members = {f"{TASK}/{name}": data for name, data in task_tar["files"].items()}
    members["../evil.txt"] = b"escaped"
    members[f"{TASK}/../../evil2.txt"] = b"escaped"
    url, md5 = _bad_tar(tmp_path, members)
    with pytest.raises(FetchError, match="refusing") as caught:
        fetch(TASK, dest=dest, url=url, md5=md5)
    assert isinstance(caught.value.__cause__, tarfile.OutsideDestinationError)
    assert [p for p in tmp_path.rglob("evil*")] == []
    assert not (dest / TASK).exists()
    assert _hidden_leftovers(dest) == [f".{TASK}.tar.part"]  # kept: the next run needs no download
    assert (dest / "Task02_Heart" / "keep.txt").read_text() == "good data alongside"


def test_a_tar_without_dataset_json_is_refused(task_tar, tmp_path):
    dest = tmp_path / "msd"
    members = {f"{TASK}/{n}": d for n, d in task_tar["files"].items() if n != "dataset.json"}
    url, md5 = _bad_tar(tmp_path, members)
    with pytest.raises(FetchError, match="no dataset.json"):
        fetch(TASK, dest=dest, url=url, md5=md5)
    assert not (dest / TASK).exists()
    assert _hidden_leftovers(dest) == [f".{TASK}.tar.part"]


def test_an_unknown_task_without_url_is_a_usage_error_naming_the_known_tasks(tmp_path, capsys):
    assert main(["Task99_Unknown", "--dest", str(tmp_path / "msd")]) == 2
    err = capsys.readouterr().err
    assert "Task99_Unknown" in err and all(task in err for task in TASKS)
    assert not (tmp_path / "msd").exists()


def test_the_makefile_target_fetches_a_task(task_tar, tmp_path):
    dest = tmp_path / "msd"
    result = subprocess.run(
        ["make", "--no-print-directory", "-o", "setup", "-o", ".venv/.installed", "data-msd",
         f"TASK={TASK}", f"MSD_URL={task_tar['path'].as_uri()}", f"MSD_MD5={task_tar['md5']}",
         f"MSD_DEST={dest}"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    _assert_task_folder(dest / TASK, task_tar)


def test_an_unverified_archive_that_does_not_unpack_is_deleted_so_the_next_run_downloads_it_again(task_tar, tmp_path):
    # with --md5 none a truncated tar stayed as the .part, and every later run refused it again
    # ("unexpected end of data") without downloading (a first-try audit, 2026-12-05)
    dest = tmp_path / "msd"
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(task_tar["path"].read_bytes()[: task_tar["path"].stat().st_size // 2])
    with pytest.raises(FetchError, match=r"not verified: --md5 none; deleted .*the next run downloads it again"):
        fetch(TASK, dest=dest, url=truncated.as_uri(), md5=None)
    assert not (dest / TASK).exists()
    assert _hidden_leftovers(dest) == []
    assert main([TASK, "--dest", str(dest), "--url", task_tar["path"].as_uri(), "--md5", "none"]) == 0
    _assert_task_folder(dest / TASK, task_tar)
