"""No identifier planted in a drop (headers, private tags, file and folder names, UIDs) survives
ingest: a byte-level scan of every output file (gzip layers opened) and of everything logged,
printed or warned during the run finds none of them."""

from __future__ import annotations

import gzip
import io
import logging
import logging.config
import re
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


# -- identity where the Annex E tables, the token search or the error paths did not look -------
#: A two-letter surname and given name: too short for a search of the whole case (codes such as
#: "MR" or "DA" would match), yet a name wherever free text of the source (a segment's label) goes.
SHORT_NAME = ("Xq", "Zv")
UMLAUT_NAME = ("Müllerplanted", "Jürgenplanted")
ODD_TOKENS = (
    "1341-09-19", "1400-01-02", "xq zv", "müllerplanted", "jürgenplanted", "m\\u00fcllerplanted",
    "j\\u00fcrgenplanted", "qwertyson", "zyxwvut", "planted", "2024-03-05",
)  # fmt: skip


def _restudy(study, folder: str, *, patient_name: str, segment_label: str | None = None, **values) -> dict[str, bytes]:
    """``study``'s files under ``folder`` with ``patient_name`` and ``values`` set on each, and the
    first segment of its SEG labelled ``segment_label``."""
    files = {}
    for relpath, data in study.files.items():
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: the umlauts are written as they are
        ds.PatientName = patient_name
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        if segment_label is not None and "SegmentSequence" in ds:
            ds.SegmentSequence[0].SegmentLabel = segment_label
        files[f"{folder}/{relpath.rsplit('/', 1)[-1]}"] = encode_file(ds)
    return files


