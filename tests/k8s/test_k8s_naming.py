"""Run names, data-version fingerprints and RayJob construction: pure functions, no cluster."""

from __future__ import annotations

import copy
import os
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from mvl_pipeline.k8s import naming
from mvl_pipeline.k8s.client import Outcome, RayJobState
from mvl_pipeline.k8s.drop_listing import drop_fingerprint, listing_digest
from mvl_pipeline.k8s.manifests import (
    ManifestError,
    load_manifests,
    pod_templates,
    rayjob_from_template,
    render_kustomization,
    select_object,
)

SLOT = datetime(2026, 11, 29, 3, 0, tzinfo=UTC)


# ----------------------------------------------------------------------------- names
def test_rayjob_name_is_deterministic_short_and_dns_safe() -> None:
    fingerprint = "a3f9" + "0" * 60
    name = naming.rayjob_name(SLOT, fingerprint)
    assert name == "mvl-train-20261129t0300-a3f90000"
    assert name == naming.rayjob_name(SLOT + timedelta(seconds=59), fingerprint)  # same minute slot
    assert len(name) <= naming.MAX_RAYJOB_NAME
    assert naming.is_dns1035_label(name, naming.MAX_RAYJOB_NAME)
    assert naming.rayjob_name(SLOT + timedelta(minutes=1), fingerprint) != name
    assert naming.rayjob_name(SLOT, "b" * 64) != name


@pytest.mark.parametrize("version", ["v1.2.3", "DVC rev 7f3a", "Patient_Smith_2026", "x" * 300])
def test_non_hex_data_versions_are_hashed_into_names(version: str) -> None:
    name = naming.rayjob_name(SLOT, version)
    token = name.rsplit("-", 1)[1]
    assert len(token) == 8 and all(c in "0123456789abcdef" for c in token)
    assert version.lower() not in name  # nothing of the given string leaks into the name


def test_data_version_digest_keeps_hex_revisions_and_hashes_free_text() -> None:
    assert naming.data_version_digest("7F3A9C1D2E") == "7f3a9c1d2e"
    assert naming.data_version_digest("f" * 80) == "f" * 64
    digest = naming.data_version_digest("Patient_Smith_2026")
    assert len(digest) == 64 and "smith" not in digest
    assert naming.data_version_token("Patient_Smith_2026") == digest[:8]
    assert naming.data_version_digest("abc") != "abc"  # too short to be a revision: hashed


