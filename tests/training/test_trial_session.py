"""``TrialSession``: the checkpoints of a trial trained in its own Tune process (the local ablation's
engine). Which checkpoints are kept (the best by validation Dice, the later of equal scores, and
the latest) and which is scored (the earlier of equal scores), as Ray Train keeps and picks them;
that a half-written or half-removed folder is never taken for a checkpoint; the device; and a REAL
interruption: a training process SIGKILLed mid-run resumes, in a new process, after its last
stored checkpoint, with the losses of an uninterrupted run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mvl_pipeline.core import storage
from mvl_pipeline.training.loop import run_training
from mvl_pipeline.training.trial_session import CHECKPOINTS, REPORT_FILE, TrialSession
from tests.training.test_loop import training_config

ROOT = Path(__file__).resolve().parents[2]


def _report(session: TrialSession, tmp_path: Path, epoch: int, val_dice: float | None) -> None:
    source = tmp_path / f"source-{epoch}"
    source.mkdir()
    (source / "weights.bin").write_bytes(bytes([epoch]))
    metrics = {"epoch": epoch} if val_dice is None else {"epoch": epoch, "val_dice": val_dice}
    session.report(metrics, str(source))


def _kept(session: TrialSession) -> list[int]:
    return [c.metrics["epoch"] for c in session.checkpoints()]


def test_the_best_by_validation_dice_and_the_latest_are_kept_and_the_earlier_of_equal_scores_is_scored(tmp_path):
    session = TrialSession(tmp_path / "trial", num_to_keep=2)
    for epoch, dice in enumerate([0.7, 0.5, 0.7, 0.6, 0.7, 0.4]):
        _report(session, tmp_path, epoch, dice)
    # Ray Train's checkpoint manager keeps the later of equal scores; the latest is always kept
    assert _kept(session) == [2, 4, 5]
    # Result.get_best_checkpoint takes the first maximum of the kept ones: the earlier
    assert session.best().metrics == {"epoch": 2, "val_dice": 0.7}
    assert session.latest().metrics["epoch"] == 5
    assert (session.latest().path / "weights.bin").read_bytes() == bytes([5])
    assert not list((tmp_path / "trial" / CHECKPOINTS).glob(".*"))  # no temporary folder left


def test_a_nan_score_ranks_below_no_score_and_no_score_below_every_number(tmp_path):
    session = TrialSession(tmp_path / "trial", num_to_keep=1)
    _report(session, tmp_path, 0, None)
    _report(session, tmp_path, 1, math.nan)
    assert _kept(session) == [0, 1] and session.best().metrics["epoch"] == 0  # NaN < no score (-inf)
    _report(session, tmp_path, 2, 0.1)
    _report(session, tmp_path, 3, None)
    assert _kept(session) == [2, 3] and session.best().metrics["epoch"] == 2


def test_a_half_written_or_half_removed_folder_is_not_a_checkpoint_and_a_resume_sweeps_them(tmp_path):
    session = TrialSession(tmp_path / "trial", num_to_keep=1)
    for epoch, dice in enumerate([0.5, 0.6, 0.4]):
        _report(session, tmp_path, epoch, dice)
    stored = tmp_path / "trial" / CHECKPOINTS
    assert sorted(p.name for p in stored.iterdir()) == ["checkpoint_000001", "checkpoint_000002"]  # nothing else left
    # what a kill leaves: a removal between its rename and its rmtree, a write before its rename,
    # and a visible folder without its marker (never a checkpoint)
    (stored / f".checkpoint_000000.old-{'a' * 32}").mkdir()
    (stored / f".checkpoint_000003.tmp-{'b' * 32}").mkdir()
    unmarked = stored / "checkpoint_000000"
    unmarked.mkdir()
    (unmarked / REPORT_FILE).write_text(json.dumps({"epoch": 0, "val_dice": 0.9}))
    assert _kept(session) == [1, 2] and session.best().metrics["epoch"] == 1
    resumed = TrialSession(tmp_path / "trial", num_to_keep=1)
    copy = resumed.get_checkpoint_dir()
    assert (Path(copy) / "weights.bin").read_bytes() == bytes([2])
    resumed.close()
    assert sorted(p.name for p in stored.iterdir()) == ["checkpoint_000000", "checkpoint_000001", "checkpoint_000002"]
    assert not (unmarked / storage.COMPLETE_MARKER).exists()


def test_a_resume_reads_a_copy_of_the_latest_checkpoint_and_close_removes_the_copy(tmp_path):
    session = TrialSession(tmp_path / "trial", num_to_keep=1)
    assert session.get_checkpoint_dir() is None
    _report(session, tmp_path, 0, 0.9)
    _report(session, tmp_path, 1, 0.1)
    resumed = TrialSession(tmp_path / "trial", num_to_keep=1)
    copy = Path(resumed.get_checkpoint_dir())
    assert (copy / "weights.bin").read_bytes() == bytes([1])  # the latest, not the best
    assert copy != resumed.latest().path and not copy.is_relative_to(tmp_path / "trial")
    resumed.close()
    assert not copy.exists()


CHILD = """
import sys
sys.path.insert(0, {root!r})
from tests.training.test_loop import training_config
from mvl_pipeline.training.loop import run_training
from mvl_pipeline.training.trial_session import TrialSession
from pathlib import Path
tmp = Path({tmp!r})
run_training(training_config(tmp, **{loop!r}), TrialSession(tmp / "trial", num_to_keep=2))
"""


def test_a_training_killed_mid_run_resumes_in_a_new_process_after_its_last_checkpoint(tmp_path):
    loop = {"epochs": 150, "val_every": 1, "steps_per_epoch": 2}
    uninterrupted = run_training(training_config(tmp_path / "whole", **loop), TrialSession(tmp_path / "whole", num_to_keep=2))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(root=str(ROOT), tmp=str(tmp_path), loop=loop)],
        cwd=ROOT, start_new_session=True,
    )  # fmt: skip
    stored = tmp_path / "trial" / CHECKPOINTS
    deadline = time.monotonic() + 300
    try:
        while max((int(p.name[-6:]) for p in stored.glob("checkpoint_[0-9]*")), default=-1) < 2:
            assert child.poll() is None, f"the training process ended (rc {child.returncode}) before it was killed"
            assert time.monotonic() < deadline, "no third checkpoint within 300 s"
            time.sleep(0.01)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL

    session = TrialSession(tmp_path / "trial", num_to_keep=2)
    before = session.latest().metrics["epoch"]
    assert 2 <= before < loop["epochs"] - 1
    state = run_training(training_config(tmp_path, **loop), session)
    assert state["resumed_after_epochs"] == [before]
    assert [h["epoch"] for h in state["history"]] == list(range(loop["epochs"]))
    assert state["global_step"] == loop["epochs"] * loop["steps_per_epoch"]
    last = session.latest()
    assert last.metrics["epoch"] == loop["epochs"] - 1
    assert json.loads((last.path / "trainer_state.json").read_text())["resumed_after_epochs"] == [before]
    assert len(session.checkpoints()) <= 3  # the best two and the latest, nothing else left behind
    assert not [p for p in stored.iterdir() if p.name.startswith(".")]
    # as if never stopped: the epochs after the resume have the uninterrupted run's losses
    for got, want in zip(state["history"][before + 1 :], uninterrupted["history"][before + 1 :], strict=True):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)
        assert got["lr"] == pytest.approx(want["lr"])


def test_the_trial_trains_on_a_gpu_only_when_it_reserved_one(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with a GPU the trial did not reserve
    assert TrialSession(tmp_path, 1).device() == torch.device("cpu")
    assert TrialSession(tmp_path, 1, use_gpu=True).device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert TrialSession(tmp_path, 1, use_gpu=True).device() == torch.device("cpu")


@pytest.mark.parametrize("num_to_keep", [0, -1])
def test_num_to_keep_below_one_is_refused(tmp_path, num_to_keep):
    with pytest.raises(ValueError, match="num_to_keep"):
        TrialSession(tmp_path, num_to_keep)
