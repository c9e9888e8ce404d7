"""Ray overhead of `fit`: the same epochs through Ray Train vs a plain single-process loop.

Builds a small sample drop in a temporary folder (sample_data -> ingest -> preprocess, the real
pipelines), then runs the same training steps three ways:

- ``plain``: ``run_training`` in a fresh Python process of its own (benchmarks/_plain_fit.py, no
  Ray), all cores: what a user's own training script would do;
- ``ray_1x``: the ``fit`` node with 1 Ray worker owning all cores (Ray + DDP-free overhead);
- ``ray_2x``: the ``fit`` node with 2 workers x 1 core (DDP over gloo).

Each side's time to its first training step is measured from the moment it is started (the
plain process launched / the ``fit`` node called) to the step: the plain side pays the
interpreter, imports (torch, MONAI, the model), data load and model build; the Ray side pays the
same in its worker plus Ray's start, the Train controller and the worker group.

- ``startup_s``: Ray's added fixed start-up, ray_1x's time to first step minus the plain
  process's (the ``fixed start-up`` of the target); ``ray_time_to_first_step_s`` and
  ``plain_time_to_first_step_s`` are the two raw figures;
- ``ray_overhead_ratio``: epoch time under Ray / the plain loop's epoch time (ray_1x: the same
  samples per epoch);
- ``throughput_ratio_vs_plain``: training samples/s under Ray / the plain loop's (medians over
  epochs). For ray_2x this is the figure to compare: each of its 2 workers runs
  ``steps_per_epoch`` steps of ``batch_size``, so its epoch holds twice the plain epoch's samples
  and its epoch-time ratio (``two_worker_overhead_ratio``) is not a per-sample cost;
- ``teardown_s``: what follows the last epoch under Ray (result, Ray shutdown).

Both sides train the same model: the model block completed from the plan
(``MedVisionLlamaConfig.for_plan``, as ``fit_model`` does), so the plain side builds it too.

Target: ratio at most 1.10 with an added start-up of at most 20 s. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")

import yaml  # noqa: E402

from mvl_pipeline.datasets.drop import DropFolderDataset  # noqa: E402
from mvl_pipeline.pipelines.sample_data.nodes import generate_sample_drop  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the shared test workspace: tests/support/workspace.py
from tests.support.workspace import local_catalog, prepare  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_model import machine  # noqa: E402  (CPU flags: AMX / AVX-512-BF16)


def params(name: str) -> dict:
    return yaml.safe_load((ROOT / "conf" / "base" / f"parameters_{name}.yml").read_text())


def build_data(tmp: Path, n_patients: int) -> dict:
    sample = params("sample_data")["sample_data"] | {"n_patients": n_patients, "followup_fraction": 0.0}
    DropFolderDataset(filepath=str(tmp / "drop")).save(generate_sample_drop(sample))
    blocks = {
        "ingest": params("ingest")["ingest"] | {"workers": 1, "progress": False},
        "preprocess": params("preprocess")["preprocess"],
        "model": params("model")["model"],
    }
    return prepare(local_catalog(tmp, blocks))


def plain_model(model_params: dict, plan: dict) -> dict:
    """The model block as ``fit_model`` hands it to the loop: completed from the plan (token grid,
    input channels, classes). Without it ``build_model`` stops: pos_grid is the plan's."""
    from mvl_pipeline.model import MedVisionLlamaConfig

    return MedVisionLlamaConfig.from_params(model_params).for_plan(plan).to_dict()


def run_fit(cases, split, plan, manifest, model_params: dict, fit: dict) -> tuple:
    """The ``fit`` node from scratch (no registry: ``fit.init`` stays ``scratch``)."""
    from mvl_pipeline.pipelines.fit.nodes import fit_model

    return fit_model(cases, split, plan, manifest, None, model_params, fit)


def throughput_ratio(history: list[dict], plain_history: list[dict]) -> float:
    """Median training samples/s of ``history`` over the plain loop's: a per-sample comparison,
    whatever the number of workers (each worker runs ``steps_per_epoch`` steps)."""
    return round(_median(h["samples_per_s"] for h in history) / _median(h["samples_per_s"] for h in plain_history), 3)


