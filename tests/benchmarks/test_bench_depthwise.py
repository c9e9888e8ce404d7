"""benchmarks/bench_depthwise.py runs with the project's environment, times every way it names,
and ends with its one JSON line (the figures and the ratios that decided the CPU path)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
WAYS = {
    "library_bf16_channels_last", "library_fp32_channels_last", "library_bf16", "library_fp32",
    "composed_fp32", "composed_bf16", "composed_taps_fp32",
}  # fmt: skip


def test_the_benchmark_times_every_way_and_prints_its_ratios_last() -> None:
    done = subprocess.run(
        [sys.executable, str(PROJECT / "benchmarks" / "bench_depthwise.py"), "--batch", "1", "--iters", "2"],
        cwd=PROJECT, capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result["batch_1_ms"]) == WAYS
    assert all(ms > 0 for ms in result["batch_1_ms"].values())
    for ratio in ("fp32_vs_bf16_channels_last", "composed_vs_library_fp32_channels_last", "composed_vs_taps_fp32"):
        assert result[f"batch_1_{ratio}"] > 0
    # read against the machine it ran on (bench_model.machine: CPU flags, GPU)
    assert {"device", "torch"} <= set(result["machine"]) and len(result["machine"]) > 2
