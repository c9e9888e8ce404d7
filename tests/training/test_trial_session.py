"""``TrialSession``: the checkpoints of a trial trained in its own Tune process (the local ablation's
engine). Which checkpoints are kept (the best by validation Dice, ties to the later one, and the
latest), that a half-written or half-removed folder is never taken for a checkpoint, and a REAL
interruption: a training process SIGKILLed mid-run resumes, in a new process, after its last
stored checkpoint, as if never stopped."""

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


def test_the_best_by_validation_dice_and_the_latest_are_kept_ties_going_to_the_later(tmp_path):
    session = TrialSession(tmp_path / "trial", num_to_keep=2)
    for epoch, dice in enumerate([0.5, 0.7, 0.6, 0.7, 0.4]):
        _report(session, tmp_path, epoch, dice)
    assert _kept(session) == [1, 3, 4]  # the two 0.7s, and the latest (a resume starts there)
    assert session.best().metrics == {"epoch": 3, "val_dice": 0.7}  # the later of equal scores, as Ray Train
    assert session.latest().metrics["epoch"] == 4
    assert (session.latest().path / "weights.bin").read_bytes() == bytes([4])
    assert not list((tmp_path / "trial" / CHECKPOINTS).glob(".*"))  # no temporary folder left


def test_a_checkpoint_without_a_score_ranks_below_every_scored_one(tmp_path):
    session = TrialSession(tmp_path / "trial", num_to_keep=1)
    _report(session, tmp_path, 0, 0.1)
    _report(session, tmp_path, 1, math.nan)
    _report(session, tmp_path, 2, None)
    assert session.best().metrics["epoch"] == 0
    assert _kept(session) == [0, 2]


def test_a_half_written_or_half_removed_folder_is_not_a_checkpoint(tmp_path):
    session = TrialSession(tmp_path / "trial", num_to_keep=2)
    _report(session, tmp_path, 0, 0.5)
    stored = tmp_path / "trial" / CHECKPOINTS
    cut_short = stored / "checkpoint_000001"  # a removal cut short: its marker went first
    cut_short.mkdir()
    (cut_short / REPORT_FILE).write_text(json.dumps({"epoch": 1, "val_dice": 0.9}))
    (stored / ".checkpoint_000002.tmp-0123").mkdir()  # a write cut short: never renamed into place
    assert _kept(session) == [0] and session.best().metrics["epoch"] == 0
    # the next report replaces the folder that is not a checkpoint, whole
    _report(session, tmp_path, 1, 0.6)
    assert [c.path.name for c in session.checkpoints()] == ["checkpoint_000000", "checkpoint_000001"]
    assert session.latest().metrics == {"epoch": 1, "val_dice": 0.6}
    assert (cut_short / "weights.bin").read_bytes() == bytes([1]) and (cut_short / storage.COMPLETE_MARKER).exists()
    # a resume sweeps the temporary folders a killed writer left
    TrialSession(tmp_path / "trial", num_to_keep=2).get_checkpoint_dir()
    assert not [p.name for p in stored.iterdir() if p.name.startswith(".")]


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
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(root=str(ROOT), tmp=str(tmp_path), loop=loop)],
        cwd=ROOT, start_new_session=True,
    )  # fmt: skip
    stored = tmp_path / "trial" / CHECKPOINTS
    deadline = time.monotonic() + 300
    try:
        while len(list(stored.glob("checkpoint_*"))) < 3:
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


@pytest.mark.parametrize("num_to_keep", [0, -1])
def test_num_to_keep_below_one_is_refused(tmp_path, num_to_keep):
    with pytest.raises(ValueError, match="num_to_keep"):
        TrialSession(tmp_path, num_to_keep)
