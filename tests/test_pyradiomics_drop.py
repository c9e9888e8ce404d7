"""Real pyradiomics volumes -> hospital-style DICOM drop -> back: pixels and geometry survive."""

from __future__ import annotations

import numpy as np
import pydicom

from mvl_pipeline.commands import sample_drop as sample_drop_cli
from mvl_pipeline.core.volume import Volume, guess_modality
from mvl_pipeline.datasets.drop import DropFolderDataset
from mvl_pipeline.datasets.volume import VolumeDataset
from mvl_pipeline.dicom.assemble import assemble_series
from mvl_pipeline.dicom.labels import read_segmentation
from mvl_pipeline.dicom.write import dataset_bytes
from mvl_pipeline.synthetic.sample_drop import convert_volumes_to_drop, exact_rescale

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def _by_series(drop) -> dict[str, list[pydicom.Dataset]]:
    series: dict[str, list[pydicom.Dataset]] = {}
    for item in drop.files:
        with drop.open(item.relpath) as handle:
            ds = pydicom.dcmread(handle)
        series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    return series


def test_breast1_survives_nrrd_to_drop_to_volume(shared_data, tmp_path):
    src = shared_data / "pyradiomics"
    before = sorted(p.name for p in src.iterdir())
    assert sample_drop_cli.main(
        ["--src", str(src), "--dst", str(tmp_path / "drop"), "--cases", "breast1", "--seed", "3"]
    ) == 0
    assert sorted(p.name for p in src.iterdir()) == before  # the source is only read

    image = VolumeDataset(filepath=str(src / "breast1_image.nrrd")).load()
    label = VolumeDataset(filepath=str(src / "breast1_label.nrrd")).load()
    drop = DropFolderDataset(filepath=str(tmp_path / "drop")).load()
    assert len(drop.files) == image.shape[2] + 1
    series = _by_series(drop)
    (slices,) = [s for s in series.values() if s[0].SOPClassUID != SEG_SOP_CLASS]
    (segs,) = [s for s in series.values() if s[0].SOPClassUID == SEG_SOP_CLASS]
    first = slices[0]
    assert first.SOPClassUID == pydicom.uid.MRImageStorage and first.Modality == "MR"
    assert (float(first.RescaleSlope), float(first.RescaleIntercept)) == (1.0, 0.0)
    assert str(first.PatientName) and first.PatientID  # fake PHI, generated

    volume = assemble_series(slices)
    assert volume.shape == image.shape
    assert np.array_equal(volume.array, image.array.astype(np.float32))  # pixel values exact
    assert np.allclose(volume.spacing, image.spacing, atol=1e-6)
    assert np.allclose(volume.affine, image.affine, atol=1e-4)

    restored, names = read_segmentation(segs[0], volume)
    assert np.array_equal(np.asarray(restored.array) == 1, label.array == 1)
    assert np.count_nonzero(np.asarray(restored.array)) == np.count_nonzero(label.array) > 0
    assert {int(k): v for k, v in dict(names).items()} == {1: "Lesion"}


def test_converter_is_deterministic_and_never_writes_case_names(shared_data):
    cases = sample_drop_cli.load_cases(shared_data / "pyradiomics", ["breast1"])
    first = convert_volumes_to_drop(cases, seed=1)
    second = convert_volumes_to_drop(cases, seed=1)
    assert first.keys() == second.keys()
    assert all(dataset_bytes(first[p]) == dataset_bytes(second[p]) for p in first)
    assert not any("breast" in path for path in first)
    assert not set(convert_volumes_to_drop(cases, seed=2)) & set(first)


def test_modality_and_rescale_choices():
    affine = np.eye(4)
    ct = Volume(np.full((2, 2, 3), -1024, np.int16), affine)
    mr = Volume(np.arange(12, dtype=np.int16).reshape(2, 2, 3), affine)
    assert guess_modality(ct) == "CT" and guess_modality(mr) == "MR"
    assert exact_rescale(mr.array) == (1.0, 0.0)
    floats = np.linspace(-3.0, 5.0, 12).reshape(2, 2, 3)
    slope, intercept = exact_rescale(floats)
    stored = np.rint((floats - intercept) / slope)
    assert stored.min() >= -32768 and stored.max() <= 32767
    assert np.max(np.abs(stored * slope + intercept - floats)) <= slope


def test_cli_fails_loudly_on_missing_cases(shared_data, tmp_path):
    """A missing case, a folder without volume pairs, a --src that does not exist and a bad
    --modality each end the command with one usage line and exit status 2, not a traceback, and
    nothing is written."""
    import subprocess
    import sys

    def run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "mvl_pipeline.commands.sample_drop", "--dst", str(tmp_path / "d"), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)

    pyradiomics = str(shared_data / "pyradiomics")
    for args, message in [
        (["--src", pyradiomics, "--cases", "liver9"], "cases ['liver9'] not found in"),
        (["--src", str(tmp_path)], "no <case>_image/<case>_label volume pairs in"),
        (["--src", str(tmp_path / "nowhere")], f"--src {tmp_path / 'nowhere'}: no such folder"),
        (["--src", pyradiomics, "--modality", "breast1=PET"], "--modality expects CASE=CT or CASE=MR"),
    ]:
        result = run(*args)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert f"python -m mvl_pipeline.commands.sample_drop: error: {message}" in result.stderr.splitlines()[-1]
    assert not (tmp_path / "d").exists()


def test_left_handed_brain1_grid_comes_back_as_the_same_world_image(shared_data):
    """brain1's grid is left-handed (its k axis runs against the slice normal): DICOM readers
    stack slices along the normal, so the volume returns with k reversed, voxel for voxel the
    same image in world space."""
    cases = sample_drop_cli.load_cases(shared_data / "pyradiomics", ["brain1"])
    image, _ = cases["brain1"]
    assert np.linalg.det(image.affine[:3, :3]) < 0
    files = convert_volumes_to_drop(cases, seed=0)
    slices = [ds for ds in files.values() if ds.Modality == "MR"]
    volume = assemble_series(slices)
    reverse_k = np.eye(4)
    reverse_k[2, 2], reverse_k[2, 3] = -1.0, image.shape[2] - 1
    assert np.allclose(volume.affine, image.affine @ reverse_k, atol=1e-4)
    assert np.array_equal(volume.array, image.array[:, :, ::-1].astype(np.float32))
