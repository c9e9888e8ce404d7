"""Quality per wall-clock second on real anatomy: every model preset trained for the same budget.

On the MSD Hippocampus task (../shared/data, ingested and preprocessed by the project's own
pipelines and defaults), each preset (``medvisionllama``, ``paper``, ``cnn``: model.preset) is
trained by the project's training loop (one process, every core, the YAML's loop settings) for the
same wall-clock budget, validated every epoch on a fixed subset of the validation patients; the
checkpoint with the best validation Dice is then scored on the test patients on their original
grid with the project's evaluation code (post-processing not applied: raw network quality).
Printed per preset: test Dice per class and mean, time to reach validation Dice 0.80, training
samples/s; the CPU's matrix-unit flags beside them. Last line: one JSON object.

    python benchmarks/bench_quality.py [--budget 120] [--presets medvisionllama paper cnn]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch  # noqa: E402  (after _hippocampus: it puts the project root on sys.path)
from _hippocampus import ROOT, base_params, hippocampus_workspace

from mvl_pipeline.evaluation.scoring import EvaluateConfig, cases_in, score_cases
from mvl_pipeline.evaluation.summary import summarise
from mvl_pipeline.formats.model_bundle import read_weights
from mvl_pipeline.model import MedVisionLlamaConfig, build_model, model_from_weights
from mvl_pipeline.preprocessing.plan import plan_classes
from mvl_pipeline.training.config import LoopConfig
from mvl_pipeline.training.loop import run_training
from mvl_pipeline.training.session import Session


class Budget(Exception):
    """The wall-clock budget is spent."""


class BudgetSession(Session):
    """The plain session, recording each epoch's validation Dice and keeping the best weights;
    stops the loop once ``budget_s`` of training wall time has passed."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.started = time.perf_counter()
        self.curve: list[dict[str, float]] = []
        self.best: tuple[float, Any] = (-1.0, None)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        elapsed = time.perf_counter() - self.started
        if "val_dice" in metrics:
            self.curve.append({"t_s": round(elapsed, 1), "val_dice": metrics["val_dice"],
                               "samples_per_s": metrics["samples_per_s"]})  # fmt: skip
            if checkpoint_dir is not None and metrics["val_dice"] > self.best[0]:
                self.best = (metrics["val_dice"], read_weights(Path(checkpoint_dir) / "model"))
        if elapsed > self.budget_s:
            raise Budget


def cpu_flags() -> dict[str, bool]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return {"amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags, "avx512f": "avx512f" in flags}


def score_on(weights: tuple[Any, Any], data: dict[str, Any], cache: str, role: str = "test") -> tuple[float, dict[str, float], Any]:
    """Mean and per-class Dice of ``weights`` (state, config) on the patients of the split's
    ``role``, on their original grid (the project's evaluation, no post-processing; Dice where the
    label holds the class, evaluate's headline); and the model. This benchmark reports each
    preset's test figure (``test``); bench_retrain, whose figures choose a default, scores on
    ``gate``, the role kept for comparing models."""
    plan = data["preprocessing_plan"]
    model = model_from_weights(*weights, llm_cache_dir=cache)
    classes = plan_classes(plan)
    rows, _ = score_cases(
        model, cases_in(data["ingested_cases"], data["data_split"], role), plan, classes,
        num_classes=model.cfg.num_classes, params=EvaluateConfig(),
    )  # fmt: skip
    summary = summarise(rows)
    means = {name: summary[name]["dice_label_present"]["mean"] for name in classes.values() if name in summary}
    per_class = {name: round(mean, 4) for name, mean in means.items() if mean is not None}  # a class no label holds: none
    return round(sum(per_class.values()) / len(per_class), 4), per_class, model


def train_preset(preset: str, data: dict[str, Any], args: argparse.Namespace, cache: str) -> dict[str, Any]:
    plan = data["preprocessing_plan"]
    cfg = MedVisionLlamaConfig.from_params({**base_params("model"), "preset": preset}).for_plan(plan)
    loop = base_params("fit")["loop"] | {"epochs": 100_000, "steps_per_epoch": args.steps, "val_every": 1}
    split = data["data_split"]
    val_ids = sorted(split["validation"])[: args.val_cases]
    config = {
        "loop": LoopConfig.from_params(loop).to_dict(), "model": cfg.to_dict(), "plan": plan,
        "classes": sorted(plan_classes(plan)), "train_ids": sorted(split["train"]), "val_ids": val_ids,
        "loaders": data["model_input_cases"], "llm_cache_dir": cache, "cpus_per_worker": os.cpu_count(),
    }  # fmt: skip
    session = BudgetSession(args.budget)
    try:
        run_training(config, session)
    except Budget:
        pass
    dice, per_class, model = score_on(session.best[1], data, cache)
    reached = next((point["t_s"] for point in session.curve if point["val_dice"] >= 0.80), None)
    rates = [point["samples_per_s"] for point in session.curve]
    return {
        "dice": dice,
        "dice_per_class": per_class,
        "best_val_dice": round(session.best[0], 4),
        "time_to_080_s": reached,
        "samples_per_s": round(sorted(rates)[len(rates) // 2], 2) if rates else None,
        "epochs": len(session.curve),
        "curve": session.curve,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=120.0, help="training seconds per preset")
    parser.add_argument("--presets", nargs="+", default=["medvisionllama", "paper", "cnn"])
    parser.add_argument("--steps", type=int, default=25, help="training steps between validations")
    parser.add_argument("--val-cases", type=int, default=16, help="validation cases of the curve")
    parser.add_argument("--cases", type=int, default=None, help="use only the task's first N cases")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    cache = str(ROOT / "data" / "06_models" / "llm_cache")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        data = hippocampus_workspace(Path(tmp), args.cases)
        split = data["data_split"]
        if any(preset != "cnn" for preset in args.presets):
            # the frozen LLM layer converted into the cache once, before any budget starts: in a fresh
            # clone the conversion would otherwise be spent from the first ViT preset's budget
            plan = data["preprocessing_plan"]
            build_model(MedVisionLlamaConfig.from_params(base_params("model")).for_plan(plan), llm_cache_dir=cache)
        for preset in args.presets:
            results[preset] = train_preset(preset, data, args, cache)
            entry = results[preset]
            print(f"{preset:15s} test Dice {entry['dice']:.4f} {entry['dice_per_class']}  best val "
                  f"{entry['best_val_dice']:.4f}  time to 0.80 {entry['time_to_080_s']} s  "
                  f"{entry['samples_per_s']} samples/s  ({entry['epochs']} validations)", flush=True)  # fmt: skip
    out: dict[str, Any] = {
        "task": "Task04_Hippocampus",
        "budget_s_per_preset": args.budget,
        "n_train": len(split["train"]), "n_test": len(split["test"]), "n_val_curve": args.val_cases,
        "cpu_flags": cpu_flags(), "threads": torch.get_num_threads(),
        "wall_s": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    for preset, entry in results.items():
        out[f"dice_{preset}"] = entry["dice"]
        out[f"time_to_080_s_{preset}"] = entry["time_to_080_s"]
        out[f"samples_per_s_{preset}"] = entry["samples_per_s"]
        out[f"detail_{preset}"] = {k: v for k, v in entry.items() if k != "curve"} | {"curve": entry["curve"]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
