"""CaseStoreDataset: partitioned cases on tmp_path and on S3, atomic per case, lazy loading."""

from __future__ import annotations

import numpy as np
import pytest
from kedro.io import DatasetError

from mvl_pipeline.core import storage
from mvl_pipeline.core.case import Case
from mvl_pipeline.core.errors import LabelGridMismatchError
from mvl_pipeline.core.volume import Volume, affine_from_geometry
from mvl_pipeline.datasets.case_store import CaseStoreDataset


def make_case(case_id: str, seed: int = 0, shape=(12, 10, 6)) -> Case:
    rng = np.random.default_rng(seed)
    affine = affine_from_geometry((0.7, 0.8, 3.0), origin=(-10.0, 4.0, 2.5))
    image = Volume(rng.normal(size=shape).astype(np.float32), affine, {"modality": "CT"})
    label = Volume(rng.integers(0, 3, size=shape).astype(np.uint8), affine, {})
    return Case(case_id, "pt-0001", image, label, {"modality": "CT", "label_names": {"1": "organ"}})


def assert_same(a: Case, b: Case) -> None:
    assert (a.case_id, a.patient_id, dict(a.meta)) == (b.case_id, b.patient_id, dict(b.meta))
    assert np.array_equal(np.asarray(a.image.array), np.asarray(b.image.array))
    assert np.array_equal(np.asarray(a.label.array), np.asarray(b.label.array))
    assert np.allclose(a.image.affine, b.image.affine, atol=0)  # exact float64 geometry


@pytest.mark.parametrize("fmt", ["nifti", "npy"])
def test_round_trip_on_disk(tmp_path, fmt):
    store = CaseStoreDataset(path=str(tmp_path / "cases"), format=fmt)
    cases = {c: make_case(c, i) for i, c in enumerate(["case-a", "case-b"])}
    store.save(cases)
    loaders = store.load()
    assert sorted(loaders) == ["case-a", "case-b"]
    for case_id, loader in loaders.items():
        assert_same(loader(), cases[case_id])


@pytest.mark.parametrize("fmt", ["nifti", "npy"])
def test_round_trip_on_s3(s3_bucket, fmt):
    store = CaseStoreDataset(path=f"s3://{s3_bucket['bucket']}/cases", format=fmt,
                             credentials=s3_bucket["credentials"])  # fmt: skip
    case = make_case("case-s3", 3)
    store.save({"case-s3": case})
    assert_same(store.load()["case-s3"](), case)
    assert "secret" not in str(store._describe()) and "testing" not in str(store._describe())


def test_saving_some_cases_leaves_the_others_and_none_deletes(tmp_path):
    store = CaseStoreDataset(path=str(tmp_path / "cases"))
    store.save({"case-a": make_case("case-a"), "case-b": make_case("case-b", 1)})
    before = (tmp_path / "cases" / "case-a" / "image.nii.gz").read_bytes()
    store.save({"case-b": lambda: make_case("case-b", 2)})  # lazy values are saved too
    assert (tmp_path / "cases" / "case-a" / "image.nii.gz").read_bytes() == before
    assert_same(store.load()["case-b"](), make_case("case-b", 2))
    store.save({"case-a": None})
    assert sorted(store.load()) == ["case-b"]


@pytest.mark.parametrize("crashing", ["case-a", "case-new"])
def test_a_crash_mid_save_leaves_nothing_a_later_load_accepts(tmp_path, monkeypatch, crashing):
    """The second file of ``crashing`` fails (its label, after its image): a replaced case keeps
    its old version whole, a new one stays invisible; cases saved before it in the same call stay
    saved. (An OSError here; the test after the next kills a real saver mid-case.)"""
    store = CaseStoreDataset(path=str(tmp_path / "cases"))
    store.save({"case-a": make_case("case-a")})
    calls = {"n": 0}
    original = store._put

    def failing_put(path, payload):
        if f"{crashing}" in path:
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError("disk full")
        original(path, payload)

    monkeypatch.setattr(store, "_put", failing_put)
    with pytest.raises(DatasetError, match="disk full"):  # Kedro wraps the OSError
        store.save({"case-a": make_case("case-a", 9), "case-new": make_case("case-new")})
    monkeypatch.undo()
    assert calls["n"] == 2  # the crash came where it was meant to, mid-case
    store = CaseStoreDataset(path=str(tmp_path / "cases"))
    loaders = store.load()
    assert sorted(loaders) == ["case-a"]  # the new case is invisible, not half-read
    with pytest.raises(DatasetError, match="missing or incomplete"):
        store.load_case("case-new")
    # case-a crashed: its old version stays whole; case-new crashed: case-a, saved before it, stays saved
    assert_same(loaders["case-a"](), make_case("case-a") if crashing == "case-a" else make_case("case-a", 9))


