"""A local Ray as `kedro run` starts it (``training.ray_driver.connect_ray``): without its dashboard
(``fit.ray_dashboard: false``) against with it (the default, as Ray's own: the dashboard head
serves the state API that Ray Train's placement-group cleaner polls), in alternating rounds of
fresh processes in one run: what turning the dashboard off saves.

    .venv/bin/python benchmarks/bench_ray_start.py [--rounds 3] [--settle 8]

Each start is a new Python process that calls ``connect_ray``, runs one Ray task (Ray is ready),
waits ``--settle`` seconds (the agents Ray starts in the background come up), counts the
processes below it and their memory: ``pss_mib``, the proportional set size summed
(``/proc/<pid>/smaps_rollup``: a page shared by k processes counts 1/k in each, so the sum is what
they hold together), and ``rss_mib``, resident memory summed (a shared page counts once per
process: it overstates a many-process Ray, kept for comparison), then shuts Ray down. The machine's busy CPU seconds over the whole life of that process
(``/proc/stat``, every process on the machine: keep the machine otherwise idle) are its CPU
cost. The last line is one JSON object: per side the medians of ``ready_s``, ``cpu_s``,
``pss_mib``, ``rss_mib`` and ``processes``, the ratios dashboard / without, and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, os, sys, time
import ray
from mvl_pipeline.training.config import FitConfig
from mvl_pipeline.training.ray_driver import connect_ray
from tests.support.procs import descendants  # the project root is the cwd

dashboard, settle = sys.argv[1] == "1", float(sys.argv[2])
started = time.monotonic()
assert connect_ray(FitConfig.from_params({"ray_dashboard": dashboard}))
ray.get(ray.remote(lambda: 1).remote())
ready = time.monotonic() - started
time.sleep(settle)
below = descendants(os.getpid())
rss_kib = pss_kib = 0
for pid in below:
    try:
        with open(f"/proc/{pid}/status") as status:
            rss_kib += next((int(line.split()[1]) for line in status if line.startswith("VmRSS:")), 0)
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            pss_kib += next((int(line.split()[1]) for line in rollup if line.startswith("Pss:")), 0)
    except (FileNotFoundError, ProcessLookupError):
        pass
url = ray._private.worker.global_worker.node.address_info.get("webui_url") or ""
ray.shutdown()
print(json.dumps({"ready_s": ready, "processes": len(below), "rss_mib": rss_kib / 1024, "pss_mib": pss_kib / 1024, "dashboard_url": url}))
"""


def busy_cpu_s() -> float:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def start(dashboard: bool, settle: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always a local Ray
    before = busy_cpu_s()
    done = subprocess.run([sys.executable, "-c", PROBE, "1" if dashboard else "0", str(settle)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300, check=False)  # fmt: skip
    cpu = busy_cpu_s() - before
    if done.returncode != 0:
        raise SystemExit(f"the local Ray did not start (dashboard={dashboard}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"cpu_s": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle", type=float, default=8.0, help="seconds Ray runs after it is ready")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_model import machine

    sides = {"without_dashboard": False, "with_dashboard": True}
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for round_ in range(args.rounds):
        for side, dashboard in sides.items():
            time.sleep(2)  # the previous Ray's processes are gone
            runs[side].append(start(dashboard, args.settle))
            print(f"round {round_ + 1}/{args.rounds} {side}: {json.dumps(runs[side][-1])}", flush=True)
    assert all(not r["dashboard_url"] for r in runs["without_dashboard"]), "a dashboard started though it was off"
    assert all(r["dashboard_url"] for r in runs["with_dashboard"]), "no dashboard started though it was asked for"
    figures = {side: {key: round(statistics.median(r[key] for r in rs), 2) for key in ("ready_s", "cpu_s", "pss_mib", "rss_mib", "processes")}
               for side, rs in runs.items()}  # fmt: skip
    ratio = lambda key: round(figures["with_dashboard"][key] / figures["without_dashboard"][key], 2)  # noqa: E731
    print(json.dumps({"machine": machine(), "rounds": args.rounds, "settle_s": args.settle, **figures,
                      "pss_ratio_dashboard": ratio("pss_mib"), "rss_ratio_dashboard": ratio("rss_mib"), "cpu_ratio_dashboard": ratio("cpu_s"),
                      "ready_ratio_dashboard": ratio("ready_s"), "processes_ratio_dashboard": ratio("processes")}))  # fmt: skip


if __name__ == "__main__":
    main()
