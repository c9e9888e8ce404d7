"""De-identification (PS3.15 Annex E Basic Profile): planted PHI must be gone from the bytes."""

from __future__ import annotations

import secrets
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from mvl_pipeline.core.pseudonyms import PseudonymKeyError, require_key
from mvl_pipeline.core.volume import Volume, affine_from_geometry
from mvl_pipeline.dicom.assemble import assemble_series
from mvl_pipeline.dicom.deid import deidentify, map_uid, pseudonym
from mvl_pipeline.dicom.write import dataset_bytes, series_uids, write_image_series

KEY = require_key("3b9c1f0e7a2d4c6b8e0f1a3c5d7e9b2a4c6e8f0a1b3d5f7e9c2a4b6d8f0e1c3a")
OTHER_KEY = require_key(secrets.token_hex(32))

PHI = {
    "PatientName": "Smith^Johanna^Q",
    "PatientID": "MRN-77881234",
    "PatientBirthDate": "19561103",
    "AccessionNumber": "ACC-99887766",
    "InstitutionName": "St Elsewhere Hospital",
    "InstitutionAddress": "12 Harbour Road Springfield",
    "ReferringPhysicianName": "Feelgood^Doctor",
    "OtherPatientIDs": "OTHER-55443322",
    "StudyDate": "20240315",
    "SeriesDate": "20240316",
    "AcquisitionDate": "20240317",
    "ContentDate": "20240318",
    "StudyTime": "101112",
    "StudyID": "STUDY-ID-4242",
    "StationName": "CTSCANNER-ROOM9",
    "OperatorsName": "Tech^Tina",
    "ImageComments": "patient Johanna fell from bicycle",
}


