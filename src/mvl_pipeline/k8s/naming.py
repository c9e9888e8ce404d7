"""Deterministic, PHI-free names for training runs on Kubernetes.

A scheduled run is identified by its schedule slot (a UTC minute) and the version of the data it
trains on, so its RayJob name is a pure function of the two::

    mvl-train-<YYYYMMDD>t<HHMM>-<first 8 hex of the data version>

Two triggers for the same slot and the same data therefore ask for the same name, and the second
one finds the first's RayJob (HTTP 409) instead of starting another run. Names and labels carry
only the slot, a hash and the pipeline name: never a file name, a patient or a study identifier.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta

RAYJOB_PREFIX = "mvl-train"
PIPELINE = "train"

# KubeRay appends a 6-character suffix to the RayJob name for its RayCluster, whose name may have at
# most 53 characters, so a RayJob name may have at most 47 (KubeRay's MaxRayJobNameLength); it must
# also be a DNS-1035 label (RayJob names become Service names).
MAX_RAYJOB_NAME = 47
# Job names end up in the pods' `batch.kubernetes.io/job-name` label: at most 63 characters.
MAX_JOB_NAME = 63
MAX_LABEL_VALUE = 63
DATA_VERSION_CHARS = 8

_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_SLOT_TOKEN = re.compile(r"^(\d{8})t(\d{4})$")
_HEX = re.compile(r"^[0-9a-f]+$")
_CRON_JOB_SUFFIX = re.compile(r"-(\d+)$")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Labels that the runs carry (keys are fixed; values come from run_labels()).
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PIPELINE = "mvl-pipeline/pipeline"
LABEL_SLOT = "mvl-pipeline/slot"
LABEL_DATA_VERSION = "mvl-pipeline/data-version"
ANNOTATION_DATA_FINGERPRINT = "mvl-pipeline/data-fingerprint"


def is_dns1035_label(name: str, max_length: int = 63) -> bool:
    """True for a valid DNS-1035 label (starts with a letter) of at most ``max_length`` chars."""
    return 0 < len(name) <= max_length and _DNS1035_LABEL.match(name) is not None


def is_dns1123_label(name: str, max_length: int = 63) -> bool:
    """True for a valid DNS-1123 label of at most ``max_length`` characters."""
    return 0 < len(name) <= max_length and _DNS1123_LABEL.match(name) is not None


def is_label_value(value: str) -> bool:
    """True for a valid Kubernetes label value (at most 63 characters, may be empty)."""
    return len(value) <= MAX_LABEL_VALUE and _LABEL_VALUE.match(value) is not None


def floor_to_minute(moment: datetime) -> datetime:
    """``moment`` in UTC, seconds dropped. A naive datetime is taken to be UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).replace(second=0, microsecond=0)


def slot_token(slot: datetime) -> str:
    """The slot as it appears in names and labels: ``YYYYMMDDtHHMM`` (UTC)."""
    return floor_to_minute(slot).strftime("%Y%m%dt%H%M")


def parse_slot(value: str, *, now: datetime | None = None) -> datetime:
    """Parse a schedule slot given on the command line.

    Accepted: ``now``; a slot token ``20261129t0300``; ISO 8601 (``2026-11-29T03:00:00Z``; naive
    means UTC); or an integer number of minutes since the Unix epoch (the CronJob controller's
    job-name suffix). The result is floored to the minute, in UTC.
    """
    text = value.strip()
    if text.lower() == "now":
        return floor_to_minute(now if now is not None else datetime.now(UTC))
    match = _SLOT_TOKEN.match(text.lower())
    if match:
        return datetime.strptime(match.group(1) + match.group(2), "%Y%m%d%H%M").replace(tzinfo=UTC)
    if text.isdigit():
        return _EPOCH + timedelta(minutes=int(text))
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"not a schedule slot: {value!r} (use 'now', YYYYMMDDtHHMM, ISO 8601, "
            "or minutes since the epoch)"
        ) from None
    return floor_to_minute(parsed)


def slot_from_cron_job_name(job_name: str) -> datetime:
    """The scheduled time of a Job created by the CronJob controller.

    The controller names each Job ``<cronjob name>-<scheduled time in minutes since the epoch>``;
    that suffix is the only place the scheduled time reaches the pod (through the pod's
    ``batch.kubernetes.io/job-name`` label and the downward API).
    """
    match = _CRON_JOB_SUFFIX.search(job_name)
    if match is None:
        raise ValueError(
            f"job name {job_name!r} does not end in -<minutes since the epoch>: "
            "it was not created by the CronJob controller (pass --slot explicitly)"
        )
    return _EPOCH + timedelta(minutes=int(match.group(1)))


def data_version_digest(data_version: str) -> str:
    """A hex digest standing for a data version: never the free text itself.

    A hex string of 8+ characters (the drop fingerprint, a git or DVC revision) is kept (lowercase,
    at most 64 characters); anything else (a tag, a name) is replaced by its sha256, so that no
    free text, which might contain an identifier, reaches names, labels or annotations.
    """
    text = data_version.strip().lower()
    if not text:
        raise ValueError("empty data version")
    if _HEX.match(text) and len(text) >= DATA_VERSION_CHARS:
        return text[:64]
    return hashlib.sha256(data_version.strip().encode("utf-8")).hexdigest()


def data_version_token(data_version: str) -> str:
    """The 8 hex characters of a data version that go into names and labels."""
    return data_version_digest(data_version)[:DATA_VERSION_CHARS]


def rayjob_name(slot: datetime, data_version: str, *, prefix: str = RAYJOB_PREFIX) -> str:
    """``<prefix>-<slot token>-<data version token>``, checked against KubeRay's limits."""
    name = f"{prefix}-{slot_token(slot)}-{data_version_token(data_version)}"
    if not is_dns1035_label(name, MAX_RAYJOB_NAME):
        raise ValueError(
            f"RayJob name {name!r} is not a DNS-1035 label of at most {MAX_RAYJOB_NAME} characters"
        )
    return name


def manual_job_name(cronjob_name: str, slot: datetime) -> str:
    """Name of a Job that ``trigger-retrain`` creates from the CronJob for ``slot``.

    ``<cronjob>-manual-<slot token>``: deterministic (a second trigger in the same minute is a
    409, not a second Job) and never mistaken for a controller-made ``<cronjob>-<minutes>`` name.
    """
    suffix = f"-manual-{slot_token(slot)}"
    name = cronjob_name[: MAX_JOB_NAME - len(suffix)].rstrip("-") + suffix
    if not is_dns1123_label(name, MAX_JOB_NAME):
        raise ValueError(f"Job name {name!r} is not a DNS-1123 label of at most {MAX_JOB_NAME}")
    return name


def run_labels(slot: datetime, data_version: str) -> dict[str, str]:
    """Labels of a training run: component, pipeline, slot and data version token; no PHI."""
    return {
        LABEL_NAME: "mvl-pipeline",
        LABEL_COMPONENT: "train",
        LABEL_PIPELINE: PIPELINE,
        LABEL_SLOT: slot_token(slot),
        LABEL_DATA_VERSION: data_version_token(data_version),
    }
