"""Scanning a drop against the previous manifest: what is new or changed, on a real drop folder
(a 3-slice DICOM study, a NIfTI image/label pair, one unreadable file, one ignored file)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np
import pytest

from mvl_pipeline.core import pseudonyms
from mvl_pipeline.core.volume import Volume, affine_from_geometry
from mvl_pipeline.datasets.drop import DropFolderDataset
from mvl_pipeline.dicom.write import dataset_bytes, series_uids, write_image_series
from mvl_pipeline.formats.nifti import encode_nifti
from mvl_pipeline.ingestion.config import IngestConfig
from mvl_pipeline.ingestion.manifest import unit_entry
from mvl_pipeline.ingestion.result import UnitResult
from mvl_pipeline.ingestion.scan import failed_internally, scan_drop

CONFIG = IngestConfig.from_params({"labels": {"organ": 1}})
KEY = bytes.fromhex(secrets.token_hex(32))
UIDS = series_uids("scan-test", "study-1", n_slices=3)
SLICES = [f"study/IM{k}" for k in range(3)]
IMAGE, LABEL = "vol/x_image.nii.gz", "vol/x_label.nii.gz"
JUNK = "junk/garbage.dcm"


def study_files(seed: int = 0) -> dict[str, bytes]:
    array = np.random.default_rng(seed).integers(-1000, 1000, (6, 5, 3)).astype(np.float32)
    volume = Volume(array, affine_from_geometry((0.8, 0.9, 2.0)))
    datasets = write_image_series(volume, header={"PatientID": "P1"}, uids=UIDS)
    return {relpath: dataset_bytes(ds) for relpath, ds in zip(SLICES, datasets, strict=True)}


def nifti(array: np.ndarray) -> bytes:
    return encode_nifti(Volume(array, np.eye(4)), compress=True)


def label_array(size: int) -> np.ndarray:
    label = np.zeros((8, 8, 8), np.uint8)
    label[2 : 2 + size, 2 : 2 + size, 2 : 2 + size] = 1
    return label


@pytest.fixture
def drop(tmp_path) -> Path:
    files = {
        **study_files(),
        IMAGE: nifti(np.random.default_rng(1).normal(size=(8, 8, 8)).astype(np.float32)),
        LABEL: nifti(label_array(3)),
        JUNK: b"%PDF-1.4\n" + bytes(300),  # a PDF saved with a .dcm name
        "README.txt": b"collected by the hospital\n",
    }
    DropFolderDataset(filepath=str(tmp_path / "drop")).save(files)
    return tmp_path / "drop"


def scan(folder: Path, manifest=None, *, force: bool = False):
    listing = DropFolderDataset(filepath=str(folder)).load()
    return scan_drop(listing, manifest or {}, KEY, CONFIG, None, force=force)


def manifest_after(result, quarantined_reason: dict[str, str] | None = None) -> dict:
    """The manifest ingest would write after processing ``result.todo`` (as ingestion/run.py)."""
    units = {}
    for unit, ukey, source_hash in result.todo:
        reason = (quarantined_reason or {}).get(unit.kind)
        quarantined = [{"reason": reason, "detail": "x"}] if reason else []
        units[ukey] = unit_entry(UnitResult(unit=ukey, quarantined=quarantined), source_hash, unit.kind)
    return {"version": 1, "files": result.files, "units": units}


def kinds(result) -> dict[str, tuple[str, ...]]:
    return {unit.kind: unit.files for unit, _, _ in result.todo}


def test_first_scan_finds_every_unit_to_do_and_ignores_bookkeeping_files(drop):
    result = scan(drop)
    assert kinds(result) == {"dicom": tuple(SLICES), "volume": (IMAGE, LABEL), "bad_file": (JUNK,)}
    assert result.n_files == 6 and result.n_units == 3  # README.txt is neither a file nor a unit
    assert result.live_units == {ukey for _, ukey, _ in result.todo}
    dicom_key = pseudonyms.unit_key(KEY, "dicom", UIDS.study)
    assert dicom_key in result.live_units
    assert {result.files[pseudonyms.file_key(KEY, p)]["unit"] for p in SLICES} == {dicom_key}


def test_keys_and_hashes_in_the_scan_carry_no_raw_path_or_uid(drop):
    result = scan(drop)
    text = repr((result.files, [(ukey, source_hash) for _, ukey, source_hash in result.todo]))
    assert "study/IM0" not in text and "x_image" not in text and UIDS.study not in text


def test_an_unreadable_file_is_a_bad_file_unit_with_its_reason(drop):
    [(unit, _, _)] = [t for t in scan(drop).todo if t[0].kind == "bad_file"]
    assert (unit.source_id, unit.error_reason) == (JUNK, "not_dicom")
    assert unit.error_detail == "file could not be read as DICOM"


def test_a_dicom_file_without_study_uid_is_a_missing_study_uid_bad_file(drop):
    no_study = write_image_series(
        Volume(np.ones((4, 4, 1), np.float32), np.eye(4)), header={}, uids=series_uids("o", "p", n_slices=1)
    )[0]
    del no_study.StudyInstanceUID
    DropFolderDataset(filepath=str(drop)).save({"other/IM0": dataset_bytes(no_study)})
    bad = {u.source_id: u for u, _, _ in scan(drop).todo if u.kind == "bad_file"}
    assert bad["other/IM0"].error_reason == "missing_study_uid"
    assert JUNK in bad  # the other bad file is still reported


def test_rescan_with_the_manifest_of_the_first_run_has_nothing_to_do(drop):
    first = scan(drop)
    second = scan(drop, manifest_after(first))
    assert second.todo == []
    assert second.files == first.files
    assert second.live_units == first.live_units and second.n_units == 3


def test_touching_files_without_changing_content_is_not_new_work(drop):
    first = scan(drop)
    for relpath in (SLICES[1], IMAGE, JUNK):
        stat = (drop / relpath).stat()
        os.utime(drop / relpath, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = scan(drop, manifest_after(first))
    assert second.todo == []
    touched = pseudonyms.file_key(KEY, IMAGE)
    assert second.files[touched]["fingerprint"] != first.files[touched]["fingerprint"]
    assert second.files[touched]["content"] == first.files[touched]["content"]


def rewrite(drop: Path, files: dict[str, bytes]) -> None:
    DropFolderDataset(filepath=str(drop)).save(files)
    for relpath in files:  # a later mtime even on a coarse clock, as a real copy would give
        stat = (drop / relpath).stat()
        os.utime(drop / relpath, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2 * 10**9))


def test_a_changed_dicom_slice_redoes_its_whole_study_only(drop):
    first = scan(drop)
    rewrite(drop, {SLICES[2]: study_files(seed=5)[SLICES[2]]})
    second = scan(drop, manifest_after(first))
    [(unit, ukey, source_hash)] = second.todo
    assert (unit.kind, unit.files) == ("dicom", tuple(SLICES))  # unchanged slices come along
    assert ukey == pseudonyms.unit_key(KEY, "dicom", UIDS.study)
    assert source_hash != dict((k, h) for _, k, h in first.todo)[ukey]


def test_a_changed_label_redoes_its_pair_only(drop):
    first = scan(drop)
    rewrite(drop, {LABEL: nifti(label_array(4))})
    [(unit, _, _)] = scan(drop, manifest_after(first)).todo
    assert (unit.kind, unit.files) == ("volume", (IMAGE, LABEL))


def test_a_new_slice_of_a_known_study_redoes_that_study(drop):
    first = scan(drop)
    DropFolderDataset(filepath=str(drop)).save({"study/copy/IM2": study_files()[SLICES[2]]})
    [(unit, _, _)] = scan(drop, manifest_after(first)).todo
    assert (unit.kind, unit.files) == ("dicom", (*SLICES, "study/copy/IM2"))


def test_force_redoes_every_study_and_image_label_pair_still_in_the_drop(drop):
    first = scan(drop)
    forced = scan(drop, manifest_after(first), force=True)
    redone = {ukey: (unit.files, source_hash) for unit, ukey, source_hash in forced.todo}
    for unit, ukey, source_hash in first.todo:
        assert redone[ukey] == (unit.files, source_hash)  # same unit, same key and hash
    # the unreadable file too: it was once dropped from a forced re-ingest (never re-quarantined)
    assert "bad_file" in kinds(forced)


def test_an_unreadable_file_whose_record_was_lost_is_quarantined_again(drop):
    """A run interrupted after a batch saved the files section but not every unit's result:
    the next scan must redo the unreadable file's unit, not drop it from the report."""
    first = scan(drop)
    manifest = manifest_after(first)
    bad_key = next(ukey for unit, ukey, _ in first.todo if unit.kind == "bad_file")
    del manifest["units"][bad_key]
    assert kinds(scan(drop, manifest)) == {"bad_file": (JUNK,)}


