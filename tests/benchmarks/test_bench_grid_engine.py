"""benchmarks/bench_grid_engine.py trains the same two ablation trials in their Tune processes, as
Ray Train runs and as plain processes, on real Hippocampus cases, and ends with its one JSON line:
run here in its smallest form (one round, 2 epochs of 2 steps, 12 cases). Minutes: marked slow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_the_benchmark_runs_every_side_and_finds_them_training_the_same(shared_data) -> None:
    assert (shared_data / "msd" / "Task04_Hippocampus" / "dataset.json").is_file()
    done = subprocess.run(
        [sys.executable, str(PROJECT / "benchmarks" / "bench_grid_engine.py"),
         "--rounds", "1", "--epochs", "2", "--steps", "2", "--cases", "12"],
        cwd=PROJECT, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    for side in ("tune", "ray_train", "plain"):
        assert summary[f"{side}_samples_per_s"] > 0 and len(summary["wall_s"][side]) == 1
        assert len(summary["per_round_samples_per_s"][side]) == 1
    # each ratio is the quotient of the two rates it names (rates rounded to 0.01 in the JSON)
    for ratio in ("tune_vs_ray_train", "tune_vs_plain", "ray_train_vs_plain"):
        top, bottom = ratio.split("_vs_")
        assert summary[ratio] == pytest.approx(summary[f"{top}_samples_per_s"] / summary[f"{bottom}_samples_per_s"], rel=0.03)
    # the same losses and validation Dice, epoch by epoch, on every side: ablation.local_engine
    # changes where a trial trains, not what it trains
    assert summary["same_training"] is True
    assert summary["machine"]["cpu_bf16_units"] in ("amx_bf16", "avx512_bf16", "none")  # read the figures with the CPU
