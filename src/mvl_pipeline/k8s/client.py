"""Talk to the cluster: create-or-attach RayJobs, follow them to the end, trigger the CronJob.

Uses the official ``kubernetes`` client with the user's kubeconfig (or the pod's service account
inside the cluster). RayJobs are custom objects (``ray.io/v1``, plural ``rayjobs``); their state
is KubeRay's ``.status.jobDeploymentStatus`` (the RayJob's lifecycle: Initializing, Running,
Complete, Failed, ValidationFailed, Suspended, Retrying, ...) and ``.status.jobStatus`` (the Ray
job's own: PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED).
"""

from __future__ import annotations

import copy
import enum
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError as Urllib3HTTPError

from mvl_pipeline.k8s.manifests import RAY_GROUP, RAY_VERSION
from mvl_pipeline.k8s.naming import LABEL_COMPONENT, LABEL_DATA_VERSION

logger = logging.getLogger(__name__)

RAYJOB_PLURAL = "rayjobs"
IN_CLUSTER_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
MANUAL_TRIGGER_ANNOTATION = "cronjob.kubernetes.io/instantiate"
SLOT_ENV = "MVL_SCHEDULE_SLOT"

# Longest single watch request; the loop re-reads the object and watches again until the deadline.
_WATCH_WINDOW_S = 300
# Pause before re-reading after a transient API error (server busy, connection reset).
_RETRY_PAUSE_S = 5.0


def _transient(exc: Exception) -> bool:
    """Errors that a later retry may not see: no HTTP status, 429 or 5xx."""
    if isinstance(exc, ApiException):
        return exc.status in (429, 500, 502, 503, 504)
    return True


def _describe_error(exc: Exception) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return type(exc).__name__


class Outcome(enum.IntEnum):
    """How a RayJob ended, as the CLI's exit code: 0 Complete, 1 Failed, 2 anything else."""

    COMPLETE = 0
    FAILED = 1
    NOT_FINISHED = 2


@dataclass(frozen=True)
class RayJobState:
    """The status fields of a RayJob that decide its outcome."""

    name: str
    deployment_status: str
    job_status: str
    reason: str = ""
    message: str = ""
    deleted: bool = False

    @classmethod
    def from_object(cls, obj: Mapping[str, Any], *, deleted: bool = False) -> RayJobState:
        status = obj.get("status") or {}
        return cls(
            name=(obj.get("metadata") or {}).get("name", ""),
            deployment_status=status.get("jobDeploymentStatus") or "",
            job_status=status.get("jobStatus") or "",
            reason=status.get("reason") or "",
            message=status.get("message") or "",
            deleted=deleted,
        )

    @property
    def outcome(self) -> Outcome:
        if self.deleted:
            return Outcome.NOT_FINISHED
        if self.deployment_status in ("Failed", "ValidationFailed"):
            return Outcome.FAILED
        if self.deployment_status == "Complete":
            # KubeRay also reports Complete for a Ray job that ended FAILED or STOPPED.
            return Outcome.COMPLETE if self.job_status == "SUCCEEDED" else Outcome.FAILED
        return Outcome.NOT_FINISHED

    @property
    def finished(self) -> bool:
        return self.deleted or self.outcome is not Outcome.NOT_FINISHED

    def describe(self) -> str:
        text = (
            f"{self.name}: deployment={self.deployment_status or '-'} job={self.job_status or '-'}"
        )
        if self.deleted:
            text += " (deleted)"
        if self.reason:
            text += f" reason={self.reason}"
        return text


@dataclass(frozen=True)
class CreateResult:
    """Name of the object and whether this call created it (False: it was already there)."""

    name: str
    created: bool


def load_api_client(kubeconfig: str | None = None, context: str | None = None) -> client.ApiClient:
    """An API client from the kubeconfig, or from the pod's service account inside a cluster."""
    if kubeconfig is None and context is None and IN_CLUSTER_NAMESPACE_FILE.exists():
        config.load_incluster_config()
        return client.ApiClient()
    configuration = client.Configuration()
    config.load_kube_config(
        config_file=kubeconfig, context=context, client_configuration=configuration
    )
    return client.ApiClient(configuration)


