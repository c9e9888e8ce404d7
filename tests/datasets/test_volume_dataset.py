"""VolumeDataset: NIfTI / NRRD round trips (local and S3), geometry, bad input, crash safety."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import nrrd
import numpy as np
import pytest
from kedro.io.core import DatasetError, Version

from mvl_pipeline.core.errors import ImagingError, UnreadableFileError
from mvl_pipeline.core.volume import Volume
from mvl_pipeline.datasets.volume import VolumeDataset, VolumeFileError
from mvl_pipeline.formats.nifti import encode_nifti
from mvl_pipeline.formats.nrrd import encode_nrrd
from mvl_pipeline.synthetic.phantom import acquisition_affine

EXTENSIONS = ["nii", "nii.gz", "nrrd", "nhdr"]


def _volume(dtype: str, seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    shape = (7, 9, 5)
    if dtype.startswith("float"):
        array = rng.normal(40.0, 300.0, size=shape).astype(dtype)
    else:
        array = rng.integers(0, 3, size=shape).astype(dtype)
    affine = acquisition_affine(
        shape=shape, spacing=(0.7, 0.9, 2.5), orientation="oblique",
        centre=(12.5, -30.25, 101.0), tilt_deg=(17.0, -6.0),
    )
    return Volume(array, affine, {"modality": "CT", "label_names": {"1": "Liver"}, "seed": seed})


def _assert_same(loaded: Volume, expected: Volume) -> None:
    assert loaded.array.dtype == expected.array.dtype
    assert np.array_equal(loaded.array, expected.array)
    assert np.allclose(loaded.affine, expected.affine, atol=1e-9)
    assert dict(loaded.meta) == dict(expected.meta)


@pytest.mark.parametrize("ext", EXTENSIONS)
@pytest.mark.parametrize("dtype", ["float32", "uint8", "int16"])
def test_round_trip_local(tmp_path, ext: str, dtype: str):
    volume = _volume(dtype)
    dataset = VolumeDataset(filepath=str(tmp_path / f"case.{ext}"))
    assert not dataset.exists()
    dataset.save(volume)
    assert dataset.exists()
    _assert_same(dataset.load(), volume)


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_round_trip_s3(s3_bucket, ext: str):
    volume = _volume("float32", seed=1)
    label = _volume("uint8", seed=2)
    root = f"s3://{s3_bucket['bucket']}/volumes"
    for name, item in (("image", volume), ("label", label)):
        dataset = VolumeDataset(
            filepath=f"{root}/{name}.{ext}", credentials=s3_bucket["credentials"]
        )
        dataset.save(item)
        _assert_same(dataset.load(), item)


def test_files_are_readable_by_the_reference_libraries(tmp_path):
    volume = _volume("int16")
    VolumeDataset(filepath=str(tmp_path / "v.nii.gz")).save(volume)
    VolumeDataset(filepath=str(tmp_path / "v.nrrd")).save(volume)
    image = nib.load(tmp_path / "v.nii.gz")
    assert np.array_equal(np.asanyarray(image.dataobj), volume.array)
    assert np.allclose(image.affine, volume.affine, atol=1e-4)
    data, header = nrrd.read(str(tmp_path / "v.nrrd"))
    assert np.array_equal(data, volume.array) and header["space"] == "left-posterior-superior"
    assert np.allclose(header["space directions"].T, np.diag([-1, -1, 1]) @ volume.affine[:3, :3])


def test_gzip_outputs_are_deterministic(tmp_path):
    volume = _volume("float32")
    for ext in ("nii.gz", "nrrd"):
        first, second = tmp_path / f"a.{ext}", tmp_path / f"b.{ext}"
        VolumeDataset(filepath=str(first)).save(volume)
        VolumeDataset(filepath=str(second)).save(volume)
        assert first.read_bytes() == second.read_bytes()


def test_real_pyradiomics_nrrd_geometry(shared_data):
    folder = shared_data / "pyradiomics"
    image = VolumeDataset(filepath=str(folder / "breast1_image.nrrd")).load()
    label = VolumeDataset(filepath=str(folder / "breast1_label.nrrd")).load()
    _, header = nrrd.read(str(folder / "breast1_image.nrrd"))
    assert image.shape == (45, 120, 21) and image.array.dtype == np.int16
    assert label.array.dtype == np.int16 and set(np.unique(label.array)) == {0, 1}
    assert image.same_grid(label)
    # LPS space directions/origin -> RAS: x and y negated
    flip = np.diag([-1.0, -1.0, 1.0])
    assert np.allclose(image.affine[:3, :3], flip @ header["space directions"].T)
    assert np.allclose(image.affine[:3, 3], flip @ header["space origin"])
    assert np.allclose(image.spacing, (0.664062, 0.664062, 2.1))
    assert image.orientation == "LPS"
    # brain1's second axis runs anterior in LPS terms: a different orientation, same rule
    brain = VolumeDataset(filepath=str(folder / "brain1_label.nrrd")).load()
    assert brain.array.dtype == np.int32 and brain.orientation == "LAS"


@pytest.mark.parametrize(
    ("space", "signs"),
    [
        ("right-anterior-superior", (1, 1, 1)),
        ("RAS", (1, 1, 1)),
        ("left-anterior-superior", (-1, 1, 1)),
        ("LPS", (-1, -1, 1)),
    ],
)
def test_nrrd_spaces_are_converted_to_ras(tmp_path, space: str, signs):
    directions = np.array([[0.0, 2.0, 0.0], [1.5, 0.0, 0.0], [0.0, 0.0, 3.0]])  # rows: axes
    origin = np.array([10.0, -20.0, 30.0])
    path = tmp_path / "v.nrrd"
    nrrd.write(
        str(path), np.zeros((3, 4, 5), np.int16),
        {"space": space, "space directions": directions, "space origin": origin},
    )
    volume = VolumeDataset(filepath=str(path)).load()
    flip = np.diag(signs).astype(float)
    assert np.allclose(volume.affine[:3, :3], flip @ directions.T)
    assert np.allclose(volume.affine[:3, 3], flip @ origin)
    assert volume.meta == {}


def test_nrrd_with_unsupported_space_is_rejected(tmp_path):
    path = tmp_path / "v.nrrd"
    nrrd.write(
        str(path), np.zeros((3, 4, 5), np.int16),
        {"space": "scanner-xyz", "space directions": np.eye(3), "space origin": np.zeros(3)},
    )
    with pytest.raises(VolumeFileError, match="unsupported NRRD space") as info:
        VolumeDataset(filepath=str(path)).load()
    assert info.value.path.endswith("v.nrrd")


def _good_neighbour(tmp_path) -> tuple[VolumeDataset, Volume]:
    volume = _volume("float32", seed=5)
    dataset = VolumeDataset(filepath=str(tmp_path / "good.nii.gz"))
    dataset.save(volume)
    return dataset, volume


def _nifti_bytes(compress: bool) -> bytes:
    return encode_nifti(_volume("float32", 9), compress=compress)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("missing.nii.gz", None, "no such volume file"),
        ("truncated.nii.gz", lambda: _nifti_bytes(True)[:-300], "gzip"),
        ("truncated.nii", lambda: _nifti_bytes(False)[:-100], "NIfTI"),
        ("short.nii", lambda: b"\x5c\x01\x00\x00" + b"\x00" * 40, "too short"),
        ("text.nii", lambda: b"this is not an image\n" * 40, "not a NIfTI"),
        ("text.nii.gz", lambda: gzip.compress(b"hello " * 100), "not a NIfTI"),
        ("plain.nrrd", lambda: b"P5 not a nrrd\n" * 10, "NRRD"),
        (
            "truncated.nrrd",
            lambda: encode_nrrd(_volume("int16", 3), encoding="raw")[:-50],
            "NRRD data",
        ),
    ],
)
def test_bad_input_raises_a_specific_error_naming_the_path(tmp_path, name, content, match):
    good, good_volume = _good_neighbour(tmp_path)
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content())
    with pytest.raises(VolumeFileError, match=match) as info:
        VolumeDataset(filepath=str(path)).load()
    error = info.value
    assert isinstance(error, UnreadableFileError) and isinstance(error, ImagingError)
    assert isinstance(error, DatasetError)  # what Kedro's catalog callers catch
    assert error.path == str(path) and str(path) in str(error)
    assert error.reason == "unreadable_file"
    _assert_same(good.load(), good_volume)  # the good file beside it is untouched


def test_nhdr_with_missing_data_file(tmp_path):
    dataset = VolumeDataset(filepath=str(tmp_path / "v.nhdr"))
    dataset.save(_volume("int16"))
    (data_file,) = [p for p in tmp_path.iterdir() if p.name.endswith(".raw.gz")]
    data_file.unlink()
    with pytest.raises(VolumeFileError, match="no such volume file") as info:
        dataset.load()
    assert info.value.path == str(data_file)


def test_nhdr_resave_replaces_its_data_file(tmp_path):
    dataset = VolumeDataset(filepath=str(tmp_path / "v.nhdr"))
    dataset.save(_volume("int16", seed=1))
    dataset.save(_volume("int16", seed=2))
    assert len([p for p in tmp_path.iterdir() if p.name.endswith(".raw.gz")]) == 1
    _assert_same(dataset.load(), _volume("int16", seed=2))


@pytest.mark.parametrize("ext", ["nii.gz", "nrrd", "nhdr"])
def test_crash_mid_save_leaves_the_previous_file(tmp_path, monkeypatch, ext: str):
    dataset = VolumeDataset(filepath=str(tmp_path / f"v.{ext}"))
    old = _volume("float32", seed=1)
    dataset.save(old)
    before = sorted(p.name for p in tmp_path.iterdir())

    def crash(_fd):  # the bytes are written, the rename has not happened
        raise OSError("disk unplugged")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(DatasetError):
        dataset.save(_volume("float32", seed=2))
    monkeypatch.undo()
    _assert_same(dataset.load(), old)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary left over


def test_crash_on_first_save_leaves_nothing_loadable(tmp_path, monkeypatch):
    dataset = VolumeDataset(filepath=str(tmp_path / "v.nii.gz"))
    monkeypatch.setattr(os, "fsync", lambda _fd: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(DatasetError):
        dataset.save(_volume("float32"))
    monkeypatch.undo()
    assert not dataset.exists()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(VolumeFileError):
        dataset.load()


def test_versioned_saves_load_the_latest(tmp_path):
    path = str(tmp_path / "v.nii.gz")
    first, second = _volume("float32", 1), _volume("float32", 2)
    VolumeDataset(filepath=path, version=Version(None, "2026-01-01T00.00.00.000Z")).save(first)
    VolumeDataset(filepath=path, version=Version(None, "2026-01-02T00.00.00.000Z")).save(second)
    _assert_same(VolumeDataset(filepath=path, version=Version(None, None)).load(), second)
    _assert_same(
        VolumeDataset(filepath=path, version=Version("2026-01-01T00.00.00.000Z", None)).load(),
        first,
    )


def test_describe_never_shows_credentials_and_options_are_checked(s3_bucket):
    credentials = {**s3_bucket["credentials"], "secret": "very-secret-value"}
    dataset = VolumeDataset(
        filepath=f"s3://{s3_bucket['bucket']}/v.nrrd", credentials=credentials
    )
    assert "very-secret-value" not in repr(dataset) and "very-secret-value" not in str(dataset)
    with pytest.raises(DatasetError, match="unknown save_args"):
        VolumeDataset(filepath="v.nii", save_args={"compression": 3})
    with pytest.raises(ValueError, match="expected one of .nii.gz, .nii, .nrrd, .nhdr"):
        VolumeDataset(filepath="v.mha")


def test_load_args_dtype_cast(tmp_path):
    dataset = VolumeDataset(filepath=str(tmp_path / "l.nrrd"))
    dataset.save(_volume("int16"))
    loaded = VolumeDataset(filepath=str(tmp_path / "l.nrrd"), load_args={"dtype": "uint8"}).load()
    assert loaded.array.dtype == np.uint8
