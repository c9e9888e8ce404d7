"""Writing series with write_image_series and reading them back: geometry, values, errors."""

from __future__ import annotations

import datetime
import io
import random
import uuid

import numpy as np
import pydicom
import pytest

from mvl_pipeline.core.errors import (
    DuplicatePositionError,
    EmptySeriesError,
    InconsistentGeometryError,
    MissingSliceError,
    MixedSliceSizeError,
    TooFewSlicesError,
    UnevenSpacingError,
)
from mvl_pipeline.core.volume import Volume, affine_from_geometry
from mvl_pipeline.dicom.assemble import assemble_series
from mvl_pipeline.dicom.write import (
    SeriesUids,
    dataset_bytes,
    make_uid,
    series_uids,
    slice_geometry,
    write_image_series,
)

HEADER = {
    "PatientName": "Doe^Jane",
    "PatientID": "MRN-0042",
    "PatientBirthDate": "19700101",
    "PatientSex": "F",
    "AccessionNumber": "ACC-1",
    "InstitutionName": "General Hospital",
    "ReferringPhysicianName": "Who^Doctor",
    "StudyDate": "20240102",
    "StudyTime": "101500",
    "StudyDescription": "CT ABDOMEN",
    "SeriesDescription": "AXIAL 2.5",
    "Manufacturer": "ACME",
    "private": [(0x0011, "MVL SITE", 0x01, "LO", "private note")],
}


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


GEOMETRIES = {
    "axial": affine_from_geometry((0.7, 0.8, 2.5), (10.0, -20.0, 30.0)),
    "oblique": affine_from_geometry(
        (0.7, 0.8, 2.5), (10.0, -20.0, 30.0), rotation(0.2, -0.15, 0.3)
    ),
    "sagittal": affine_from_geometry(
        (1.0, 1.2, 3.0), (-5.0, 0.0, 0.0), np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]])
    ),
}


def hu_volume(affine: np.ndarray, shape: tuple[int, int, int] = (14, 11, 6)) -> Volume:
    rng = np.random.default_rng(7)
    return Volume(rng.integers(-1024, 2000, shape).astype(np.float32), affine)


def write_files(tmp_path, datasets, *, shuffle: bool = True) -> list:
    """Save under random names with shuffled InstanceNumbers: order must come from geometry."""
    numbers = list(range(1, len(datasets) + 1))
    if shuffle:
        random.Random(3).shuffle(numbers)
    paths = []
    for ds, number in zip(datasets, numbers, strict=True):
        ds.InstanceNumber = number
        path = tmp_path / uuid.UUID(int=random.Random(number).getrandbits(128)).hex
        path.write_bytes(dataset_bytes(ds))
        paths.append(path)
    return sorted(paths)  # directory order: by (random) name, not by position


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_round_trip_reassembles_from_shuffled_files(tmp_path, geometry: str) -> None:
    volume = hu_volume(GEOMETRIES[geometry])
    datasets = write_image_series(
        volume, header=HEADER, uids=series_uids("t", geometry, n_slices=6)
    )
    result = assemble_series(write_files(tmp_path, datasets))
    np.testing.assert_array_equal(result.array, volume.array)
    np.testing.assert_allclose(result.affine, volume.affine, atol=1e-6)
    assert result.meta["assembly"]["reordered"]
    assert result.meta["n_slices"] == 6
    assert result.orientation == volume.orientation


def test_gantry_tilt_shear_is_kept(tmp_path) -> None:
    affine = GEOMETRIES["axial"].copy()
    affine[:3, 2] += 0.3 * affine[:3, 1]  # slices shifted along j: a tilted gantry
    volume = hu_volume(affine)
    result = assemble_series(
        write_files(
            tmp_path,
            write_image_series(volume, header={}, uids=series_uids("t", "tilt", n_slices=6)),
        )
    )
    np.testing.assert_allclose(result.affine, affine, atol=1e-6)
    assert result.meta["assembly"]["gantry_tilt"]


