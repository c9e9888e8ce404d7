"""The network: output shapes, no NaN, gradients exactly on the trainable parameters, for
isotropic and anisotropic patches, binary and multi-class heads and every ``llm.mode``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mvl_pipeline.model import build_model, configure_optimizers, count_parameters
from mvl_pipeline.model.blocks import LoRALinear
from mvl_pipeline.model.network import FROZEN_LLM_PREFIX

CASES = {
    # name: (config overrides, input spatial shape)
    "iso-binary-pretrained": ({"patch_size": [4, 4, 4], "num_classes": 1, "pos_grid": [4, 4, 4],
                               "decoder": {"taps": [1], "channels": [16, 8]}}, (16, 16, 16)),
    "aniso-multiclass-pretrained": ({}, (16, 16, 8)),
    "aniso-multiclass-random": ({"llm": {"mode": "random"}}, (16, 16, 8)),
    "aniso-binary-none": ({"num_classes": 1, "llm": {"mode": "none"}}, (16, 8, 8)),
    "iso8-three-levels-position0-bf16": (
        {"patch_size": 8, "depth": 3, "decoder": {"taps": [1, 3], "channels": [16, 8, 8]},
         "llm": {"position": 0}, "precision": "bf16-mixed"}, (16, 16, 16)),
    "lora-inside-and-on-projection-midway": (
        {"depth": 3, "llm": {"position": 1, "lora": {"rank": 2, "targets": ["q_proj", "v_proj",
                                                                           "down_proj", "proj_out"]}}},
        (16, 16, 8)),
    "grad-checkpointing-llm-bf16-cpu-dtype": (
        {"grad_checkpointing": True, "llm": {"cpu_dtype": "bfloat16"}}, (8, 16, 8)),
}  # fmt: skip


def loss_of(model, x: torch.Tensor) -> torch.Tensor:
    """As the training loop asks: with deep supervision the coarse heads' outputs are trained too."""
    logits, coarse = model(x, aux=True) if model.deep_supervision else (model(x), [])
    if model.cfg.num_classes == 1:
        target = (x > 0).float()
        loss = F.binary_cross_entropy_with_logits(logits, target)
        return loss + sum(F.binary_cross_entropy_with_logits(c, F.interpolate(target, size=c.shape[2:])) for c in coarse)
    target = torch.randint(0, model.cfg.num_classes, (x.shape[0], *x.shape[2:]))
    small = [F.interpolate(target[:, None].float(), size=c.shape[2:])[:, 0].long() for c in coarse]
    return F.cross_entropy(logits, target) + sum(F.cross_entropy(c, t) for c, t in zip(coarse, small, strict=True))


@pytest.mark.parametrize("case", list(CASES))
def test_shapes_finite_and_gradients_only_on_trainable(case, make_cfg, llm_cache_dir):
    overrides, spatial = CASES[case]
    cfg = make_cfg(**overrides)
    torch.manual_seed(0)
    model = build_model(cfg, llm_cache_dir=llm_cache_dir).train()
    x = torch.randn(2, cfg.in_channels, *spatial)
    logits = model(x)
    assert logits.shape == (2, cfg.num_classes, *spatial)
    assert logits.dtype == torch.float32 and logits.is_contiguous()
    assert torch.isfinite(logits).all()

    loss_of(model, x).backward()
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    frozen = set(named) - trainable
    assert all(named[n].grad is None for n in frozen)
    for name in trainable:
        grad = named[name].grad
        assert grad is not None, f"{name} got no gradient"
        assert torch.isfinite(grad).all(), name
        # LoRA's A starts with zero gradient because B starts at zero; everything else moves
        if not name.endswith("lora_a"):
            assert grad.abs().sum() > 0, f"{name} has an all-zero gradient"

    llm_params = {n for n in named if n.startswith(FROZEN_LLM_PREFIX) and ".lora_" not in n}
    if cfg.llm.mode == "none":
        assert model.llm is None and not llm_params
    else:
        assert llm_params and llm_params <= frozen
        assert not model.llm.layer.training  # model.train() leaves the frozen layer in eval
        assert model.llm_reference.mode == cfg.llm.mode
    if cfg.llm.lora.enabled:
        wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
        assert len(wrapped) == len(cfg.llm.lora.targets)
        assert all(not m.base.weight.requires_grad for m in wrapped)
        assert all(m.lora_a.requires_grad and m.lora_a.dtype == torch.float32 for m in wrapped)


def test_features_and_head_compose_to_forward(make_cfg, llm_cache_dir):
    model = build_model(make_cfg(), llm_cache_dir=llm_cache_dir).eval()
    x = torch.randn(1, 1, 16, 16, 8)
    with torch.no_grad():
        features = model.features(x)
        assert features.shape == (1, model.decoder.out_channels, 16, 16, 8)
        torch.testing.assert_close(model.head(features), model(x))
        probabilities = model.probabilities(model(x))
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(1, 16, 16, 8))


