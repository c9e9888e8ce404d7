"""Trials side by side vs one at a time: the default model's bf16 training throughput with every
core in one process (one ablation trial at a time, as before ``ablation.local_concurrent_trials``),
against one process per core, 1 thread each (what a local Ray runs with two trials at once on 2
cores), timed in alternating rounds in one run.

    .venv/bin/python benchmarks/bench_trials.py [--seconds 30] [--rounds 2] [--crop 40 56 40]

Each side is fresh processes: the model is built, warmed up (3 steps), then trained on a fixed
random batch for ``--seconds``; samples/s is counted per process and summed over the processes
that ran at once. The last line is one JSON object: ``one_process_samples_per_s``,
``side_by_side_samples_per_s`` (medians over rounds), ``side_by_side_speedup`` and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(threads: int, seconds: float, crop: list[int]) -> None:
    """One training process: print {"samples_per_s", "steps"} as its last line."""
    import torch
    import yaml

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_model

    base = yaml.safe_load((ROOT / "conf/base/parameters_model.yml").read_text())["model"]
    base["pos_grid"] = [c // p for c, p in zip(crop, base["patch_size"], strict=True)]
    args = types.SimpleNamespace(batch=2, crop=crop)
    cache = Path(tempfile.gettempdir()) / "mvl_pipeline-llm-cache"
    variant = bench_model.Variant(bench_model.variant_params(base, "new"), args, torch.device("cpu"), cache)
    for _ in range(3):
        variant.step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        variant.step()
        steps += 1
    elapsed = time.perf_counter() - start
    print(json.dumps({"samples_per_s": steps * args.batch / elapsed, "steps": steps}), flush=True)


def side(processes: int, threads: int, args) -> float:
    """``processes`` training processes of ``threads`` threads at once: their summed samples/s."""
    command = [sys.executable, __file__, "--worker", str(threads), "--seconds", str(args.seconds),
               "--crop", *map(str, args.crop)]  # fmt: skip
    running = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    total = 0.0
    for process in running:
        out, _ = process.communicate(timeout=args.seconds + 600)
        if process.returncode != 0:
            raise SystemExit(f"a training process failed (exit {process.returncode})")
        total += json.loads(out.strip().splitlines()[-1])["samples_per_s"]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="timed training per process per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--crop", type=int, nargs=3, default=[40, 56, 40], help="the Hippocampus plan's patch by default")
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.seconds, args.crop)
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_model import machine

    cores = os.cpu_count() or 1
    if cores < 2:
        raise SystemExit(f"this machine has {cores} core: there is nothing to run side by side")
    one, many = [], []
    for index in range(args.rounds):
        order = [("one", 1, cores), ("many", cores, 1)]
        for name, processes, threads in order if index % 2 == 0 else order[::-1]:  # alternate who goes first
            (one if name == "one" else many).append(side(processes, threads, args))
        print(f"round {index + 1}/{args.rounds}: one process x {cores} threads {one[-1]:.2f} samples/s, "
              f"{cores} processes x 1 thread {many[-1]:.2f} samples/s ({many[-1] / one[-1]:.2f}x)", flush=True)  # fmt: skip
    result = {
        "machine": machine(), "cores": cores, "crop": args.crop, "batch": 2, "seconds": args.seconds, "rounds": args.rounds,
        "one_process_samples_per_s": round(statistics.median(one), 3),
        "side_by_side_samples_per_s": round(statistics.median(many), 3),
        "side_by_side_speedup": round(statistics.median(many) / statistics.median(one), 3),
        "per_round_speedup": [round(m / o, 3) for m, o in zip(many, one, strict=True)],
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
