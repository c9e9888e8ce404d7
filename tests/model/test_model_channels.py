"""``in_channels`` comes from the plan for every preset: a plan of two input channels (two MR
contrasts) makes two-channel models that take ``(B, 2, X, Y, Z)`` and refuse one channel."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from mvl_pipeline.model import MedVisionLlamaConfig, build_model
from mvl_pipeline.model.plan import plan_in_channels
from mvl_pipeline.model.presets import PRESETS

PROJECT = Path(__file__).resolve().parents[2]
PLAN = {
    "patch_size": [32, 32, 16],
    "target_spacing": [1.0, 1.0, 2.0],
    "embed_patch_size": [8, 8, 8],
    "label_values": [0, 1, 2],
    "channels": [{"name": "t1", "modality": "MR"}, {"name": "t2", "modality": "MR"}],
}
TINY = {"embed_dim": 48, "depth": 2, "num_heads": 2, "decoder": {"taps": [1], "channels": [16, 8, 8], "stem_channels": 4}}


def config(preset: str, plan: dict, **overrides) -> MedVisionLlamaConfig:
    block = copy.deepcopy(yaml.safe_load((PROJECT / "conf" / "base" / "parameters_model.yml").read_text())["model"])
    return MedVisionLlamaConfig.from_params({**block, **TINY, "preset": preset, **overrides}).for_plan(plan)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_takes_its_input_channels_from_the_plan(preset):
    assert config(preset, PLAN).in_channels == 2 == plan_in_channels(PLAN)
    single = {k: v for k, v in PLAN.items() if k != "channels"}
    assert config(preset, single).in_channels == 1
    assert config(preset, single, in_channels=3).in_channels == 1  # the plan, not the YAML, decides


@pytest.mark.parametrize(("preset", "llm"), [("medvisionllama", {"mode": "none"}), ("cnn", {"mode": "none"})])
def test_a_two_channel_model_segments_two_contrasts_and_refuses_one(preset, llm, tmp_path):
    cfg = config(preset, PLAN, llm=llm, pos_grid=None)
    model = build_model(cfg, llm_cache_dir=str(tmp_path)).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 2, 32, 32, 16))
    assert logits.shape == (1, 3, 32, 32, 16)
    with pytest.raises(ValueError, match=r"expected input \(B, 2, X, Y, Z\)"):
        model(torch.randn(1, 1, 32, 32, 16))