def default_namespace(kubeconfig: str | None = None, context: str | None = None) -> str:
    """The namespace of the kubeconfig context (or of the pod), else ``default``."""
    if kubeconfig is None and context is None and IN_CLUSTER_NAMESPACE_FILE.exists():
        return IN_CLUSTER_NAMESPACE_FILE.read_text(encoding="utf-8").strip()
    contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
    chosen = next((c for c in contexts if c["name"] == context), None) if context else active
    return ((chosen or {}).get("context") or {}).get("namespace") or "default"


class TrainingRuns:
    """RayJobs and retrain Jobs in one namespace."""

    def __init__(self, api_client: client.ApiClient, namespace: str) -> None:
        self.namespace = namespace
        self._custom = client.CustomObjectsApi(api_client)
        self._batch = client.BatchV1Api(api_client)

    # ----------------------------------------------------------------- RayJobs
    def get_rayjob(self, name: str) -> dict | None:
        """The RayJob object, or None when there is none of that name."""
        try:
            return self._custom.get_namespaced_custom_object(
                RAY_GROUP, RAY_VERSION, self.namespace, RAYJOB_PLURAL, name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create_or_attach(self, body: Mapping[str, Any]) -> CreateResult:
        """Create the RayJob; if one of that name exists (409), attach to it instead."""
        name = body["metadata"]["name"]
        try:
            self._custom.create_namespaced_custom_object(
                RAY_GROUP, RAY_VERSION, self.namespace, RAYJOB_PLURAL, dict(body)
            )
        except ApiException as exc:
            if exc.status != 409:
                raise
            if self.get_rayjob(name) is None:
                raise  # 409 for another reason than "already exists"
            logger.info("RayJob %s already exists: attaching to it", name)
            return CreateResult(name=name, created=False)
        logger.info("created RayJob %s in namespace %s", name, self.namespace)
        return CreateResult(name=name, created=True)

    def run_for_data_version(self, token: str) -> RayJobState | None:
        """The newest training RayJob of this data version token that has not failed."""
        listing = self._custom.list_namespaced_custom_object(
            RAY_GROUP, RAY_VERSION, self.namespace, RAYJOB_PLURAL, label_selector=f"{LABEL_DATA_VERSION}={token}"
        )
        items = sorted(listing.get("items") or [], key=lambda o: (o.get("metadata") or {}).get("creationTimestamp") or "")
        states = [RayJobState.from_object(o) for o in items if (o.get("metadata") or {}).get("labels", {}).get(LABEL_DATA_VERSION) == token]
        alive = [s for s in states if s.outcome is not Outcome.FAILED]
        return alive[-1] if alive else None

    def unfinished_run(self) -> RayJobState | None:
        """The newest training RayJob (``component=train``, a data version label, not suspended:
        never the template) that has not finished, or None."""
        listing = self._custom.list_namespaced_custom_object(
            RAY_GROUP, RAY_VERSION, self.namespace, RAYJOB_PLURAL, label_selector=f"{LABEL_COMPONENT}=train"
        )
        runs = [
            o for o in listing.get("items") or []
            if LABEL_DATA_VERSION in ((o.get("metadata") or {}).get("labels") or {})
            and not (o.get("spec") or {}).get("suspend")
        ]  # fmt: skip
        runs.sort(key=lambda o: (o.get("metadata") or {}).get("creationTimestamp") or "")
        going = [s for s in map(RayJobState.from_object, runs) if not s.finished]
        return going[-1] if going else None

    def rayjob_state(self, name: str) -> RayJobState | None:
        obj = self.get_rayjob(name)
        return None if obj is None else RayJobState.from_object(obj)

    def wait(
        self,
        name: str,
        *,
        timeout_s: float,
        on_change: Callable[[RayJobState], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> RayJobState | None:
        """Follow the RayJob until it is Complete/Failed/deleted, or ``timeout_s`` passes.

        Returns the last state seen (not finished on timeout), or None if the RayJob does not exist.
        Re-reads the object before every watch request, so a dropped or expired watch never
        loses the final state.
        """
        deadline = clock() + timeout_s
        last: RayJobState | None = None

        def seen(state: RayJobState) -> RayJobState:
            nonlocal last
            if on_change is not None and state != last:
                on_change(state)
            last = state
            return state

        while True:
            try:
                obj = self.get_rayjob(name)
            except (ApiException, Urllib3HTTPError, ConnectionError) as exc:
                if not _transient(exc) or deadline - clock() <= _RETRY_PAUSE_S:
                    raise
                logger.warning("reading %s failed (%s): retrying", name, _describe_error(exc))
                time.sleep(_RETRY_PAUSE_S)
                continue
            if obj is None:
                return None if last is None else seen(replace(last, deleted=True))
            state = seen(RayJobState.from_object(obj))
            remaining = deadline - clock()
            if state.finished or remaining <= 0:
                return state
            resource_version = (obj.get("metadata") or {}).get("resourceVersion")
            finished = self._watch_until_finished(name, resource_version, remaining, seen)
            if finished is not None:
                return finished
            if deadline - clock() <= 0:
                return last

    def _watch_until_finished(
        self,
        name: str,
        resource_version: str | None,
        remaining_s: float,
        seen: Callable[[RayJobState], RayJobState],
    ) -> RayJobState | None:
        window = max(1, int(min(remaining_s, _WATCH_WINDOW_S)))
        kwargs: dict[str, Any] = {
            "field_selector": f"metadata.name={name}",
            "timeout_seconds": window,
            # client-side bound too: some API servers (and proxies) ignore timeoutSeconds
            "_request_timeout": (10, window + 2),
        }
        if resource_version:
            kwargs["resource_version"] = resource_version
        stream = watch.Watch()
        try:
            for event in stream.stream(
                self._custom.list_namespaced_custom_object,
                RAY_GROUP,
                RAY_VERSION,
                self.namespace,
                RAYJOB_PLURAL,
                **kwargs,
            ):
                if not event:
                    continue
                obj = event.get("raw_object") or {}
                if (obj.get("metadata") or {}).get("name") != name:
                    continue
                state = seen(RayJobState.from_object(obj, deleted=event.get("type") == "DELETED"))
                if state.finished:
                    return state
        except ApiException as exc:
            if exc.status != 410:  # 410 Gone: resourceVersion too old; re-read and watch again
                raise
        except (Urllib3HTTPError, TimeoutError, ConnectionError) as exc:
            logger.debug("watch of %s interrupted (%s): re-reading", name, type(exc).__name__)
        finally:
            stream.stop()
        return None

    # ----------------------------------------------------------------- CronJob -> Job
    def create_job_from_cronjob(
        self, cronjob_name: str, job_name: str, *, env: Mapping[str, str] | None = None
    ) -> CreateResult:
        """``kubectl create job <job_name> --from=cronjob/<cronjob_name>``, plus ``env`` set on
        every container. A Job of that name already there (409) is reported, not replaced."""
        cronjob = self._batch.read_namespaced_cron_job(cronjob_name, self.namespace)
        template = self._batch.api_client.sanitize_for_serialization(cronjob.spec.job_template)
        job_spec = copy.deepcopy(template.get("spec") or {})
        for container in (job_spec.get("template") or {}).get("spec", {}).get("containers", []):
            container_env = [
                e for e in container.get("env") or [] if e.get("name") not in (env or {})
            ]
            container_env += [{"name": key, "value": value} for key, value in (env or {}).items()]
            container["env"] = container_env
        template_meta = template.get("metadata") or {}
        body = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": job_name,
                "namespace": self.namespace,
                "labels": dict(template_meta.get("labels") or {}),
                "annotations": {
                    **(template_meta.get("annotations") or {}),
                    MANUAL_TRIGGER_ANNOTATION: "manual",
                },
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "CronJob",
                        "name": cronjob.metadata.name,
                        "uid": cronjob.metadata.uid,
                        "controller": True,
                    }
                ],
            },
            "spec": job_spec,
        }
        try:
            self._batch.create_namespaced_job(self.namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            logger.info("Job %s already exists: not creating a second one", job_name)
            return CreateResult(name=job_name, created=False)
        logger.info("created Job %s from CronJob %s", job_name, cronjob_name)
        return CreateResult(name=job_name, created=True)
