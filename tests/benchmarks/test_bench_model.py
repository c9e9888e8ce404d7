"""benchmarks/bench_model.py times the training loop's step: with deep supervision (the default
model's ``decoder.deep_supervision: true``) its heads run and get gradients, as in training."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

from benchmarks import bench_model

PROJECT = Path(__file__).resolve().parents[2]
TINY = {"embed_dim": 48, "depth": 2, "num_heads": 2, "decoder": {"taps": [1], "channels": [16, 8, 8], "stem_channels": 4}}


def test_the_timed_step_trains_the_deep_supervision_heads(tmp_path) -> None:
    block = copy.deepcopy(yaml.safe_load((PROJECT / "conf" / "base" / "parameters_model.yml").read_text())["model"])
    decoder = {**block["decoder"], **TINY["decoder"]}
    params = {**block, **TINY, "decoder": decoder, "llm": {**block["llm"], "mode": "none"}, "pos_grid": [2, 2, 2]}
    variant = bench_model.Variant(params, SimpleNamespace(batch=1, crop=[16, 16, 16]), torch.device("cpu"), tmp_path)
    assert variant.deep == variant.model.deep_supervision > 0  # the default model has the heads
    heads = list(variant.model.decoder.aux_heads.parameters())
    before = [p.detach().clone() for p in heads]
    loss = variant.step()
    assert loss > 0
    # before the change the step called model(x) alone: the heads got no gradient and never moved
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads)
    assert any(not torch.equal(p, b) for p, b in zip(heads, before, strict=True))
