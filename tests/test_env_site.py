"""A site's own Kedro environment, end to end: `kedro run --pipelines ingest --env hospital_a`.

Kedro reads conf/local only under the default environment `local`; the pseudonymisation key must
still be found (MVL_PSEUDONYM_KEY, else conf/local/credentials.yml: the SecretKeyDataset of
conf/base/catalog_ingest.yml), and with neither the run must stop with a message naming both.
Runs the real `kedro` command of the project's environment in a copy of the project whose
conf/hospital_a holds its own globals (data root, drop) and tiny sample-drop parameters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

KEDRO = str(Path(sys.executable).parent / "kedro")
ENV = "hospital_a"
SITE_GLOBALS = {"data_root": "site_data", "drop_url": "site_data/01_raw/sample_drop"}
TINY_DROP = {
    "sample_data": {
        "n_patients": 2, "followup_fraction": 0.0, "image_size": 32, "n_slices": [8, 8],
        "pixel_spacing_mm": [8.0, 8.0], "slice_spacing_mm": 10.0, "thin_slice_studies": 0,
        "non_axial_studies": 0,
    },
    "ingest": {"workers": 1, "progress": False},
}  # fmt: skip


@pytest.fixture(scope="module")
def site(project_copy) -> Path:
    root = project_copy("env-site")
    conf = root / "conf" / ENV
    conf.mkdir()
    (conf / "globals.yml").write_text(yaml.safe_dump(SITE_GLOBALS), encoding="utf-8")
    (conf / "parameters.yml").write_text(yaml.safe_dump(TINY_DROP), encoding="utf-8")  # soft-merged
    (root / "conf/local/credentials.yml").unlink()  # the copy's key: each test sets its own
    run(root, "--pipelines", "sample_data", check=True)
    assert any((root / SITE_GLOBALS["drop_url"]).rglob("*.dcm")), "the site's drop was not written"
    return root


def run(root: Path, *args: str, env: dict[str, str] | None = None, check: bool = False):
    base = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("MVL_", "MLFLOW_TRACKING", "MLFLOW_REGISTRY", "MLFLOW_EXPERIMENT", "AWS_"))
    }  # fmt: skip
    base.update(KEDRO_DISABLE_TELEMETRY="true", MLFLOW_ENABLE_TELEMETRY="false", HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [KEDRO, "run", *args, "--env", ENV], cwd=root, env={**base, **(env or {})},
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    if check:
        assert done.returncode == 0, f"kedro run {' '.join(args)} --env {ENV}:\n{(done.stdout + done.stderr)[-6000:]}"
    return done


def test_ingest_under_a_site_environment_without_any_key_names_both_places(site: Path):
    (site / "conf/local/credentials.yml").unlink(missing_ok=True)
    done = run(site, "--pipelines", "ingest")
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert "MVL_PSEUDONYM_KEY" in output and "conf/local/credentials.yml" in output, output[-3000:]
    assert not (site / "site_data/02_intermediate/ingest_manifest.json").exists()


def test_ingest_under_a_site_environment_reads_the_key_in_conf_local(site: Path):
    subprocess.run(
        [sys.executable, "-m", "mvl_pipeline.commands.secrets", "ensure-key", "conf/local/credentials.yml"],
        cwd=site, check=True, capture_output=True,
    )  # fmt: skip
    key = yaml.safe_load((site / "conf/local/credentials.yml").read_text(encoding="utf-8"))["pseudonymisation"]["key"]
    done = run(site, "--pipelines", "ingest", check=True)
    assert "KedroDeprecationWarning" not in done.stderr
    assert str(key) not in done.stdout + done.stderr  # the key is never logged
    manifest = json.loads((site / "site_data/02_intermediate/ingest_manifest.json").read_text(encoding="utf-8"))
    assert manifest, "empty ingest manifest"
    cases = [p for p in (site / "site_data/02_intermediate/cases").iterdir() if p.is_dir()]
    assert len(cases) == TINY_DROP["sample_data"]["n_patients"], cases
    assert not (site / "data/02_intermediate/cases").exists() or not any((site / "data/02_intermediate/cases").iterdir())
