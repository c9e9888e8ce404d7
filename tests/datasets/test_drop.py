"""DropFolderDataset: listing at any depth, reading, pickling into workers, atomic saves."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pydicom
import pytest
from kedro.io.core import DatasetError
from pydicom.data import get_testdata_file

from mvl_pipeline.core.errors import EmptySeriesError, UnreadableFileError
from mvl_pipeline.datasets.drop import (
    SAVE_MARKER,
    DropFolder,
    DropFolderDataset,
    DropFolderError,
    EmptyDropFolderError,
)


def _files() -> dict:
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    return {
        "1.2.3/4.5.6/7.8.9/1.dcm": ct,
        "1.2.3/4.5.6/7.8.9/2.dcm": Path(get_testdata_file("MR_small.dcm")).read_bytes(),
        "readme.txt": b"drop manifest\n",
        "deep/a/b/c/d/e.bin": bytes(range(256)) * 10,
    }


def _dataset(where: str, tmp_path, s3_bucket, name: str = "drop") -> DropFolderDataset:
    if where == "local":
        return DropFolderDataset(filepath=str(tmp_path / name))
    return DropFolderDataset(
        filepath=f"s3://{s3_bucket['bucket']}/{name}", credentials=s3_bucket["credentials"]
    )


def _sha256_in_worker(drop: DropFolder, relpath: str) -> tuple[str, int]:
    return drop.sha256(relpath), len(drop.read_bytes(relpath))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_round_trip(tmp_path, s3_bucket, where: str):
    files = _files()
    dataset = _dataset(where, tmp_path, s3_bucket)
    assert not dataset.exists()
    dataset.save(files)
    assert dataset.exists()
    drop = dataset.load()
    assert [f.relpath for f in drop.files] == sorted(files)
    for item in drop.files:
        content = drop.read_bytes(item.relpath)
        assert item.size == len(content)
        assert drop.sha256(item.relpath) == hashlib.sha256(content).hexdigest()
        with drop.open(item.relpath) as handle:
            assert handle.read() == content
        expected = files[item.relpath]
        if isinstance(expected, bytes):
            assert content == expected
        if where == "s3":
            assert item.fingerprint.startswith("etag:") and len(item.fingerprint) > 10
        else:
            assert item.fingerprint.endswith(f":{item.size}")
    with drop.open("1.2.3/4.5.6/7.8.9/1.dcm") as handle:
        ct = pydicom.dcmread(handle)
    assert ct.SOPInstanceUID == files["1.2.3/4.5.6/7.8.9/1.dcm"].SOPInstanceUID
    assert (ct.pixel_array == files["1.2.3/4.5.6/7.8.9/1.dcm"].pixel_array).all()


def test_drop_folder_survives_pickling_into_a_worker_process(s3_bucket):
    dataset = _dataset("s3", None, s3_bucket)
    dataset.save(_files())
    drop = dataset.load()
    drop.read_bytes("readme.txt")  # a live filesystem exists now; it must not be pickled
    clone = pickle.loads(pickle.dumps(drop))
    assert clone.files == drop.files and clone._fs is None
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        digest, size = pool.submit(_sha256_in_worker, drop, "deep/a/b/c/d/e.bin").result(timeout=120)
    assert size == 2560
    assert digest == hashlib.sha256(bytes(range(256)) * 10).hexdigest()
    assert "testing" not in repr(drop)  # credentials never shown


def test_hidden_entries_are_skipped_and_saves_never_delete(tmp_path):
    root = tmp_path / "drop"
    dataset = DropFolderDataset(filepath=str(root))
    dataset.save({"a/x.dcm": b"first"})
    (root / "a" / ".x.dcm.tmp-123").write_bytes(b"half")  # a crashed atomic write
    (root / ".DS_Store").write_bytes(b"litter")
    (root / ".cache").mkdir()
    (root / ".cache" / "y.dcm").write_bytes(b"hidden folder")
    (root / "placed_by_hospital.dcm").write_bytes(b"already there")
    dataset.save({"b/z.dcm": b"second"})
    drop = dataset.load()
    assert [f.relpath for f in drop.files] == ["a/x.dcm", "b/z.dcm", "placed_by_hospital.dcm"]
    before = {f.relpath: f for f in drop.files}
    dataset.save({"a/x.dcm": b"first, re-sent and longer"})
    after = {f.relpath: f for f in dataset.load().files}
    assert after["a/x.dcm"].fingerprint != before["a/x.dcm"].fingerprint
    assert after["b/z.dcm"] == before["b/z.dcm"]
    assert (root / "placed_by_hospital.dcm").read_bytes() == b"already there"


def test_relative_paths_are_kept_inside_the_folder(tmp_path):
    dataset = DropFolderDataset(filepath=str(tmp_path / "drop"))
    for bad in ("../escape.dcm", "/abs.dcm", "a/../../b.dcm", ".hidden.dcm", "a//b.dcm", ""):
        with pytest.raises(DatasetError):
            dataset.save({"ok.dcm": b"fine", bad: b"x"})
    assert not (tmp_path / "escape.dcm").exists()
    assert not (tmp_path / "drop").exists()  # paths are all checked before anything is written
    dataset.save({"ok.dcm": b"fine"})
    with pytest.raises(ValueError):
        dataset.load().read_bytes("../drop/ok.dcm")


def test_bad_input_raises_specific_errors_naming_the_path(tmp_path, s3_bucket):
    good = DropFolderDataset(filepath=str(tmp_path / "good"))
    good.save({"f.dcm": b"good data"})
    missing = tmp_path / "missing"
    # what a first `kedro run` without the Makefile meets: the message says where a drop comes from
    with pytest.raises(DropFolderError, match=r"not found \(it is drop_url in conf/<env>/globals\.yml: `make sample-data`") as info:
        DropFolderDataset(filepath=str(missing)).load()
    assert isinstance(info.value, UnreadableFileError) and str(missing) in str(info.value)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / ".partial").write_bytes(b"x")
    with pytest.raises(EmptyDropFolderError, match=r"holds no files \(it is drop_url .*`make data-msd`") as info:
        DropFolderDataset(filepath=str(empty)).load()
    assert isinstance(info.value, EmptySeriesError) and info.value.path == str(empty)
    assert DropFolderDataset(filepath=str(empty), load_args={"allow_empty": True}).load().files == []
    with pytest.raises(DropFolderError):
        _dataset("s3", None, s3_bucket, "nothing-here").load()
    drop = good.load()
    (tmp_path / "good" / "f.dcm").unlink()
    with pytest.raises(DropFolderError, match="no such file") as info:
        drop.read_bytes("f.dcm")
    assert info.value.path.endswith("good/f.dcm")
    with pytest.raises(DatasetError, match="bytes or pydicom"):
        good.save({"n.dcm": 42})


def test_crash_mid_save_leaves_only_complete_files(tmp_path, monkeypatch):
    dataset = DropFolderDataset(filepath=str(tmp_path / "drop"))
    dataset.save({"old.dcm": b"from yesterday"})
    calls = {"n": 0}
    real_fsync = os.fsync

    def crash_on_second(fd):
        calls["n"] += 1
        if calls["n"] == 3:  # the first fsync is the save marker's, the second 1.dcm's
            raise OSError("power cut")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", crash_on_second)
    with pytest.raises(DatasetError):
        dataset.save({"s/1.dcm": b"a" * 1000, "s/2.dcm": b"b" * 1000, "s/3.dcm": b"c" * 1000})
    monkeypatch.undo()
    assert (tmp_path / "drop" / SAVE_MARKER).is_file()  # the save did not finish: it says so
    with pytest.raises(DatasetError, match="did not finish"):
        dataset.load()
    (tmp_path / "drop" / SAVE_MARKER).unlink()  # the user takes the folder as it is
    listed = {f.relpath: f.size for f in dataset.load().files}
    assert listed == {"old.dcm": 14, "s/1.dcm": 1000}  # 2 never appears, not even truncated
    assert sorted(os.listdir(tmp_path / "drop" / "s")) == ["1.dcm"]


SAVER = """
import sys
from mvl_pipeline.datasets.drop import DropFolderDataset
print("saving", flush=True)
DropFolderDataset(filepath=sys.argv[1]).save({f"s/{i:05d}.dcm": bytes(2048) for i in range(20000)})
"""


def test_a_save_killed_half_way_leaves_a_marker_that_load_refuses_and_a_full_save_clears(tmp_path):
    """An audit (2026-12-05): `make train` after a sample-drop generation stopped half-way used
    the partial drop (3 of 8 patients) without a word; then with a warning, still training on
    part of the drop (an audit, 2026-12-07); now refused. A real process, SIGKILLed mid-save."""
    import signal
    import subprocess
    import sys
    import time

    drop = tmp_path / "drop"
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(drop)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saving"
    deadline = time.monotonic() + 60
    def written() -> int:  # whole files only: a save's temporaries are hidden
        return len([n for n in os.listdir(drop / "s") if not n.startswith(".")]) if (drop / "s").is_dir() else 0

    while written() <= 10:
        assert time.monotonic() < deadline and proc.poll() is None, "the save ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (drop / SAVE_MARKER).is_file()
    assert 10 < written() < 20000, written()  # SIGKILL came after the 11th file
    with pytest.raises(DatasetError, match="a save into this drop folder did not finish"):
        DropFolderDataset(filepath=str(drop)).load()
    DropFolderDataset(filepath=str(drop)).save({"s/00000.dcm": bytes(2048)})  # a save that finishes
    assert not (drop / SAVE_MARKER).exists()
    whole = DropFolderDataset(filepath=str(drop)).load()
    assert SAVE_MARKER not in {f.relpath for f in whole.files} and len(whole.files) == written()


def test_describe_never_shows_credentials(s3_bucket):
    credentials = {**s3_bucket["credentials"], "secret": "very-secret-value"}
    dataset = DropFolderDataset(filepath=f"s3://{s3_bucket['bucket']}/d", credentials=credentials)
    assert "very-secret-value" not in repr(dataset)


def test_entries_that_cannot_be_read_are_listed_with_their_problem(tmp_path):
    """A dangling or looping link, a link to a folder, a pipe and a name with a backslash (a zip
    made on Windows) are listed with their problem, for ingest to quarantine each on its own: the
    listing never fails, nothing follows the folder link, and no error quotes a path."""
    drop = tmp_path / "drop"
    (drop / "sub").mkdir(parents=True)
    (drop / "ok.dcm").write_bytes(b"fine")
    (drop / "Doe^Jane gone.dcm").symlink_to(drop / "nowhere")
    (drop / "loop.dcm").symlink_to(drop / "loop.dcm")
    (drop / "folder_link").symlink_to(drop)
    (drop / "sub" / "to_ok.dcm").symlink_to(drop / "ok.dcm")
    os.mkfifo(drop / "pipe.dcm")
    (drop / "Doe\\Jane.dcm").write_bytes(b"x")
    listing = {f.relpath: f.problem for f in DropFolderDataset(filepath=str(drop)).load().files}
    assert listing == {
        "ok.dcm": None, "sub/to_ok.dcm": None, "Doe^Jane gone.dcm": "broken_link", "loop.dcm": "broken_link",
        "folder_link": "link_to_folder", "pipe.dcm": "not_a_regular_file", "Doe\\Jane.dcm": "invalid_path",
    }  # fmt: skip
    with pytest.raises(ValueError, match="a backslash in the path") as error:
        DropFolderDataset(filepath=str(drop)).load().read_bytes("Doe\\Jane.dcm")
    assert "Doe" not in str(error.value)


_LIST_AS_UNPRIVILEGED = """
import json, os, sys
from mvl_pipeline.datasets.drop import DropFolderDataset
from mvl_pipeline.ingestion.scan import scan_drop
from mvl_pipeline.ingestion.config import IngestConfig
if os.geteuid() == 0:  # root reads every folder: list as 'nobody', as a hospital's service account would
    os.setgid(65534)
    os.setuid(65534)
