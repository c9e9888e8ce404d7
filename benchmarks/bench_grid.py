"""What the default ablation grid costs on this machine, before it runs: every arm's training step
as a local trial runs it, against the machine's own bf16 matmul rate, and the grid's time from them.

    .venv/bin/python benchmarks/bench_grid.py [--rounds 3] [--steps 4] [--crop 40 56 40]

The grid is ``conf/base/parameters_ablation.yml`` (arms, seeds, each arm's model, the trial budget)
on ``conf/base/parameters_model.yml``, completed from the Hippocampus plan as the grid completes it
(``tune_driver.arm_models``). Each arm's model is built once and trained on a fixed random batch
(batch ``fit.loop.batch_size``, the plan's patch) with the loop's step (deep supervision, clip,
AdamW), at the threads a local trial gets: the cores shared out between
``ablation.local_concurrent_trials`` trials. Round-robin, every round: the 2048^3 bf16 matmul rate
at those threads, then each arm's mean step time over ``--steps`` steps.

- ``arms.<arm>``: ``step_s`` (median over rounds), ``gflop_per_step`` (matmul and convolution
  FLOPs of one step, forward and backward: ``torch.utils.flop_counter``), ``fraction_of_matmul_rate``
  (those FLOPs per second over the matmul rate of the same rounds);
- ``predicted_steps_min``: every trial's steps (epochs x steps_per_epoch) at its arm's step time,
  the trials list-scheduled in the grid's own order (``tune_driver.trial_order``) on the slots.
  Steps only: the grid adds the batches' sampling, validation, each trial's start-up and scoring,
  and the trials share the machine's memory (README, measured, gives a grid's time against this);
- ``floor_min``: the grid's arithmetic at the matmul rate on every core: no step runs faster;
- ``predicted_vs_floor``: how far from that floor the steps run.

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _hippocampus import base_params
from bench_cnn import HIPPOCAMPUS_PLAN
from bench_model import Variant, machine, matmul_gflops
from torch.utils.flop_counter import FlopCounterMode

from mvl_pipeline.model import MedVisionLlamaConfig, build_model, configure_optimizers
from mvl_pipeline.training.ablation_config import AblationConfig
from mvl_pipeline.training.losses import make_loss
from mvl_pipeline.training.tune_driver import arm_models, trial_order


class ArmStep(Variant):
    """One arm's model, optimiser and fixed batch; ``step`` is bench_model's, the training loop's step
    (deep supervision, the loop's gradient clip, AdamW). Built from the arm's complete model block,
    which bench_model's own constructor does not take."""

    def __init__(self, model_params: dict, crop: list[int], batch: int, lr: float, seed: int = 0):
        self.cfg = MedVisionLlamaConfig.from_params(model_params)
        cache = Path(tempfile.gettempdir()) / "mvl_pipeline-llm-cache"
        self.model = build_model(self.cfg, llm_cache_dir=cache, seed=seed).train()
        self.optimizer = configure_optimizers(self.model, lr=lr, weight_decay=0.01)
        self.loss_fn = make_loss(self.cfg.num_classes)
        self.deep = getattr(self.model, "deep_supervision", 0)
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn((batch, self.cfg.in_channels, *crop), generator=generator)
        self.y = torch.randint(0, self.cfg.num_classes, (batch, *crop), generator=generator)

    def flops(self) -> int:
        with FlopCounterMode(display=False) as counter:
            self.step()
        return counter.get_total_flops()

    def mean_step_s(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        return (time.perf_counter() - start) / steps


def list_schedule(durations: list[float], slots: int) -> float:
    """When the last of ``durations`` ends, each started in order on the first slot to come free."""
    free = [0.0] * slots
    for duration in durations:
        slot = free.index(min(free))
        free[slot] += duration
    return max(free)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per arm per round")
    parser.add_argument("--crop", type=int, nargs=3, default=HIPPOCAMPUS_PLAN["patch_size"], help="the plan's patch (smaller: a quick check)")
    parser.add_argument("--arms", nargs="+", default=None, help="time these arms only (default: the grid's)")
    args = parser.parse_args()
    plan = {**HIPPOCAMPUS_PLAN, "patch_size": list(args.crop)}
    ablation = AblationConfig.from_params({**base_params("ablation"), **({"arms": args.arms} if args.arms else {})})
    loop = base_params("fit")["loop"]
    cores = os.cpu_count() or 1
    slots = max(1, min(ablation.local_concurrent_trials, cores))
    torch.set_num_threads(max(1, cores // slots))
    models = arm_models(base_params("model"), ablation, plan)
    arms = {arm: ArmStep(models[arm], plan["patch_size"], loop["batch_size"], ablation.trial.lr)
            for arm in ablation.arms}  # fmt: skip
    flops = {arm: arm_step.flops() for arm, arm_step in arms.items()}  # also the warm-up
    for arm_step in arms.values():
        arm_step.step()
    rates: list[float] = []
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for index in range(args.rounds):
        rates.append(matmul_gflops(torch.bfloat16, torch.device("cpu")))
        for arm, arm_step in arms.items():
            times[arm].append(arm_step.mean_step_s(args.steps))
        print(f"round {index + 1}/{args.rounds}: bf16 matmul {rates[-1]:.0f} GFLOP/s; "
              + ", ".join(f"{arm} {t[-1]:.3f} s" for arm, t in times.items()), flush=True)  # fmt: skip
    rate = statistics.median(rates)
    step_s = {arm: statistics.median(t) for arm, t in times.items()}
    steps = ablation.trial.epochs * ablation.trial.steps_per_epoch
    order = trial_order(models, ablation.arms, ablation.seeds)
    predicted = list_schedule([steps * step_s[t["arm"]] for t in order], slots)
    floor = sum(steps * flops[t["arm"]] for t in order) / (rate * 1e9 * slots)
    result = {
        "machine": machine() | {"cores": cores},
        "crop": plan["patch_size"], "batch": loop["batch_size"], "rounds": args.rounds, "steps_per_round": args.steps,
        "slots": slots, "threads_per_trial": torch.get_num_threads(),
        "matmul_gflops_bf16": round(rate, 1), "matmul_gflops_bf16_per_round": [round(r, 1) for r in rates],
        "arms": {
            arm: {"step_s": round(step_s[arm], 4), "step_s_per_round": [round(t, 4) for t in times[arm]],
                  "gflop_per_step": round(flops[arm] / 1e9, 2),
                  "fraction_of_matmul_rate": round(flops[arm] / step_s[arm] / 1e9 / rate, 3)}
            for arm in arms
        },
        "trials": len(order), "steps_per_trial": steps,
        "predicted_steps_min": round(predicted / 60, 1), "floor_min": round(floor / 60, 1),
        "predicted_vs_floor": round(predicted / floor, 2),
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