def test_dicom_attributes_are_lps_and_complete() -> None:
    volume = hu_volume(GEOMETRIES["axial"])
    uids = series_uids("t", "attrs", n_slices=6, series_number=7)
    datasets = write_image_series(volume, header=HEADER, uids=uids)
    first = pydicom.dcmread(io.BytesIO(dataset_bytes(datasets[0])))
    assert [float(v) for v in first.ImagePositionPatient] == [-10.0, 20.0, 30.0]  # RAS (10,-20,30)
    assert [float(v) for v in first.ImageOrientationPatient] == [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0]
    assert [float(v) for v in first.PixelSpacing] == [0.8, 0.7]  # (row spacing = j, column = i)
    assert float(first.SliceThickness) == 2.5
    assert (first.Rows, first.Columns) == (11, 14)
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.SOPClassUID == pydicom.uid.CTImageStorage
    assert (first.BitsAllocated, first.PixelRepresentation, first.PhotometricInterpretation) == (
        16,
        1,
        "MONOCHROME2",
    )
    assert (first.StudyInstanceUID, first.SeriesInstanceUID, first.FrameOfReferenceUID) == (
        uids.study,
        uids.series,
        uids.frame_of_reference,
    )
    assert first.SOPInstanceUID == uids.sop_instances[0] and first.SeriesNumber == 7
    assert first.PatientName == "Doe^Jane" and first.InstitutionName == "General Hospital"
    assert first.private_block(0x0011, "MVL SITE")[0x01].value == "private note"
    assert first.ContentDate == "20240102"  # deterministic: from the study, not the clock
    assert (float(first.RescaleSlope), float(first.RescaleIntercept), first.RescaleType) == (
        1.0,
        -1024.0,
        "HU",
    )
    np.testing.assert_array_equal(
        first.pixel_array.T.astype(np.float32) - 1024, volume.array[:, :, 0]
    )


def test_hu_round_trip_within_rounding_for_other_rescales(tmp_path) -> None:
    rng = np.random.default_rng(1)
    values = rng.uniform(-1000, 1500, (9, 8, 4)).astype(np.float32)
    volume = Volume(values, GEOMETRIES["oblique"])
    datasets = write_image_series(
        volume, header={}, uids=series_uids("t", "hu", n_slices=4), rescale=(0.5, -1000.0)
    )
    result = assemble_series(write_files(tmp_path, datasets))
    assert np.abs(result.array - values).max() <= 0.25 + 1e-4  # half a stored step


def test_mr_uint16_series(tmp_path) -> None:
    values = np.random.default_rng(2).integers(0, 4000, (10, 10, 3)).astype(np.float32)
    volume = Volume(values, GEOMETRIES["sagittal"])
    datasets = write_image_series(
        volume,
        header={"Modality": "MR"},
        uids=series_uids("t", "mr", n_slices=3),
        rescale=(1.0, 0.0),
        dtype=np.uint16,
    )
    assert (
        datasets[0].SOPClassUID == pydicom.uid.MRImageStorage
        and datasets[0].PixelRepresentation == 0
    )
    result = assemble_series(write_files(tmp_path, datasets))
    np.testing.assert_array_equal(result.array, values)
    assert result.meta["modality"] == "MR"


def test_writing_is_deterministic() -> None:
    volume = hu_volume(GEOMETRIES["oblique"])
    first = [
        dataset_bytes(ds)
        for ds in write_image_series(volume, header=HEADER, uids=series_uids("t", "d", n_slices=6))
    ]
    again = [
        dataset_bytes(ds)
        for ds in write_image_series(
            hu_volume(GEOMETRIES["oblique"]),
            header=dict(HEADER),
            uids=series_uids("t", "d", n_slices=6),
        )
    ]
    assert first == again
    assert len(set(first)) == 6
    assert not any(datetime.date.today().strftime("%Y%m%d").encode() in blob for blob in first)


def test_uids_are_deterministic_and_valid() -> None:
    uid = make_uid("study", "case-1")
    assert uid == make_uid("study", "case-1") != make_uid("study", "case-2")
    assert uid.startswith("2.25.") and len(uid) <= 64 and uid[5:].isdigit()
    assert make_uid(np.random.default_rng(5)) == make_uid(np.random.default_rng(5))
    uids = series_uids("drop", "case-1", "CT", n_slices=3)
    assert len({uids.study, uids.series, uids.frame_of_reference, *uids.sop_instances}) == 6
    seg_series = series_uids("drop", "case-1", "SEG", n_slices=1)
    assert (seg_series.study, seg_series.frame_of_reference) == (
        uids.study,
        uids.frame_of_reference,
    )
    with pytest.raises(ValueError):
        make_uid()


