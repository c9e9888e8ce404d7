"""Manifests as plain dicts: render the kustomize tree, find the RayJob, turn it into a run.

The RayJob spec lives in one place, ``k8s/base/rayjob-template.yaml`` (+ overlay patches). It can
reach ``submit`` three ways: rendered here with ``kubectl kustomize <overlay>``, read from a
pre-rendered YAML file, or read back from the cluster, where ``kubectl apply -k`` put it as the
suspended RayJob ``mvl-train-template`` (what the CronJob's pod uses: no kubectl in the image).
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

RAY_GROUP = "ray.io"
RAY_VERSION = "v1"
RAYJOB_API_VERSION = f"{RAY_GROUP}/{RAY_VERSION}"
RAYJOB_KIND = "RayJob"
RAYCRONJOB_KIND = "RayCronJob"
TEMPLATE_NAME = "mvl-train-template"
TEMPLATE_ROLE_LABEL = "mvl-pipeline/role"

# Metadata that the API server owns: never copied from a stored object into a new one.
_SERVER_METADATA = (
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
    "ownerReferences",
    "finalizers",
    "generateName",
)
_CLIENT_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)


class ManifestError(Exception):
    """A manifest could not be rendered, read, or does not hold what was asked for."""


def find_kubectl(kubectl: str | None = None) -> str:
    """Path of the kubectl binary: ``kubectl`` argument, ``$MVL_KUBECTL``, or ``kubectl`` on PATH."""
    candidate = kubectl or os.environ.get("MVL_KUBECTL") or "kubectl"
    found = shutil.which(candidate)
    if found is None:
        raise ManifestError(
            f"kubectl not found ({candidate!r}): install kubectl >= 1.27 (kustomize is built in), "
            "or render elsewhere and pass the YAML with --manifest"
        )
    return found


def render_kustomization(directory: str | Path, *, kubectl: str | None = None) -> list[dict]:
    """``kubectl kustomize <directory>``, parsed into a list of objects."""
    directory = Path(directory)
    if not (directory / "kustomization.yaml").is_file():
        raise ManifestError(f"{directory} has no kustomization.yaml")
    command = [find_kubectl(kubectl), "kustomize", str(directory)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise ManifestError(f"`{' '.join(command)}` failed: {result.stderr.strip()}")
    return parse_objects(result.stdout)


def parse_objects(text: str) -> list[dict]:
    """All non-empty documents of a multi-document YAML string."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def load_manifests(path: str | Path) -> list[dict]:
    """The objects of a rendered, multi-document YAML file."""
    try:
        return parse_objects(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(f"cannot read manifests from {path}: {exc}") from exc


def select_object(objects: list[dict], kind: str, name: str | None = None) -> dict:
    """The single object of ``kind`` (and ``name``, when given) among ``objects``."""
    matches = [
        obj
        for obj in objects
        if obj.get("kind") == kind and (name is None or obj.get("metadata", {}).get("name") == name)
    ]
    if len(matches) != 1:
        wanted = f"{kind}/{name}" if name else kind
        raise ManifestError(f"expected exactly one {wanted}, found {len(matches)}")
    return matches[0]


def pod_templates(obj: Mapping[str, Any]) -> Iterator[tuple[str, dict]]:
    """``(where, PodTemplateSpec)`` for every pod template inside a workload object.

    Knows the core workloads and KubeRay's RayJob / RayCronJob (head group, worker groups,
    submitter pod template).
    """
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        if "template" in spec:
            yield f"{kind}.spec.template", spec["template"]
    elif kind == "CronJob":
        template = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template")
        if template is not None:
            yield "CronJob.spec.jobTemplate.spec.template", template
    elif kind == "Pod":
        yield "Pod", {"metadata": obj.get("metadata", {}), "spec": spec}
    elif kind == RAYJOB_KIND:
        yield from _rayjob_spec_templates(spec, "RayJob.spec")
    elif kind == RAYCRONJOB_KIND:
        yield from _rayjob_spec_templates(
            spec.get("jobTemplate") or {}, "RayCronJob.spec.jobTemplate"
        )


def _rayjob_spec_templates(spec: Mapping[str, Any], where: str) -> Iterator[tuple[str, dict]]:
    cluster = spec.get("rayClusterSpec") or {}
    head = cluster.get("headGroupSpec") or {}
    if "template" in head:
        yield f"{where}.rayClusterSpec.headGroupSpec.template", head["template"]
    for index, group in enumerate(cluster.get("workerGroupSpecs") or []):
        if "template" in group:
            label = group.get("groupName", index)
            yield f"{where}.rayClusterSpec.workerGroupSpecs[{label}].template", group["template"]
    if "submitterPodTemplate" in spec:
        yield f"{where}.submitterPodTemplate", spec["submitterPodTemplate"]


def containers(pod_template: Mapping[str, Any]) -> Iterator[dict]:
    """Init containers and containers of a PodTemplateSpec."""
    pod_spec = pod_template.get("spec") or {}
    yield from pod_spec.get("initContainers") or []
    yield from pod_spec.get("containers") or []


def rayjob_from_template(
    template: Mapping[str, Any],
    *,
    name: str,
    namespace: str,
    labels: Mapping[str, str],
    annotations: Mapping[str, str] | None = None,
    image: str | None = None,
) -> dict:
    """A new, runnable RayJob object from the template RayJob (rendered or read from the cluster).

    Server-owned metadata and the status are dropped, the template's ``suspend`` and role label
    removed; ``image`` (when given) replaces the image of every container.
    """
    if template.get("kind") != RAYJOB_KIND:
        raise ManifestError(f"template is a {template.get('kind')}, not a {RAYJOB_KIND}")
    body = copy.deepcopy(dict(template))
    body["apiVersion"] = RAYJOB_API_VERSION
    body.pop("status", None)

    metadata = body.setdefault("metadata", {})
    for field in _SERVER_METADATA:
        metadata.pop(field, None)
    metadata["name"] = name
    metadata["namespace"] = namespace
    new_labels = {
        k: v for k, v in (metadata.get("labels") or {}).items() if k != TEMPLATE_ROLE_LABEL
    }
    new_labels.update(labels)
    metadata["labels"] = new_labels
    new_annotations = {
        k: v for k, v in (metadata.get("annotations") or {}).items() if k not in _CLIENT_ANNOTATIONS
    }
    new_annotations.update(annotations or {})
    if new_annotations:
        metadata["annotations"] = new_annotations
    else:
        metadata.pop("annotations", None)

    spec = body.get("spec")
    if not isinstance(spec, dict) or not spec.get("entrypoint"):
        raise ManifestError("template RayJob has no spec.entrypoint")
    spec.pop("suspend", None)
    if image:
        for _, pod_template in pod_templates(body):
            for container in containers(pod_template):
                container["image"] = image
    return body
