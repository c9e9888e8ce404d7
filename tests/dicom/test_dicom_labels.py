"""DICOM SEG and RTSTRUCT -> label volumes on the image grid."""

from __future__ import annotations

import datetime
import io
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from mvl_pipeline.core.errors import LabelGridMismatchError, UnknownLabelValueError
from mvl_pipeline.core.volume import Volume, affine_from_geometry, lps_to_ras
from mvl_pipeline.dicom.assemble import assemble_series
from mvl_pipeline.dicom.labels import rasterise_rtstruct, read_segmentation
from mvl_pipeline.dicom.segmentation import write_segmentation
from mvl_pipeline.dicom.write import (
    dataset_bytes,
    make_uid,
    series_uids,
    write_image_series,
)

SEGMENTS = [(1, "Liver", "Organ"), (2, "Lesion", "Morphologically Abnormal Structure")]
OBLIQUE = np.array([[0.955, -0.296, 0.0], [0.289, 0.936, 0.199], [-0.059, -0.189, 0.980]])


def data_file(name: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = get_testdata_file(name)
    if path is None:
        pytest.fail(f"test file {name} not found: install pydicom-data (dev dependencies)")
    return path


def image_series(
    direction: np.ndarray | None = None, shape=(20, 16, 6)
) -> tuple[Volume, list[Dataset]]:
    if direction is not None:
        direction, _ = np.linalg.qr(direction)  # orthonormal
    affine = affine_from_geometry((0.9, 0.8, 3.0), (12.0, -40.0, 25.0), direction)
    volume = Volume(np.random.default_rng(0).normal(0, 100, shape).astype(np.float32), affine)
    header = {
        "PatientID": "P9",
        "PatientName": "Test^Patient",
        "StudyDate": "20240301",
        "StudyTime": "090000",
    }
    datasets = write_image_series(
        volume, header=header, uids=series_uids("lab", str(shape), n_slices=shape[2])
    )
    sources = [pydicom.dcmread(io.BytesIO(dataset_bytes(ds))) for ds in datasets]
    return assemble_series(sources), sources


def organ_and_lesion(shape) -> np.ndarray:
    label = np.zeros(shape, dtype=np.uint8)
    label[3:15, 2:12, 1:5] = 1
    label[6:9, 5:8, 2:4] = 2
    label[:, :, 0] = 0  # empty slices at both ends
    label[:, :, -1] = 0
    return label


def seg_round_trip(
    reference: Volume, sources: list[Dataset], label: np.ndarray
) -> tuple[Dataset, bytes]:
    seg = write_segmentation(
        Volume(label, reference.affine),
        source_images=sources,
        segments=SEGMENTS,
        uids=(make_uid("seg series"), make_uid("seg sop"), 300),
        header_overrides={"SeriesDescription": "reference labels"},
    )
    blob = dataset_bytes(seg)
    return pydicom.dcmread(io.BytesIO(blob)), blob


@pytest.mark.parametrize("oblique", [False, True])
def test_seg_round_trip_restores_multiclass_label(oblique: bool) -> None:
    reference, sources = image_series(OBLIQUE if oblique else None)
    label = organ_and_lesion(reference.shape)
    seg, blob = seg_round_trip(reference, sources, label)
    assert seg.SegmentationType == "BINARY" and seg.SeriesDescription == "reference labels"
    assert int(seg.NumberOfFrames) < 2 * reference.shape[2]  # empty frames omitted
    restored, names = read_segmentation(seg, reference)
    assert names == {1: "Liver", 2: "Lesion"}
    np.testing.assert_array_equal(restored.array, label)
    assert restored.same_grid(reference)
    assert restored.meta["label_names"] == {"1": "Liver", "2": "Lesion"}
    assert type(seg) is pydicom.FileDataset and dataset_bytes(seg) == blob  # input not changed


def test_seg_is_deterministic_and_clock_free() -> None:
    reference, sources = image_series()
    label = organ_and_lesion(reference.shape)
    first, blob = seg_round_trip(reference, sources, label)
    _, again = seg_round_trip(reference, sources, label)
    assert blob == again  # no random UIDs (two runs) ...
    assert datetime.date.today().strftime("%Y%m%d").encode() not in blob  # ... and no clock
    assert (first.InstanceCreationDate, first.ContentDate) == ("20240301", "20240301")
    assert first.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID


def test_all_empty_label_round_trips() -> None:
    reference, sources = image_series()
    seg, _ = seg_round_trip(reference, sources, np.zeros(reference.shape, dtype=np.uint8))
    restored, _ = read_segmentation(seg, reference)
    assert not restored.array.any()


def test_seg_on_a_different_grid_is_refused() -> None:
    reference, sources = image_series()
    seg, _ = seg_round_trip(reference, sources, organ_and_lesion(reference.shape))
    shifted = reference.affine.copy()
    shifted[:3, 3] += 0.5 * shifted[:3, 0]  # half a voxel along i
    with pytest.raises(LabelGridMismatchError, match="does not lie"):
        read_segmentation(seg, Volume(reference.array, shifted))
    rotated = reference.affine.copy()
    rotated[:3, :2] = rotated[:3, 1::-1]
    with pytest.raises(LabelGridMismatchError, match="orientation"):
        read_segmentation(seg, Volume(reference.array, rotated))


def test_write_segmentation_validates_labels() -> None:
    reference, sources = image_series()
    label = organ_and_lesion(reference.shape)
    with pytest.raises(ValueError, match="1..N"):
        write_segmentation(
            Volume(label, reference.affine),
            source_images=sources,
            segments=[(1, "Liver", "Organ"), (3, "Lesion", "Lesion")],
            uids=("1.2", "1.3", 1),
        )
    label[0, 0, 2] = 7
    with pytest.raises(UnknownLabelValueError):
        write_segmentation(
            Volume(label, reference.affine),
            source_images=sources,
            segments=SEGMENTS,
            uids=("1.2", "1.3", 1),
        )


def liver_reference(seg: Dataset) -> Volume:
    """The grid liver.dcm's 3 frames lie on (its source CT is not available)."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    positions = np.array(
        [
            [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
            for f in seg.PerFrameFunctionalGroupsSequence
        ]
    )
    positions = positions[np.argsort(positions[:, 2])]
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = (spacing[1], 0, 0)
    affine_lps[:3, 1] = (0, spacing[0], 0)
    affine_lps[:3, 2] = positions[1] - positions[0]
    affine_lps[:3, 3] = positions[0]
    return Volume(
        np.zeros((int(seg.Columns), int(seg.Rows), len(positions)), np.float32),
        lps_to_ras(affine_lps),
    )


def test_real_liver_seg_reads_onto_its_geometry() -> None:
    seg = pydicom.dcmread(data_file("liver.dcm"))
    reference = liver_reference(seg)
    label, names = read_segmentation(seg, reference)
    assert names == {1: "Liver"}
    assert label.shape == (512, 512, 3)
    frames = seg.pixel_array
    z = [
        float(f.PlanePositionSequence[0].ImagePositionPatient[2])
        for f in seg.PerFrameFunctionalGroupsSequence
    ]
    for frame_index, k in zip(np.argsort(z), range(3), strict=True):
        np.testing.assert_array_equal(label.array[:, :, k], frames[frame_index].T)
    assert set(np.unique(label.array)) == {0, 1} and label.array.sum() > 1000


# --- RTSTRUCT ---------------------------------------------------------------------------------


def contour(points_ijk, reference: Volume, kind: str = "CLOSED_PLANAR") -> Dataset:
    affine_lps = lps_to_ras(reference.affine)
    world = (
        affine_lps @ np.column_stack([np.asarray(points_ijk, float), np.ones(len(points_ijk))]).T
    ).T[:, :3]
    item = Dataset()
    item.ContourGeometricType = kind
    item.NumberOfContourPoints = len(points_ijk)
    item.ContourData = [f"{v:.6f}" for v in world.ravel()]
    return item


def rectangle(i0, i1, j0, j1, k):
    return [(i0, j0, k), (i1, j0, k), (i1, j1, k), (i0, j1, k)]


def structure_set(reference: Volume, rois: dict[int, tuple[str, list[Dataset]]]) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.Modality = "RTSTRUCT"
    ds.StructureSetROISequence, ds.ROIContourSequence = [], []
    for number, (name, contours) in rois.items():
        roi = Dataset()
        roi.ROINumber, roi.ROIName = number, name
        ds.StructureSetROISequence.append(roi)
        item = Dataset()
        item.ReferencedROINumber = number
        item.ContourSequence = contours
        ds.ROIContourSequence.append(item)
    return ds


@pytest.mark.parametrize("oblique", [False, True])
def test_rtstruct_rasterised_with_holes_and_overlap(oblique: bool) -> None:
    reference, _ = image_series(OBLIQUE if oblique else None)
    body = [contour(rectangle(2, 9, 3, 12, k), reference) for k in (1, 2, 3)]
    body.append(contour(rectangle(4, 6, 5, 7, 2), reference))  # a hole in slice 2
    lesion = [
        contour(rectangle(12, 14, 1, 2, 4), reference),
        contour([(1, 1, 4)], reference, "POINT"),
    ]
    rt = structure_set(reference, {10: ("Body", body), 20: ("Lesion", lesion)})
    label, names = rasterise_rtstruct(rt, reference)
    expected = np.zeros(reference.shape, np.uint8)
    expected[2:10, 3:13, 1:4] = 1
    expected[4:7, 5:8, 2] = 0
    expected[12:15, 1:3, 4] = 2
    assert names == {1: "Body", 2: "Lesion"}
    np.testing.assert_array_equal(label.array, expected)
    assert label.meta["skipped_contours"] == 1
    assert label.same_grid(reference)


def test_rtstruct_contour_off_the_slices_is_refused() -> None:
    reference, _ = image_series()
    rt = structure_set(reference, {1: ("Body", [contour(rectangle(2, 5, 2, 5, 1.5), reference)])})
    with pytest.raises(LabelGridMismatchError, match="Body"):
        rasterise_rtstruct(rt, reference)


def polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def test_real_rtstruct_file_rasterises_on_its_contour_planes() -> None:
    rt = pydicom.dcmread(data_file("rtstruct.dcm"), force=True)
    # its CT is not available: a 2 mm axial grid through its contour planes (z = -200, -190, -180)
    affine_lps = np.diag([2.0, 2.0, 10.0, 1.0])
    affine_lps[:3, 3] = (-250.0, -250.0, -200.0)
    reference = Volume(np.zeros((251, 251, 3), np.float32), lps_to_ras(affine_lps))
    label, names = rasterise_rtstruct(rt, reference)
    assert names == {1: "patient", 2: "Isocenter 1", 3: "Isocenter 2"}
    assert label.meta["skipped_contours"] == 2  # the two isocentres are POINTs
    for k, item in enumerate(rt.ROIContourSequence[0].ContourSequence):
        points = np.asarray([float(v) for v in item.ContourData]).reshape(-1, 3)
        voxels = int((label.array[:, :, k] == 1).sum())
        assert voxels * 4.0 == pytest.approx(polygon_area(points[:, :2]), rel=0.03)


def test_referenced_series_uids_of_real_label_objects() -> None:
    from mvl_pipeline.dicom.labels import referenced_series_uids

    seg = pydicom.dcmread(data_file("liver.dcm"))
    assert referenced_series_uids(seg) == [
        "1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1"
    ]
    rt = pydicom.dcmread(data_file("rtstruct.dcm"), force=True)
    assert referenced_series_uids(rt) == ["1.2.826.0.1.3680043.8.498.2010020400001.2.1.1"]
    reference, sources = image_series()
    written, _ = seg_round_trip(reference, sources, organ_and_lesion(reference.shape))
    assert referenced_series_uids(written) == [sources[0].SeriesInstanceUID]