try:
    drop = DropFolderDataset(filepath=sys.argv[1]).load()
except Exception as error:
    print(json.dumps({"error": f"{type(error).__name__}: {error}"}))
    raise SystemExit(0)
todo = scan_drop(drop, {}, bytes(32), IngestConfig.from_params({"labels": {"organ": 1}}), None).todo
print(json.dumps({"listing": {f.relpath: f.problem for f in drop.files},
                  "bad": {u.source_id: [u.error_reason, u.error_detail] for u, _, _ in todo if u.kind == "bad_file"}}))
"""


def _list_unprivileged(folder: Path) -> dict:
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _LIST_AS_UNPRIVILEGED, str(folder)],
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_folder_that_may_not_be_listed_is_a_quarantined_entry_not_silently_missing():
    """fsspec skips a folder it may not list without a word, so a patient's folder with the wrong
    permissions vanished from ingest (an audit, 2026-12-05). Listed by an unprivileged process
    (real permissions, no mock), it is now an entry of its own that ingest quarantines, next to
    the readable files; a hidden folder stays hidden; a drop folder that may not be listed at all
    fails with that reason instead of 'holds no files'."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="mvl-perm-"))  # not under pytest's root-only tmp folder
    try:
        base.chmod(0o755)
        drop = base / "drop"
        for relpath in ("ok/a.dcm", "Doe^Jane/b.dcm", ".hidden/c.dcm"):
            (drop / relpath).parent.mkdir(parents=True, exist_ok=True)
            (drop / relpath).write_bytes(b"x")
        for folder in (drop, drop / "ok"):
            folder.chmod(0o755)
        (drop / "ok" / "a.dcm").chmod(0o644)
        (drop / "Doe^Jane").chmod(0o000)
        (drop / ".hidden").chmod(0o000)
        out = _list_unprivileged(drop)
        assert out["listing"] == {"ok/a.dcm": None, "Doe^Jane": "unreadable_folder"}
        reason, detail = out["bad"]["Doe^Jane"]
        assert reason == "unreadable_folder"
        assert "could not be listed" in detail and "Doe" not in detail
        drop.chmod(0o000)
        root = _list_unprivileged(drop)
        assert root["error"].startswith("DropFolderError: the drop folder may not be listed (permission denied)")
    finally:
        for folder in (base, *base.rglob("*")):
            if folder.is_dir() and not folder.is_symlink():
                folder.chmod(0o755)
        import shutil

        shutil.rmtree(base)
