"""Shared by the fit / evaluate / register tests: a tiny project's data made by the real
pipelines (sample_data -> ingest -> preprocess), a tiny model configuration, one local Ray."""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def base_params(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "conf" / "base" / f"parameters_{name}.yml").read_text())


TINY_MODEL = {
    "embed_dim": 48,
    "depth": 2,
    "num_heads": 2,
    "patch_size": [8, 8, 8],
    "pos_grid": [4, 4, 2],
    "token_budget": 32,
    "decoder": {"taps": [1], "channels": [16, 8, 8], "stem_channels": 4},
    "llm": {"mode": "pretrained", "source": "smollm2-offline", "layer_index": -1},
}


def tiny_model_params() -> dict[str, Any]:
    model = base_params("model")["model"]
    merged = copy.deepcopy(model)
    for key, value in TINY_MODEL.items():
        if isinstance(value, dict):
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    merged["num_classes"] = 3
    return merged


@pytest.fixture(scope="session")
def tiny_training_data(tmp_path_factory, llm_cache_dir) -> dict[str, Any]:
    """Model-input cases, split, plan, manifest and ingested cases of 17 tiny phantom patients:
    6 train, 2 validation, 6 gate, 3 test (six gate patients: the fewest whose exact one-sided
    test can reach p < 0.025, so the fewest on which a challenger can replace a champion)."""
    from mvl_pipeline.datasets.drop import DropFolderDataset
    from mvl_pipeline.pipelines.sample_data.nodes import generate_sample_drop
    from tests.support.workspace import local_catalog, prepare

    tmp = tmp_path_factory.mktemp("tiny-project")
    sample = base_params("sample_data")["sample_data"] | {
        "n_patients": 17,
        "followup_fraction": 0.0,
        "image_size": 48,
        "pixel_spacing_mm": [7.5, 8.0],
        "n_slices": [16, 20],
        "slice_spacing_mm": 10.0,
        "thin_slice_studies": 0,
        "non_axial_studies": 0,
    }
    DropFolderDataset(filepath=str(tmp / "drop")).save(generate_sample_drop(sample))

    ingest = base_params("ingest")["ingest"] | {"workers": 1, "progress": False}
    preprocess = base_params("preprocess")["preprocess"]
    preprocess["split"]["ratios"] = {"train": 0.35, "validation": 0.12, "gate": 0.35, "test": 0.18}
    blocks = {"ingest": ingest, "preprocess": preprocess, "model": tiny_model_params()}
    data = prepare(local_catalog(tmp, blocks, key_hex=hashlib.sha256(b"tiny").hexdigest()))
    split = data["data_split"]
    sizes = {role: len(split["patients"][role]) for role in ("train", "validation", "gate", "test")}
    assert sizes == {"train": 6, "validation": 2, "gate": 6, "test": 3}, sizes
    return {
        "root": tmp,
        **data,
        "labels": ingest["labels"],
        "model": tiny_model_params(),
        "llm_cache_dir": llm_cache_dir,
    }


def tiny_fit_params(tmp: Path, llm_cache_dir: str, **loop: Any) -> dict[str, Any]:
    fit = base_params("fit")["fit"]
    fit["scaling"] = {"num_workers": 2, "cpus_per_worker": 1, "use_gpu": False}
    fit["storage_path"] = str(tmp / "ray_results")
    fit["llm_cache_dir"] = llm_cache_dir
    fit["stream_to_mlflow"] = False
    fit["loop"] |= {"epochs": 3, "steps_per_epoch": 4, "batch_size": 2, "val_every": 1, "lr": 0.003} | loop
    return fit


