"""Saving without the frozen LLM weights, reloading bit-identically, refusing another layer."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from mvl_pipeline.model import (
    LLMLayerMismatchError,
    build_model,
    load_model,
    model_from_weights,
    model_weights,
    save_model,
)
from mvl_pipeline.model.network import FROZEN_LLM_PREFIX


def trained_model(cfg, llm_cache_dir):
    """A model whose trainable tensors are no longer at their init (incl. LoRA's zero B)."""
    torch.manual_seed(0)
    model = build_model(cfg, llm_cache_dir=llm_cache_dir)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def frozen_llm_names(model) -> set[str]:
    return {n for n in model.state_dict() if n.startswith(FROZEN_LLM_PREFIX) and ".lora_" not in n}


@pytest.mark.parametrize(
    "overrides",
    [
        {"llm": {"lora": {"rank": 2, "targets": ["q_proj", "o_proj", "proj_in"]}}},
        {"llm": {"mode": "random", "random_seed": 7}},
        {"llm": {"mode": "none"}},
        {"precision": "bf16-mixed", "llm": {"cpu_dtype": "bfloat16"}},
    ],
    ids=["pretrained-lora", "random", "none", "bf16"],
)
def test_save_load_roundtrip_is_identical(overrides, make_cfg, llm_cache_dir, tmp_path):
    model = trained_model(make_cfg(**overrides), llm_cache_dir)
    save_model(model, tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"model.safetensors", "config.json"}

    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        saved = set(f.keys())
    frozen_llm = frozen_llm_names(model)
    assert not saved & frozen_llm  # no copy of the LLM weights
    assert saved == set(model.state_dict()) - frozen_llm
    assert {n for n, p in model.named_parameters() if p.requires_grad} <= saved

    config = json.loads((tmp_path / "m" / "config.json").read_text())
    if model.cfg.llm.mode == "none":
        assert config["llm_reference"] is None and not frozen_llm
    else:
        assert frozen_llm
        assert config["llm_reference"]["sha256"] == model.llm_reference.sha256
        assert len(config["llm_reference"]["sha256"]) == 64

    loaded = load_model(tmp_path / "m", llm_cache_dir=llm_cache_dir).eval()
    assert loaded.cfg == model.cfg
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = torch.randn(1, 1, 16, 16, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_weights_pair_roundtrip_matches_what_torch_weights_dataset_stores(make_cfg, llm_cache_dir):
    model = trained_model(make_cfg(), llm_cache_dir)
    state, config = model_weights(model)
    assert json.loads(json.dumps(config)) == config  # JSON-ready
    rebuilt = model_from_weights(state, config, llm_cache_dir=llm_cache_dir).eval()
    x = torch.randn(1, 1, 16, 16, 8)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    with pytest.raises(ValueError, match="not a MedVisionLlama config"):
        model_from_weights(state, config["model"], llm_cache_dir=llm_cache_dir)
    with pytest.raises(KeyError, match="missing tensors"):
        model_from_weights({k: v for k, v in state.items() if "up_full" not in k}, config,
                           llm_cache_dir=llm_cache_dir)  # fmt: skip


def test_loading_against_another_llm_layer_raises(
    make_cfg, llm_cache_dir, other_llama_dir, tmp_path
):
    model = trained_model(make_cfg(), llm_cache_dir)
    save_model(model, tmp_path / "m")
    # same architecture, other weights
    with pytest.raises(LLMLayerMismatchError, match="sha256"):
        load_model(tmp_path / "m", llm_cache_dir=llm_cache_dir, llm_source=str(other_llama_dir))
    # same checkpoint, another layer
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config["model"]["llm"]["layer_index"] = 0
    config_path.write_text(json.dumps(config))
    with pytest.raises(LLMLayerMismatchError):
        load_model(tmp_path / "m", llm_cache_dir=llm_cache_dir)


def test_another_copy_of_the_same_llm_is_accepted(
    make_cfg, llm_cache_dir, tiny_llama_dir, tmp_path
):
    model = trained_model(make_cfg(), llm_cache_dir)
    save_model(model, tmp_path / "m")
    copy = shutil.copytree(tiny_llama_dir, tmp_path / "elsewhere")
    loaded = load_model(tmp_path / "m", llm_cache_dir=llm_cache_dir, llm_source=str(copy))
    assert loaded.llm_reference.sha256 == model.llm_reference.sha256


def test_save_and_load_through_s3(make_cfg, llm_cache_dir, s3_server):
    model = trained_model(make_cfg(), llm_cache_dir)
    save_model(model, "s3://models/run-1/model", storage_options=s3_server)
    loaded = load_model("s3://models/run-1/model", llm_cache_dir=llm_cache_dir,
                        storage_options=s3_server).eval()  # fmt: skip
    x = torch.randn(1, 1, 16, 16, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