def test_folders_without_the_completion_marker_are_ignored(tmp_path):
    store = CaseStoreDataset(path=str(tmp_path / "cases"))
    store.save({"case-a": make_case("case-a")})
    (tmp_path / "cases" / "case-a" / storage.COMPLETE_MARKER).unlink()
    assert store.load() == {}
    with pytest.raises(DatasetError, match="incomplete"):
        store.load_case("case-a")


def test_bad_keys_and_values_are_refused(tmp_path):
    store = CaseStoreDataset(path=str(tmp_path / "cases"))
    with pytest.raises(DatasetError, match="invalid case id"):
        store.save({"../escape": make_case("../escape")})
    with pytest.raises(DatasetError, match="does not match"):
        store.save({"case-a": make_case("case-b")})
    with pytest.raises(DatasetError, match="expected a Case"):
        store.save({"case-a": {"not": "a case"}})
    with pytest.raises(DatasetError, match="format"):
        CaseStoreDataset(path=str(tmp_path), format="dicom")


def test_a_label_off_the_image_grid_is_refused_when_the_case_is_built():
    case = make_case("case-a")
    moved = case.image.affine.copy()
    moved[:3, 3] += 5.0  # same shape, 5 mm elsewhere
    shifted = Volume(np.asarray(case.label.array), moved, {})
    with pytest.raises(LabelGridMismatchError):
        Case("case-a", "pt", case.image, shifted)


@pytest.mark.parametrize("fmt", ["nifti", "npy"])
def test_a_multi_channel_case_round_trips_channel_first(tmp_path, fmt):
    import nibabel as nib

    single = make_case("case-mc", 3)
    image = Volume(np.stack([single.image.array, -2 * single.image.array]), single.image.affine, {"modality": "MR"})
    case = Case("case-mc", "pt-0001", image, single.label, {"modality": "MR", "channels": [{"name": "t1"}, {"name": "t2"}]})
    store = CaseStoreDataset(path=str(tmp_path / "cases"), format=fmt)
    store.save({"case-mc": case})
    loaded = store.load()["case-mc"]()
    assert loaded.image.array.shape == (2, 12, 10, 6) and loaded.image.shape == (12, 10, 6)
    assert_same(loaded, case)
    if fmt == "nifti":  # on disk a viewer sees NIfTI's 4-D layout: (X, Y, Z, channel)
        stored = nib.load(tmp_path / "cases" / "case-mc" / "image.nii.gz")
        assert stored.shape == (12, 10, 6, 2)
        np.testing.assert_array_equal(np.asarray(stored.dataobj)[..., 1], case.image.array[1])


_KILLED_MID_DELETE = r"""
import os, signal, sys
from mvl_pipeline.datasets.case_store import CaseStoreDataset
unlink = os.unlink
def unlink_then_die(path, *args, **kwargs):  # SIGKILL right after the deletion's first file
    unlink(path, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
os.unlink = unlink_then_die
CaseStoreDataset(path=sys.argv[1]).save({"case-a": None})
"""


def test_a_process_killed_while_deleting_a_case_leaves_no_listed_half_case(tmp_path):
    """SIGKILL in the middle of a case's removal (ingest removes a stale case, preprocess a held-out
    one): removing the files in place left ``_COMPLETE`` behind with a volume gone, a case that
    the next run listed and could not load (an audit, 2026-12-04, 6 of 6 tries). The folder is now
    renamed away first: the killed removal leaves a hidden temporary, which loaders skip and
    ``remove_temporaries`` clears."""
    import subprocess
    import sys

    root = tmp_path / "cases"
    store = CaseStoreDataset(path=str(root))
    store.save({"case-a": make_case("case-a"), "case-b": make_case("case-b", 1)})
    done = subprocess.run([sys.executable, "-c", _KILLED_MID_DELETE, str(root)], capture_output=True, timeout=120, check=False)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    assert [p.name for p in root.iterdir() if p.name.startswith(".case-a.old-")]  # killed half-way
    assert sorted(CaseStoreDataset(path=str(root)).load()) == ["case-b"]
    assert storage.remove_temporaries(str(root)) == 1
    assert sorted(p.name for p in root.iterdir()) == ["case-b"]