def _text_in_integer_string(files: dict[str, bytes], value: str) -> dict[str, bytes]:
    """Every file with Series Number (an IS, an integer string) holding ``value`` instead."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    out = {}
    for relpath, data in files.items():
        ds = pydicom.dcmread(io.BytesIO(data))
        if "SegmentSequence" not in ds:  # the image slices
            raw = (value + " " * (len(value) % 2)).encode()
            ds[0x00200011] = RawDataElement(Tag(0x00200011), "IS", len(raw), raw, 0, False, True)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out[relpath] = buffer.getvalue()
    return out


@pytest.mark.parametrize("labels", ["project map", "source names"])
def test_identity_in_free_text_unlisted_tags_odd_paths_and_error_messages_never_leaks(
    tmp_path, sample_studies, capfd, project_logging, caplog, recwarn, labels
):
    """Found by an audit (2026-12-04), each reproduced before its fix: a birth date in an
    alternative calendar (0010,0033), missing from the Annex E tables the de-identification reads;
    a two-letter name in a SEG's segment label; an umlaut name in it (the guard searched
    ASCII-escaped JSON); a name in an integer field (the error echoed it); a backslash in a file
    name (the error quoting the path stopped the run); a detached NRRD header naming a data file
    by an absolute path; a dangling link. ``source names``: no project label map, so the
    segments' own names become the cases' label names."""
    drop = tmp_path / "drop"
    files: dict[str, bytes] = {}
    files |= _restudy(sample_studies[0], "a", patient_name="Zyxwvut^Qwertyson", PatientID="MRN-PLANTED-1",
                      PatientBirthDateInAlternativeCalendar="1341-09-19 AH",
                      PatientDeathDateInAlternativeCalendar="1400-01-02", PatientAlternativeCalendar="ISLAMIC")  # fmt: skip
    files |= _restudy(sample_studies[1], "b", patient_name="^".join(SHORT_NAME), PatientID="MRN-PLANTED-2",
                      segment_label=" ".join(SHORT_NAME) + " organ")  # fmt: skip
    files |= _restudy(sample_studies[2], "c", patient_name="^".join(UMLAUT_NAME), PatientID="MRN-PLANTED-3",
                      segment_label=" ".join(reversed(UMLAUT_NAME)) + " organ")  # fmt: skip
    # another person's name and a date in a segment's label: with the sources' own names, the
    # case keeps "label 1" instead (with a project map the name is matched, then dropped)
    other = {"segment_label": "Organ (Plantedperson, read 2024-03-05)"} if labels == "source names" else {}
    files |= _text_in_integer_string(
        _restudy(sample_studies[3], "d", patient_name="Qwertyson^Zyxwvut", PatientID="MRN-PLANTED-4", **other),
        "Qwertyson",
    )
    slice_bytes = next(iter(drop_files(sample_studies[4]).values()))
    files["f/Qwertyson_scan.nhdr"] = (
        b"NRRD0004\ntype: short\ndimension: 3\nsizes: 16 16 10\nspacings: 1.5 1.5 3\nencoding: raw\n"
        b"endian: little\ndata file: /mnt/pacs/Zyxwvut_Qwertyson_19230405/scan.raw\n\n"
    )
    path = tmp_path / "seg.nrrd"
    nrrd.write(str(path), np.zeros((16, 16, 10), np.uint8), {"spacings": [1.5, 1.5, 3.0]})
    files["f/Qwertyson_scan_label.nrrd"] = path.read_bytes()
    files |= drop_files(sample_studies[4])  # an ordinary study beside them
    write_drop(drop, files)
    (drop / "e").mkdir()  # written by hand: the drop dataset itself refuses such a name
    (drop / "e" / "Zyxwvut\\Qwertyson 19230405.dcm").write_bytes(slice_bytes)
    (drop / "g").mkdir()
    (drop / "g" / "Zyxwvut_Qwertyson.dcm").symlink_to(drop / "g" / "MRN-PLANTED-5 gone")

    caplog.set_level(logging.DEBUG, logger="mvl_pipeline")
    params = ingest_params(**({"labels": None} if labels == "source names" else {}))
    run = run_ingest(drop, tmp_path / "data", params)  # the run goes through: nothing stops it

    ingested = {sample_studies[k].case_id for k in (0, 3, 4)}
    if labels == "source names":  # B's label holds its patient's name; C's umlauts are not kept
        label_reasons = ["phi_guard"]
        ingested.add(sample_studies[2].case_id)
        assert run.case(sample_studies[2].case_id).meta["label_names"]["1"] == "label 1"
        assert run.case(sample_studies[3].case_id).meta["label_names"]["1"] == "label 1"
    else:  # neither name is in the project's map: quarantined, the name not quoted
        label_reasons = ["label_values_not_in_label_map"] * 2
    assert sorted(r["reason"] for r in run.quarantine) == sorted(
        ["broken_link", "invalid_path", "unreadable_file", *label_reasons]
    )
    assert set(run.case_ids()) == ingested
    header = run.case(sample_studies[0].case_id).meta["deidentified_header"]
    assert not {"00100033", "00100034", "00100035"} & set(header)  # the Patient module outside the tables
    assert "00200011" not in run.case(sample_studies[3].case_id).meta["deidentified_header"]  # the bad IS

    captured = capfd.readouterr()
    logs = "\n".join(
        [r.getMessage() for r in caplog.records] + [str(w.message) for w in recwarn]
        + [captured.out, captured.err, project_logging.read_text()]
    )  # fmt: skip
    texts = {
        f"{p.relative_to(run.root)}#{layer}": data
        for p in sorted(run.root.rglob("*"))
        if p.is_file()
        for layer, data in enumerate(_readable_layers(p))
    }
    texts["<logs>"] = logs.encode()
    texts["<output paths>"] = "\n".join(str(p.relative_to(run.root)) for p in run.root.rglob("*")).encode()
    leaks = sorted({(where, token) for where, data in texts.items() for token in ODD_TOKENS
                    if token.encode() in data.lower()})  # fmt: skip
    short = [where for where, data in texts.items() if not where.endswith(".nii.gz#0")
             and any(re.search(rf"(?<![a-z0-9]){n.lower()}(?![a-z0-9])", data.decode("utf-8", "replace").lower())
                     for n in SHORT_NAME)]  # fmt: skip
    assert leaks == [] and short == [], f"identifiers leaked: {leaks} {short}"
