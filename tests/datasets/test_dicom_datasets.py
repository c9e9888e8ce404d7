"""DicomSeriesDataset / DicomSegDataset: round trips on tmp_path and on S3 (moto), bad inputs."""

from __future__ import annotations

import io
import shutil
import warnings

import numpy as np
import pydicom
import pytest
from kedro.io import DatasetError
from pydicom.data import get_testdata_file

from mvl_pipeline.core.errors import EmptySeriesError, NotDicomError, UnreadableFileError
from mvl_pipeline.core.volume import Volume, affine_from_geometry
from mvl_pipeline.datasets import dicom as dicom_datasets
from mvl_pipeline.datasets.dicom import (
    DicomSeg,
    DicomSegDataset,
    DicomSeriesDataset,
    DicomSeriesSave,
)
from mvl_pipeline.dicom.labels import read_segmentation
from mvl_pipeline.dicom.segmentation import write_segmentation
from mvl_pipeline.dicom.write import (
    dataset_bytes,
    make_uid,
    series_uids,
)


def data_file(name: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = get_testdata_file(name)
    if path is None:
        pytest.fail(f"test file {name} not found: install pydicom-data")
    return path


def series_save(seed: str = "a", n: int = 5) -> DicomSeriesSave:
    rng = np.random.default_rng(len(seed))
    volume = Volume(
        rng.integers(-1000, 1000, (12, 10, n)).astype(np.float32),
        affine_from_geometry((0.9, 0.8, 2.5), (3.0, 4.0, 5.0)),
    )
    header = {"PatientID": "case-0001", "StudyDate": "20240101", "StudyTime": "080000"}
    return DicomSeriesSave(volume, header, series_uids("ds", seed, n_slices=n))


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path) -> tuple[str, dict | None]:
    """A folder URL and the credentials a catalog entry would carry."""
    if request.param == "local":
        return str(tmp_path / "data"), None
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket['bucket']}/data", bucket["credentials"]


def cause(info: pytest.ExceptionInfo) -> BaseException:
    """Kedro wraps load/save errors in DatasetError; ours is the cause."""
    assert isinstance(info.value, DatasetError)
    return info.value.__cause__


def test_series_round_trip(base) -> None:
    url, credentials = base
    data = series_save()
    dataset = DicomSeriesDataset(filepath=f"{url}/ct", credentials=credentials)
    assert not dataset.exists()
    dataset.save(data)
    assert dataset.exists()
    volume = dataset.load()
    np.testing.assert_array_equal(volume.array, data.volume.array)
    np.testing.assert_allclose(volume.affine, data.volume.affine, atol=1e-6)
    names = sorted(p.rsplit("/", 1)[-1] for p in dataset._fs.find(dataset._path))
    assert names == sorted([f"{uid}.dcm" for uid in data.uids.sop_instances] + ["_COMPLETE"])
    description = repr(dataset)
    assert "secret" not in description and "testing" not in description and "ct" in description


def test_series_save_replaces_an_earlier_version(base) -> None:
    url, credentials = base
    dataset = DicomSeriesDataset(filepath=f"{url}/ct", credentials=credentials)
    dataset.save(series_save("first", n=6))
    second = series_save("second", n=4)
    dataset.save(second)
    volume = dataset.load()  # no slice of the first version mixed in
    assert volume.shape[2] == 4
    np.testing.assert_array_equal(volume.array, second.volume.array)


def test_series_save_of_ready_made_datasets(tmp_path) -> None:
    from mvl_pipeline.core.pseudonyms import require_key
    from mvl_pipeline.dicom.deid import deidentify
    from mvl_pipeline.dicom.write import write_image_series

    data = series_save()
    key = require_key("5f1e9a3c7b2d4e6f8a0c1e3b5d7f9a2c4e6b8d0f1a3c5e7b9d2f4a6c8e0b1d3f")
    slices = [
        deidentify(ds, key)[0]
        for ds in write_image_series(data.volume, header=data.header, uids=data.uids)
    ]
    dataset = DicomSeriesDataset(filepath=str(tmp_path / "deid"))
    dataset.save(slices)
    assert dataset.load().meta["series_instance_uid"] == slices[0].SeriesInstanceUID


def test_crash_mid_save_leaves_nothing_loadable(base, monkeypatch) -> None:
    url, credentials = base
    good = DicomSeriesDataset(filepath=f"{url}/good", credentials=credentials)
    good.save(series_save("good"))
    real_save = dicom_datasets.save_dataset
    calls = []

    def crash_after_first(ds, fs, protocol, path):
        if calls:
            raise OSError("disk full")
        calls.append(path)
        real_save(ds, fs, protocol, path)

    monkeypatch.setattr(dicom_datasets, "save_dataset", crash_after_first)
    broken = DicomSeriesDataset(filepath=f"{url}/broken", credentials=credentials)
    with pytest.raises(DatasetError):
        broken.save(series_save("broken"))
    assert len(calls) == 1
    assert not broken.exists()
    with pytest.raises(DatasetError) as info:
        broken.load()
    assert type(cause(info)) is UnreadableFileError
    assert good.load().shape == (12, 10, 5)  # good data alongside is not lost


def test_crash_mid_resave_keeps_the_old_version_or_refuses(base, monkeypatch) -> None:
    url, credentials = base
    dataset = DicomSeriesDataset(filepath=f"{url}/ct", credentials=credentials)
    old = series_save("old")
    dataset.save(old)

    def crash(ds, fs, protocol, path):
        raise OSError("connection reset")

    monkeypatch.setattr(dicom_datasets, "save_dataset", crash)
    with pytest.raises(DatasetError):
        dataset.save(series_save("new"))
    if url.startswith("s3://"):  # the folder itself is being replaced: refuse what is left
        with pytest.raises(DatasetError) as info:
            dataset.load()
        assert type(cause(info)) is UnreadableFileError
    else:  # a local save is swapped in only when complete: the old version is intact
        np.testing.assert_array_equal(dataset.load().array, old.volume.array)


