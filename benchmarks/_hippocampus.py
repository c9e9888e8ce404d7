"""The real-anatomy workspace shared by the benchmarks: the MSD Hippocampus task (../shared/data)
ingested and preprocessed with the project's own pipelines and defaults, in a temporary folder.

    data = hippocampus_workspace(tmp, n_cases=None)   # ingest + preprocess (about 15 s for 200)
    data["model_input_cases"], data["ingested_cases"], data["data_split"], data["preprocessing_plan"]
    data = open_workspace(tmp)                        # cases, split and plan, read back in another process
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT.parent / "shared" / "data" / "msd" / "Task04_Hippocampus"
sys.path.insert(0, str(ROOT))  # tests/support/workspace.py


def base_params(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "conf" / "base" / f"parameters_{name}.yml").read_text())[name]


def task_drop(target: Path, n_cases: int | None = None) -> Path:
    """A copy of the task folder (links to the read-only files), optionally its first ``n_cases``."""
    if not (TASK / "dataset.json").is_file():
        raise SystemExit(f"the Hippocampus task is not at {TASK} (../shared/data/msd/Task04_Hippocampus)")
    spec = json.loads((TASK / "dataset.json").read_text())
    if n_cases:
        spec["training"] = spec["training"][:n_cases]
        spec["numTraining"] = len(spec["training"])
    target.mkdir(parents=True, exist_ok=True)
    for entry in spec["training"]:
        for key in ("image", "label"):
            relative = entry[key].lstrip("./")
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(TASK / relative, target / relative)
    (target / "dataset.json").write_text(json.dumps(spec))
    return target


def _params(model: dict[str, Any] | None) -> dict[str, Any]:
    ingest = base_params("ingest") | {"labels": None, "label_aliases": {}, "progress": False}
    return {"ingest": ingest, "preprocess": base_params("preprocess"), "model": model or base_params("model")}


def hippocampus_workspace(root: Path, n_cases: int | None = None, model: dict[str, Any] | None = None) -> dict[str, Any]:
    from tests.support.workspace import local_catalog, prepare

    task_drop(root / "drop", n_cases)
    return prepare(local_catalog(root, _params(model)))


def open_workspace(root: Path) -> dict[str, Any]:
    """What training needs of ``hippocampus_workspace(root)``, read back from ``root`` (another process)."""
    from tests.support.workspace import local_catalog

    catalog = local_catalog(root, _params(None))
    names = ("model_input_cases", "data_split", "preprocessing_plan")
    return {name: catalog.load(name) for name in names}