@pytest.mark.parametrize("kind", ["dicom", "volume", "bad_file"])
def test_a_unit_whose_last_result_was_internal_error_is_retried_and_only_it(drop, kind):
    first = scan(drop)
    second = scan(drop, manifest_after(first, {kind: "internal_error"}))
    assert kinds(second) == {kind: kinds(first)[kind]}


def test_a_unit_quarantined_for_its_data_is_not_retried(drop):
    first = scan(drop)
    assert scan(drop, manifest_after(first, {"dicom": "too_few_slices", "volume": "empty_image"})).todo == []


def test_a_unit_with_no_result_in_the_manifest_is_done(drop):
    first = scan(drop)
    manifest = manifest_after(first)
    dicom_key = pseudonyms.unit_key(KEY, "dicom", UIDS.study)
    del manifest["units"][dicom_key]
    assert kinds(scan(drop, manifest)) == {"dicom": tuple(SLICES)}


def test_files_that_left_the_drop_are_not_work_and_their_unit_is_no_longer_live(drop):
    first = scan(drop)
    (drop / IMAGE).unlink()
    (drop / LABEL).unlink()
    second = scan(drop, manifest_after(first))
    assert second.todo == []
    volume_key = next(k for u, k, _ in first.todo if u.kind == "volume")
    assert volume_key not in second.live_units and second.n_units == 2
    assert pseudonyms.file_key(KEY, IMAGE) not in second.files


