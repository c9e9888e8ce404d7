"""benchmarks/bench_grid.py times each arm of the ablation grid's step against the machine's matmul
rate and predicts the grid's time from them: it runs with the project's environment, counts each
arm's arithmetic, and ends with its one JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench_grid():
    sys.path.insert(0, str(PROJECT / "benchmarks"))  # the benchmarks import each other as scripts do
    try:
        import bench_grid

        yield bench_grid
    finally:
        sys.path.remove(str(PROJECT / "benchmarks"))


def test_trials_are_list_scheduled_in_order_on_the_first_free_slot(bench_grid) -> None:
    # 10 and 6 start together; 4 follows 6 (free at 6); 3 follows 4 (free at 10, tied with 10's end: the first)
    assert bench_grid.list_schedule([10, 6, 4, 3], 2) == 13
    assert bench_grid.list_schedule([10, 6, 4, 3], 1) == 23
    assert bench_grid.list_schedule([5, 5, 5], 4) == 5


def test_the_benchmark_times_every_arm_against_the_matmul_rate_and_prints_its_prediction_last() -> None:
    done = subprocess.run(
        [sys.executable, str(PROJECT / "benchmarks" / "bench_grid.py"), "--crop", "16", "16", "16",
         "--rounds", "2", "--steps", "1", "--arms", "pretrained", "none", "cnn"],
        cwd=PROJECT, capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result["arms"]) == {"pretrained", "none", "cnn"}
    for arm in result["arms"].values():
        assert arm["step_s"] > 0 and arm["gflop_per_step"] > 0 and arm["fraction_of_matmul_rate"] > 0
        assert len(arm["step_s_per_round"]) == 2
    flops = {name: arm["gflop_per_step"] for name, arm in result["arms"].items()}
    assert flops["pretrained"] > flops["none"]  # the frozen LLM layer's GEMMs, forward and back
    assert result["trials"] == 9 and result["steps_per_trial"] > 0
    assert len(result["matmul_gflops_bf16_per_round"]) == 2 and result["matmul_gflops_bf16"] > 0
    assert 0 < result["floor_min"] and 0 < result["predicted_steps_min"]
    assert result["predicted_vs_floor"] == pytest.approx(result["predicted_steps_min"] / result["floor_min"], rel=0.2)  # both rounded to 0.1 min
    assert {"cpu_bf16_units", "cores"} <= set(result["machine"])
