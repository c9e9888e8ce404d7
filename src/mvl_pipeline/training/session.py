"""What the training loop needs from its runtime: a rank, checkpoints, reports, an all-reduce.

``Session`` is one plain process (rank 0 of 1: benchmarks, debugging, unit tests);
``RaySession`` is a Ray Train worker (``ray.train.get_context()``, ``get_checkpoint()``,
``report()``, DDP through ``prepare_model``); ``trial_session.TrialSession`` is a local ablation
trial training in its own Ray Tune process, its checkpoints in the trial's folder.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn


class Session:
    """What the loop needs from its runtime. The plain session is one process, rank 0."""

    world_rank = 0
    world_size = 1

    def get_checkpoint_dir(self) -> str | None:
        return None

    def close(self) -> None:
        """Give back what the session holds (the local copy of a restored checkpoint)."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        del metrics, checkpoint_dir

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        return values

    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class RestoredCopy:
    """A temporary local copy of the checkpoint a worker resumes from (the loop writes its state
    into the folder it resumes from), removed by ``cleanup``: every resume copied the model and
    optimizer state (tens of MB) into the node's temporary folder and left it there."""

    def __init__(self) -> None:
        self._copy: tempfile.TemporaryDirectory[str] | None = None

    def of(self, write: Callable[[str], Any]) -> str:
        """The copy's folder, filled once by ``write(folder)``."""
        if self._copy is None:
            self._copy = tempfile.TemporaryDirectory(prefix="mvl-restore-")
            write(self._copy.name)
        return self._copy.name

    def cleanup(self) -> None:
        if self._copy is not None:
            self._copy.cleanup()
            self._copy = None


class RaySession(Session):
    def __init__(self) -> None:
        import ray.train

        self._train = ray.train
        context = ray.train.get_context()
        self.world_rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self._restored = ray.train.get_checkpoint()
        self._restored_copy = RestoredCopy()

    def get_checkpoint_dir(self) -> str | None:
        """A local copy of the checkpoint this worker resumes from (None: a fresh start), removed
        by ``close``."""
        if self._restored is None:
            return None
        return self._restored_copy.of(self._restored.to_directory)

    def close(self) -> None:
        self._restored_copy.cleanup()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        checkpoint = None
        if checkpoint_dir is not None:
            checkpoint = self._train.Checkpoint.from_directory(checkpoint_dir)
        self._train.report(metrics, checkpoint=checkpoint)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        if self.world_size == 1:
            return model.to(self.device())
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return values
        tensor = torch.from_numpy(np.asarray(values, dtype=np.float64))
        torch.distributed.all_reduce(tensor)
        return tensor.numpy()

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()
