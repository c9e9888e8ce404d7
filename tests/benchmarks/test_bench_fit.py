"""benchmarks/bench_fit.py calls the ``fit`` node as it is today and trains, on its plain side,
the model the node trains; its two-worker figure is compared per sample, not per epoch."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import yaml

from benchmarks import bench_fit
from mvl_pipeline.model import MedVisionLlamaConfig, build_model

PROJECT = Path(__file__).resolve().parents[2]
PLAN = {"patch_size": [32, 32, 16], "target_spacing": [1.0, 1.0, 2.0], "embed_patch_size": [8, 8, 8], "label_values": [0, 1, 2]}
TINY = {"embed_dim": 48, "depth": 2, "num_heads": 2, "decoder": {"taps": [1], "channels": [16, 8, 8], "stem_channels": 4}}


def model_block(**overrides) -> dict:
    block = copy.deepcopy(yaml.safe_load((PROJECT / "conf" / "base" / "parameters_model.yml").read_text())["model"])
    return {**block, **overrides}


def test_run_fit_hands_the_fit_node_its_parameters_by_their_names(monkeypatch) -> None:
    from mvl_pipeline.pipelines.fit import nodes

    signature = inspect.signature(nodes.fit_model)
    calls: list[dict] = []

    def fake(*args, **kwargs):
        calls.append(dict(signature.bind(*args, **kwargs).arguments))
        return "weights", "history"

    monkeypatch.setattr(nodes, "fit_model", fake)
    model, fit = {"preset": "medvisionllama"}, {"loop": {"epochs": 1}}
    assert bench_fit.run_fit("cases", "split", "plan", "manifest", model, fit) == ("weights", "history")
    (bound,) = calls
    # the call it replaced, fit_model(cases, split, plan, manifest, model, fit, labels), bound the
    # model block to registry_before and the fit block to model_params
    assert bound["model_params"] is model and bound["fit_params"] is fit and bound["registry_before"] is None


class _Trained(Exception):
    """Raised by the stand-in for Ray's fit once it has seen the model the node hands it."""


def test_the_plain_side_builds_the_model_the_fit_node_trains(tmp_path, monkeypatch) -> None:
    from mvl_pipeline.pipelines.fit import nodes
    from mvl_pipeline.training import ray_driver

    block = model_block(**TINY, llm={**model_block()["llm"], "mode": "none"})
    with pytest.raises(ValueError, match="pos_grid"):  # the raw YAML block, as the plain side had it
        build_model(MedVisionLlamaConfig.from_params(block), llm_cache_dir=tmp_path)
    plain = MedVisionLlamaConfig.from_params(bench_fit.plain_model(block, PLAN))
    handed: list[MedVisionLlamaConfig] = []

    def fit(cases, train, validation, plan, model_cfg, fit_cfg, **kwargs):
        handed.append(model_cfg)
        raise _Trained

    monkeypatch.setattr(ray_driver, "fit", fit)
    fit_block = yaml.safe_load((PROJECT / "conf" / "base" / "parameters_fit.yml").read_text())["fit"]
    with pytest.raises(_Trained):  # the fit node as it is today, up to where it hands Ray the model
        nodes.fit_model({}, {"train": [], "validation": []}, PLAN, {"fingerprint": "0" * 64}, None, block, fit_block)
    assert handed == [plain]
    assert plain.pos_grid == (4, 4, 2) and plain.num_classes == 3
    build_model(plain, llm_cache_dir=tmp_path)


def test_two_workers_are_compared_per_sample() -> None:
    plain = [{"samples_per_s": 10.0, "epoch_time_s": 6.0}] * 3
    # two workers: each runs the plain side's steps, so an epoch holds twice the samples; 1.8x
    # the epoch time is 1.11x the plain side's samples/s, not 1.8x slower
    two = [{"samples_per_s": 2 * 10.0 / 1.8, "epoch_time_s": 10.8}] * 3
    assert bench_fit.throughput_ratio(two, plain) == pytest.approx(1.111, abs=1e-3)
    assert bench_fit.throughput_ratio(plain, plain) == 1.0
