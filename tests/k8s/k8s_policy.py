"""Checks for the rendered manifests in k8s/: schemas first, then the policy the schemas miss.

Every check takes the rendered objects (a list of dicts, as ``kubectl kustomize`` prints them)
and returns a list of problems (strings); an empty list means the check passed. The tests run each
check on every overlay, and each check on a deliberately broken copy to prove it can fail.
"""

from __future__ import annotations

import copy
import re
import zoneinfo
from collections.abc import Iterator, Mapping
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

from mvl_pipeline.k8s.manifests import containers, pod_templates

OVERLAYS = ("cpu", "gpu", "raycronjob")
RENDER_TARGETS = {
    "base": "k8s/base",
    "cpu": "k8s/overlays/cpu",
    "gpu": "k8s/overlays/gpu",
    "raycronjob": "k8s/overlays/raycronjob",
}
K8S_VERSIONS = ("1.30.0", "1.32.0")
CRD_KINDS = {"RayJob": "ray.io_rayjobs.yaml", "RayCronJob": "ray.io_raycronjobs.yaml"}
GPU_OVERLAYS = {"gpu", "raycronjob"}  # raycronjob builds on the gpu overlay
SECRET_NAME = "mvl-pipeline-secrets"
SECRET_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MVL_PSEUDONYM_KEY", "HF_TOKEN",
               "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
CONFIGMAP_NAME = "mvl-pipeline-config"
CONFIGMAP_REQUIRED = {
    "MVL_DATA_ROOT",
    "MVL_DROP_URL",
    "MLFLOW_TRACKING_URI",
    "MVL_LLM_SOURCE",
    "HF_HOME",
}
ENTRYPOINT = "kedro run --pipelines train --env cluster"
SUBMIT_SA_RIGHTS = {("ray.io", "rayjobs", verb) for verb in ("create", "get", "list", "watch")}
OPERATOR_RIGHTS = SUBMIT_SA_RIGHTS | {("batch", "cronjobs", "get"), ("batch", "jobs", "create")}

# Words that mark an env var / ConfigMap key as a secret (compared per "_"-separated word, so
# AWS_SECRET_ACCESS_KEY, HF_TOKEN, MVL_PSEUDONYM_KEY match and TOKENIZERS_PARALLELISM does not).
SECRET_WORDS = {
    "SECRET",
    "PASSWORD",
    "PASSWD",
    "PASS",
    "TOKEN",
    "CREDENTIAL",
    "CREDENTIALS",
    "PRIVATE",
    "KEY",
    "APIKEY",
    "PSEUDONYM",
    "SALT",
    "CERT",
}


def looks_secret(name: str) -> bool:
    return any(word in SECRET_WORDS for word in re.split(r"[^A-Za-z0-9]+", name.upper()))


# Literal secret material anywhere in a manifest.
SECRET_VALUE_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),  # Hugging Face token
]

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")

# Name rules per kind: (pattern, max length). KubeRay: RayJob <= 47 (its RayCluster gets a
# 6-char suffix, <= 53); RayCronJob names its child RayJobs <name>-<suffix>, kept <= 36 here
# (47 - 11, conservative). CronJob <= 52 (its Jobs get an 11-char suffix).
NAME_RULES: dict[str, tuple[re.Pattern[str], int]] = {
    "RayJob": (_DNS1035_LABEL, 47),
    "RayCronJob": (_DNS1035_LABEL, 36),
    "CronJob": (_DNS1123_LABEL, 52),
    "Service": (_DNS1035_LABEL, 63),
    "Deployment": (_DNS1123_LABEL, 63),
    "Job": (_DNS1123_LABEL, 63),
}


# ----------------------------------------------------------------------------- helpers
def objects_of(objects: list[dict], kind: str) -> list[dict]:
    return [obj for obj in objects if obj.get("kind") == kind]


def _name(obj: Mapping[str, Any]) -> str:
    return f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"


def all_pod_templates(objects: list[dict]) -> Iterator[tuple[str, dict, dict]]:
    """``(label, object, pod template)`` for every pod template in every object."""
    for obj in objects:
        for where, template in pod_templates(obj):
            yield f"{_name(obj)} {where}", obj, template