@pytest.fixture(scope="session")
def ray_worker_tmp() -> Path:
    """The temporary folder of ``ray_local``'s workers, their own: a test sees what a fit leaves there."""
    path = Path(tempfile.mkdtemp(prefix="mvl-ray-tmp-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_local(ray_worker_tmp):
    """One local Ray for the whole session (starting it costs seconds), set up as `kedro run` sets
    up its local Ray (``training.ray_driver.connect_ray``): the Train controller polls its workers
    every 0.25 s (not 2 s: seconds of idle start-up, wind-down and failure detection per fit), and
    the workers run at the driver's niceness (not 15, where anything else on the machine takes
    their cores)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        with pytest.MonkeyPatch.context() as env:  # read by Ray's processes when they start
            env.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
            env.setenv("RAY_worker_niceness", "0")
            env.setenv("TMPDIR", str(ray_worker_tmp))
            env.setenv("RAY_TMPDIR", tempfile.gettempdir())  # Ray's own session folder stays where it was
            # a Ray of its own, never one found on the machine (a user's `ray start`)
            ray.init(address="local", num_cpus=2, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_fit(tmp_path, tiny_training_data):
    """``tiny_fit(**loop_overrides)`` -> fit parameters writing into this test's tmp_path."""

    def make(**loop: Any) -> dict[str, Any]:
        return tiny_fit_params(tmp_path, tiny_training_data["llm_cache_dir"], **loop)

    return make


def train_tiny(data: dict[str, Any], *, epochs: int, steps: int, seed: int = 42) -> tuple[dict, dict]:
    """A tiny model trained in-process (no Ray), then through the fit pipeline's last node
    (post-processing decided on validation, the record of its development patients): what
    ``trained_model`` holds after ``fit``."""
    from mvl_pipeline.formats.model_bundle import read_weights
    from mvl_pipeline.training.config import LoopConfig
    from mvl_pipeline.training.loop import run_training
    from mvl_pipeline.training.session import Session

    class Capture(Session):
        def report(self, metrics, checkpoint_dir):
            if checkpoint_dir is not None:
                self.weights = read_weights(Path(checkpoint_dir) / "model")

    loop = LoopConfig.from_params({"epochs": epochs, "steps_per_epoch": steps, "batch_size": 2, "lr": 0.003,
                                   "val_every": epochs, "seed": seed,
                                   "warmup_epochs": 1.0 if epochs * steps > 1 else 0.0}).to_dict()  # fmt: skip
    session = Capture()
    run_training(
        {"loop": loop, "model": data["model"], "plan": data["preprocessing_plan"], "classes": [1, 2],
         "train_ids": data["development_split"]["train"], "val_ids": data["development_split"]["validation"],
         "loaders": data["model_input_cases"], "llm_cache_dir": data["llm_cache_dir"], "cpus_per_worker": 2},
        session,
    )  # fmt: skip
    return finish_fit(data, session.weights)


def finish_fit(data: dict[str, Any], weights: tuple[dict, dict]) -> tuple[dict, dict]:
    from mvl_pipeline.pipelines.fit.nodes import decide_postprocessing

    return decide_postprocessing(weights, data["ingested_cases"], data["development_split"], data["preprocessing_plan"],
                                 data["llm_cache_dir"], {})  # fmt: skip


@pytest.fixture(scope="session")
def tiny_models(tiny_training_data) -> dict[str, tuple[dict, dict]]:
    """Three models of known relative quality, as ``(state_dict, config)`` like ``trained_model``:
    ``untrained``, ``short`` (a few steps) and ``long`` (more steps)."""
    from mvl_pipeline.model import MedVisionLlamaConfig, build_model, model_weights

    data = tiny_training_data
    cfg = MedVisionLlamaConfig.from_params(data["model"])
    untrained = model_weights(build_model(cfg, llm_cache_dir=data["llm_cache_dir"]))
    return {
        "untrained": finish_fit(data, untrained),
        "short": train_tiny(data, epochs=1, steps=5),
        "long": train_tiny(data, epochs=8, steps=5),
    }


@pytest.fixture(scope="session")
def one_step_models(tiny_training_data) -> dict[int, tuple[dict, dict]]:
    """Deliberately bad challengers: one training step each, from three seeds."""
    return {seed: train_tiny(tiny_training_data, epochs=1, steps=1, seed=seed) for seed in (0, 1, 2)}