def test_other_input_sizes_resample_the_positional_embedding(make_cfg, llm_cache_dir):
    model = build_model(make_cfg(), llm_cache_dir=llm_cache_dir).eval()
    assert tuple(model.pos_embed.weight.shape[2:]) == (4, 4, 4)
    with torch.no_grad():
        for spatial in [(16, 16, 8), (24, 8, 12), (32, 32, 16)]:
            out = model(torch.randn(1, 1, *spatial))
            assert out.shape == (1, 3, *spatial) and torch.isfinite(out).all()
        grid = (4, 4, 4)  # the stored grid is used as is
        assert torch.equal(model.pos_embed(grid), model.pos_embed.weight.flatten(2).transpose(1, 2))


def test_bad_inputs_raise_value_error(make_cfg, llm_cache_dir):
    model = build_model(make_cfg(llm={"mode": "none"}), llm_cache_dir=llm_cache_dir)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        model(torch.randn(1, 1, 16, 16, 7))
    with pytest.raises(ValueError, match=r"expected input \(B, 1, X, Y, Z\)"):
        model(torch.randn(1, 2, 16, 16, 8))
    with pytest.raises(ValueError, match=r"expected input"):
        model(torch.randn(16, 16, 8))


def test_llm_layer_changes_the_output_and_modes_differ(make_cfg, llm_cache_dir):
    torch.manual_seed(0)
    x = torch.randn(1, 1, 16, 16, 8)
    outputs = {}
    for mode in ("pretrained", "random"):
        torch.manual_seed(1)  # same trainable init, only the frozen layer differs
        model = build_model(make_cfg(llm={"mode": mode}), llm_cache_dir=llm_cache_dir).eval()
        with torch.no_grad():
            outputs[mode] = model(x)
    assert not torch.allclose(outputs["pretrained"], outputs["random"])


def test_parameter_counts_and_optimizer_groups(make_cfg, llm_cache_dir):
    model = build_model(make_cfg(llm={"lora": {"rank": 2, "targets": ["q_proj"]}}),
                        llm_cache_dir=llm_cache_dir)  # fmt: skip
    counts = count_parameters(model)
    llm_frozen = sum(p.numel() for n, p in model.named_parameters()
                     if n.startswith(FROZEN_LLM_PREFIX) and ".lora_" not in n)  # fmt: skip
    assert counts["frozen"] == llm_frozen > 0
    assert counts["total"] == counts["trainable"] + counts["frozen"]
    assert counts["total"] == sum(p.numel() for p in model.parameters())

    optimizer = configure_optimizers(model, lr=1e-3, weight_decay=0.05)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.pos_embed.weight) in no_decay_ids
    assert id(model.norm.weight) in no_decay_ids and id(model.norm.bias) in no_decay_ids
    assert id(model.blocks[0].attn.gate_logit) in no_decay_ids
    assert all(p.ndim >= 2 for p in decay["params"])
    assert id(model.blocks[0].attn.qkv.weight) not in no_decay_ids

    # a step moves trainable weights and leaves the frozen layer bit-identical
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    qkv_before = model.blocks[0].attn.qkv.weight.clone()
    loss_of(model, torch.randn(1, 1, 16, 16, 8)).backward()
    optimizer.step()
    assert not torch.equal(model.blocks[0].attn.qkv.weight, qkv_before)
    for name, before in frozen_before.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name


def test_compile_switch_returns_the_same_model_class(make_cfg, llm_cache_dir):
    model = build_model(make_cfg(compile=True, llm={"mode": "none"}), llm_cache_dir=llm_cache_dir)
    assert type(model).__name__ == "MedVisionLlama"
    assert model._compiled_call_impl is not None  # nn.Module.compile() in place


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compile_mode_reaches_torch_compile(make_cfg, llm_cache_dir, monkeypatch, mode):
    # compile is lazy: the mode is only seen by torch.compile, so record what it is given
    seen = []
    real = torch.compile

    def recording(*args, **kwargs):
        seen.append(kwargs.get("mode"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", recording)
    model = build_model(make_cfg(compile=True, compile_mode=mode, llm={"mode": "none"}), llm_cache_dir=llm_cache_dir)
    assert seen == [mode] and model._compiled_call_impl is not None


def test_compile_without_a_cpp_compiler_runs_the_model_uncompiled_and_says_why(make_cfg, llm_cache_dir, tmp_path, monkeypatch, caplog):
    # TorchInductor needs a C++ compiler on CPU; without one, compiling would fail at the first
    # step, minutes into a run. A PATH holding no compiler stands for such a machine.
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CXX", raising=False)
    from mvl_pipeline.model.network import c_compiler

    assert c_compiler() is None
    with caplog.at_level("WARNING", logger="mvl_pipeline.model.network"):
        model = build_model(make_cfg(compile=True, llm={"mode": "none"}), llm_cache_dir=llm_cache_dir)
    assert model._compiled_call_impl is None
    assert "no C++ compiler" in caplog.text and "uncompiled" in caplog.text
    out = model(torch.randn(1, 1, 16, 16, 8))  # the eager model still runs
    assert out.shape[0] == 1
