"""k8s/ renders with kustomize and passes the Kubernetes and KubeRay schemas and our policy;
each check also fails on a deliberately broken manifest."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import k8s_policy as policy
import pytest
from k8s_policy import K8S_VERSIONS, OVERLAYS, RENDER_TARGETS

from mvl_pipeline.k8s.manifests import render_kustomization

TARGETS = tuple(RENDER_TARGETS)
EXPECTED_KINDS = {
    "base": {
        "ConfigMap",
        "CronJob",
        "Deployment",
        "PersistentVolumeClaim",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
        "RayJob",
    },
    "cpu": {
        "ConfigMap",
        "CronJob",
        "Deployment",
        "PersistentVolumeClaim",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
        "RayJob",
    },
    "gpu": {
        "ConfigMap",
        "CronJob",
        "Deployment",
        "PersistentVolumeClaim",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
        "RayJob",
    },
    "raycronjob": {
        "ConfigMap",
        "Deployment",
        "PersistentVolumeClaim",
        "Service",
        "RayJob",
        "RayCronJob",
    },
}


# ----------------------------------------------------------------------------- rendering
@pytest.mark.parametrize("target", TARGETS)
def test_kustomize_renders_the_expected_objects(rendered: dict, target: str) -> None:
    objects = rendered[target]
    assert {obj["kind"] for obj in objects} == EXPECTED_KINDS[target]
    assert all(obj["metadata"].get("namespace") == "mvl-pipeline" for obj in objects)
    images = {
        c["image"] for _, _, t in policy.all_pod_templates(objects) for c in policy.containers(t)
    }
    assert len(images) == 1, images
    if target == "base":
        assert images == {"mvl-pipeline"}  # overlays map it to a registry and a variant tag
    else:
        assert next(iter(images)).startswith("registry.example.org/mvl/mvl-pipeline:")


def test_overlays_pick_the_image_variant(rendered: dict) -> None:
    def tag(objects: list[dict]) -> str:
        return next(
            c["image"]
            for _, _, t in policy.all_pod_templates(objects)
            for c in policy.containers(t)
        ).rsplit(":", 1)[1]

    assert tag(rendered["cpu"]) == "0.1.0-cpu"
    assert tag(rendered["gpu"]) == "0.1.0-cu128"
    assert tag(rendered["raycronjob"]) == "0.1.0-cu128"


def test_user_rbac_renders_the_operator_role(kubectl: str, project_root: Path) -> None:
    objects = render_kustomization(project_root / "k8s/user-rbac", kubectl=kubectl)
    assert policy.check_operator_role(objects) == []
    for version in K8S_VERSIONS:
        problems, kinds = policy.check_core_schemas(objects, version)
        assert problems == [] and kinds == ["Role"]


# ----------------------------------------------------------------------------- schemas
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("target", TARGETS)
def test_core_objects_pass_kubernetes_validate_strict(
    rendered: dict, target: str, version: str
) -> None:
    objects = rendered[target]
    problems, validated = policy.check_core_schemas(objects, version)
    assert problems == []
    # nothing silently skipped: every non-CRD object was validated against a real schema
    assert sorted(validated) == sorted(
        o["kind"] for o in objects if o["kind"] not in policy.CRD_KINDS
    )
    assert set(validated) == EXPECTED_KINDS[target] - set(policy.CRD_KINDS)


@pytest.mark.parametrize("target", TARGETS)
def test_kuberay_objects_pass_the_crd_schemas(
    rendered: dict, schemas_dir: Path, target: str
) -> None:
    crds = [o for o in rendered[target] if o["kind"] in policy.CRD_KINDS]
    assert crds, "no RayJob/RayCronJob rendered"
    assert policy.check_crd_schemas(rendered[target], schemas_dir) == []


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("target", TARGETS)
def test_kuberay_pod_templates_pass_the_core_podtemplate_schema(
    rendered: dict, target: str, version: str
) -> None:
    templates = [
        w
        for w, obj, _ in policy.all_pod_templates(rendered[target])
        if obj["kind"] in policy.CRD_KINDS
    ]
    # head, worker group and submitter of the RayJob (and of the RayCronJob's jobTemplate)
    assert len(templates) == 3 * len([o for o in rendered[target] if o["kind"] in policy.CRD_KINDS])
    assert policy.check_pod_templates_core(rendered[target], version) == []


def test_crd_defaults_are_applied_before_validation(schemas_dir: Path) -> None:
    schema = policy.crd_schema(schemas_dir, "RayJob")
    instance = {
        "spec": {"entrypoint": "x", "rayClusterSpec": {"workerGroupSpecs": [{"groupName": "w"}]}}
    }
    policy.apply_defaults(instance, schema)
    assert instance["spec"]["submissionMode"] == "K8sJobMode"
    assert instance["spec"]["backoffLimit"] == 0
    assert instance["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] == 2147483647


def test_crd_schema_is_strict_where_it_lists_properties(schemas_dir: Path) -> None:
    schema = policy.crd_schema(schemas_dir, "RayJob")
    spec = schema["properties"]["spec"]
    assert spec["additionalProperties"] is False
    container = spec["properties"]["rayClusterSpec"]["properties"]["headGroupSpec"]["properties"][
        "template"
    ]["properties"]["spec"]["properties"]["containers"]["items"]
    assert container["additionalProperties"] is False
    # maps stay maps (rayStartParams: string -> string)
    params = spec["properties"]["rayClusterSpec"]["properties"]["headGroupSpec"]["properties"][
        "rayStartParams"
    ]
    assert params["additionalProperties"] == {"type": "string"}


# ----------------------------------------------------------------------------- policy
POLICY_CHECKS: dict[str, Callable[[list[dict], str], list[str]]] = {
    "cron": lambda objs, _: policy.check_cron(objs),
    "names": lambda objs, _: policy.check_names(objs),
    "security": lambda objs, _: policy.check_security(objs),
    "resources": lambda objs, _: policy.check_resources(objs),
    "secrets": lambda objs, _: policy.check_no_literal_secrets(objs),
    "gpu": policy.check_gpu_placement,
    "rbac": lambda objs, _: policy.check_rbac(objs),
    "ray-pods": lambda objs, _: policy.check_ray_pods(objs),
    "kuberay": lambda objs, _: policy.check_kuberay(objs),
    "wiring": lambda objs, _: policy.check_wiring(objs),
}


@pytest.mark.parametrize("check", list(POLICY_CHECKS))
@pytest.mark.parametrize("target", TARGETS)
def test_policy(rendered: dict, target: str, check: str) -> None:
    assert POLICY_CHECKS[check](rendered[target], target) == []


def test_gpu_limits_only_in_the_gpu_overlays(rendered: dict) -> None:
    def gpu_containers(objects: list[dict]) -> list[str]:
        return [
            w
            for w, _, t in policy.all_pod_templates(objects)
            for c in policy.containers(t)
            if policy._gpu_keys(c)
        ]

    assert gpu_containers(rendered["base"]) == []
    assert gpu_containers(rendered["cpu"]) == []
    assert gpu_containers(rendered["gpu"]) and all(
        "workerGroupSpecs" in w for w in gpu_containers(rendered["gpu"])
    )
    assert set(policy.GPU_OVERLAYS) <= set(OVERLAYS)


def test_cronjob_runs_the_submit_cli_with_slot_and_data_version(rendered: dict) -> None:
    cronjob = next(o for o in rendered["gpu"] if o["kind"] == "CronJob")
    container = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "mvl_pipeline.k8s"]
    assert container["args"][0] == "submit"
    assert {"--slot=auto", "--data-version=auto", "--wait", "--template=mvl-train-template"} <= set(
        container["args"]
    )
    env = {e["name"]: e for e in container["env"]}
    assert (
        env["MVL_JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"]
        == "metadata.labels['batch.kubernetes.io/job-name']"
    )
    assert env["MVL_K8S_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


@pytest.mark.parametrize(
    "expression,valid",
    [
        ("0 3 * * 0", True),
        ("*/15 * * * *", True),
        ("0 0 1 JAN,JUL *", True),
        ("30 2 * * MON-FRI", True),
        ("@weekly", True),
        ("0 25 * * *", False),
        ("61 * * * *", False),
        ("0 3 * *", False),
        ("0 3 * * 7", False),
        ("CRON_TZ=UTC 0 3 * * 0", False),
        ("0 3 * * 0/0", False),
        ("@fortnightly", False),
    ],
)
def test_cron_parser(expression: str, valid: bool) -> None:
    assert (policy.cron_errors(expression) == []) is valid


def test_quantities() -> None:
    assert policy.parse_quantity("500m") < policy.parse_quantity("1")
    assert policy.parse_quantity("4Gi") == 4 * 2**30
    assert policy.parse_quantity("1G") < policy.parse_quantity("1Gi")
    with pytest.raises(ValueError):
        policy.parse_quantity("lots")


# ----------------------------------------------------------------------------- broken variants
def _rayjob(objs: list[dict]) -> dict:
    return next(o for o in objs if o["kind"] == "RayJob")


def _kind(objs: list[dict], kind: str) -> dict:
    return next(o for o in objs if o["kind"] == kind)


def _worker(objs: list[dict]) -> dict:
    return _rayjob(objs)["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"][
        "containers"
    ][0]


def _head_pod(objs: list[dict]) -> dict:
    return _rayjob(objs)["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]


def _cron_container(objs: list[dict]) -> dict:
    return _kind(objs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][
        0
    ]


def _viz_container(objs: list[dict]) -> dict:
    return _kind(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def _break_core_unknown_field(objs: list[dict]) -> None:
    _viz_container(objs)["imagePullPolicyy"] = "Always"


def _break_core_unknown_kind(objs: list[dict]) -> None:
    objs.append({"apiVersion": "v1", "kind": "Frobnicator", "metadata": {"name": "x"}})


def _break_crd_unknown_field(objs: list[dict]) -> None:
    _rayjob(objs)["spec"]["shutdownAfterJobFinish"] = True  # typo: KubeRay would prune it


def _break_crd_type(objs: list[dict]) -> None:
    _rayjob(objs)["spec"]["backoffLimit"] = "one"


def _break_crd_nested_unknown_field(objs: list[dict]) -> None:
    _worker(objs)["resource"] = {"limits": {"cpu": "1"}}


def _break_pod_template(objs: list[dict]) -> None:
    _head_pod(objs)["containers"][0]["ports"][0]["containerPort"] = "gcs"


def _break_cron(objs: list[dict]) -> None:
    _kind(objs, "CronJob")["spec"]["schedule"] = "0 25 * * *"


def _break_cron_policy(objs: list[dict]) -> None:
    _kind(objs, "CronJob")["spec"]["concurrencyPolicy"] = "Allow"


def _break_raycron(objs: list[dict]) -> None:
    _kind(objs, "RayCronJob")["spec"]["schedule"] = "TZ=UTC 0 3 * * 0"


def _break_name(objs: list[dict]) -> None:
    _rayjob(objs)["metadata"]["name"] = "mvl-train-" + "x" * 38  # 48 > 47 (KubeRay)


def _break_label(objs: list[dict]) -> None:
    _rayjob(objs)["metadata"]["labels"]["mvl-pipeline/slot"] = "2026-11-29 03:00"


def _break_security(objs: list[dict]) -> None:
    del _worker(objs)["securityContext"]["allowPrivilegeEscalation"]


def _break_security_root(objs: list[dict]) -> None:
    _viz_container(objs)["securityContext"]["runAsUser"] = 0


def _break_resources(objs: list[dict]) -> None:
    del _viz_container(objs)["resources"]["limits"]["memory"]


def _break_resources_order(objs: list[dict]) -> None:
    _cron_container(objs)["resources"]["requests"]["memory"] = "4Gi"


def _break_literal_secret_env(objs: list[dict]) -> None:
    _cron_container(objs)["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "abc123"})


def _break_secret_object(objs: list[dict]) -> None:
    objs.append(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "mvl-pipeline-secrets"},
            "stringData": {"MVL_PSEUDONYM_KEY": "0123456789abcdef"},
        }
    )


def _break_secret_in_configmap(objs: list[dict]) -> None:
    _kind(objs, "ConfigMap")["data"]["MVL_PSEUDONYM_KEY"] = "0123456789abcdef"


def _break_gpu_in_cpu(objs: list[dict]) -> None:
    _worker(objs)["resources"]["limits"]["nvidia.com/gpu"] = "1"


def _break_gpu_missing(objs: list[dict]) -> None:
    del _worker(objs)["resources"]["limits"]["nvidia.com/gpu"]
    del _worker(objs)["resources"]["requests"]["nvidia.com/gpu"]


def _break_rbac_verb(objs: list[dict]) -> None:
    _kind(objs, "Role")["rules"][0]["verbs"].append("delete")


def _break_rbac_cluster(objs: list[dict]) -> None:
    objs.append(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "x"},
            "rules": [],
        }
    )


def _break_rbac_token(objs: list[dict]) -> None:
    del _kind(objs, "Deployment")["spec"]["template"]["spec"]["automountServiceAccountToken"]


def _break_shm(objs: list[dict]) -> None:
    mounts = _worker(objs)["volumeMounts"]
    mounts[:] = [m for m in mounts if m["mountPath"] != "/dev/shm"]


def _break_tmp(objs: list[dict]) -> None:
    mounts = _viz_container(objs)["volumeMounts"]
    mounts[:] = [m for m in mounts if m["mountPath"] != "/tmp"]


def _break_unsuspended_template(objs: list[dict]) -> None:
    del _rayjob(objs)["spec"]["suspend"]


def _break_worker_replicas(objs: list[dict]) -> None:
    del _rayjob(objs)["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"]


def _break_entrypoint(objs: list[dict]) -> None:
    _rayjob(objs)["spec"]["entrypoint"] = "kedro run"


def _break_secret_name(objs: list[dict]) -> None:
    env = next(e for e in _worker(objs)["env"] if e["name"] == "AWS_ACCESS_KEY_ID")
    env["valueFrom"]["secretKeyRef"]["name"] = "someone-elses-secret"


def _break_configmap_key(objs: list[dict]) -> None:
    del _kind(objs, "ConfigMap")["data"]["MVL_DROP_URL"]


def _core(version: str) -> Callable[[list[dict], str], list[str]]:
    return lambda objs, _: policy.check_core_schemas(objs, version)[0]


BROKEN = [
    # (id, target, break, check, expected text in a problem)
    ("core-unknown-field", "gpu", _break_core_unknown_field, _core("1.32.0"), "imagePullPolicyy"),
    (
        "core-unknown-field-1.30",
        "cpu",
        _break_core_unknown_field,
        _core("1.30.0"),
        "imagePullPolicyy",
    ),
    ("core-kind-not-skipped", "gpu", _break_core_unknown_kind, _core("1.32.0"), "no schema"),
    ("crd-unknown-field", "gpu", _break_crd_unknown_field, "crd", "shutdownAfterJobFinish"),
    ("crd-type", "gpu", _break_crd_type, "crd", "backoffLimit"),
    ("crd-nested-unknown-field", "cpu", _break_crd_nested_unknown_field, "crd", "resource"),
    (
        "crd-raycronjob",
        "raycronjob",
        lambda o: _kind(o, "RayCronJob")["spec"].update(schedul="x"),
        "crd",
        "schedul",
    ),
    ("pod-template-core", "gpu", _break_pod_template, "podtemplate", "containerPort"),
    ("cron-syntax", "cpu", _break_cron, POLICY_CHECKS["cron"], "out of range"),
    ("cron-forbid", "gpu", _break_cron_policy, POLICY_CHECKS["cron"], "Forbid"),
    ("raycron-tz", "raycronjob", _break_raycron, POLICY_CHECKS["cron"], "TZ"),
    ("name-length", "gpu", _break_name, POLICY_CHECKS["names"], "47"),
    ("label-value", "gpu", _break_label, POLICY_CHECKS["names"], "invalid label value"),
    (
        "security-escalation",
        "gpu",
        _break_security,
        POLICY_CHECKS["security"],
        "allowPrivilegeEscalation",
    ),
    ("security-root", "cpu", _break_security_root, POLICY_CHECKS["security"], "runAsUser 0"),
    ("limits-missing", "gpu", _break_resources, POLICY_CHECKS["resources"], "no memory limit"),
    (
        "request-above-limit",
        "cpu",
        _break_resources_order,
        POLICY_CHECKS["resources"],
        "above limit",
    ),
    (
        "secret-env-value",
        "gpu",
        _break_literal_secret_env,
        POLICY_CHECKS["secrets"],
        "literal value",
    ),
    ("secret-object", "cpu", _break_secret_object, POLICY_CHECKS["secrets"], "Secret with data"),
    (
        "secret-in-configmap",
        "gpu",
        _break_secret_in_configmap,
        POLICY_CHECKS["secrets"],
        "MVL_PSEUDONYM_KEY",
    ),
    (
        "gpu-in-cpu-overlay",
        "cpu",
        _break_gpu_in_cpu,
        POLICY_CHECKS["gpu"],
        "outside the gpu overlay",
    ),
    (
        "gpu-missing-in-gpu-overlay",
        "gpu",
        _break_gpu_missing,
        POLICY_CHECKS["gpu"],
        "without an nvidia.com/gpu",
    ),
    ("rbac-extra-verb", "gpu", _break_rbac_verb, POLICY_CHECKS["rbac"], "delete"),
    ("rbac-cluster-role", "cpu", _break_rbac_cluster, POLICY_CHECKS["rbac"], "cluster-wide"),
    ("rbac-token-mounted", "gpu", _break_rbac_token, POLICY_CHECKS["rbac"], "token"),
    ("ray-shm", "gpu", _break_shm, POLICY_CHECKS["ray-pods"], "/dev/shm"),
    ("tmp-writable", "cpu", _break_tmp, POLICY_CHECKS["ray-pods"], "/tmp"),
    (
        "template-not-suspended",
        "gpu",
        _break_unsuspended_template,
        POLICY_CHECKS["kuberay"],
        "suspended",
    ),
    ("worker-replicas", "cpu", _break_worker_replicas, POLICY_CHECKS["kuberay"], "minReplicas"),
    ("entrypoint", "gpu", _break_entrypoint, POLICY_CHECKS["kuberay"], "entrypoint"),
    ("secret-ref-name", "gpu", _break_secret_name, POLICY_CHECKS["wiring"], "someone-elses-secret"),
    ("configmap-key", "cpu", _break_configmap_key, POLICY_CHECKS["wiring"], "MVL_DROP_URL"),
]


@pytest.mark.parametrize(
    "case_id,target,breaker,check,expected", BROKEN, ids=[b[0] for b in BROKEN]
)
def test_each_check_reports_a_broken_manifest(
    rendered: dict,
    schemas_dir: Path,
    case_id: str,
    target: str,
    breaker: Callable,
    check,
    expected: str,
) -> None:
    objects = copy.deepcopy(rendered[target])
    if check == "crd":

        def check(objs: list[dict], _: str) -> list[str]:
            return policy.check_crd_schemas(objs, schemas_dir)
    elif check == "podtemplate":

        def check(objs: list[dict], _: str) -> list[str]:
            return policy.check_pod_templates_core(objs, "1.32.0")

    assert check(objects, target) == [], "the unbroken manifest must pass first"
    breaker(objects)
    problems = check(objects, target)
    assert problems, f"{case_id}: the check did not notice"
    assert any(expected in problem for problem in problems), problems