def test_missing_empty_and_incomplete_folders(base, tmp_path) -> None:
    url, credentials = base
    missing = DicomSeriesDataset(filepath=f"{url}/nope", credentials=credentials)
    with pytest.raises(DatasetError) as info:
        missing.load()
    assert type(cause(info)) is UnreadableFileError and "nope" in str(cause(info))
    fs = missing._fs
    root = missing._path.rsplit("/", 1)[0]
    fs.pipe_file(root + "/empty/_COMPLETE", b"")
    empty = DicomSeriesDataset(filepath=f"{url}/empty", credentials=credentials)
    with pytest.raises(DatasetError) as info:
        empty.load()
    assert type(cause(info)) is EmptySeriesError and "empty" in str(cause(info))
    fs.pipe_file(root + "/drop/IM1", open(data_file("CT_small.dcm"), "rb").read())
    drop = DicomSeriesDataset(filepath=f"{url}/drop", credentials=credentials)
    with pytest.raises(DatasetError, match="incomplete"):
        drop.load()
    external = DicomSeriesDataset(
        filepath=f"{url}/drop",
        credentials=credentials,
        load_args={"require_complete": False, "min_slices": 1},
    )
    assert external.load().shape == (128, 128, 1)


def test_bad_files_in_a_series_folder(base) -> None:
    url, credentials = base
    good = DicomSeriesDataset(filepath=f"{url}/good", credentials=credentials)
    good.save(series_save("g"))
    fs = good._fs
    cases = {
        "notdicom": (b"hello, not a DICOM file" * 10, NotDicomError),
        "truncated": (open(data_file("CT_small.dcm"), "rb").read()[:5000], UnreadableFileError),
    }
    for name, (blob, error) in cases.items():
        folder = good._path.rsplit("/", 1)[0] + f"/{name}"
        fs.pipe_file(folder + "/IM1", blob)
        dataset = DicomSeriesDataset(
            filepath=f"{url}/{name}",
            credentials=credentials,
            load_args={"require_complete": False, "min_slices": 1},
        )
        with pytest.raises(DatasetError) as info:
            dataset.load()
        assert type(cause(info)) is error
        assert "IM1" in str(cause(info))
    assert good.load().shape[2] == 5


# --- DICOM SEG ------------------------------------------------------------------------------


def make_seg() -> tuple[pydicom.Dataset, Volume, np.ndarray]:
    from mvl_pipeline.dicom.assemble import assemble_series
    from mvl_pipeline.dicom.write import write_image_series

    data = series_save("seg")
    sources = [
        pydicom.dcmread(io.BytesIO(dataset_bytes(ds)))
        for ds in write_image_series(data.volume, header=data.header, uids=data.uids)
    ]
    reference = assemble_series(sources)
    label = np.zeros(reference.shape, np.uint8)
    label[2:8, 3:7, 1:4] = 1
    label[4:6, 4:6, 2] = 2
    seg = write_segmentation(
        Volume(label, reference.affine),
        source_images=sources,
        segments=[(1, "Kidney", "Organ"), (2, "Tumor", "Lesion")],
        uids=(make_uid("seg"), make_uid("seg", 1), 100),
    )
    return seg, reference, label


def test_seg_round_trip(base) -> None:
    url, credentials = base
    seg, reference, label = make_seg()
    dataset = DicomSegDataset(filepath=f"{url}/labels/seg.dcm", credentials=credentials)
    assert not dataset.exists()
    dataset.save(seg)
    assert dataset.exists()
    loaded = dataset.load()
    assert isinstance(loaded, DicomSeg) and loaded.segments == {1: "Kidney", 2: "Tumor"}
    restored, _ = read_segmentation(loaded.dataset, reference)
    np.testing.assert_array_equal(restored.array, label)
    assert "secret" not in repr(dataset)


def test_seg_bad_inputs(base, tmp_path) -> None:
    url, credentials = base
    seg, _, _ = make_seg()
    good = DicomSegDataset(filepath=f"{url}/good.dcm", credentials=credentials)
    good.save(seg)
    fs = good._fs
    root = good._path.rsplit("/", 1)[0]
    blob = dataset_bytes(seg)
    fs.pipe_file(root + "/truncated.dcm", blob[: len(blob) // 2])
    fs.pipe_file(root + "/ct.dcm", open(data_file("CT_small.dcm"), "rb").read())
    fs.pipe_file(root + "/text.dcm", b"not dicom at all" * 20)
    for name, error in (
        ("missing.dcm", UnreadableFileError),
        ("truncated.dcm", UnreadableFileError),
        ("ct.dcm", UnreadableFileError),
        ("text.dcm", NotDicomError),
    ):
        dataset = DicomSegDataset(filepath=f"{url}/{name}", credentials=credentials)
        with pytest.raises(DatasetError) as info:
            dataset.load()
        assert type(cause(info)) is error, name
        assert name in str(cause(info))
    with pytest.raises(DatasetError):
        good.save(pydicom.dcmread(data_file("CT_small.dcm")))
    assert good.load().segments == {1: "Kidney", 2: "Tumor"}


def test_real_liver_seg_loads(tmp_path) -> None:
    path = tmp_path / "liver.dcm"
    shutil.copy(data_file("liver.dcm"), path)
    loaded = DicomSegDataset(filepath=str(path)).load()
    assert loaded.segments == {1: "Liver"} and int(loaded.dataset.NumberOfFrames) == 3
