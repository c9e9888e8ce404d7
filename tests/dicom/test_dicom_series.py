"""Reading real DICOM files (pydicom's and pydicom-data's test files) and assembling series."""

from __future__ import annotations

import io
import shutil
import warnings

import fsspec
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from mvl_pipeline.core.errors import (
    DuplicatePositionError,
    ImagingError,
    InconsistentGeometryError,
    NoDecoderError,
    NoPixelDataError,
    NotAnImageError,
    NotDicomError,
    UnreadableFileError,
)
from mvl_pipeline.core.volume import Volume, affine_from_geometry
from mvl_pipeline.dicom.assemble import assemble_series
from mvl_pipeline.dicom.decode import read_frames
from mvl_pipeline.dicom.native import scan_native
from mvl_pipeline.dicom.read import ObjectKind, classify, read_header, sort_study
from mvl_pipeline.dicom.write import dataset_bytes, series_uids, write_image_series


def data_file(name: str) -> str:
    """A pydicom / pydicom-data test file; missing data is a broken environment: fail."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about its optional download sources
        path = get_testdata_file(name)
    if path is None:
        pytest.fail(f"test file {name} not found: install pydicom-data (dev dependencies)")
    return path


def pydicom_values(path: str) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return pydicom.pixels.apply_modality_lut(ds.pixel_array, ds).astype(np.float32)


def small_series(
    n_slices: int = 5, shape: tuple[int, int] = (12, 10), seed: str = "s"
) -> list[Dataset]:
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1500, (*shape, n_slices)).astype(np.float32)
    volume = Volume(array, affine_from_geometry((0.8, 0.9, 2.0), (5.0, -7.0, 11.0)))
    return write_image_series(
        volume, header={"PatientID": "P1"}, uids=series_uids("t", seed, n_slices=n_slices)
    )


# --- single files across transfer syntaxes ------------------------------------------------------

NATIVE = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_padded.dcm",
    "693_UNCR.dcm",
    "693_UNCI.dcm",
]
DECODED_BY_PYDICOM = [
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "693_J2KR.dcm",
    "693_J2KI.dcm",
]


@pytest.mark.parametrize("name", NATIVE + DECODED_BY_PYDICOM)
def test_single_slice_matches_pydicom_modality_lut(name: str) -> None:
    path = data_file(name)
    volume = assemble_series([path], min_slices=1)
    expected = pydicom_values(path)
    assert volume.array.dtype == np.float32
    assert volume.shape == (expected.shape[1], expected.shape[0], 1)
    np.testing.assert_allclose(volume.array[:, :, 0], expected.T, atol=1e-3)
    report = volume.meta["assembly"]
    assert report["fast_path_files"] == (1 if name in NATIVE else 0)
    assert volume.meta["transfer_syntax"] == str(
        pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    )


def test_ct_small_is_in_hounsfield_units_with_lps_to_ras_affine() -> None:
    path = data_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    volume = assemble_series([path], min_slices=1)
    assert float(ds.RescaleIntercept) == -1024.0
    assert volume.array.min() == ds.pixel_array.min() - 1024
    ipp = [float(v) for v in ds.ImagePositionPatient]
    np.testing.assert_allclose(volume.origin, (-ipp[0], -ipp[1], ipp[2]))
    np.testing.assert_allclose(
        volume.spacing[:2], [float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0])]
    )
    assert volume.orientation == "LPS"  # axial DICOM: i runs to patient left, j to posterior
    assert volume.meta["modality"] == "CT"
    assert volume.meta["series_instance_uid"] == ds.SeriesInstanceUID


@pytest.mark.parametrize(
    ("name", "uid"),
    [
        ("JPEG-lossy.dcm", "1.2.840.10008.1.2.4.51"),
        ("JPEG2000-embedded-sequence-delimiter.dcm", "1.2.840.10008.1.2.4.91"),
    ],
)
def test_undecodable_pixel_data_raises_no_decoder(name: str, uid: str) -> None:
    path = data_file(name)
    with pytest.raises(NoDecoderError) as info:
        read_frames(path)
    assert info.value.reason == "no_decoder"
    assert (
        info.value.detail == f"no decoder for transfer syntax {pydicom.uid.UID(uid).name} ({uid})"
    )
    with pytest.raises(NoDecoderError):
        assemble_series([path], min_slices=1)


def test_enhanced_multiframe_emri_small_frames_decode_in_every_syntax() -> None:
    reference = pydicom.dcmread(data_file("emri_small.dcm")).pixel_array
    for name in (
        "emri_small.dcm",
        "emri_small_RLE.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "emri_small_big_endian.dcm",
    ):
        frames = read_frames(data_file(name))
        assert frames.shape == (10, 64, 64)
        np.testing.assert_array_equal(frames, reference)


def test_emri_small_without_functional_groups_has_no_geometry() -> None:
    # pydicom-data's emri_small had its functional groups stripped: no plane position at all
    with pytest.raises(InconsistentGeometryError, match="no plane geometry"):
        assemble_series([data_file("emri_small.dcm")], min_slices=1)


def test_enhanced_ct_assembled_from_per_frame_functional_groups() -> None:
    path = data_file("eCT_Supplemental.dcm")  # real Enhanced CT, 2 frames 10 mm apart
    ds = pydicom.dcmread(path)
    volume = assemble_series([path], min_slices=2)
    assert volume.shape == (512, 512, 2)
    np.testing.assert_allclose(volume.spacing, (0.388672, 0.388672, 10.0), rtol=1e-6)
    # IOP (-1,0,0 / 0,1,0) in LPS: i runs to patient right, j posterior, k (normal) inferior
    np.testing.assert_allclose(volume.direction, np.diag([1.0, -1.0, -1.0]), atol=1e-9)
    positions = [
        float(f.PlanePositionSequence[0].ImagePositionPatient[2])
        for f in ds.PerFrameFunctionalGroupsSequence
    ]
    k0 = int(np.argmax(positions))  # first along the normal (-z)
    expected = ds.pixel_array[k0].astype(np.float32) - 1024.0  # shared Pixel Value Transformation
    np.testing.assert_array_equal(volume.array[:, :, 0], expected.T)


def test_legacy_converted_multiframe_equals_its_single_frame_series() -> None:
    import highdicom as hd

    from mvl_pipeline.dicom.write import make_uid

    slices = [pydicom.dcmread(io.BytesIO(dataset_bytes(ds))) for ds in small_series(6)]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=slices,
        series_instance_uid=make_uid("e"),
        series_number=2,
        sop_instance_uid=make_uid("e", 1),
        instance_number=1,
    )
    single = assemble_series(slices)
    multi = assemble_series([enhanced])
    np.testing.assert_array_equal(multi.array, single.array)
    np.testing.assert_allclose(multi.affine, single.affine, atol=1e-6)
    assert multi.meta["assembly"]["n_frames"] == 6


def test_real_ct_variants_of_one_slice_are_duplicate_positions() -> None:
    # pydicom-data's 693_* files are one CT slice in several syntaxes: same position
    with pytest.raises(DuplicatePositionError) as info:
        assemble_series([data_file("693_UNCR.dcm"), data_file("693_J2KR.dcm")], min_slices=1)
    assert info.value.reason == "duplicate_slice_positions"


# --- broken and non-image files ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "error", "reason"),
    [
        ("MR_truncated.dcm", UnreadableFileError, "unreadable_file"),
        ("no_meta.dcm", NotDicomError, "not_dicom"),
        ("zipMR.gz", NotDicomError, "not_dicom"),
        ("meta_missing_tsyntax.dcm", UnreadableFileError, "unreadable_file"),
        ("badVR.dcm", NotAnImageError, "not_an_image"),  # RT Dose with NumberOfFrames '1A'
        ("rtplan_truncated.dcm", UnreadableFileError, "unreadable_file"),
        ("rtplan.dcm", NotAnImageError, "not_an_image"),
        ("rtstruct.dcm", NotAnImageError, "not_an_image"),
        ("liver.dcm", NotAnImageError, "not_an_image"),
    ],
)
def test_broken_or_non_image_files_raise_their_error(name: str, error: type, reason: str) -> None:
    path = data_file(name)
    with pytest.raises(error) as info:
        assemble_series([path], min_slices=1)
    assert type(info.value) is error
    assert info.value.reason == reason
    assert path in str(info.value)


def test_read_header_with_and_without_preamble_and_suffix(tmp_path) -> None:
    no_suffix = tmp_path / "IM0001"
    shutil.copy(data_file("CT_small.dcm"), no_suffix)
    assert read_header(no_suffix).Modality == "CT"
    assert "PixelData" not in read_header(no_suffix)
    preamble_less = read_header(data_file("rtstruct.dcm"))  # a real file without preamble / meta
    assert preamble_less.Modality == "RTSTRUCT"
    with fsspec.open(str(no_suffix), "rb") as handle:  # fsspec file object
        assert read_header(handle).SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert read_header(no_suffix.read_bytes()).Rows == 128


def test_read_header_errors_name_the_path(tmp_path) -> None:
    missing = tmp_path / "missing.dcm"
    with pytest.raises(UnreadableFileError, match="missing.dcm"):
        read_header(missing)
    data = open(data_file("CT_small.dcm"), "rb").read()
    for cut in (100, 700, 2000, 30_000, len(data) - 10):
        truncated = tmp_path / f"cut{cut}.dcm"
        truncated.write_bytes(data[:cut])
        with pytest.raises(UnreadableFileError) as info:
            assemble_series([truncated], min_slices=1)
        assert str(truncated) in str(info.value)
    text = tmp_path / "notes.dcm"
    text.write_text("patient notes, not DICOM\n" * 20)
    with pytest.raises(NotDicomError, match="notes.dcm"):
        read_header(text)
    with pytest.raises(UnreadableFileError, match="Transfer Syntax"):
        read_header(data_file("meta_missing_tsyntax.dcm"))


def test_image_without_pixel_data(tmp_path) -> None:
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    del ds.PixelData
    path = tmp_path / "nopixels.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(NoPixelDataError, match="nopixels.dcm"):
        assemble_series([path], min_slices=1)


def test_invalid_numeric_value_is_unreadable_not_a_value_error(tmp_path) -> None:
    ds = small_series(3)[1]
    ds.ImagePositionPatient = ["123.25", "0", "0"]
    data = dataset_bytes(ds).replace(b"123.25", b"12A.25")
    path = tmp_path / "bad.dcm"
    path.write_bytes(data)
    with pytest.raises(UnreadableFileError, match="invalid ImagePositionPatient"):
        assemble_series([path], min_slices=1)


@pytest.mark.parametrize(
    ("sop_class", "modality", "kind"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "CT", ObjectKind.IMAGE),
        ("1.2.840.10008.5.1.4.1.1.4.1", "MR", ObjectKind.IMAGE),
        ("1.2.840.10008.5.1.4.1.1.481.1", "RTIMAGE", ObjectKind.IMAGE),
        ("1.2.840.10008.5.1.4.1.1.66.4", "SEG", ObjectKind.SEGMENTATION),
        ("1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT", ObjectKind.RTSTRUCT),
        ("1.2.840.10008.5.1.4.1.1.88.22", "SR", ObjectKind.NON_IMAGE),
        ("1.2.840.10008.5.1.4.1.1.88.59", "KO", ObjectKind.NON_IMAGE),
        ("1.2.840.10008.5.1.4.1.1.11.1", "PR", ObjectKind.NON_IMAGE),
        ("1.2.840.10008.5.1.4.1.1.481.5", "RTPLAN", ObjectKind.NON_IMAGE),
        ("1.2.840.10008.5.1.4.1.1.104.1", "DOC", ObjectKind.NON_IMAGE),
    ],
)
def test_classify_by_sop_class(sop_class: str, modality: str, kind: ObjectKind) -> None:
    ds = Dataset()
    ds.SOPClassUID, ds.Modality = sop_class, modality
    result = classify(ds)
    assert result.kind is kind
    assert (result.error is None) == (kind is ObjectKind.IMAGE)
    assert result.is_label_source == (kind in (ObjectKind.SEGMENTATION, ObjectKind.RTSTRUCT))
    if result.error is not None:
        assert result.error.reason == "not_an_image"


def test_check_is_image() -> None:
    from mvl_pipeline.dicom.read import check_is_image

    check_is_image(read_header(data_file("CT_small.dcm")))
    with pytest.raises(NotAnImageError, match="label source"):
        check_is_image(read_header(data_file("liver.dcm")), path="liver.dcm")


def test_classify_real_files() -> None:
    assert classify(read_header(data_file("liver.dcm"))).kind is ObjectKind.SEGMENTATION
    assert classify(read_header(data_file("rtstruct.dcm"))).kind is ObjectKind.RTSTRUCT
    assert classify(read_header(data_file("rtplan.dcm"))).kind is ObjectKind.NON_IMAGE
    assert classify(read_header(data_file("CT_small.dcm"))).kind is ObjectKind.IMAGE


# --- sources, fast path details, grouping, workers ----------------------------------------------


def test_every_source_type_gives_the_same_volume(tmp_path) -> None:
    slices = small_series(4)
    blobs = [dataset_bytes(ds) for ds in slices]
    paths = []
    for index, blob in enumerate(blobs):
        paths.append(tmp_path / f"{index}")
        paths[-1].write_bytes(blob)
    reference = assemble_series(paths)
    assert reference.meta["assembly"]["fast_path_files"] == 4
    variants = [
        blobs,
        [(f"slice-{i}", b) for i, b in enumerate(blobs)],
        [io.BytesIO(b) for b in blobs],
        [pydicom.dcmread(io.BytesIO(b)) for b in blobs],
        [str(p) for p in paths],
    ]
    for sources in variants:
        volume = assemble_series(sources)
        np.testing.assert_array_equal(volume.array, reference.array)
        np.testing.assert_allclose(volume.affine, reference.affine)


def test_large_header_and_nested_sequences_use_the_fast_path(tmp_path) -> None:
    slices = small_series(3)
    for ds in slices:
        ds.private_block(0x0029, "BIG VENDOR", create=True).add_new(0x10, "OB", bytes(40_000))
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        item.ReferencedSOPInstanceUID = "1.2.3"
        inner = Dataset()
        inner.CodeValue = "121322"
        item.PurposeOfReferenceCodeSequence = [inner]
        ds.ReferencedImageSequence = [item, item]
    paths = []
    for index, ds in enumerate(slices):
        paths.append(tmp_path / f"{index}.dcm")
        paths[-1].write_bytes(dataset_bytes(ds))
    volume = assemble_series(paths)
    assert volume.meta["assembly"]["fast_path_files"] == 3
    np.testing.assert_array_equal(volume.array, assemble_series(slices).array)


def test_unused_high_bits_are_ignored_like_pydicom(tmp_path) -> None:
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    values = ds.pixel_array.astype(np.uint16) & 0x0FFF
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
    ds.PixelData = (values | 0xF000).astype("<u2").tobytes()  # garbage in the unused bits
    path = tmp_path / "12bit.dcm"
    ds.save_as(path, enforce_file_format=True)
    volume = assemble_series([path], min_slices=1)
    assert volume.meta["assembly"]["fast_path_files"] == 1
    np.testing.assert_allclose(volume.array[:, :, 0], pydicom_values(str(path)).T)


def test_sort_study_groups_series_and_their_labels_and_skips_other_objects(tmp_path) -> None:
    for seed in ("a", "b"):
        for ds in small_series(3, seed=seed):
            (tmp_path / f"{seed}-{ds.InstanceNumber}").write_bytes(dataset_bytes(ds))
    for name in ("liver.dcm", "rtplan.dcm", "no_meta.dcm"):
        shutil.copy(data_file(name), tmp_path / name)
    headers, unreadable = {}, []
    for path in sorted(tmp_path.iterdir()):
        try:
            headers[path.name] = read_header(path)
        except ImagingError as error:
            unreadable.append(error.reason)
    study = sort_study(headers)
    assert unreadable == ["not_dicom"]
    assert sorted(len(files) for files in study.series.values()) == [3, 3]
    assert study.label_files == ["liver.dcm"]
    assert classify(headers["liver.dcm"]).kind is ObjectKind.SEGMENTATION
    # liver.dcm's SEG references a series that is not in this folder: kept by its reference
    assert list(study.labels.values()) == [["liver.dcm"]] and not set(study.labels) & set(study.series)
    assert [(key, error.reason) for key, error in study.skipped] == [("rtplan.dcm", "not_an_image")]


def test_scanner_rejects_what_it_does_not_understand() -> None:
    blob = dataset_bytes(small_series(1)[0])
    assert scan_native(blob).pixel_offset > 0
    assert scan_native(blob[:128] + b"XXXX" + blob[132:]) is None  # no DICM prefix
    compressed = open(data_file("MR_small_RLE.dcm"), "rb").read()
    assert scan_native(compressed) is None  # encapsulated syntax: pydicom's job


def test_a_modality_outside_dicoms_defined_terms_is_recorded_as_other():
    """Modality goes into case metadata, the plan and logs; a header may hold any text there."""
    from mvl_pipeline.dicom.read import modality_of

    for value, recorded in (("CT", "CT"), ("PT", "PT"), ("SEG", "SEG"), ("KOWALCZYK", "OT"), ("", "OT"), (None, "OT")):
        header = Dataset()
        if value is not None:
            header.Modality = value
        assert modality_of(header) == recorded
    assert modality_of(Dataset(), "unknown") == "unknown"
