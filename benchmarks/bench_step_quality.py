"""Does the new train step learn as the previous one did? The same steps on real anatomy, several seeds.

On the MSD Hippocampus task (../shared/data, ingested and preprocessed by the project's own
pipelines and defaults), the default model is trained by the project's training loop for the
same number of steps (default 6 epochs x 50 = 300) with the step as it is (``new``) and as it was
(``previous``: ``patch_ops: conv``, the frozen LLM layer in fp32, ``cpu_ops: reference``; the
``previous`` of bench_model.py), for each seed. A seed fixes the initial weights and the training
patches, so new and previous see the same start and the same batches: per seed the difference
isolates the step's numerics. Printed: per seed the mean training loss of the last epoch and the
validation Dice after the last step (a few validation patients), the mean new - previous
difference, the previous step's seed-to-seed SD (issue target: the difference within it), and
the training samples/s of each (the two sides alternate, so machine load hits both). Last line:
one JSON object.

With ``--variants A B`` any two of bench_model.py's variants are compared the same way (e.g.
``full_res_s2d full_res_conv``: the decoder's full-resolution level folded or as convs). A
variant with ``+ftz`` appended trains with ``fit.loop.flush_denormal: true`` (e.g. ``new+ftz
new``). Every training runs in a fresh process, as in a Ray worker: the flush-to-zero setting is
per thread and reaches torch's threads only when they start after it.

    python benchmarks/bench_step_quality.py [--seeds 0 1 2] [--epochs 6] [--steps 50] [--variants A B]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch  # noqa: E402  (after _hippocampus: it puts the project root on sys.path)
from _hippocampus import ROOT, base_params, hippocampus_workspace, open_workspace
from bench_model import machine, variant_params

from mvl_pipeline.model import MedVisionLlamaConfig
from mvl_pipeline.preprocessing.plan import plan_classes
from mvl_pipeline.training.config import LoopConfig
from mvl_pipeline.training.loop import run_training
from mvl_pipeline.training.session import Session

FTZ = "+ftz"


def train(variant: str, seed: int, workspace: str, args: argparse.Namespace, cache: str) -> dict[str, Any]:
    """One training, in this (fresh) process."""
    logging.basicConfig(level=logging.WARNING)
    data = open_workspace(Path(workspace))
    plan = data["preprocessing_plan"]
    model_variant = variant.removesuffix(FTZ)
    cfg = MedVisionLlamaConfig.from_params(variant_params(base_params("model"), model_variant)).for_plan(plan)
    loop = base_params("fit")["loop"] | {"epochs": args.epochs, "steps_per_epoch": args.steps, "seed": seed,
                                         "val_every": args.epochs, "flush_denormal": variant.endswith(FTZ)}  # fmt: skip
    split = data["data_split"]
    config = {
        "loop": LoopConfig.from_params(loop).to_dict(), "model": cfg.to_dict(), "plan": plan,
        "classes": sorted(plan_classes(plan)), "train_ids": sorted(split["train"]),
        "val_ids": sorted(split["validation"])[: args.val_cases],
        "loaders": data["model_input_cases"], "llm_cache_dir": cache, "cpus_per_worker": os.cpu_count(),
    }  # fmt: skip
    started = time.perf_counter()
    history = run_training(config, Session())["history"]
    return {
        "last_epoch_loss": round(history[-1]["train_loss"], 5),
        "val_dice": round(history[-1]["val_dice"], 4),
        "samples_per_s": round(statistics.median(h["samples_per_s"] for h in history), 2),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=50, help="training steps per epoch")
    parser.add_argument("--val-cases", type=int, default=8, help="validation patients scored after the last step")
    parser.add_argument("--variants", nargs=2, default=["new", "previous"], metavar=("A", "B"),
                        help="the two steps compared, A - B (bench_model.py's variants: new, previous, "
                             "full_res_conv, full_res_s2d, attention_flash, fp32, none; +ftz appended: "
                             "with fit.loop.flush_denormal)")  # fmt: skip
    args = parser.parse_args()
    if len(args.seeds) < 2:
        parser.error("at least 2 seeds: the seed-to-seed spread is the yardstick")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    cache = str(ROOT / "data" / "06_models" / "llm_cache")
    first, second = args.variants
    runs: dict[str, dict[int, dict[str, Any]]] = {v: {} for v in args.variants}
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench-step-quality-") as tmp:
        hippocampus_workspace(Path(tmp))
        for seed in args.seeds:
            for variant in args.variants:
                with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as fresh:
                    entry = fresh.submit(train, variant, seed, tmp, args, cache).result()
                runs[variant][seed] = entry
                print(f"seed {seed} {variant:13s} last-epoch loss {entry['last_epoch_loss']:.4f}  val Dice "
                      f"{entry['val_dice']:.4f}  {entry['samples_per_s']} samples/s", flush=True)  # fmt: skip

    def column(variant: str, key: str) -> list[float]:
        return [runs[variant][seed][key] for seed in args.seeds]

    out: dict[str, Any] = {"machine": machine(), "task": "Task04_Hippocampus", "seeds": args.seeds,
                           "steps": args.epochs * args.steps, "compared": [first, second]}  # fmt: skip
    for key in ("last_epoch_loss", "val_dice"):
        a, b = column(first, key), column(second, key)
        differences = [x - y for x, y in zip(a, b, strict=True)]
        spread = statistics.stdev(b)
        out[key] = {
            first: a, second: b,
            "mean_difference": round(statistics.mean(differences), 5),
            f"{second}_seed_sd": round(spread, 5),
            "difference_within_seed_sd": abs(statistics.mean(differences)) <= spread,
        }  # fmt: skip
    rate_a, rate_b = statistics.median(column(first, "samples_per_s")), statistics.median(column(second, "samples_per_s"))
    out |= {f"samples_per_s_{first}": rate_a, f"samples_per_s_{second}": rate_b,
            f"train_speedup_vs_{second}": round(rate_a / rate_b, 3),
            "wall_s": round(time.perf_counter() - started, 1), "runs": runs}  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
