"""The same drop served from S3 (a moto server bucket, real HTTP through s3fs) ingests to the
same result as from disk; a second run against the bucket (ETag fingerprints) does nothing."""

from __future__ import annotations

import gzip

import nibabel as nib
import s3fs
from ingest_support import assert_same_cases, drop_files, run_ingest, snapshot, write_drop


def test_drop_in_s3_ingests_like_the_same_drop_on_disk(
    tmp_path, s3_bucket, sample_studies, count_processed
):
    files = drop_files(*sample_studies[:3])
    truth = sample_studies[3]
    files["nifti/pt9_image.nii.gz"] = gzip.compress(
        nib.Nifti1Image(truth.image.array, truth.image.affine).to_bytes()
    )
    files["nifti/pt9_label.nii.gz"] = gzip.compress(
        nib.Nifti1Image(truth.label.array, truth.image.affine).to_bytes()
    )
    files["incoming/broken.dcm"] = b"DICM but not really"
    local_drop = write_drop(tmp_path / "drop", files)

    credentials = s3_bucket["credentials"]
    fs = s3fs.S3FileSystem(
        key=credentials["key"],
        secret=credentials["secret"],
        client_kwargs=credentials["client_kwargs"],
    )
    prefix = f"{s3_bucket['bucket']}/hospital/drop"
    for relpath, data in files.items():  # uploaded as a hospital's sync job would, file by file
        fs.pipe_file(f"{prefix}/{relpath}", data)
    fs.invalidate_cache()
    assert len(fs.find(prefix)) == len(files)

    from_disk = run_ingest(local_drop, tmp_path / "disk")
    from_s3 = run_ingest(f"s3://{prefix}", tmp_path / "s3", drop_credentials=credentials)

    assert len(from_s3.case_ids()) == 4
    assert_same_cases(from_disk, from_s3)
    assert from_s3.manifest["units"] == from_disk.manifest["units"]
    assert sorted(from_s3.manifest["files"]) == sorted(from_disk.manifest["files"])
    fingerprints = {f["fingerprint"].split(":")[0] for f in from_s3.manifest["files"].values()}
    assert fingerprints == {"etag"}
    assert from_s3.quarantine == from_disk.quarantine and [
        r["reason"] for r in from_s3.quarantine
    ] == ["not_dicom"]
    assert from_s3.summary.equals(from_disk.summary)
    assert snapshot(from_s3.cases_path) == snapshot(from_disk.cases_path)  # byte for byte
    assert len(count_processed()) == 2 * 5

    before = snapshot(from_s3.root)
    run_ingest(f"s3://{prefix}", tmp_path / "s3", drop_credentials=credentials)
    assert len(count_processed()) == 2 * 5  # nothing new in the bucket: nothing processed
    assert snapshot(from_s3.root) == before
