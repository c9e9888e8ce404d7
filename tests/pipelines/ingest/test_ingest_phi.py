"""No identifier planted in a drop (headers, private tags, file and folder names, UIDs) survives
ingest: a byte-level scan of every output file (gzip layers opened) and of everything logged,
printed or warned during the run finds none of them."""

from __future__ import annotations

import gzip
import io
import logging
import logging.config
import shutil
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
import yaml
from ingest_support import KEY, PROJECT, drop_files, ingest_params, run_ingest, write_drop
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from mvl_pipeline.core import pseudonyms
from mvl_pipeline.datasets.drop import encode_file

PLANTED = {
    "PatientName": "Zyxwvut^Qwertyson",
    "PatientID": "MRN-PLANTED-4711",
    "PatientBirthDate": "19230405",
    "AccessionNumber": "ACC-PLANTED-0815",
    "InstitutionName": "Xanadu Planted Infirmary",
    "InstitutionAddress": "7 Plantedway, Quuxville",
    "ReferringPhysicianName": "Vonplanted^Quirinius",
    "OperatorsName": "Techplanted^Ursula",
    "StudyID": "STUDY-PLANTED-55",
    "OtherPatientIDs": "OTHER-PLANTED-ID-99",
}
PRIVATE_TEXT = "PLANTED-PRIVATE-9931 Zyxwvut Qwertyson, born 1923-04-05"
FOLDER = "Zyxwvut_Qwertyson_scan"
#: What must never appear in any output or log (compared case-insensitively).
#: ("planted" covers every *-PLANTED-* value; bare short numbers would match hex digests and
#: mtimes in the manifest by chance, so digits are searched only with their prefixes.)
TOKENS = (
    "zyxwvut", "qwertyson", "planted", "19230405", "1923-04-05", "quirinius", "quuxville",
    "ursula", "xanadu",
)  # fmt: skip
_WELL_KNOWN = "1.2.840.10008."


def _plant(ds: Dataset) -> Dataset:
    for keyword, value in PLANTED.items():
        setattr(ds, keyword, value)
    ds.private_block(0x0011, "PLANTED SITE", create=True).add_new(0x01, "LO", PRIVATE_TEXT)
    return ds


def _planted_study(
    study, folder: str, *, drop_slice: int | None = None, with_seg: bool = True
) -> dict[str, bytes]:
    """The study's files with planted identity, under ``folder`` with identifying file names."""
    files = {}
    slices = [study.slice_relpath(k) for k in range(len(study.sop_uids))]
    for k, relpath in enumerate(slices):
        if k == drop_slice:
            continue
        ds = _plant(pydicom.dcmread(io.BytesIO(study.files[relpath])))
        files[f"{folder}/Qwertyson_slice_{k:02d}.dcm"] = encode_file(ds)
    if with_seg:
        (seg_path,) = set(study.files) - set(slices)
        seg = _plant(pydicom.dcmread(io.BytesIO(study.files[seg_path])))
        files[f"{folder}/Qwertyson_segmentation.dcm"] = encode_file(seg)
    return files


def _raw_uids(files: dict[str, bytes]) -> set[str]:
    """Every instance UID in the drop's DICOM files (study, series, SOP, frame of reference ...)."""
    uids: set[str] = set()

    def collect(ds: Dataset) -> None:
        for element in ds.iterall():
            if element.VR == "UI" and element.value:
                values = (
                    element.value
                    if isinstance(element.value, list | pydicom.multival.MultiValue)
                    else [element.value]
                )
                uids.update(str(v) for v in values if not str(v).startswith(_WELL_KNOWN))

    for relpath, data in files.items():
        if relpath.endswith(".dcm"):
            try:
                ds = pydicom.dcmread(io.BytesIO(data), force=True)
            except Exception:  # noqa: BLE001 - the deliberately truncated file
                continue
            collect(ds)
            uids.add(str(ds.file_meta.get("MediaStorageSOPInstanceUID", "")))
            implementation = str(ds.file_meta.get("ImplementationClassUID", ""))
            uids.discard(implementation)  # the writing software's UID, not an identifier
    uids.discard("")
    assert len(uids) > 30
    return uids


def _readable_layers(path: Path) -> list[bytes]:
    """The file's bytes, plus the decompressed bytes of a gzip file (.nii.gz)."""
    data = path.read_bytes()
    layers = [data]
    if data[:2] == b"\x1f\x8b":
        layers.append(gzip.decompress(data))
    return layers


