"""Bad input that an audit (2026-12-04) found recorded as ``internal_error`` (a crash of the code,
retried on every run, its reason saying nothing) or with a misleading detail, each in a drop
beside good studies: every one now gets a specific reason, and the good ones are ingested."""

from __future__ import annotations

import gzip
import io

import nibabel as nib
import numpy as np
import pydicom
from ingest_support import drop_files, ingest_params, run_ingest, write_drop

from mvl_pipeline.datasets.drop import encode_file


def _edit(files: dict[str, bytes], change, *, only_slices: bool = True, first: int | None = None) -> dict[str, bytes]:
    """The study's files with ``change(ds)`` applied to its slices (or its SEG), or to the first
    ``first`` slices only."""
    out, done = {}, 0
    for relpath, data in files.items():
        ds = pydicom.dcmread(io.BytesIO(data))
        is_seg = "SegmentSequence" in ds
        if is_seg != only_slices and (first is None or done < first):
            change(ds)
            done += 1
        out[relpath] = encode_file(ds)
    return out


def _nifti(array: np.ndarray, affine: np.ndarray) -> bytes:
    return gzip.compress(nib.Nifti1Image(array, affine).to_bytes())


def test_each_bad_input_gets_its_own_reason_and_the_good_studies_are_ingested(tmp_path, sample_studies):
    def zero_spacing(ds):
        ds.PixelSpacing = [0.0, 0.0]

    def truncate_seg(ds):
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]

    def other_patient(ds):
        ds.PatientID = "P-OTHER"

    files = drop_files(sample_studies[4])  # a good study
    files |= _edit(drop_files(sample_studies[0]), zero_spacing)
    files |= _edit(drop_files(sample_studies[1]), truncate_seg, only_slices=False)
    files |= _edit(drop_files(sample_studies[2]), other_patient, first=1)
    rng = np.random.default_rng(0)
    image = rng.normal(300, 50, (12, 10, 8)).astype(np.float32)
    label = (image > 320).astype(np.uint8)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    flipped = affine.copy()
    flipped[0, 0] = -1.0
    rgb = np.zeros(image.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    # neutral names: a file's base name is its patient hint, scrubbed from the details ("rgb" would be)
    files |= {
        "vol/c1_image.nii.gz": _nifti(image.astype(np.complex64), affine),
        "vol/c1_label.nii.gz": _nifti(label, affine),
        "vol/c2_image.nii.gz": _nifti(rgb, affine),
        "vol/c2_label.nii.gz": _nifti(label, affine),
        "vol/c3_image.nii.gz": _nifti(image, affine),
        "vol/c3_label.nii.gz": _nifti(label, flipped),
        "vol/c4_image.nii.gz": _nifti(image, affine),
        "vol/c4_label.nii.gz": _nifti(label, affine),
        # a 2-D image stored with its thin axis first (it passed: only the third axis was checked)
        "vol/c5_image.nii.gz": _nifti(image.transpose(2, 0, 1)[:1], affine),
        "vol/c5_label.nii.gz": _nifti(label.transpose(2, 0, 1)[:1], affine),
    }
    drop = write_drop(tmp_path / "drop", files)
    run = run_ingest(drop, tmp_path / "data", ingest_params(labels=None))

    details = sorted((r["reason"], r["detail"]) for r in run.quarantine)
    assert details == [
        ("label_grid_mismatch", "label and image have the same shape (12, 10, 8) but other orientation or "
                                "position (their affines differ by up to 2)"),
        ("mixed_patients", "the study's files name 2 different patients (Patient ID)"),
        ("too_few_slices", "the image is 1 voxel(s) thick along axis 0 (shape [1, 12, 10]): a 3-D image needs at "
                           "least 8 along every axis"),
        ("unreadable_file", "PixelSpacing must be positive"),
        ("unreadable_file", "the SEG's pixel data does not fit its frames (truncated, or a wrong Number of Frames: "
                            "ValueError)"),
        ("unreadable_file", "voxels of type RGB are not supported: an image of real numbers is needed"),
        ("unreadable_file", "voxels of type complex64 are not supported: an image of real numbers is needed"),
    ]  # fmt: skip
    assert len(run.case_ids()) == 2  # the good study and the good pair
    assert sample_studies[4].case_id in run.case_ids()


def test_a_series_with_burned_in_text_on_any_slice_is_quarantined(tmp_path, sample_studies):
    """An audit (2026-12-07): only the series' first file was checked for burned-in text, so a
    series whose later slices were annotated and sent again (BurnedInAnnotation YES on them, not
    on the first) was ingested, its pixels into the cases and the overlays."""
    annotated = drop_files(sample_studies[0])
    slices = sorted(p for p, data in annotated.items() if "SegmentSequence" not in pydicom.dcmread(io.BytesIO(data)))
    for relpath in slices[1:]:  # every slice but the one read first
        ds = pydicom.dcmread(io.BytesIO(annotated[relpath]))
        ds.BurnedInAnnotation = "YES"
        annotated[relpath] = encode_file(ds)
    drop = write_drop(tmp_path / "drop", annotated | drop_files(sample_studies[4]))
    run = run_ingest(drop, tmp_path / "data")
    assert [r["reason"] for r in run.quarantine] == ["burned_in_annotation"]
    assert run.case_ids() == [sample_studies[4].case_id]