_KILLED_MID_SAVE = r"""
import os, signal, sys
import numpy as np
from mvl_pipeline.core.case import Case
from mvl_pipeline.core.volume import Volume, affine_from_geometry
from mvl_pipeline.datasets.case_store import CaseStoreDataset
store = CaseStoreDataset(path=sys.argv[1])
put = store._put
def put_then_die(path, payload):  # SIGKILL right after case-new's first file (its image)
    put(path, payload)
    if "case-new" in path:
        os.kill(os.getpid(), signal.SIGKILL)
store._put = put_then_die
affine = affine_from_geometry((0.7, 0.8, 3.0), origin=(-10.0, 4.0, 2.5))
image = Volume(np.zeros((12, 10, 6), np.float32), affine, {"modality": "CT"})
store.save({"case-new": Case("case-new", "pt-0002", image, Volume(np.zeros((12, 10, 6), np.uint8), affine, {}), {})})
"""


def test_a_saver_killed_mid_case_leaves_a_temporary_no_load_lists(tmp_path):
    """SIGKILL between a new case's image and the rest of it: the next process lists only the
    cases that were whole, refuses the half case by name, and clears its temporary."""
    import subprocess
    import sys

    root = tmp_path / "cases"
    CaseStoreDataset(path=str(root)).save({"case-a": make_case("case-a")})
    done = subprocess.run([sys.executable, "-c", _KILLED_MID_SAVE, str(root)], capture_output=True, timeout=120, check=False)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    assert any("case-new" in p.name and p.name != "case-new" for p in root.iterdir())  # killed half-way
    store = CaseStoreDataset(path=str(root))
    loaders = store.load()
    assert sorted(loaders) == ["case-a"]
    assert_same(loaders["case-a"](), make_case("case-a"))
    with pytest.raises(DatasetError, match="missing or incomplete"):
        store.load_case("case-new")
    assert storage.remove_temporaries(str(root)) == 1
    assert sorted(p.name for p in root.iterdir()) == ["case-a"]


_KILLED_MID_SWAP = r"""
import os, signal, sys
import numpy as np
from mvl_pipeline.core.case import Case
from mvl_pipeline.core.volume import Volume, affine_from_geometry
from mvl_pipeline.datasets.case_store import CaseStoreDataset
replace = os.replace
def replace_then_die(src, dst, *args, **kwargs):  # SIGKILL between the swap's two renames
    replace(src, dst, *args, **kwargs)
    if ".old-" in os.path.basename(dst):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace_then_die
affine = affine_from_geometry((0.7, 0.8, 3.0), origin=(-10.0, 4.0, 2.5))
image = Volume(np.full((12, 10, 6), 7.0, np.float32), affine, {"modality": "CT"})
label = Volume(np.ones((12, 10, 6), np.uint8), affine, {})
CaseStoreDataset(path=sys.argv[1]).save({"case-a": Case("case-a", "pt-0001", image, label, {"modality": "CT"})})
"""


def test_a_saver_killed_between_the_swaps_two_renames_loses_neither_version(tmp_path):
    """A case replaced by a new version: the old folder is renamed away, then the new one into
    place. SIGKILL between the two left no case-a, and the sweep of temporaries deleted both
    versions (an audit, 2026-12-07). The sweep now puts the complete new version in place."""
    import subprocess
    import sys

    root = tmp_path / "cases"
    CaseStoreDataset(path=str(root)).save({"case-a": make_case("case-a")})
    done = subprocess.run([sys.executable, "-c", _KILLED_MID_SWAP, str(root)], capture_output=True, timeout=120, check=False)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    assert not (root / "case-a").exists()  # killed between the renames
    assert storage.remove_temporaries(str(root)) == 1  # the old version's folder
    case = CaseStoreDataset(path=str(root)).load_case("case-a")
    assert np.all(np.asarray(case.image.array) == 7.0)  # the new version, whole
    assert sorted(p.name for p in root.iterdir()) == ["case-a"]


def test_removing_a_case_on_s3_takes_its_completion_marker_first(s3_bucket):
    """On an object store there is no rename: the marker goes before the objects it vouches for.
    The removal of the objects is watched on the real (moto) store: the marker is already gone."""
    store = CaseStoreDataset(path=f"s3://{s3_bucket['bucket']}/gone", credentials=s3_bucket["credentials"])
    store.save({"case-a": make_case("case-a"), "case-b": make_case("case-b", 1)})
    marker = f"{s3_bucket['bucket']}/gone/case-a/{storage.COMPLETE_MARKER}"
    assert store._fs.exists(marker)
    remove, marker_at_removal = store._fs.rm, []

    def watched(path, *args, **kwargs):
        marker_at_removal.append(store._fs.exists(marker))
        return remove(path, *args, **kwargs)

    store._fs.rm = watched
    store.save({"case-a": None})
    store._fs.rm = remove
    assert marker_at_removal == [False]
    assert sorted(store.load()) == ["case-b"]
    assert not store._fs.exists(f"{s3_bucket['bucket']}/gone/case-a")