def test_invalid_inputs_to_the_writer() -> None:
    skewed = GEOMETRIES["axial"].copy()
    skewed[:3, 1] += 0.3 * skewed[:3, 0]  # i and j not orthogonal
    with pytest.raises(ValueError, match="orthogonal"):
        write_image_series(hu_volume(skewed), header={}, uids=series_uids("t", "x", n_slices=6))
    with pytest.raises(ValueError, match="SOP Instance UIDs"):
        write_image_series(
            hu_volume(GEOMETRIES["axial"]), header={}, uids=series_uids("t", "x", n_slices=5)
        )
    with pytest.raises(ValueError, match="keyword"):
        write_image_series(
            hu_volume(GEOMETRIES["axial"]),
            header={"PatientsNmae": "x"},
            uids=series_uids("t", "x", n_slices=6),
        )
    with pytest.raises(ValueError, match="CT or MR"):
        write_image_series(
            hu_volume(GEOMETRIES["axial"]),
            header={"Modality": "US"},
            uids=series_uids("t", "x", n_slices=6),
        )
    assert slice_geometry(hu_volume(GEOMETRIES["oblique"])).slice_thickness == pytest.approx(2.5)


# --- malformed series -------------------------------------------------------------------------


def series(
    n: int = 6, seed: str = "err", shape: tuple[int, int] = (14, 11)
) -> list[pydicom.Dataset]:
    volume = hu_volume(GEOMETRIES["axial"], (*shape, n))
    return write_image_series(volume, header={}, uids=series_uids("t", seed, n_slices=n))


def test_missing_slice(tmp_path) -> None:
    datasets = series(6)
    del datasets[3]
    with pytest.raises(MissingSliceError, match="1 slice"):
        assemble_series(write_files(tmp_path, datasets))
    datasets = series(8)
    del datasets[2:4]
    with pytest.raises(MissingSliceError, match="2 slice"):
        assemble_series(write_files(tmp_path, datasets))


def test_duplicate_positions_from_a_second_acquisition(tmp_path) -> None:
    datasets = series(5)
    extra = pydicom.dcmread(io.BytesIO(dataset_bytes(datasets[2])))
    extra.SOPInstanceUID = make_uid("extra")
    extra.AcquisitionNumber = 2
    with pytest.raises(DuplicatePositionError, match="several acquisitions"):
        assemble_series(write_files(tmp_path, [*datasets, extra]))


def test_mixed_slice_sizes(tmp_path) -> None:
    datasets = series(5)
    datasets[1] = series(5, shape=(16, 11))[1]
    with pytest.raises(MixedSliceSizeError):
        assemble_series(write_files(tmp_path, datasets))


def test_uneven_spacing(tmp_path) -> None:
    datasets = series(6)
    position = [float(v) for v in datasets[3].ImagePositionPatient]
    datasets[3].ImagePositionPatient = [
        position[0],
        position[1],
        position[2] + 1.0,
    ]  # 40% of a step
    with pytest.raises(UnevenSpacingError):
        assemble_series(write_files(tmp_path, datasets))


def test_inconsistent_orientation_spacing_line_and_series(tmp_path) -> None:
    cases = []
    datasets = series(5, seed="o")
    datasets[2].ImageOrientationPatient = [1, 0, 0, 0, 0.9950041653, 0.0998334166]
    cases.append((datasets, "orientations"))
    datasets = series(5, seed="p")
    datasets[2].PixelSpacing = [0.8, 0.75]
    cases.append((datasets, "pixel spacings"))
    datasets = series(5, seed="l")
    position = [float(v) for v in datasets[2].ImagePositionPatient]
    datasets[2].ImagePositionPatient = [position[0] + 5.0, position[1], position[2]]
    cases.append((datasets, "one line"))
    datasets = series(5, seed="s")
    datasets[4].SeriesInstanceUID = make_uid("other series")
    cases.append((datasets, "SeriesInstanceUID"))
    for index, (datasets, message) in enumerate(cases):
        folder = tmp_path / str(index)
        folder.mkdir()
        with pytest.raises(InconsistentGeometryError, match=message):
            assemble_series(write_files(folder, datasets))


def test_too_few_and_no_slices(tmp_path) -> None:
    with pytest.raises(TooFewSlicesError):
        assemble_series(write_files(tmp_path, series(2)))
    assert assemble_series(write_files(tmp_path, series(2, seed="two")), min_slices=2).shape[2] == 2
    with pytest.raises(EmptySeriesError):
        assemble_series([])


def test_series_uids_dataclass_is_frozen() -> None:
    uids = SeriesUids("1", "2", "3", ("4",), 1)
    with pytest.raises(AttributeError):
        uids.study = "x"  # type: ignore[misc]
