"""The loop's session for a trial trained in its own Ray Tune process, with its checkpoints kept in
a local folder: the local ablation's engine (``ablation.local_engine: tune``).

On one machine a trial has one worker, so a Ray Train run adds nothing the trial uses (no DDP, no
worker group to restart), only processes: per trial a controller, the worker actor, a placement
group cleaner, a synchronisation actor, a dataset manager, an autoscaling coordinator and the
queue that carries its reports to Tune. With two trials side by side on 2 cores those took a
share of the cores the training steps needed (2026-12-06, AMD EPYC, real Hippocampus cases, the
same trainings each way, 12 epochs of 35 steps): as Ray Train runs the steps trained 0.74-0.90x
the samples/s of two plain processes (5 runs against 4), in bare Tune trials 0.92-0.98x (3 runs);
``benchmarks/bench_grid_engine.py`` (this engine, 6 epochs, 2 rounds): 1.10x the Ray Train runs'
samples/s, 0.94x the plain processes'.

``TrialSession`` keeps what Ray Train's checkpointing gave the trial, in ``<trial folder>/checkpoints``:

- every validated epoch's checkpoint is stored atomically (``core.storage.atomic_directory``: a
  folder appears whole or not at all) as ``checkpoint_<report index>``, with the metrics it was
  reported with (``report.json``);
- the ``num_to_keep`` best by validation Dice are kept, and the latest (a resume starts from it);
  among equal scores the later one ranks higher, as in Ray Train;
- a trial started again (after an interruption) resumes from the latest, through a temporary
  copy (the loop writes its state into the folder it resumes from), as ``RaySession`` does.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvl_pipeline.core import storage
from mvl_pipeline.training.session import Session

CHECKPOINTS = "checkpoints"
REPORT_FILE = "report.json"
SCORE = "val_dice"
_NAME = re.compile(r"^checkpoint_(\d{6})$")


@dataclass(frozen=True)
class StoredCheckpoint:
    index: int  # the report's place in the run (resumes continue the count)
    path: Path
    metrics: dict[str, Any]

    def rank(self) -> tuple[bool, float, int]:
        """Ray Train's order (best last): no score < any score, then the score, then later first."""
        score = self.metrics.get(SCORE)
        valid = isinstance(score, int | float) and not math.isnan(score)
        return valid, float(score) if valid else 0.0, self.index


class TrialSession(Session):
    """One process, rank 0, checkpoints in ``<directory>/checkpoints`` (a local folder)."""

    def __init__(self, directory: str | os.PathLike[str], num_to_keep: int) -> None:
        if num_to_keep < 1:
            raise ValueError(f"num_to_keep must be >= 1, got {num_to_keep}")
        self.directory = Path(directory) / CHECKPOINTS
        self.num_to_keep = int(num_to_keep)
        self._restored_copy: tempfile.TemporaryDirectory[str] | None = None

    def checkpoints(self) -> list[StoredCheckpoint]:
        """The complete stored checkpoints, in report order (a folder left half-written by a
        killed process has no completion marker, and its name is not a checkpoint's)."""
        found = []
        for path in self.directory.glob("checkpoint_*"):
            match = _NAME.match(path.name)
            if match and (path / storage.COMPLETE_MARKER).exists():
                metrics = json.loads((path / REPORT_FILE).read_text(encoding="utf-8"))
                found.append(StoredCheckpoint(int(match.group(1)), path, metrics))
        return sorted(found, key=lambda c: c.index)

    def latest(self) -> StoredCheckpoint | None:
        stored = self.checkpoints()
        return stored[-1] if stored else None

    def best(self) -> StoredCheckpoint | None:
        stored = self.checkpoints()
        return max(stored, key=StoredCheckpoint.rank) if stored else None

    def get_checkpoint_dir(self) -> str | None:
        """A copy of the latest checkpoint (None: a fresh start). Called once, as training starts:
        the temporary folders a killed writer left are removed here (one process trains a trial)."""
        for leftover in self.directory.glob(".checkpoint_*"):
            shutil.rmtree(leftover, ignore_errors=True)
        latest = self.latest()
        if latest is None:
            return None
        if self._restored_copy is None:
            self._restored_copy = tempfile.TemporaryDirectory(prefix="mvl-restore-")
            shutil.copytree(latest.path, self._restored_copy.name, dirs_exist_ok=True)
        return self._restored_copy.name

    def close(self) -> None:
        if self._restored_copy is not None:
            self._restored_copy.cleanup()
            self._restored_copy = None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if checkpoint_dir is None:
            return
        latest = self.latest()
        index = latest.index + 1 if latest is not None else 0
        target = self.directory / f"checkpoint_{index:06d}"
        with storage.atomic_directory(None, "file", str(target)) as tmp:
            shutil.copytree(checkpoint_dir, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(storage.COMPLETE_MARKER))
            Path(tmp, REPORT_FILE).write_text(json.dumps(metrics, default=float), encoding="utf-8")
        self._prune()

    def _prune(self) -> None:
        """Keep the ``num_to_keep`` best and the latest; remove the others."""
        stored = self.checkpoints()
        keep = {c.index for c in sorted(stored, key=StoredCheckpoint.rank)[-self.num_to_keep :]}
        keep.add(stored[-1].index)
        for checkpoint in stored:
            if checkpoint.index not in keep:
                # the marker first: a removal cut short leaves a folder no reader takes for a checkpoint
                (checkpoint.path / storage.COMPLETE_MARKER).unlink(missing_ok=True)
                shutil.rmtree(checkpoint.path, ignore_errors=True)