def is_ray_template(where: str) -> bool:
    return "headGroupSpec" in where or "workerGroupSpecs" in where


def is_worker_template(where: str) -> bool:
    return "workerGroupSpecs" in where


_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "P": Decimal(10**15),
    "E": Decimal(10**18),
}


def parse_quantity(value: Any) -> Decimal:
    """A Kubernetes resource quantity (``500m``, ``4Gi``, ``1``) as a number."""
    text = str(value).strip()
    match = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([A-Za-z]*)", text)
    if not match:
        raise ValueError(f"not a quantity: {value!r}")
    number, suffix = Decimal(match.group(1)), match.group(2)
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix in _DECIMAL:
        return number * _DECIMAL[suffix]
    if suffix == "":
        return number
    raise ValueError(f"unknown quantity suffix in {value!r}")


# ----------------------------------------------------------------------------- 1. core schemas
def check_core_schemas(objects: list[dict], k8s_version: str) -> tuple[list[str], list[str]]:
    """kubernetes-validate --strict (Python API) on every object that is not a KubeRay CRD.

    Returns ``(problems, validated kinds)``. A kind without a schema is a problem, never a silent
    skip (the CLI only WARNs and exits 0 there).
    """
    problems, validated = [], []
    for obj in objects:
        if obj.get("kind") in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, k8s_version, strict=True)
            validated.append(obj["kind"])
        except ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(
                f"{_name(obj)} invalid for Kubernetes {k8s_version}: {path}: {exc.message}"
            )
        except SchemaNotFoundError as exc:
            problems.append(f"{_name(obj)}: no schema, it would be skipped: {exc.message}")
    return problems, validated


# ----------------------------------------------------------------------------- 2. CRD schemas
def _strict(schema: Any) -> Any:
    """A copy of an OpenAPI v3 CRD schema that rejects unknown fields, as a structural schema
    prunes them: ``additionalProperties: false`` wherever ``properties`` are listed (unless the
    schema preserves unknown fields); ``nullable`` becomes a null type."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: value for key, value in schema.items()}
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    for key in ("items", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(out["additionalProperties"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = _strict(out[key])
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def apply_defaults(instance: Any, schema: Mapping[str, Any]) -> None:
    """Fill in the schema's ``default`` values, as the API server does before validation."""
    if isinstance(instance, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in instance and "default" in sub:
                instance[key] = copy.deepcopy(sub["default"])
            if key in instance:
                apply_defaults(instance[key], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, value in instance.items():
                if key not in (schema.get("properties") or {}):
                    apply_defaults(value, extra)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:
            apply_defaults(item, schema["items"])


_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
_FORMATS = jsonschema.FormatChecker(formats=())
for _fmt, (_low, _high) in _INT_RANGES.items():
    _FORMATS.checks(_fmt)(
        lambda value, low=_low, high=_high: not isinstance(value, int) or low <= value <= high
    )


@cache
def crd_schema(schemas_dir: Path, kind: str, version: str = "v1") -> dict:
    """The strict openAPIV3Schema of a KubeRay CRD version, loaded once."""
    path = Path(schemas_dir) / CRD_KINDS[kind]
    crd = yaml.load(
        path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    )
    if crd["spec"]["names"]["kind"] != kind:
        raise ValueError(f"{path} is the CRD of {crd['spec']['names']['kind']}, not {kind}")
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            if not entry.get("served"):
                raise ValueError(f"{kind} {version} is not served by {path}")
            return _strict(entry["schema"]["openAPIV3Schema"])
    raise ValueError(f"{path} has no version {version}")


def validate_crd_object(obj: dict, schemas_dir: Path) -> list[str]:
    group, _, version = obj.get("apiVersion", "").partition("/")
    if group != "ray.io":
        return [f"{_name(obj)}: apiVersion {obj.get('apiVersion')!r} is not ray.io/<version>"]
    schema = crd_schema(Path(schemas_dir), obj["kind"], version)
    instance = copy.deepcopy(obj)
    apply_defaults(instance, schema)
    validator = jsonschema.Draft202012Validator(schema, format_checker=_FORMATS)
    return [
        f"{_name(obj)}: {'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.path)))
    ]


def check_crd_schemas(objects: list[dict], schemas_dir: Path) -> list[str]:
    """Every RayJob / RayCronJob against the KubeRay CRD schema: defaults applied, unknown fields
    rejected at every level that lists its properties."""
    problems = []
    for obj in objects:
        if obj.get("kind") in CRD_KINDS:
            problems += validate_crd_object(obj, schemas_dir)
    return problems


# ----------------------------------------------------------------------------- 3. pod templates
def check_pod_templates_core(objects: list[dict], k8s_version: str) -> list[str]:
    """Each pod template inside a KubeRay object as a core v1 PodTemplate, strict."""
    problems = []
    for obj in objects:
        if obj.get("kind") not in CRD_KINDS:
            continue
        for where, template in pod_templates(obj):
            pod_template = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": "synthesized"},
                "template": template,
            }
            try:
                kubernetes_validate.validate(pod_template, k8s_version, strict=True)
            except ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                problems.append(f"{_name(obj)} {where} as PodTemplate: {path}: {exc.message}")
    return problems


# ----------------------------------------------------------------------------- 4. cron
_CRON_FIELDS = [
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    (
        "month",
        1,
        12,
        {m: i + 1 for i, m in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())},
    ),
    ("day of week", 0, 6, {d: i for i, d in enumerate("SUN MON TUE WED THU FRI SAT".split())}),
]
_CRON_DESCRIPTORS = {
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@midnight",
    "@hourly",
}


