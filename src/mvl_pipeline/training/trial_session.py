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
  folder appears whole, with its ``_COMPLETE`` marker, or not at all) as
  ``checkpoint_<report index>``, with the metrics it was reported with (``report.json``);
- the ``num_to_keep`` best by validation Dice are kept, and the latest (a resume starts from it);
  among equal scores the later one is kept, as Ray Train's checkpoint manager keeps them; a
  checkpoint is removed by a rename to a temporary name first (``core.storage.remove_directory``);
- the checkpoint scored is the best kept, the earlier one among equal scores, as Ray Train's
  ``Result.get_best_checkpoint`` picks it;
- a trial started again (after an interruption) resumes from the latest, through a temporary
  copy, as ``RaySession`` does; the temporaries a killed writer left are removed first.

The epochs are not reported to Tune one by one (``TuneReportCallback`` did, for Tune's progress
table): the trial reports once, its test scores. A trial that fails is started again by Tune
(``fit.max_failures``), from the top of ``run_trial``: its MLflow child run is closed and a new one
opened, where Ray Train restarted its workers inside one child run.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import torch

from mvl_pipeline.core import storage
from mvl_pipeline.training.session import RestoredCopy, Session

CHECKPOINTS = "checkpoints"
REPORT_FILE = "report.json"
SCORE = "val_dice"
_NAME = re.compile(r"^checkpoint_(\d{6})$")
_LOCAL = fsspec.filesystem("file")


@dataclass(frozen=True)
class StoredCheckpoint:
    index: int  # the report's place in the run (resumes continue the count)
    path: Path
    metrics: dict[str, Any]

    def score(self) -> tuple[bool, float]:
        """Ray Train's order of scores: NaN < no score (-inf) < any number."""
        value = self.metrics.get(SCORE)
        if value is None:
            return True, -math.inf
        return (False, 0.0) if math.isnan(value) else (True, float(value))


class TrialSession(Session):
    """One process, rank 0, checkpoints in ``<directory>/checkpoints`` (a local folder); on the
    GPU only when the trial reserved one (``use_gpu``: a process without a GPU of its own still
    sees the machine's)."""

    def __init__(self, directory: str | os.PathLike[str], num_to_keep: int, *, use_gpu: bool = False) -> None:
        if num_to_keep < 1:
            raise ValueError(f"num_to_keep must be >= 1, got {num_to_keep}")
        self.directory = Path(directory) / CHECKPOINTS
        self.num_to_keep = int(num_to_keep)
        self.use_gpu = bool(use_gpu)
        self._restored_copy = RestoredCopy()

    def checkpoints(self) -> list[StoredCheckpoint]:
        """The complete stored checkpoints, in report order."""
        found = []
        for path in self.directory.glob("checkpoint_*"):
            match = _NAME.match(path.name)
            if match and storage.is_complete(_LOCAL, "file", str(path)):
                metrics = json.loads((path / REPORT_FILE).read_text(encoding="utf-8"))
                found.append(StoredCheckpoint(int(match.group(1)), path, metrics))
        return sorted(found, key=lambda c: c.index)

    def latest(self) -> StoredCheckpoint | None:
        stored = self.checkpoints()
        return stored[-1] if stored else None

    def best(self) -> StoredCheckpoint | None:
        """The checkpoint to score: the best score kept, the earliest of equal ones."""
        stored = self.checkpoints()
        return max(stored, key=lambda c: (*c.score(), -c.index)) if stored else None

    def get_checkpoint_dir(self) -> str | None:
        """A copy of the latest checkpoint (None: a fresh start). Called once, as training starts:
        the temporaries a killed writer left are removed here (one process trains a trial)."""
        if self.directory.is_dir():
            storage.remove_temporaries(str(self.directory))
        latest = self.latest()
        if latest is None:
            return None
        return self._restored_copy.of(lambda folder: shutil.copytree(latest.path, folder, dirs_exist_ok=True))

    def close(self) -> None:
        self._restored_copy.cleanup()

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
        """Keep the ``num_to_keep`` best (the later of equal scores) and the latest."""
        stored = self.checkpoints()
        keep = {c.index for c in sorted(stored, key=lambda c: (*c.score(), c.index))[-self.num_to_keep :]}
        keep.add(stored[-1].index)
        for checkpoint in stored:
            if checkpoint.index not in keep:
                storage.remove_directory(None, "file", str(checkpoint.path))

    def device(self) -> torch.device:
        return torch.device("cuda" if self.use_gpu and torch.cuda.is_available() else "cpu")
