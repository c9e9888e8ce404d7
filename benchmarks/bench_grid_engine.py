"""How a local ablation trial trains: in its Ray Tune trial's process (``ablation.local_engine:
tune``, the default) against a Ray Train run of one worker (``ray_train``, as on a cluster), against
the same trainings as plain processes (what a user's own script would run), on real Hippocampus
cases, two trials side by side as the local grid runs them.

    .venv/bin/python benchmarks/bench_grid_engine.py [--rounds 2] [--epochs 6] [--steps 35] [--cases 60]

The workspace: the first ``--cases`` cases of ../shared's Hippocampus task, ingested and
preprocessed with the project's pipelines. Each side is a fresh process per round, the sides in
alternating order, round after round:

- ``tune`` and ``ray_train``: ``tune_driver.run_ablation`` (the ablation node's grid, no MLflow)
  over two trials of equal cost, ``pretrained`` and ``shuffled`` at seed 0, 2 at a time on a local
  Ray of 2 CPUs, 1 core each (the default grid on 2 cores), ``--epochs`` x ``--steps`` (the
  trial's 35), validation every 2 epochs, then the test cases scored;
- ``plain``: the same two trainings as two plain processes side by side, 1 thread each
  (``benchmarks/_plain_fit.py``: ``run_training`` with the same configuration, no Ray).

Per side: the training samples/s of each epoch after the first (the loop's own figure: the steps
only, without validation or reports), median over epochs, trials and rounds, and the wall time
(not like for like: the plain side starts no Ray, builds no arm beforehand and scores nothing).
``tune_vs_ray_train`` is the speed-up of the default engine over the Ray Train run,
``tune_vs_plain`` and ``ray_train_vs_plain`` each engine's speed against plain processes;
``same_training`` says whether every side trained the same (equal losses and validation Dice,
epoch by epoch). The
last line is one JSON object, with the machine's CPU flags.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from _hippocampus import ROOT, base_params, hippocampus_workspace, open_workspace  # noqa: E402
from bench_model import machine  # noqa: E402

ARMS = ["pretrained", "shuffled"]  # the same cost: the trials run side by side from start to end
SIDES = ("tune", "ray_train", "plain")


def context_for(workspace: Path, epochs: int, steps: int, engine: str, storage: Path):
    """The ablation's trial context, as its node builds it, for the two-trial grid."""
    from mvl_pipeline.evaluation.scoring import EvaluateConfig
    from mvl_pipeline.ingestion.manifest import data_version
    from mvl_pipeline.training import tune_driver
    from mvl_pipeline.training.ablation_config import AblationConfig
    from mvl_pipeline.training.config import FitConfig
    from tests.support.workspace import local_catalog

    catalog = local_catalog(workspace, {})  # reads what hippocampus_workspace wrote
    ablation = base_params("ablation")
    ablation |= {"arms": ARMS, "reference": ARMS[0], "seeds": [0], "local_engine": engine, "storage_path": str(storage),
                 "trial": {**ablation["trial"], "epochs": epochs, "steps_per_epoch": steps}}  # fmt: skip
    ablation["arm_models"] = {arm: ablation["arm_models"][arm] for arm in ARMS}
    config = AblationConfig.from_params(ablation)
    # a local Ray of 2 CPUs on any machine: the two trials 1 core each, as the plain processes get
    fit = FitConfig.from_params(base_params("fit") | {"ray_num_cpus": 2, "llm_cache_dir": str(Path(tempfile.gettempdir()) / "mvl_pipeline-llm-cache")})
    context, experiment = tune_driver.build_context(
        model_input_cases=catalog.load("model_input_cases"), ingested_cases=catalog.load("ingested_cases"),
        development_split=catalog.load("development_split"), test_split=catalog.load("test_split"),
        preprocessing_plan=catalog.load("preprocessing_plan"), data_version=data_version(catalog.load("ingest_manifest")),
        lineage={"git_commit": "bench", "git_dirty": "bench"}, model_params=base_params("model"), fit_cfg=fit,
        evaluate_cfg=EvaluateConfig.from_params(base_params("evaluate")), config=config,
    )  # fmt: skip
    return replace(context, mlflow=None), experiment, fit, config


