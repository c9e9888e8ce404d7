"""Retrain from the champion or from scratch? The measurement behind ``fit.init``'s default.

On the MSD Hippocampus task (../shared/data, ingested and preprocessed by the project's own
pipelines and defaults): day 0 trains from scratch on the first ``--day0-fraction`` of the
training patients (the champion). On day 1 the other training patients arrive and two retrains
run on all of them, side by side in this process, with the project's training loop and the YAML's
loop settings: ``scratch`` (a fresh initialisation, ``--epochs``) and ``champion`` (the day-0
model's weights, ``--champion-epochs``, the same schedule shape: what ``fit.init: champion`` does).
Each keeps its checkpoint with the best validation Dice; all three are scored on the same patients
on their original grid by the project's evaluation code (post-processing not applied): the gate
patients by default (``--score-role``), since these figures choose a default; not the test ones.

Printed: Dice (of the scored role) and training wall time of each, the champion retrain's time as a fraction of the
scratch retrain's, and the Dice difference; the CPU's matrix-unit flags beside them. One seed:
the ablation's seed-to-seed SD of test Dice on this task was 0.004-0.012 per arm (README, "Does
the frozen LLM layer help?"), so a difference below about 0.01 is no difference. Last line: one
JSON object. The defaults take about 2.5 min on 2 cores; the YAML's budget (the README's figure)
about 8 min:

    python benchmarks/bench_retrain.py [--epochs 12] [--champion-epochs 3] [--steps 25]
    python benchmarks/bench_retrain.py --epochs 24 --steps 50
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch  # noqa: E402  (after _hippocampus: it puts the project root on sys.path)
from _hippocampus import ROOT, base_params, hippocampus_workspace
from bench_quality import BudgetSession, cpu_flags, score_on

from mvl_pipeline.model import MedVisionLlamaConfig
from mvl_pipeline.preprocessing.plan import plan_classes
from mvl_pipeline.training.config import LoopConfig
from mvl_pipeline.training.loop import run_training


def train(data: dict[str, Any], train_ids: list[str], epochs: int, args: argparse.Namespace, cache: str,
          init: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    plan = data["preprocessing_plan"]
    cfg = MedVisionLlamaConfig.from_params(base_params("model")).for_plan(plan)
    loop = base_params("fit")["loop"] | {"epochs": epochs, "steps_per_epoch": args.steps, "val_every": 1}
    config = {
        "loop": LoopConfig.from_params(loop).to_dict(), "model": cfg.to_dict(), "plan": plan,
        "classes": sorted(plan_classes(plan)), "train_ids": sorted(train_ids),
        "val_ids": sorted(data["data_split"]["validation"])[: args.val_cases],
        "loaders": data["model_input_cases"], "llm_cache_dir": cache, "cpus_per_worker": os.cpu_count(),
        "init_weights": init,
    }  # fmt: skip
    session = BudgetSession(math.inf)  # keeps the best validation checkpoint's weights
    started = time.perf_counter()
    run_training(config, session)
    wall = time.perf_counter() - started
    dice, per_class, _ = score_on(session.best[1], data, cache, args.score_role)
    return {
        "dice": dice, "dice_per_class": per_class,
        "train_wall_s": round(wall, 1), "epochs": epochs, "n_train": len(train_ids),
        "best_val_dice": round(session.best[0], 4), "val_curve": [p["val_dice"] for p in session.curve],
        "state": session.best[1][0],
    }  # fmt: skip


def main() -> None:
    fit = base_params("fit")
    ratio = fit["champion_epochs"] / fit["loop"]["epochs"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12, help="epochs of a fit from scratch")
    parser.add_argument("--champion-epochs", type=int, default=None,
                        help=f"epochs from the champion (default: --epochs x {ratio:g}, the YAML's ratio)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=25, help="training steps per epoch")
    parser.add_argument("--val-cases", type=int, default=16, help="validation cases (best checkpoint)")
    parser.add_argument("--day0-fraction", type=float, default=0.7, help="training patients there on day 0")
    parser.add_argument("--score-role", default="gate", choices=("gate", "test"),
                        help="the patients the three models are scored on (default gate: the figures choose fit.init, "
                             "so not the test patients)")  # fmt: skip
    args = parser.parse_args()
    champion_epochs = args.champion_epochs or max(1, round(args.epochs * ratio))
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    cache = str(ROOT / "data" / "06_models" / "llm_cache")
    with tempfile.TemporaryDirectory(prefix="bench-retrain-") as tmp:
        data = hippocampus_workspace(Path(tmp))
        train_ids = sorted(data["data_split"]["train"])
        day0_ids = train_ids[: int(len(train_ids) * args.day0_fraction)]
        day0 = train(data, day0_ids, args.epochs, args, cache)
        print(f"day 0 scratch   {len(day0_ids)} cases  {args.score_role} Dice {day0['dice']:.4f}  {day0['train_wall_s']} s", flush=True)
        scratch = train(data, train_ids, args.epochs, args, cache)
        print(f"day 1 scratch   {len(train_ids)} cases  {args.score_role} Dice {scratch['dice']:.4f}  {scratch['train_wall_s']} s", flush=True)
        champion = train(data, train_ids, champion_epochs, args, cache, init=day0["state"])
        print(f"day 1 champion  {len(train_ids)} cases  {args.score_role} Dice {champion['dice']:.4f}  {champion['train_wall_s']} s", flush=True)
    out: dict[str, Any] = {
        "task": "Task04_Hippocampus", "score_role": args.score_role, "n_scored": len(data["data_split"][args.score_role]),
        "epochs_scratch": args.epochs, "epochs_champion": champion_epochs, "steps_per_epoch": args.steps,
        "dice_day0": day0["dice"], "dice_scratch": scratch["dice"], "dice_champion": champion["dice"],
        "dice_champion_minus_scratch": round(champion["dice"] - scratch["dice"], 4),
        "train_s_scratch": scratch["train_wall_s"], "train_s_champion": champion["train_wall_s"],
        "time_ratio_champion_vs_scratch": round(champion["train_wall_s"] / scratch["train_wall_s"], 3),
        "cpu_flags": cpu_flags(), "threads": torch.get_num_threads(),
        "wall_s": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    for name, entry in (("day0", day0), ("scratch", scratch), ("champion", champion)):
        out[f"detail_{name}"] = {k: v for k, v in entry.items() if k != "state"}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