def _median(values) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _median_epoch(history: list[dict]) -> float:
    """Median epoch time: robust to one epoch slowed by something else on the machine."""
    return _median(e["epoch_time_s"] for e in history)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-fit-") as folder:
        tmp = Path(folder)
        data = build_data(tmp, args.patients)
        cases, split, plan = data["model_input_cases"], data["data_split"], data["preprocessing_plan"]
        manifest = data["ingest_manifest"]
        model_params = params("model")["model"]
        model = plain_model(model_params, plan)  # what fit_model trains (pos_grid, classes from the plan)
        base_fit = params("fit")["fit"]
        base_fit["loop"] |= {"epochs": args.epochs, "steps_per_epoch": args.steps, "val_every": args.epochs}
        base_fit |= {"llm_cache_dir": str(ROOT / "data/06_models/llm_cache"), "stream_to_mlflow": False}

        from mvl_pipeline.model import MedVisionLlamaConfig, build_model
        from mvl_pipeline.preprocessing.plan import plan_classes
        from mvl_pipeline.training.config import LoopConfig

        build_model(MedVisionLlamaConfig.from_params(model), llm_cache_dir=base_fit["llm_cache_dir"])  # warm cache

        # plain single process, all cores, started fresh (benchmarks/_plain_fit.py)
        train_ids = [c for c in split["train"] if c in cases]
        val_ids = [c for c in split["validation"] if c in cases]
        config = {
            "loop": LoopConfig.from_params(base_fit["loop"]).to_dict(), "model": model, "plan": plan,
            "classes": sorted(plan_classes(plan)), "train_ids": train_ids, "val_ids": val_ids,
            "model_input_path": str(tmp / "model_input"), "llm_cache_dir": base_fit["llm_cache_dir"],
            "cpus_per_worker": cores, "mlflow": None,
        }  # fmt: skip
        (tmp / "plain.json").write_text(json.dumps(config), encoding="utf-8")
        started, launched_unix = time.perf_counter(), time.time()
        subprocess.run(
            [sys.executable, str(Path(__file__).with_name("_plain_fit.py")), str(tmp / "plain.json"), str(tmp / "plain_out.json")],
            check=True,
        )  # fmt: skip
        plain_wall = time.perf_counter() - started
        state = json.loads((tmp / "plain_out.json").read_text(encoding="utf-8"))
        plain_epochs = sum(e["epoch_time_s"] for e in state["history"])
        plain_first_step = state["loop_started_unix"] - launched_unix

        results = {}
        for name, workers, cpus in (("ray_1x", 1, cores), ("ray_2x", 2, max(1, cores // 2))):
            fit = {**base_fit, "scaling": {"num_workers": workers, "cpus_per_worker": cpus, "use_gpu": False},
                   "storage_path": str(tmp / f"ray_{name}"), "run_name": f"bench-{name}"}  # fmt: skip
            started, started_unix = time.perf_counter(), time.time()
            _, history = run_fit(cases, split, plan, manifest, model_params, fit)
            wall = time.perf_counter() - started
            epochs = sum(e["epoch_time_s"] for e in history["epochs"])
            startup = history["loop_started_unix"] - started_unix  # until the first step
            results[name] = {
                "wall_s": round(wall, 2),
                "epochs_s": round(epochs, 2),
                "time_to_first_step_s": round(startup, 2),
                "added_startup_s": round(startup - plain_first_step, 2),
                "teardown_s": round(wall - startup - epochs, 2),
                "ray_overhead_ratio": round(epochs / plain_epochs, 3),
                "median_epoch_ratio": round(_median_epoch(history["epochs"]) / _median_epoch(state["history"]), 3),
                "samples_per_s": round(history["epochs"][-1]["samples_per_s"], 2),
                "throughput_ratio_vs_plain": throughput_ratio(history["epochs"], state["history"]),
                "wall_ratio_vs_plain": round(wall / plain_wall, 3),
            }
    summary = {
        "plain_wall_s": round(plain_wall, 2),
        "plain_epochs_s": round(plain_epochs, 2),
        "epochs": args.epochs,
        "steps_per_epoch": args.steps,
        "ray_overhead_ratio": results["ray_1x"]["ray_overhead_ratio"],
        "median_epoch_ratio": results["ray_1x"]["median_epoch_ratio"],
        "startup_s": results["ray_1x"]["added_startup_s"],
        "ray_time_to_first_step_s": results["ray_1x"]["time_to_first_step_s"],
        "plain_time_to_first_step_s": round(plain_first_step, 2),
        "throughput_ratio_vs_plain": results["ray_1x"]["throughput_ratio_vs_plain"],
        "two_worker_overhead_ratio": results["ray_2x"]["ray_overhead_ratio"],  # per epoch: 2x the samples
        "two_worker_throughput_ratio_vs_plain": results["ray_2x"]["throughput_ratio_vs_plain"],
        "two_worker_startup_s": results["ray_2x"]["added_startup_s"],
        "runs": results,
        "cores": cores,
        "machine": machine(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
