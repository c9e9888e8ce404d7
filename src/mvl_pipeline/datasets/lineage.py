"""Where a run comes from: the git commit of the code and the DVC version of the ingested data.

``load()`` returns ``{"git_commit", "git_dirty", "dvc_data_version", "dvc_data_status",
"dvc_stage"}``. ``dvc_data_version`` is the md5 that ``dvc.lock`` records for the ingest stage's
output ``data/02_intermediate/cases`` (dvc.yaml; the catalog names it from ``data_root``, so an
env whose data lives elsewhere, ``--env msd``, finds no entry: ``unrecorded``), and it is only given when it describes the data
in the workspace now; ``dvc_data_status`` says why it is or is not:

- ``recorded``: the workspace copy still hashes to what dvc.lock records. Checked inside ``dvc
  repro`` too: ``dvc repro -s fit`` (``--single-item``) or ``--downstream`` do not bring the
  ingest stage up to date, so dvc.lock may describe other data (an audit, 2026-12-05, found a
  model trained on 7 patients tagged with the 5-patient version, ``recorded``);
- ``modified``: the data changed since dvc.lock was written (e.g. a plain ``kedro run`` that
  ingested new studies): the version is ``None`` until ``dvc repro`` / ``dvc commit`` records it;
- ``being_produced``: this very DVC stage writes the data, so its version is not known yet;
- ``unrecorded``: no dvc.lock entry (never reproduced through DVC);
- ``unknown``: DVC could not check (no DVC repository, a lock held by another DVC command).

Fields that cannot be known are ``None``. Read-only. The kedro-mlflow run tags
(``mvl_pipeline.hooks``) and the registered model versions (``register``) carry these values, so a
registered model leads back to its code and data.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml
from kedro.io import AbstractDataset, DatasetError

logger = logging.getLogger(__name__)


def git_commit(project: Path) -> tuple[str | None, bool | None]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            # dvc.lock is rewritten by `dvc repro` itself, stage by stage, before it can be
            # committed: counted, it would mark every model of a clean `dvc repro` dirty
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)dvc.lock"],
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


def dvc_out_unchanged(project: Path, stage: str, out_path: str) -> bool | None:
    """Whether ``stage``'s output ``out_path`` in the workspace still matches dvc.lock.

    Hashes through DVC's own state cache (files unchanged since DVC last hashed them are not
    re-read). ``None`` when DVC cannot tell (no repository, no such stage or output, a busy lock).
    """
    try:
        from dvc.repo import Repo

        with Repo(str(project)) as repo:
            for dvc_stage in repo.index.stages:
                if getattr(dvc_stage, "name", None) != stage:
                    continue
                for out in dvc_stage.outs:
                    if str(out.def_path).rstrip("/") == out_path.rstrip("/"):
                        return not out.status()
    except Exception as error:  # noqa: BLE001 - lineage must never fail a run
        logger.warning("could not check %s against dvc.lock: %s", out_path, type(error).__name__)
    return None


class LineageDataset(AbstractDataset[dict[str, Any], None]):
    def __init__(
        self,
        *,
        project_path: str = ".",
        dvc_lock: str = "dvc.lock",
        data_stage: str = "ingest",
        data_out: str = "data/02_intermediate/cases",
        verify: bool = True,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._project = Path(project_path).resolve()
        self._lock = self._project / dvc_lock
        self._stage = data_stage
        self._out = data_out
        self._verify = verify
        self.metadata = metadata

    def _data_version(self) -> tuple[str | None, str]:
        running_stage = os.environ.get("DVC_STAGE")
        if running_stage is not None and running_stage.split(":")[-1] == self._stage:
            return None, "being_produced"
        recorded = dvc_out_hash(self._lock, self._stage, self._out)
        if recorded is None:
            return None, "unrecorded"
        if not self._verify:
            return recorded, "recorded"
        # inside `dvc repro` too: with --single-item or --downstream DVC does not bring the
        # upstream stages up to date, so dvc.lock may describe other data than the workspace holds
        unchanged = dvc_out_unchanged(self._project, self._stage, self._out)
        if unchanged is None:
            return None, "unknown"
        return (recorded, "recorded") if unchanged else (None, "modified")

    def load(self) -> dict[str, Any]:
        commit, dirty = git_commit(self._project)
        version, status = self._data_version()
        return {
            "git_commit": commit,
            "git_dirty": dirty,
            "dvc_data_version": version,
            "dvc_data_status": status,
            "dvc_stage": self._stage,
        }

    def save(self, data: None) -> None:
        raise DatasetError("lineage is read-only")

    def _describe(self) -> dict[str, Any]:
        return {"project_path": str(self._project), "dvc_lock": str(self._lock), "data_out": self._out}
