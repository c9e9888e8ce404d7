"""benchmarks/bench_cnn.py runs with the project's environment, times the ``cnn`` preset against
MONAI's DynUNet on the same weights, and ends with its one JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]


def test_the_benchmark_times_the_preset_and_monai_side_by_side_and_prints_its_ratios_last() -> None:
    done = subprocess.run(
        [sys.executable, str(PROJECT / "benchmarks" / "bench_cnn.py"), "--rounds", "2", "--steps", "1"],
        cwd=PROJECT, capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for kind in ("step_s", "infer_s"):
        assert result[f"preset_{kind}"] > 0 and result[f"monai_{kind}"] > 0
    assert result["speedup_vs_monai"] > 0 and result["infer_speedup_vs_monai"] > 0
    assert len(result["step_speedup_per_round"]) == 2
    # the same start, batch and steps: the two sides' losses agree to bf16 noise
    losses = result["last_losses"]
    assert len(losses["preset"]) == len(losses["monai"]) == 3
    assert all(abs(a - b) < 0.02 for a, b in zip(losses["preset"], losses["monai"], strict=True)), losses
    assert {"device", "torch"} <= set(result["machine"]) and len(result["machine"]) > 2
