"""Where a run comes from: the git commit of the code and the DVC version of the ingested data.

``load()`` returns ``{"git_commit", "git_dirty", "dvc_data_version", "dvc_stage"}``; fields that
cannot be known (no git, no ``dvc.lock`` yet) are ``None``. Read-only. Fit and register tag
their MLflow runs and model versions with it, so a registered model leads back to its data.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml
from kedro.io import AbstractDataset, DatasetError


def git_commit(project: Path) -> tuple[str | None, bool | None]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=project, capture_output=True, text=True, check=True, timeout=10,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit or None, bool(status.strip())


def dvc_out_hash(lock_file: Path, stage: str, out_prefix: str) -> str | None:
    """The md5 DVC recorded in ``dvc.lock`` for ``stage``'s output under ``out_prefix``."""
    if not lock_file.is_file():
        return None
    try:
        lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return None
    for out in lock.get("stages", {}).get(stage, {}).get("outs", []) or []:
        if str(out.get("path", "")).rstrip("/").startswith(out_prefix.rstrip("/")):
            return out.get("md5") or out.get("hash")
    return None


class LineageDataset(AbstractDataset[dict[str, Any], None]):
    def __init__(
        self,
        *,
        project_path: str = ".",
        dvc_lock: str = "dvc.lock",
        data_stage: str = "ingest",
        data_out: str = "data/02_intermediate/cases",
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._project = Path(project_path).resolve()
        self._lock = self._project / dvc_lock
        self._stage = data_stage
        self._out = data_out
        self.metadata = metadata

    def load(self) -> dict[str, Any]:
        commit, dirty = git_commit(self._project)
        return {
            "git_commit": commit,
            "git_dirty": dirty,
            "dvc_data_version": dvc_out_hash(self._lock, self._stage, self._out),
            "dvc_stage": self._stage,
        }

    def save(self, data: None) -> None:
        raise DatasetError("lineage is read-only")

    def _describe(self) -> dict[str, Any]:
        return {"project_path": str(self._project), "dvc_lock": str(self._lock)}