def run_side(side: str, workspace: Path, epochs: int, steps: int, out: Path) -> None:
    """One side, in this (fresh) process: write {"wall_s", "histories": {arm: history}}."""
    from mvl_pipeline.training import tune_driver
    from mvl_pipeline.training.ablation_trial import train_config

    storage = out.with_suffix(".store")
    context, experiment, fit, config = context_for(workspace, epochs, steps, "tune" if side == "plain" else side, storage)
    started = time.perf_counter()
    if side == "plain":
        processes = []
        for arm in ARMS:
            trial = train_config(replace(context, scaling={**context.scaling, "cpus_per_worker": 1}), arm, 0, None)
            trial.pop("loaders")
            trial["model_input_path"] = str(workspace / "model_input")
            (out.parent / f"{arm}.json").write_text(json.dumps(trial), encoding="utf-8")
            command = [sys.executable, str(Path(__file__).with_name("_plain_fit.py")), str(out.parent / f"{arm}.json"),
                       str(out.parent / f"{arm}.out.json")]  # fmt: skip
            processes.append(subprocess.Popen(command))
        if any(process.wait() for process in processes):
            raise SystemExit("a plain training process failed")
        histories = {arm: json.loads((out.parent / f"{arm}.out.json").read_text())["history"] for arm in ARMS}
    else:
        trials = tune_driver.run_ablation(context, experiment, fit, config)
        histories = {trial["arm"]: trial["history"] for trial in trials}
    out.write_text(json.dumps({"wall_s": time.perf_counter() - started, "histories": histories}), encoding="utf-8")
    shutil.rmtree(storage, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=base_params("ablation")["trial"]["steps_per_epoch"])
    parser.add_argument("--cases", type=int, default=60)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: one side, in a fresh process
    parser.add_argument("--workspace", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        run_side(args.side, Path(args.workspace), args.epochs, args.steps, Path(args.out))
        return
    if args.epochs < 2:
        raise SystemExit("--epochs must be at least 2 (the first epoch is not counted)")
    with tempfile.TemporaryDirectory(prefix="bench-grid-engine-") as folder:
        tmp = Path(folder)
        hippocampus_workspace(tmp, n_cases=args.cases)
        open_workspace(tmp)  # fails here, before any side runs, if the cases do not read back as a trial reads them
        runs = {side: [] for side in SIDES}
        for round_ in range(args.rounds):
            order = SIDES if round_ % 2 == 0 else tuple(reversed(SIDES))
            for side in order:
                out = tmp / f"{side}-{round_}" / "out.json"
                out.parent.mkdir()
                command = [sys.executable, __file__, "--side", side, "--workspace", str(tmp), "--epochs", str(args.epochs),
                           "--steps", str(args.steps), "--out", str(out)]  # fmt: skip
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                runs[side].append(json.loads(out.read_text()))
                print(f"round {round_ + 1}/{args.rounds} {side}: {runs[side][-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)

    def rate(side: str) -> float:
        return statistics.median(e["samples_per_s"] for run in runs[side] for h in run["histories"].values() for e in h[1:])

    def losses(run: dict) -> dict:
        """Each trial's losses and validation Dice, epoch by epoch (to 6 decimals)."""
        return {arm: [(round(e["train_loss"], 6), round(e.get("val_dice", -1.0), 6)) for e in history]
                for arm, history in sorted(run["histories"].items())}  # fmt: skip

    rates = {side: rate(side) for side in SIDES}
    summary = {
        "arms": ARMS,
        "epochs": args.epochs,
        "steps_per_epoch": args.steps,
        "rounds": args.rounds,
        "cases": args.cases,
        **{f"{side}_samples_per_s": round(rates[side], 2) for side in SIDES},
        "tune_vs_ray_train": round(rates["tune"] / rates["ray_train"], 3),
        "tune_vs_plain": round(rates["tune"] / rates["plain"], 3),
        "ray_train_vs_plain": round(rates["ray_train"] / rates["plain"], 3),
        "wall_s": {side: [round(run["wall_s"], 1) for run in runs[side]] for side in SIDES},
        "per_round_samples_per_s": {
            side: [round(statistics.median(e["samples_per_s"] for h in run["histories"].values() for e in h[1:]), 2) for run in runs[side]]
            for side in SIDES
        },
        "same_training": len({json.dumps(losses(run)) for side in SIDES for run in runs[side]}) == 1,
        "cores": os.cpu_count(),
        "machine": machine(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