def cron_errors(schedule: str) -> list[str]:
    """Errors of a standard 5-field cron expression (robfig/cron ParseStandard, what the CronJob
    controller and KubeRay use); an empty list when it is valid."""
    text = schedule.strip()
    if "TZ" in text:
        return ["TZ / CRON_TZ in the schedule are rejected: use timeZone"]
    if text.startswith("@"):
        if text in _CRON_DESCRIPTORS or re.fullmatch(
            r"@every \d+(ns|us|ms|s|m|h)(\d+(ns|us|ms|s|m|h))*", text
        ):
            return []
        return [f"unknown descriptor {text!r}"]
    fields = text.split()
    if len(fields) != 5:
        return [f"expected 5 fields, got {len(fields)}"]
    errors = []
    for value, (label, low, high, names) in zip(fields, _CRON_FIELDS, strict=True):
        for part in value.split(","):
            errors += [f"{label} {part!r}: {e}" for e in _cron_part_errors(part, low, high, names)]
    return errors


def _cron_part_errors(part: str, low: int, high: int, names: Mapping[str, int]) -> list[str]:
    def number(token: str) -> int | None:
        if token.upper() in names:
            return names[token.upper()]
        return int(token) if token.isdigit() else None

    range_part, _, step = part.partition("/")
    if step and (not step.isdigit() or int(step) == 0):
        return ["step must be a positive integer"]
    if range_part in ("*", "?"):
        return []
    start_text, dash, end_text = range_part.partition("-")
    start = number(start_text)
    end = number(end_text) if dash else start
    if start is None or end is None:
        return ["not a number or name"]
    if not (low <= start <= high and low <= end <= high):
        return [f"out of range {low}-{high}"]
    if start > end:
        return ["range start after end"]
    return []


def check_cron(objects: list[dict]) -> list[str]:
    """Schedules parse, time zones exist; CronJob: Forbid, a starting deadline, history limits."""
    problems = []
    for obj in objects_of(objects, "CronJob") + objects_of(objects, "RayCronJob"):
        spec = obj.get("spec") or {}
        problems += [
            f"{_name(obj)} schedule {spec.get('schedule')!r}: {e}"
            for e in cron_errors(str(spec.get("schedule", "")))
        ]
        zone = spec.get("timeZone")
        if zone is not None:
            try:
                zoneinfo.ZoneInfo(zone)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                problems.append(f"{_name(obj)}: unknown timeZone {zone!r}")
        if obj["kind"] == "CronJob":
            if spec.get("concurrencyPolicy") != "Forbid":
                problems.append(f"{_name(obj)}: concurrencyPolicy must be Forbid")
            if (
                not isinstance(spec.get("startingDeadlineSeconds"), int)
                or spec["startingDeadlineSeconds"] < 10
            ):
                problems.append(f"{_name(obj)}: startingDeadlineSeconds must be set (>= 10)")
            for limit in ("successfulJobsHistoryLimit", "failedJobsHistoryLimit"):
                if not isinstance(spec.get(limit), int):
                    problems.append(f"{_name(obj)}: {limit} must be set")
    return problems