def test_too_long_prefix_is_rejected() -> None:
    with pytest.raises(ValueError, match="47"):
        naming.rayjob_name(SLOT, "a" * 64, prefix="mvl-train-with-a-much-longer-prefix")
    with pytest.raises(ValueError, match="empty"):
        naming.data_version_token("  ")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("20261129t0300", SLOT),
        ("2026-11-29T03:00:00Z", SLOT),
        ("2026-11-29T04:00:30+01:00", SLOT),
        ("2026-11-29T03:00", SLOT),  # naive means UTC
        (str(int((SLOT - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() // 60)), SLOT),
    ],
)
def test_parse_slot(text: str, expected: datetime) -> None:
    assert naming.parse_slot(text) == expected


def test_parse_slot_now_floors_to_the_minute_in_utc() -> None:
    now = datetime(2026, 11, 29, 4, 0, 42, tzinfo=timezone(timedelta(hours=1)))
    assert naming.parse_slot("now", now=now) == SLOT
    with pytest.raises(ValueError, match="not a schedule slot"):
        naming.parse_slot("yesterday")


def test_slot_from_cron_job_name() -> None:
    minutes = int((SLOT - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() // 60)
    assert naming.slot_from_cron_job_name(f"mvl-retrain-{minutes}") == SLOT
    with pytest.raises(ValueError, match="CronJob controller"):
        naming.slot_from_cron_job_name("mvl-retrain-manual")


def test_manual_job_name() -> None:
    assert naming.manual_job_name("mvl-retrain", SLOT) == "mvl-retrain-manual-20261129t0300"
    long_name = naming.manual_job_name("x" * 60, SLOT)
    assert len(long_name) <= 63 and naming.is_dns1123_label(long_name)


def test_run_labels_are_valid_and_carry_no_free_text() -> None:
    labels = naming.run_labels(SLOT, "Patient_Smith_2026")
    assert labels[naming.LABEL_SLOT] == "20261129t0300"
    assert labels[naming.LABEL_PIPELINE] == "train"
    assert all(naming.is_label_value(value) for value in labels.values())
    assert not any("smith" in value.lower() for value in labels.values())


# ----------------------------------------------------------------------------- fingerprints
def _write(root: Path, rel: str, content: bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    os.utime(path, (1_700_000_000, 1_700_000_000))


def test_listing_digest_is_order_independent() -> None:
    entries = [("a/1.dcm", 10, "e1"), ("b/2.dcm", 20, "e2")]
    assert listing_digest(entries) == listing_digest(list(reversed(entries)))
    assert listing_digest(entries) != listing_digest(entries[:1])
    assert listing_digest(entries) != listing_digest([("a/1.dcm", 11, "e1"), ("b/2.dcm", 20, "e2")])


def test_local_drop_fingerprint_depends_on_relative_paths_sizes_and_mtimes(tmp_path: Path) -> None:
    for root in (tmp_path / "one", tmp_path / "two"):
        _write(root, "study1/series1/img1.dcm", b"x" * 100)
        _write(root, "study1/series1/img2.dcm", b"y" * 200)
    first = drop_fingerprint(str(tmp_path / "one"))
    assert first.n_files == 2 and len(first.sha256) == 64
    assert drop_fingerprint(str(tmp_path / "two")) == first  # the location does not matter
    assert drop_fingerprint(f"file://{tmp_path / 'one'}/") == first

    _write(tmp_path / "one", "study2/img.nii.gz", b"z")
    assert drop_fingerprint(str(tmp_path / "one")).sha256 != first.sha256
    os.utime(tmp_path / "two/study1/series1/img1.dcm", (1_800_000_000, 1_800_000_000))
    assert drop_fingerprint(str(tmp_path / "two")).sha256 != first.sha256


def test_s3_drop_fingerprint_uses_etags(s3_bucket: dict) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_bucket["endpoint_url"], region_name="us-east-1")
    bucket = s3_bucket["bucket"]
    for key, body in {"drop/a/1.dcm": b"one", "drop/a/2.dcm": b"two", "other/x.dcm": b"no"}.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    options = {"client_kwargs": {"endpoint_url": s3_bucket["endpoint_url"]}}

    first = drop_fingerprint(f"s3://{bucket}/drop", storage_options=options)
    assert first.n_files == 2  # only below the drop prefix
    assert drop_fingerprint(f"s3://{bucket}/drop/", storage_options=options) == first
    s3.put_object(Bucket=bucket, Key="drop/a/2.dcm", Body=b"TWO")  # same size, new content
    changed = drop_fingerprint(f"s3://{bucket}/drop", storage_options=options)
    assert changed.n_files == 2 and changed.sha256 != first.sha256


# ----------------------------------------------------------------------------- manifests
def _template(rendered: dict) -> dict:
    return select_object(rendered["gpu"], "RayJob", "mvl-train-template")


def test_rayjob_from_template(rendered: dict) -> None:
    template = copy.deepcopy(_template(rendered))
    template["metadata"].update(
        uid="u-1",
        resourceVersion="42",
        creationTimestamp="2026-01-01T00:00:00Z",
        annotations={"kubectl.kubernetes.io/last-applied-configuration": "{}"},
    )
    template["status"] = {"jobDeploymentStatus": "Suspended"}
    before = copy.deepcopy(template)

    labels = naming.run_labels(SLOT, "ab" * 32)
    body = rayjob_from_template(
        template,
        name="mvl-train-20261129t0300-abababab",
        namespace="ns1",
        labels=labels,
        annotations={"k": "v"},
        image="reg/img:1",
    )
    assert template == before  # the template is not modified
    assert body["metadata"]["name"] == "mvl-train-20261129t0300-abababab"
    assert body["metadata"]["namespace"] == "ns1"
    assert set(body["metadata"]) == {"name", "namespace", "labels", "annotations"}
    assert body["metadata"]["annotations"] == {"k": "v"}
    assert labels.items() <= body["metadata"]["labels"].items()
    assert "mvl-pipeline/role" not in body["metadata"]["labels"]
    assert "status" not in body and "suspend" not in body["spec"]
    assert body["spec"]["entrypoint"] == "kedro run --pipelines train --env cluster"
    images = {c["image"] for _, t in pod_templates(body) for c in t["spec"]["containers"]}
    assert images == {"reg/img:1"}


def test_rayjob_from_template_rejects_other_kinds(rendered: dict) -> None:
    with pytest.raises(ManifestError, match="not a RayJob"):
        rayjob_from_template(
            select_object(rendered["gpu"], "CronJob"), name="x", namespace="n", labels={}
        )


def test_select_object_needs_exactly_one(rendered: dict) -> None:
    with pytest.raises(ManifestError, match="found 0"):
        select_object(rendered["gpu"], "RayCronJob")


def test_render_and_load(project_root: Path, tmp_path: Path, kubectl: str) -> None:
    objects = render_kustomization(project_root / "k8s/overlays/cpu", kubectl=kubectl)
    assert select_object(objects, "RayJob")["metadata"]["name"] == "mvl-train-template"
    import yaml

    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(objects), encoding="utf-8")
    assert load_manifests(path) == objects


def test_render_without_kubectl_fails_clearly(
    project_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MVL_KUBECTL", "kubectl-that-does-not-exist")
    with pytest.raises(ManifestError, match="kubectl not found"):
        render_kustomization(project_root / "k8s/overlays/cpu")
    with pytest.raises(ManifestError, match="no kustomization.yaml"):
        render_kustomization(project_root / "src")


# ----------------------------------------------------------------------------- RayJob states
@pytest.mark.parametrize(
    "deployment,job,outcome",
    [
        ("Complete", "SUCCEEDED", Outcome.COMPLETE),
        ("Complete", "FAILED", Outcome.FAILED),
        ("Complete", "STOPPED", Outcome.FAILED),
        ("Failed", "FAILED", Outcome.FAILED),
        ("Failed", "", Outcome.FAILED),
        ("ValidationFailed", "", Outcome.FAILED),
        ("Running", "RUNNING", Outcome.NOT_FINISHED),
        ("Retrying", "FAILED", Outcome.NOT_FINISHED),
        ("Suspended", "", Outcome.NOT_FINISHED),
        ("", "", Outcome.NOT_FINISHED),
    ],
)
def test_rayjob_outcome(deployment: str, job: str, outcome: Outcome) -> None:
    state = RayJobState.from_object(
        {"metadata": {"name": "j"}, "status": {"jobDeploymentStatus": deployment, "jobStatus": job}}
    )
    assert state.outcome is outcome
    assert state.finished is (outcome is not Outcome.NOT_FINISHED)