@pytest.fixture
def project_logging(tmp_path) -> Iterator[Path]:
    """The project's conf/logging.yml (console + info.log, levels per logger), info.log in tmp."""
    config = yaml.safe_load((PROJECT / "conf" / "logging.yml").read_text())
    logfile = tmp_path / "logs" / "info.log"
    logfile.parent.mkdir()
    config["handlers"]["info_file_handler"]["filename"] = str(logfile)
    config["handlers"]["info_file_handler"]["delay"] = False
    # the console handler writes to file descriptor 1 itself (capfd reads it there), not to
    # whichever sys.stdout replacement pytest has installed while this fixture is set up
    config["handlers"]["console"]["stream"] = "ext://sys.__stdout__"
    root = logging.getLogger()
    saved_root = (root.level, list(root.handlers))
    saved = {name: logging.getLogger(name).level for name in config["loggers"]}
    logging.config.dictConfig(config)
    try:
        yield logfile
    finally:
        for handler in root.handlers:
            if handler not in saved_root[1]:
                handler.close()
        root.handlers[:] = saved_root[1]
        root.setLevel(saved_root[0])
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


@pytest.fixture(scope="module")
def planted_drop(tmp_path_factory, sample_studies) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("phi") / "drop"
    files: dict[str, bytes] = {}
    files |= _planted_study(sample_studies[0], f"{FOLDER}/MRN-PLANTED-4711_baseline")
    files |= _planted_study(sample_studies[1], f"{FOLDER}/MRN-PLANTED-4711_missing", drop_slice=5)
    files |= _planted_study(
        sample_studies[2], f"{FOLDER}/ACC-PLANTED-0815_unlabelled", with_seg=False
    )
    # one truncated copy of a planted slice, and planted non-image / no-decoder objects
    slice_bytes = files[f"{FOLDER}/MRN-PLANTED-4711_baseline/Qwertyson_slice_00.dcm"]
    files[f"{FOLDER}/Zyxwvut_broken_MRN-PLANTED-4711.dcm"] = slice_bytes[: len(slice_bytes) // 2]
    for name in ("rtplan.dcm", "JPEG-lossy.dcm"):
        ds = _plant(pydicom.dcmread(get_testdata_file(name)))
        files[f"{FOLDER}/Zyxwvut_{name}"] = encode_file(ds)
    # a NIfTI pair whose file names carry the identity
    truth = sample_studies[3]
    image = nib.Nifti1Image(truth.image.array.astype(np.int16), truth.image.affine)
    label = nib.Nifti1Image(truth.label.array, truth.image.affine)
    stem = f"{FOLDER}/volumes/Zyxwvut_Qwertyson_MRN-PLANTED-4711"
    image.header["descrip"] = b"Zyxwvut^Qwertyson MRN-PLANTED-4711"  # free text in the header
    files[f"{stem}_image.nii.gz"] = gzip.compress(image.to_bytes())
    files[f"{stem}_label.nii.gz"] = gzip.compress(label.to_bytes())
    # an NRRD pair without a 'space' field (the reader warns about it) and identifying names
    rng = np.random.default_rng(5)
    volume = rng.normal(300, 80, size=(16, 16, 10)).astype(np.int16)
    for suffix, array in (("image", volume), ("seg", (volume > 380).astype(np.uint8))):
        path = root.parent / f"nrrd_{suffix}.nrrd"
        nrrd.write(str(path), array, {"spacings": [1.5, 1.5, 3.0]})
        files[f"{FOLDER}/Qwertyson_nrrd_{suffix}.nrrd"] = path.read_bytes()
    files |= drop_files(sample_studies[4])  # an ordinary study beside them
    write_drop(root, files)
    return root, files


@pytest.mark.parametrize("keep_unlabelled", [False, True], ids=["labelled-only", "keep-unlabelled"])
def test_no_identifier_survives_in_outputs_or_logs(
    tmp_path, planted_drop, sample_studies, capfd, project_logging, caplog, recwarn, keep_unlabelled
):
    drop, files = planted_drop
    everything = b"\n".join(files.values()).lower() + "\n".join(files).lower().encode()
    assert [t for t in TOKENS if t.encode() not in everything] == []  # they really are planted
    uids = _raw_uids(files)

    caplog.set_level(logging.DEBUG, logger="mvl_pipeline")  # our own code: even its debug lines
    params = ingest_params(keep_unlabelled=keep_unlabelled, progress=True)
    run = run_ingest(drop, tmp_path / "data", params)

    # the run did its work: planted studies ingested, problems recorded
    expected_cases = {
        pseudonyms.case_pseudonym(KEY, s.study_uid, s.series_uid)
        for s in sample_studies[:1] + sample_studies[4:]
    }
    reasons = sorted(r["reason"] for r in run.quarantine)
    if keep_unlabelled:
        expected_cases.add(sample_studies[2].case_id)
        assert reasons == ["missing_slices", "no_decoder", "unreadable_file"]
    else:
        assert reasons == ["missing_slices", "unreadable_file"]
    volume_cases = {
        pseudonyms.case_pseudonym(
            KEY, "volume", f"{FOLDER}/volumes/Zyxwvut_Qwertyson_MRN-PLANTED-4711_image.nii.gz"
        ),
        pseudonyms.case_pseudonym(KEY, "volume", f"{FOLDER}/Qwertyson_nrrd_image.nrrd"),
    }
    assert set(run.case_ids()) == expected_cases | volume_cases
    header = run.case(sample_studies[0].case_id).meta["deidentified_header"]
    assert header["00120062"]["Value"] == ["YES"]  # PatientIdentityRemoved
    assert header["00100010"]["Value"][0]["Alphabetic"].startswith("case-")  # a pseudonym

    outputs = [p for p in sorted(run.root.rglob("*")) if p.is_file()]
    assert {p.name for p in outputs} >= {
        "image.nii.gz", "label.nii.gz", "case.json", "ingest_manifest.json", "quarantine.json",
        "ingest_summary.csv",
    }  # fmt: skip
    captured = capfd.readouterr()
    logs = "\n".join(
        [r.getMessage() for r in caplog.records] + [str(w.message) for w in recwarn]
        + [captured.out, captured.err, project_logging.read_text()]
    )  # fmt: skip
    # all three channels were really captured: records, the console handler, the progress bar
    assert "ingest summary" in project_logging.read_text()
    assert "ingest summary" in captured.out and "ingest:" in captured.err
    assert any(r.name.startswith("mvl_pipeline") for r in caplog.records)

    texts = {
        f"{p.relative_to(run.root)}#{layer}": data
        for p in outputs
        for layer, data in enumerate(_readable_layers(p))
    }
    assert len(texts) > len(outputs)  # the .nii.gz files were also read decompressed
    texts["<logs>"] = logs.encode()
    texts["<output paths>"] = "\n".join(str(p.relative_to(run.root)) for p in outputs).encode()
    leaks = [
        (where, token)
        for where, data in texts.items()
        for token in TOKENS
        if token.encode() in data.lower()
    ]
    if leaks:  # name the offending log lines in the failure
        bad = [line for line in logs.splitlines() if any(t in line.lower() for t in TOKENS)]
        pytest.fail(f"identifiers leaked: {sorted(set(leaks))}; log lines: {bad[:5]}")
    uid_leaks = [
        (where, uid) for where, data in texts.items() for uid in uids if uid.encode() in data
    ]
    assert uid_leaks == []


def test_logs_never_name_drop_paths_even_for_undecodable_files(tmp_path, project_logging, caplog):
    """A file that no plugin decodes goes through the decoder error path (it logs at DEBUG)."""
    drop = tmp_path / "drop"
    name = f"{FOLDER}/Zyxwvut_Qwertyson_MRN-PLANTED-4711.dcm"
    (drop / FOLDER).mkdir(parents=True)
    shutil.copy(get_testdata_file("JPEG2000-embedded-sequence-delimiter.dcm"), drop / name)
    caplog.set_level(logging.DEBUG, logger="mvl_pipeline")
    run = run_ingest(drop, tmp_path / "data", ingest_params(keep_unlabelled=True))
    assert [r["reason"] for r in run.quarantine] == ["no_decoder"]
    assert any(
        r.name.startswith("mvl_pipeline.dicom") for r in caplog.records
    )  # the decoder path logged
    text = "\n".join(
        [r.getMessage() for r in caplog.records] + [project_logging.read_text()]
    ).lower()
    assert "zyxwvut" not in text and "planted" not in text