# ----------------------------------------------------------------------------- 5. names, labels
def check_names(objects: list[dict]) -> list[str]:
    """Object names fit their kind's DNS rule and length; container/port names and every label
    are valid."""
    problems = []
    for obj in objects:
        metadata = obj.get("metadata") or {}
        name = metadata.get("name") or ""
        pattern, limit = NAME_RULES.get(obj.get("kind", ""), (_DNS1123_SUBDOMAIN, 253))
        if len(name) > limit or not pattern.match(name):
            problems.append(
                f"{_name(obj)}: name must match {pattern.pattern} with at most {limit} chars"
            )
        problems += _label_problems(_name(obj), metadata.get("labels") or {})
    for where, _, template in all_pod_templates(objects):
        problems += _label_problems(where, (template.get("metadata") or {}).get("labels") or {})
        for container in containers(template):
            if not _DNS1123_LABEL.match(container.get("name", "")):
                problems.append(
                    f"{where}: container name {container.get('name')!r} is not DNS-1123"
                )
            for port in container.get("ports") or []:
                port_name = port.get("name")
                if port_name is not None and not (
                    len(port_name) <= 15
                    and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", port_name)
                    and re.search("[a-z]", port_name)
                ):
                    problems.append(f"{where}: port name {port_name!r} is not an IANA service name")
    return problems


def _label_problems(where: str, labels: Mapping[str, Any]) -> list[str]:
    problems = []
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if (prefix and not (len(prefix) <= 253 and _DNS1123_SUBDOMAIN.match(prefix))) or not (
            len(name) <= 63 and _LABEL_NAME.match(name)
        ):
            problems.append(f"{where}: invalid label key {key!r}")
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            problems.append(f"{where}: invalid label value {key}={value!r}")
    return problems


# ----------------------------------------------------------------------------- 6. security
def check_security(objects: list[dict]) -> list[str]:
    """Every container: non-root, no privilege escalation, read-only root fs, all capabilities
    dropped, not privileged; no host namespaces."""
    problems = []
    for where, _, template in all_pod_templates(objects):
        pod_spec = template.get("spec") or {}
        pod_sc = pod_spec.get("securityContext") or {}
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            if pod_spec.get(host):
                problems.append(f"{where}: {host} is set")
        if pod_sc.get("runAsUser") == 0:
            problems.append(f"{where}: pod runAsUser 0")
        for container in containers(template):
            label = f"{where} container {container.get('name')}"
            sc = container.get("securityContext") or {}
            non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
            if non_root is not True:
                problems.append(f"{label}: runAsNonRoot is not true")
            if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
                problems.append(f"{label}: runAsUser 0")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{label}: allowPrivilegeEscalation is not false")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{label}: readOnlyRootFilesystem is not true")
            if sc.get("privileged"):
                problems.append(f"{label}: privileged")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{label}: capabilities.drop lacks ALL")
            if (sc.get("capabilities") or {}).get("add"):
                problems.append(f"{label}: adds capabilities")
    return problems


