"""The KubeRay CRD schemas that tests/k8s checks against are vendored in k8s/schemas, with their
source, version, licence and sha256 in k8s/schemas/README.md, and equal the shared reference set
(../shared/schemas) byte for byte."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml
from k8s_policy import CRD_KINDS


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", sorted(CRD_KINDS))
def test_vendored_schema_is_the_crd_of_its_kind(schemas_dir: Path, kind: str) -> None:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader: 2 MB of YAML in < 1 s
    crd = yaml.load((schemas_dir / CRD_KINDS[kind]).read_text(encoding="utf-8"), Loader=loader)
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["spec"]["group"] == "ray.io"
    assert crd["spec"]["names"]["kind"] == kind
    assert "v1" in {version["name"] for version in crd["spec"]["versions"]}


@pytest.mark.parametrize("name", sorted(CRD_KINDS.values()))
def test_vendored_schema_equals_the_shared_reference(schemas_dir: Path, project_root: Path, name: str) -> None:
    shared = project_root.parent / "shared" / "schemas"
    if not (shared / name).is_file():
        pytest.fail(
            f"{shared / name} not found: this check compares k8s/schemas with the shared reference "
            "set beside the checkout (CI has it). The manifest checks themselves use only k8s/schemas."
        )
    vendored = schemas_dir / name
    assert _sha256(vendored) == _sha256(shared / name), (
        f"k8s/schemas/{name} differs from {shared / name}: refresh one from the other "
        "(k8s/schemas/README.md says how) and update the sha256 in that README"
    )


def test_readme_names_source_licence_and_the_vendored_hashes(schemas_dir: Path) -> None:
    readme = (schemas_dir / "README.md").read_text(encoding="utf-8")
    assert "ray-project/kuberay" in readme and "Apache License 2.0" in readme
    for name in CRD_KINDS.values():
        assert f"{_sha256(schemas_dir / name)}  {name}" in readme, f"k8s/schemas/README.md: sha256 of {name} is stale"
