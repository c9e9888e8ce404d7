"""The typed config: YAML defaults, round trip, and loud failures on bad values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mvl_pipeline.model import MedVisionLlamaConfig

PARAMS = Path(__file__).resolve().parents[2] / "conf" / "base" / "parameters_model.yml"


def default_params() -> dict:
    return yaml.safe_load(PARAMS.read_text())["model"]


def test_yaml_defaults_build_the_documented_default():
    cfg = MedVisionLlamaConfig.from_params(default_params())
    assert cfg.llm.mode == "pretrained"
    assert cfg.llm.source == "smollm2-offline" and cfg.llm.layer_index == -1
    assert cfg.llm_position == cfg.depth  # after the encoder
    assert cfg.patch_size == (8, 8, 8) and cfg.embed_dim % cfg.num_heads == 0
    assert cfg.stage_factors == ((2, 2, 2),) * 3
    assert MedVisionLlamaConfig.from_params(cfg.to_dict()) == cfg


def test_anisotropic_patch_stages_multiply_to_the_patch():
    cfg = MedVisionLlamaConfig.from_params(
        {"patch_size": [8, 8, 2], "decoder": {"taps": [1, 2], "channels": [32, 16, 8]}}
    )
    assert cfg.stage_factors == ((2, 2, 2), (2, 2, 1), (2, 2, 1))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"patch_sizes": [8, 8, 8]}, r"unknown key\(s\) \['patch_sizes'\]"),
        ({"llm": {"mode": "frozen"}}, "llm.mode must be one of"),
        ({"llm": {"lora": {"rank": 2, "targets": ["qkv"]}}}, r"llm.lora.targets \['qkv'\]"),
        ({"patch_size": [6, 6, 6]}, "powers of two"),
        ({"embed_dim": 100, "num_heads": 3}, "not divisible"),
        ({"decoder": {"channels": [32, 16]}}, "needs 3 entries"),
        ({"decoder": {"taps": [1, 2, 3]}}, "at most 2 decoder.taps"),
        ({"decoder": {"taps": [5]}}, r"outside \[1, depth=4\]"),
        ({"llm": {"position": 5}}, "llm.position"),
        ({"precision": "fp16"}, "precision must be one of"),
        ({"llm": {"cpu_dtype": "float16"}}, "cpu_dtype"),
        ({"compile_mode": "cudagraphs"}, "compile_mode must be one of"),
    ],
)
def test_bad_values_raise_value_error(params, message):
    with pytest.raises(ValueError, match=message):
        MedVisionLlamaConfig.from_params(params)