# ----------------------------------------------------------------------------- 7. resources
def check_resources(objects: list[dict]) -> list[str]:
    """Every container requests and limits cpu and memory, requests <= limits; extended resources
    (GPUs) are limited, and requested only equal to the limit."""
    problems = []
    for where, _, template in all_pod_templates(objects):
        for container in containers(template):
            label = f"{where} container {container.get('name')}"
            resources = container.get("resources") or {}
            requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
            for kind in ("cpu", "memory"):
                if kind not in requests:
                    problems.append(f"{label}: no {kind} request")
                if kind not in limits:
                    problems.append(f"{label}: no {kind} limit")
                if kind in requests and kind in limits:
                    try:
                        if parse_quantity(requests[kind]) > parse_quantity(limits[kind]):
                            problems.append(f"{label}: {kind} request above limit")
                    except ValueError as exc:
                        problems.append(f"{label}: {exc}")
            for key in set(requests) | set(limits):
                if "/" in key:
                    if key not in limits:
                        problems.append(f"{label}: {key} requested without a limit")
                    elif key in requests and str(requests[key]) != str(limits[key]):
                        problems.append(f"{label}: {key} request differs from its limit")
    return problems


# ----------------------------------------------------------------------------- 8. secrets
def _walk_strings(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk_strings(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk_strings(item, f"{path}[{index}]")
    elif isinstance(value, str):
        yield path, value


def check_no_literal_secrets(objects: list[dict]) -> list[str]:
    """No secret values anywhere: no Secret objects with data, secret-looking env vars only from
    a secretKeyRef, no secret-looking ConfigMap keys, no key/token material in any string."""
    problems = []
    for obj in objects:
        if obj.get("kind") == "Secret" and (obj.get("data") or obj.get("stringData")):
            problems.append(f"{_name(obj)}: a Secret with data in the manifests")
        if obj.get("kind") == "ConfigMap":
            for key in list(obj.get("data") or {}) + list(obj.get("binaryData") or {}):
                if looks_secret(key):
                    problems.append(f"{_name(obj)}: secret-looking key {key!r} in a ConfigMap")
        for path, text in _walk_strings(obj):
            if any(pattern.search(text) for pattern in SECRET_VALUE_PATTERNS):
                problems.append(f"{_name(obj)} {path}: looks like secret material")
    for where, _, template in all_pod_templates(objects):
        for container in containers(template):
            for env in container.get("env") or []:
                if not looks_secret(env.get("name", "")):
                    continue
                if "value" in env:
                    problems.append(
                        f"{where} container {container.get('name')}: env "
                        f"{env['name']} has a literal value"
                    )
                elif "secretKeyRef" not in (env.get("valueFrom") or {}):
                    problems.append(
                        f"{where} container {container.get('name')}: env "
                        f"{env['name']} does not come from a Secret"
                    )
    return problems


# ----------------------------------------------------------------------------- 9. GPUs
def _gpu_keys(container: Mapping[str, Any]) -> set[str]:
    resources = container.get("resources") or {}
    keys = set(resources.get("limits") or {}) | set(resources.get("requests") or {})
    return {key for key in keys if key.endswith("/gpu")}


def check_gpu_placement(objects: list[dict], overlay: str) -> list[str]:
    """GPUs only in the gpu overlays, and there on every Ray worker and nowhere else."""
    gpu_overlay = overlay in GPU_OVERLAYS
    problems = []
    worker_templates = 0
    for where, _, template in all_pod_templates(objects):
        worker = is_worker_template(where)
        worker_templates += worker
        for container in containers(template):
            label = f"{where} container {container.get('name')}"
            gpus = _gpu_keys(container)
            if gpus and not gpu_overlay:
                problems.append(f"{label}: GPU resources {sorted(gpus)} outside the gpu overlay")
            if gpus and gpu_overlay and not worker:
                problems.append(f"{label}: GPU resources on a non-worker pod")
            if gpu_overlay and worker:
                limit = (container.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu")
                if limit is None or parse_quantity(limit) < 1:
                    problems.append(f"{label}: Ray worker without an nvidia.com/gpu limit")
    for obj in objects_of(objects, "RayJob") + objects_of(objects, "RayCronJob"):
        spec = obj["spec"] if obj["kind"] == "RayJob" else obj["spec"]["jobTemplate"]
        cluster = spec.get("rayClusterSpec") or {}
        groups = [cluster.get("headGroupSpec") or {}] + list(cluster.get("workerGroupSpecs") or [])
        for group in groups:
            if (
                not gpu_overlay
                and str((group.get("rayStartParams") or {}).get("num-gpus", "0")) != "0"
            ):
                problems.append(f"{_name(obj)}: rayStartParams num-gpus outside the gpu overlay")
    if gpu_overlay and worker_templates == 0:
        problems.append("gpu overlay without Ray worker templates")
    return problems


# ----------------------------------------------------------------------------- 10. RBAC
def _rights(role: Mapping[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role.get("rules") or []
        for group in rule.get("apiGroups") or []
        for resource in rule.get("resources") or []
        for verb in rule.get("verbs") or []
    }


def _rbac_shape(objects: list[dict]) -> list[str]:
    """No cluster-wide RBAC, no wildcards, no non-resource URLs."""
    problems = []
    for kind in ("ClusterRole", "ClusterRoleBinding"):
        problems += [f"{_name(obj)}: cluster-wide RBAC" for obj in objects_of(objects, kind)]
    roles = {obj["metadata"]["name"]: obj for obj in objects_of(objects, "Role")}
    for role in roles.values():
        for rule in role.get("rules") or []:
            for field in ("apiGroups", "resources", "verbs"):
                if "*" in (rule.get(field) or []):
                    problems.append(f"{_name(role)}: wildcard in {field}")
            if rule.get("nonResourceURLs"):
                problems.append(f"{_name(role)}: nonResourceURLs")
    return problems


def check_rbac(
    objects: list[dict], expected_rights: set[tuple[str, str, str]] = SUBMIT_SA_RIGHTS
) -> list[str]:
    """Namespace-scoped and minimal: the CronJob's service account may create/get/list/watch
    rayjobs and nothing else; no other pod has a service-account token."""
    problems = _rbac_shape(objects)
    roles = {obj["metadata"]["name"]: obj for obj in objects_of(objects, "Role")}
    cronjob_accounts = set()
    for where, obj, template in all_pod_templates(objects):
        pod_spec = template.get("spec") or {}
        account = pod_spec.get("serviceAccountName")
        if obj.get("kind") == "CronJob":
            if not account:
                problems.append(f"{where}: the CronJob pod has no serviceAccountName")
            cronjob_accounts.add(account)
        elif pod_spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: mounts a service-account token it does not need")
        elif account:
            problems.append(f"{where}: uses service account {account!r}")

    for account in cronjob_accounts - {None}:
        rights: set[tuple[str, str, str]] = set()
        for binding in objects_of(objects, "RoleBinding"):
            if any(
                s.get("kind") == "ServiceAccount" and s.get("name") == account
                for s in binding.get("subjects") or []
            ):
                ref = binding.get("roleRef") or {}
                if ref.get("kind") != "Role" or ref.get("name") not in roles:
                    problems.append(
                        f"{_name(binding)}: binds {account} to a missing or non-Role {ref}"
                    )
                    continue
                rights |= _rights(roles[ref["name"]])
        if rights != expected_rights:
            problems.append(
                f"service account {account}: rights {sorted(rights)} != {sorted(expected_rights)}"
            )
    for account_obj in objects_of(objects, "ServiceAccount"):
        if account_obj["metadata"]["name"] not in cronjob_accounts:
            problems.append(f"{_name(account_obj)}: not used by the CronJob")
        if account_obj.get("automountServiceAccountToken") is not False:
            problems.append(
                f"{_name(account_obj)}: automountServiceAccountToken should be false (pods opt in)"
            )
    if not cronjob_accounts and (objects_of(objects, "Role") or objects_of(objects, "RoleBinding")):
        problems.append("Role/RoleBinding without the CronJob that needs them")
    return problems


def check_operator_role(objects: list[dict]) -> list[str]:
    """k8s/user-rbac: a namespaced Role with exactly the rights the CLI needs."""
    problems = _rbac_shape(objects)
    roles = objects_of(objects, "Role")
    if len(roles) != 1:
        return problems + [f"expected one Role, got {len(roles)}"]
    if _rights(roles[0]) != OPERATOR_RIGHTS:
        problems.append(
            f"{_name(roles[0])}: rights {sorted(_rights(roles[0]))} != {sorted(OPERATOR_RIGHTS)}"
        )
    return problems


# ----------------------------------------------------------------------------- 11. Ray pods
def check_ray_pods(objects: list[dict]) -> list[str]:
    """Ray head/worker pods: /dev/shm is a memory emptyDir (smaller than the memory limit);
    with a read-only root filesystem every pod has a writable emptyDir at /tmp."""
    problems = []
    for where, _, template in all_pod_templates(objects):
        volumes = {v.get("name"): v for v in (template.get("spec") or {}).get("volumes") or []}
        for container in containers(template):
            label = f"{where} container {container.get('name')}"
            mounts = {m.get("mountPath"): m for m in container.get("volumeMounts") or []}
            readonly_root = (container.get("securityContext") or {}).get("readOnlyRootFilesystem")
            if readonly_root:
                tmp = volumes.get((mounts.get("/tmp") or {}).get("name"), {})
                if "emptyDir" not in tmp:
                    problems.append(f"{label}: read-only root filesystem but no emptyDir at /tmp")
            if not is_ray_template(where):
                continue
            shm = volumes.get((mounts.get("/dev/shm") or {}).get("name"), {})
            empty_dir = shm.get("emptyDir")
            if not isinstance(empty_dir, dict) or empty_dir.get("medium") != "Memory":
                problems.append(f"{label}: /dev/shm is not an emptyDir with medium Memory")
                continue
            memory_limit = ((container.get("resources") or {}).get("limits") or {}).get("memory")
            if "sizeLimit" not in empty_dir:
                problems.append(f"{label}: /dev/shm emptyDir has no sizeLimit")
            elif memory_limit is not None and parse_quantity(
                empty_dir["sizeLimit"]
            ) >= parse_quantity(memory_limit):
                problems.append(f"{label}: /dev/shm sizeLimit is not below the memory limit")
    return problems


# ----------------------------------------------------------------------------- 12. KubeRay
def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _rayjob_spec_problems(label: str, spec: Mapping[str, Any]) -> list[str]:
    """Rules of KubeRay's own validation (ValidateRayJobSpec / ValidateRayClusterSpec) that the
    CRD schema cannot express, plus what this project requires of every run."""
    problems = []
    if ENTRYPOINT not in str(spec.get("entrypoint", "")):
        problems.append(f"{label}: entrypoint does not run `{ENTRYPOINT}`")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append(f"{label}: shutdownAfterJobFinishes must be true")
    if (
        not isinstance(spec.get("ttlSecondsAfterFinished"), int)
        or spec["ttlSecondsAfterFinished"] < 0
    ):
        problems.append(f"{label}: ttlSecondsAfterFinished must be set (>= 0)")
    if not isinstance(spec.get("backoffLimit"), int) or spec["backoffLimit"] < 0:
        problems.append(f"{label}: backoffLimit must be set (>= 0)")
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        problems.append(f"{label}: suspend needs shutdownAfterJobFinishes (KubeRay)")
    if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
        problems.append(f"{label}: activeDeadlineSeconds must be positive")
    cluster = spec.get("rayClusterSpec") or {}
    if not cluster:
        return problems + [f"{label}: no rayClusterSpec"]
    autoscaling = cluster.get("enableInTreeAutoscaling") is True
    if (cluster.get("authOptions") or {}).get("mode") == "token":
        version = cluster.get("rayVersion")
        if not version or _version_tuple(str(version)) < (2, 52, 0):
            problems.append(
                f"{label}: authOptions token needs rayVersion >= 2.52.0 (got {version!r})"
            )
    head = cluster.get("headGroupSpec") or {}
    groups = [("head", head)] + [
        (g.get("groupName", "?"), g) for g in cluster.get("workerGroupSpecs") or []
    ]
    for group_name, group in groups:
        if not ((group.get("template") or {}).get("spec") or {}).get("containers"):
            problems.append(f"{label}: group {group_name} has no container")
        params = group.get("rayStartParams") or {}
        if group.get("resources") and any(
            params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")
        ):
            problems.append(
                f"{label}: group {group_name} sets resources in rayStartParams and resources"
            )
    for group in cluster.get("workerGroupSpecs") or []:
        low, high, replicas = (
            group.get("minReplicas"),
            group.get("maxReplicas"),
            group.get("replicas"),
        )
        if not autoscaling and (low is None or high is None):
            problems.append(
                f"{label}: worker group {group.get('groupName')} needs minReplicas and maxReplicas"
            )
        elif (
            low is not None
            and high is not None
            and not (low <= (replicas if replicas is not None else low) <= high)
        ):
            problems.append(
                f"{label}: worker group {group.get('groupName')} replicas outside [min, max]"
            )
    return problems


def check_kuberay(objects: list[dict]) -> list[str]:
    """KubeRay's semantic rules and the run contract; the template RayJob is suspended, so that
    `kubectl apply -k` never starts a training; RayCronJob runs are not."""
    problems = []
    rayjobs = objects_of(objects, "RayJob")
    if len(rayjobs) != 1:
        problems.append(f"expected exactly one RayJob (the template), got {len(rayjobs)}")
    for obj in rayjobs:
        problems += _rayjob_spec_problems(_name(obj), obj.get("spec") or {})
        if (obj.get("spec") or {}).get("suspend") is not True:
            problems.append(
                f"{_name(obj)}: the template RayJob must be suspended (apply must not train)"
            )
    for obj in objects_of(objects, "RayCronJob"):
        template = (obj.get("spec") or {}).get("jobTemplate") or {}
        problems += _rayjob_spec_problems(f"{_name(obj)} jobTemplate", template)
        if template.get("suspend"):
            problems.append(f"{_name(obj)}: jobTemplate is suspended: no run would ever start")
    return problems


# ----------------------------------------------------------------------------- 13. wiring
def check_wiring(objects: list[dict]) -> list[str]:
    """Config from the ConfigMap, credentials from the Secret (names and keys the docs promise);
    the ConfigMap holds the required settings; HF_HOME is on a mounted volume."""
    problems = []
    configmaps = [
        c for c in objects_of(objects, "ConfigMap") if c["metadata"]["name"] == CONFIGMAP_NAME
    ]
    if len(configmaps) != 1:
        return [f"expected the ConfigMap {CONFIGMAP_NAME}, found {len(configmaps)}"]
    data = configmaps[0].get("data") or {}
    missing = CONFIGMAP_REQUIRED - set(data)
    if missing:
        problems.append(f"ConfigMap {CONFIGMAP_NAME} lacks {sorted(missing)}")
    for key, value in data.items():
        if value == "":
            problems.append(f"ConfigMap {CONFIGMAP_NAME}: {key} is empty (unset it instead)")
    hf_home = data.get("HF_HOME", "")
    for where, _, template in all_pod_templates(objects):
        for container in containers(template):
            label = f"{where} container {container.get('name')}"
            for source in container.get("envFrom") or []:
                ref = source.get("configMapRef") or source.get("secretRef") or {}
                if "secretRef" in source:
                    problems.append(f"{label}: envFrom a whole Secret")
                elif ref.get("name") != CONFIGMAP_NAME:
                    problems.append(f"{label}: envFrom unknown ConfigMap {ref.get('name')!r}")
            for env in container.get("env") or []:
                secret_ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if secret_ref and (
                    secret_ref.get("name") != SECRET_NAME
                    or secret_ref.get("key") not in SECRET_KEYS
                ):
                    problems.append(
                        f"{label}: env {env.get('name')} from unknown secret key {secret_ref}"
                    )
            if is_ray_template(where) and hf_home:
                if not any(
                    hf_home == m.get("mountPath")
                    or hf_home.startswith(m.get("mountPath", "") + "/")
                    for m in container.get("volumeMounts") or []
                ):
                    problems.append(f"{label}: HF_HOME={hf_home} is not on a mounted volume")
    claims = {c["metadata"]["name"] for c in objects_of(objects, "PersistentVolumeClaim")}
    for where, _, template in all_pod_templates(objects):
        for volume in (template.get("spec") or {}).get("volumes") or []:
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            if claim is not None and claim not in claims:
                problems.append(f"{where}: volume {volume.get('name')} uses unknown PVC {claim!r}")
    return problems