def test_failed_internally_looks_only_for_internal_error_records():
    assert failed_internally({"quarantined": [{"reason": "not_dicom"}, {"reason": "internal_error"}]})
    assert not failed_internally({"quarantined": [{"reason": "not_dicom"}]})
    assert not failed_internally({"quarantined": [], "skipped": [{"reason": "internal_error"}]})
    assert not failed_internally({})


def test_a_value_pydicom_cannot_decode_and_entries_that_are_not_files_are_bad_file_units(drop):
    """pydicom decodes a value when it is first read, after its reader returned: a Study Instance
    UID written with a wrong VR raised out of the scan and stopped the whole ingest (an audit,
    2026-12-04). Now that file, a dangling link and a name with a backslash are each a bad_file
    unit, the rest of the drop is scanned as before, and a second scan keeps them as they are."""
    from pydicom.data import get_testdata_file

    data = bytearray(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    at = data.find(b"\x20\x00\x0d\x00UI")  # (0020,000D) in explicit VR little endian
    data[at + 4 : at + 6] = b"FD"  # 44 bytes are no whole number of 8-byte floats
    (drop / "wrong_vr.dcm").write_bytes(bytes(data))
    (drop / "gone.dcm").symlink_to(drop / "nowhere")
    (drop / "a\\b.dcm").write_bytes(b"x")
    first = scan(drop)
    bad = {unit.files: unit.error_reason for unit, _, _ in first.todo if unit.kind == "bad_file"}
    assert bad == {("wrong_vr.dcm",): "unreadable_file", ("gone.dcm",): "broken_link",
                   ("a\\b.dcm",): "invalid_path", (JUNK,): "not_dicom"}  # fmt: skip
    assert sorted(u.kind for u, _, _ in first.todo) == ["bad_file"] * 4 + ["dicom", "volume"]
    assert scan(drop, manifest_after(first)).todo == []


def test_units_a_cut_off_run_left_pending_are_done_though_nothing_changed(drop):
    """A run saves its manifest with every batch, and that manifest already holds every file's new
    fingerprint (and the run's settings): a unit not yet processed when the run was cut off looked
    unchanged to the next scan, and kept its old result for good (an audit, 2026-12-07: a new
    SEG for a study, or a re-ingest under new settings, never came). Listed as pending, it is done."""
    first = scan(drop)
    manifest = manifest_after(first)
    assert scan(drop, manifest).todo == []
    dicom_key = pseudonyms.unit_key(KEY, "dicom", UIDS.study)
    volume_key = next(k for u, k, _ in first.todo if u.kind == "volume")
    manifest["pending"] = [dicom_key, volume_key]
    assert kinds(scan(drop, manifest)) == {"dicom": tuple(SLICES), "volume": (IMAGE, LABEL)}
