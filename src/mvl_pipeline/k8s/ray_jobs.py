"""The training run as a Ray job, submitted through Ray's Job Submission API (what KubeRay does).

KubeRay turns a RayJob into ``ray job submit --submission-id <RayJob name> -- <spec.entrypoint>``
against the Ray cluster's dashboard. :class:`RayJobRuns` does the same from the RayJob object the
trigger built (entrypoint, ``runtimeEnvYAML``, ``entrypointNumCpus``, labels as job metadata), so
``python -m mvl_pipeline.k8s submit --ray-address http://HEAD:8265`` runs the same trigger code
against any Ray cluster: a local multi-node one (``scenarios/retrain.py``), or a cluster without
KubeRay. The submission id is the RayJob name, so a second trigger for the same slot and data
re-attaches to the first's job instead of starting another.

Only ids, states and the data version token are logged: never the entrypoint's environment.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from mvl_pipeline.k8s import naming
from mvl_pipeline.k8s.client import CreateResult, Outcome, RayJobState

logger = logging.getLogger(__name__)

#: Ray job states that end a job, and those that mean "this data is (being) trained".
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
ACTIVE_OR_DONE = frozenset({"PENDING", "RUNNING", "SUCCEEDED"})
SUBMIT_ATTEMPTS = 6  # 2 + 4 + 8 + 16 + 30 s of backoff at most


def _status(details: Any) -> str:
    status = getattr(details, "status", "")
    return str(getattr(status, "value", status) or "")


def state_of(name: str, details: Any | None) -> RayJobState | None:
    """A Ray job's details as the RayJob state the CLI reports (KubeRay's mapping)."""
    if details is None:
        return None
    job_status = _status(details)
    deployment = "Complete" if job_status in TERMINAL else "Running"
    return RayJobState(name=name, deployment_status=deployment, job_status=job_status,
                       message=str(getattr(details, "message", "") or "")[:500])  # fmt: skip


class RayJobRuns:
    """Training runs on a Ray cluster, addressed by its dashboard URL (``http://HEAD:8265``)."""

    def __init__(self, address: str, *, client: Any | None = None) -> None:
        from ray.job_submission import JobSubmissionClient

        self.address = address
        self.namespace = address  # what the CLI prints where a Kubernetes namespace would be
        self._client = client or JobSubmissionClient(address)

    def _details(self, name: str) -> Any | None:
        try:
            return self._client.get_job_info(name)
        except RuntimeError as exc:  # the SDK's "job ... does not exist" (HTTP 404)
            if "does not exist" in str(exc) or "404" in str(exc):
                return None
            raise

    def rayjob_state(self, name: str) -> RayJobState | None:
        return state_of(name, self._details(name))

    def run_for_data_version(self, token: str) -> RayJobState | None:
        """The newest job of this data version token that is pending, running or succeeded."""
        jobs = [
            job for job in self._client.list_jobs()
            if (job.metadata or {}).get(naming.LABEL_DATA_VERSION) == token and _status(job) in ACTIVE_OR_DONE
        ]  # fmt: skip
        if not jobs:
            return None
        newest = max(jobs, key=lambda job: job.start_time or 0)
        return state_of(newest.submission_id, newest)

    def unfinished_run(self) -> RayJobState | None:
        """The newest training job (one with a data version label) still pending or running."""
        jobs = [
            job for job in self._client.list_jobs()
            if naming.LABEL_DATA_VERSION in (job.metadata or {}) and _status(job) not in TERMINAL
        ]  # fmt: skip
        if not jobs:
            return None
        newest = max(jobs, key=lambda job: job.start_time or 0)
        return state_of(newest.submission_id, newest)

    def create_or_attach(self, body: Mapping[str, Any]) -> CreateResult:
        """Submit the RayJob's entrypoint with its name as submission id, or attach to that job."""
        name = body["metadata"]["name"]
        spec = body.get("spec") or {}
        if self._details(name) is not None:
            logger.info("Ray job %s already exists: attaching to it", name)
            return CreateResult(name=name, created=False)
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "") or {}
        metadata = {str(k): str(v) for k, v in ((body.get("metadata") or {}).get("labels") or {}).items()}
        try:
            self._submit(name, spec["entrypoint"], runtime_env, metadata, spec.get("entrypointNumCpus"))
        except RuntimeError as exc:  # a concurrent trigger submitted it between the two calls
            if "already exists" not in str(exc) or self._details(name) is None:
                raise
            logger.info("Ray job %s already exists: attaching to it", name)
            return CreateResult(name=name, created=False)
        logger.info("submitted Ray job %s to %s", name, self.address)
        return CreateResult(name=name, created=True)

    def _submit(self, name: str, entrypoint: str, runtime_env: Mapping[str, Any], metadata: Mapping[str, str],
                num_cpus: float | None) -> None:  # fmt: skip
        """Submit, retrying what the dashboard calls temporary (a head whose job agent is not up
        yet answers 500 "No available agent ... try again later") with bounded backoff."""
        for attempt in range(1, SUBMIT_ATTEMPTS + 1):
            try:
                self._client.submit_job(entrypoint=entrypoint, submission_id=name, runtime_env=dict(runtime_env) or None,
                                        metadata=dict(metadata), entrypoint_num_cpus=num_cpus)  # fmt: skip
                return
            except RuntimeError as exc:
                if "try again later" not in str(exc) or attempt == SUBMIT_ATTEMPTS:
                    raise
                delay = min(2.0**attempt, 30.0)
                logger.warning("the Ray job API at %s is not ready (%s); attempt %d/%d, retrying in %.0f s",
                               self.address, str(exc)[:120], attempt, SUBMIT_ATTEMPTS, delay)  # fmt: skip
                time.sleep(delay)

    def wait(
        self,
        name: str,
        *,
        timeout_s: float,
        on_change: Callable[[RayJobState], None] | None = None,
        poll_s: float = 2.0,
    ) -> RayJobState | None:
        """Poll the job until it ends or ``timeout_s`` passes; the last state seen."""
        deadline = time.monotonic() + timeout_s
        last: RayJobState | None = None
        while True:
            state = self.rayjob_state(name)
            if state != last and state is not None and on_change is not None:
                on_change(state)
            last = state
            if state is None or state.outcome is not Outcome.NOT_FINISHED or time.monotonic() >= deadline:
                return state
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))

    def logs(self, name: str) -> str:
        return self._client.get_job_logs(name)