def data_file(name: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = get_testdata_file(name)
    if path is None:
        pytest.fail(f"test file {name} not found")
    return path


def planted(path: str = "CT_small.dcm") -> Dataset:
    ds = pydicom.dcmread(data_file(path))
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ds.private_block(0x0011, "HOSPITAL PRIVATE", create=True).add_new(
        0x01, "LO", "Private-Secret-Note"
    )
    request = Dataset()
    request.RequestingPhysician = "Hidden^Requester"
    request.RequestedProcedureID = "REQ-31337"
    request.ScheduledProcedureStepStartDate = "20240314"
    ds.RequestAttributesSequence = [request]
    other = Dataset()
    other.PatientID = "SEQ-PID-6060"
    ds.OtherPatientIDsSequence = [other]
    reference = Dataset()
    reference.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    reference.ReferencedSOPInstanceUID = "1.2.3.999.1"
    reference.ReferencedFrameNumber = 1
    ds.ReferencedImageSequence = [reference]
    ds.file_meta.SourceApplicationEntityTitle = "HOSP_PACS_AE"
    return ds


PLANTED_STRINGS = [
    "Smith",
    "Johanna",
    "MRN-77881234",
    "19561103",
    "ACC-99887766",
    "St Elsewhere",
    "Harbour Road",
    "Feelgood",
    "OTHER-55443322",
    "20240315",
    "20240316",
    "20240317",
    "20240318",
    "20240314",
    "STUDY-ID-4242",
    "CTSCANNER",
    "Tech^Tina",
    "bicycle",
    "Private-Secret-Note",
    "HOSPITAL PRIVATE",
    "Hidden^Requester",
    "REQ-31337",
    "SEQ-PID-6060",
    "HOSP_PACS_AE",
    "1.2.3.999.1",
]


def test_planted_phi_is_gone_from_the_bytes() -> None:
    ds = planted()
    original_uids = [
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
        str(ds.SOPInstanceUID),
        str(ds.FrameOfReferenceUID),
    ]
    before = dataset_bytes(ds)
    assert all(s.encode() in before for s in PLANTED_STRINGS)
    clean, report = deidentify(ds, KEY)
    after = dataset_bytes(clean)
    leaked = [s for s in [*PLANTED_STRINGS, *original_uids] if s.encode() in after]
    assert leaked == []
    assert clean.PatientIdentityRemoved == "YES"
    assert clean.PatientID == clean.PatientName == report.patient_pseudonym
    assert report.patient_pseudonym == pseudonym(KEY, "patient", "", "MRN-77881234")
    assert not any(element.tag.is_private for element in clean.iterall())
    assert report.counts["private"] > 100  # CT_small's own GE private elements plus ours
    assert {"X", "Z", "D", "U"} <= set(report.counts)
    assert clean.ReferencedImageSequence[0].ReferencedSOPInstanceUID == map_uid(KEY, "1.2.3.999.1")
    assert clean.ReferencedImageSequence[0].ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    codes = [
        (item.CodeValue, item.CodingSchemeDesignator)
        for item in clean.DeidentificationMethodCodeSequence
    ]
    assert codes == [("113100", "DCM")]
    assert "Basic Application" in clean.DeidentificationMethod[0]
    assert clean.LongitudinalTemporalInformationModified == "REMOVED"
    # the pixels and the image geometry are untouched
    np.testing.assert_array_equal(clean.pixel_array, ds.pixel_array)
    assert clean.ImagePositionPatient == ds.ImagePositionPatient


def test_input_is_not_mutated() -> None:
    ds = planted()
    before = dataset_bytes(ds)
    deidentify(ds, KEY)
    assert dataset_bytes(ds) == before


def test_uid_mapping_is_keyed_deterministic_and_valid() -> None:
    ds = planted()
    first, _ = deidentify(ds, KEY)
    again, _ = deidentify(planted(), KEY)
    other, _ = deidentify(planted(), OTHER_KEY)
    for keyword in (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "FrameOfReferenceUID",
    ):
        new = str(getattr(first, keyword))
        assert new == str(getattr(again, keyword)) == map_uid(KEY, str(getattr(ds, keyword)))
        assert new != str(getattr(other, keyword))
        assert new.startswith("2.25.") and len(new) <= 64 and pydicom.uid.UID(new).is_valid
    assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
    assert first.SOPClassUID == ds.SOPClassUID  # well-known UIDs are kept
    assert first.PatientID != other.PatientID


def test_retain_longitudinal_temporal_keeps_dates_but_not_birth_date() -> None:
    clean, report = deidentify(planted(), KEY, retain_longitudinal_temporal=True)
    assert (clean.StudyDate, clean.SeriesDate, clean.AcquisitionDate) == (
        "20240315",
        "20240316",
        "20240317",
    )
    assert clean.PatientBirthDate == ""
    codes = [item.CodeValue for item in clean.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113106"]
    assert clean.LongitudinalTemporalInformationModified == "UNMODIFIED"
    assert report.retain_longitudinal_temporal and report.counts["kept_temporal"] >= 3
    assert b"Smith" not in dataset_bytes(clean)


def test_burned_in_annotation_is_flagged() -> None:
    ds = planted()
    assert deidentify(ds, KEY)[1].burned_in_annotation is False
    ds.BurnedInAnnotation = "YES"
    flagged = deidentify(ds, KEY)[1]
    assert flagged.burned_in_annotation and "YES" in flagged.burned_in_reason
    ultrasound = pydicom.dcmread(data_file("US1_UNCR.dcm"))
    report = deidentify(ultrasound, KEY)[1]
    assert report.burned_in_annotation and "US" in report.burned_in_reason
    capture = pydicom.dcmread(data_file("SC_rgb.dcm"))
    assert deidentify(capture, KEY)[1].burned_in_annotation


def test_pseudonyms() -> None:
    case = pseudonym(KEY, "patient", "MRN-1")
    assert case == pseudonym(KEY, "patient", "MRN-1")
    assert case.startswith("case-") and len(case) == len("case-") + 16
    assert case != pseudonym(OTHER_KEY, "patient", "MRN-1") != pseudonym(KEY, "patient", "MRN-2")
    assert pseudonym(KEY, "MRN-1", prefix="study").startswith("study-")
    with pytest.raises(ValueError):
        pseudonym(KEY)


@pytest.mark.parametrize(
    "value", [None, "", "   ", "abc123", "zz" * 32, "00" * 32, "ab" * 40, b"short", 12345]
)
def test_missing_or_weak_keys_are_refused(value) -> None:
    with pytest.raises(PseudonymKeyError):
        require_key(value)
    with pytest.raises(PseudonymKeyError):
        deidentify(planted(), value)


def test_good_keys_are_accepted() -> None:
    assert len(require_key(secrets.token_hex(32))) == 32
    assert len(require_key(secrets.token_bytes(48))) == 48


def test_deidentified_series_still_assembles_identically() -> None:
    volume = Volume(
        np.random.default_rng(4).normal(0, 200, (10, 9, 4)).astype(np.float32).round(),
        affine_from_geometry((0.8, 0.8, 2.0), (1.0, 2.0, 3.0)),
    )
    header = {"PatientName": "Doe^John", "PatientID": "MRN-1", "StudyDate": "20240101"}
    slices = write_image_series(volume, header=header, uids=series_uids("d", "x", n_slices=4))
    cleaned = [deidentify(ds, KEY)[0] for ds in slices]
    assert len({str(ds.SeriesInstanceUID) for ds in cleaned}) == 1
    assert len({str(ds.SOPInstanceUID) for ds in cleaned}) == 4
    assert len({str(ds.PatientID) for ds in cleaned}) == 1
    result = assemble_series([dataset_bytes(ds) for ds in cleaned])
    np.testing.assert_array_equal(result.array, volume.array)
    np.testing.assert_allclose(result.affine, volume.affine, atol=1e-6)
    assert result.meta["series_instance_uid"] == map_uid(KEY, str(slices[0].SeriesInstanceUID))


def test_label_objects_keep_pointing_at_their_deidentified_series() -> None:
    from mvl_pipeline.dicom.labels import referenced_series_uids

    for name, force in (("liver.dcm", False), ("rtstruct.dcm", True)):
        ds = pydicom.dcmread(data_file(name), force=force)
        clean, _ = deidentify(ds, KEY)
        (original,) = referenced_series_uids(ds)
        assert referenced_series_uids(clean) == [map_uid(KEY, original)]
        assert original.encode() not in dataset_bytes(clean)


def test_patient_module_attributes_outside_the_tables_are_removed() -> None:
    """The dicom-anonymizer 2026c tables lack Patient's Birth Date / Death Date in Alternative
    Calendar and Patient's Alternative Calendar (0010,0033-0035; found by an audit, 2026-12-04):
    every Patient-module attribute they do not list goes, except Anatomical Orientation Type,
    and in sequences too."""
    ds = planted()
    ds.PatientBirthDateInAlternativeCalendar = "1341-09-19 AH"
    ds.PatientDeathDateInAlternativeCalendar = "1400-01-02"
    ds.PatientAlternativeCalendar = "ISLAMIC"
    ds.AnatomicalOrientationType = "BIPED"
    item = Dataset()
    item.PatientBirthDateInAlternativeCalendar = "1341-09-19 AH"
    item.CodeValue = "X1"
    ds.ProcedureCodeSequence = [item]  # an attribute the tables let through, with an item
    clean, report = deidentify(ds, KEY)
    assert not [e.keyword for e in clean.iterall() if e.tag in (0x00100033, 0x00100034, 0x00100035)]
    assert b"1341-09-19" not in dataset_bytes(clean)
    assert clean.AnatomicalOrientationType == "BIPED"
    assert report.counts["patient_group_outside_tables"] == 4
    assert clean.PatientID == report.patient_pseudonym  # the tables' own patient attributes as before


def test_uids_outside_the_tables_are_mapped_and_well_known_ones_kept() -> None:
    """The 2026c tables list neither Concatenation Source nor Volume / Table Frame of Reference
    UIDs (an audit, 2026-12-07): kept, they carried a vendor's UID (often the acquisition date
    and the scanner's serial number) into case.json. Every UID outside the tables is now mapped
    as U maps, in sequences too; a well-known DICOM UID (a SOP class) stays."""
    from mvl_pipeline.dicom.deid import _action_for

    source = "1.3.12.2.1107.5.2.43.166004.2026113010221234567"
    ds = planted()
    ds.SOPInstanceUIDOfConcatenationSource = source
    ds.VolumeFrameOfReferenceUID = source + ".1"
    ds.TableFrameOfReferenceUID = source + ".2"
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    item.MultiFrameSourceSOPInstanceUID = source + ".3"
    ds.ProcedureCodeSequence = [item]  # an attribute the tables let through, with an item
    assert all(_action_for(pydicom.tag.Tag(k)) is None for k in (0x00200242, 0x00209312, 0x00209313, 0x00081167))
    clean, report = deidentify(ds, KEY)
    assert source.encode() not in dataset_bytes(clean)
    assert clean.SOPInstanceUIDOfConcatenationSource == map_uid(KEY, source)
    assert clean.VolumeFrameOfReferenceUID == map_uid(KEY, source + ".1")
    assert clean.ProcedureCodeSequence[0].ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
    assert report.counts["uids_outside_tables"] >= 4
