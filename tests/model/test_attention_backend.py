"""With ``model.cpu_math_attention_tokens: N`` (``cpu_ops: tuned``; default 0, off) attention over
at most N tokens runs on SDPA's math backend on CPU, in the encoder blocks and in the frozen LLM
layer: which kernel ran is read from the profiler, and the two paths give the same attention and
gradients up to rounding."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import profile

from mvl_pipeline.model import MedVisionLlamaConfig, build_model, load_llm_layer
from mvl_pipeline.model.blocks import HybridAttention, LLMBridge

MATH, FLASH = "aten::_scaled_dot_product_attention_math", "aten::_scaled_dot_product_flash_attention_for_cpu"
GRIDS = {64: (4, 4, 4), 175: (5, 7, 5), 256: (8, 8, 4)}
LIMIT = 192  # the threshold measured fastest for isolated steps (model/blocks.py)


def kernels(step) -> set[str]:
    with profile() as prof:
        step()
    return {e.key for e in prof.key_averages()} & {MATH, FLASH}


def attention_step(module: HybridAttention, x: torch.Tensor, grid, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = module(x, grid)
    y.float().square().sum().backward()
    return y.detach().float(), x.grad


def pair(tokens: int) -> tuple[HybridAttention, HybridAttention, torch.Tensor]:
    torch.manual_seed(0)
    tuned = HybridAttention(48, 3, 3, tuned_cpu=True, math_attention_tokens=LIMIT)
    reference = HybridAttention(48, 3, 3, tuned_cpu=False)
    reference.load_state_dict(tuned.state_dict())
    with torch.no_grad():
        tuned.gate_logit.fill_(2.0)  # mostly the global (attention) branch, so a wrong one shows
        reference.gate_logit.fill_(2.0)
    return tuned, reference, torch.randn(2, tokens, 48)


@pytest.mark.parametrize("tokens", [64, 175, 256])
def test_the_encoder_uses_the_math_backend_up_to_the_threshold_and_flash_above(tokens):
    tuned, reference, x = pair(tokens)
    grid = GRIDS[tokens]
    expected = {MATH} if tokens <= LIMIT else {FLASH}
    assert kernels(lambda: attention_step(tuned, x, grid, bf16=True)) == expected
    assert kernels(lambda: attention_step(reference, x, grid, bf16=True)) == {FLASH}  # cpu_ops: reference


@pytest.mark.parametrize("bf16", [False, True])
def test_math_and_flash_attention_agree_forward_and_backward(bf16):
    tuned, reference, x = pair(64)
    y, grad = attention_step(tuned, x, GRIDS[64], bf16)
    y_ref, grad_ref = attention_step(reference, x, GRIDS[64], bf16)
    tolerance = {"rtol": 3e-2, "atol": 3e-2} if bf16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(y, y_ref, **tolerance)
    torch.testing.assert_close(grad, grad_ref, **tolerance)
    for (name, p), p_ref in zip(tuned.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, **tolerance, msg=name)


def test_the_frozen_llm_layer_uses_the_math_backend_for_short_sequences_with_the_same_output(
    tiny_llama_dir, llm_cache_dir
):
    loaded = load_llm_layer(str(tiny_llama_dir), -1, cache_dir=llm_cache_dir)
    dims = loaded.dims
    tuned = LLMBridge(8, loaded.layer, dims.hidden_size, dims.head_dim, math_attention_tokens=LIMIT)
    reference = LLMBridge(8, loaded.layer, dims.hidden_size, dims.head_dim)
    torch.manual_seed(0)
    h = torch.randn(2, 64, dims.hidden_size)
    with torch.no_grad():
        assert kernels(lambda: tuned.run_layer(h)) == {MATH}
        assert kernels(lambda: reference.run_layer(h)) == {FLASH}
        assert kernels(lambda: tuned.run_layer(torch.randn(1, LIMIT + 1, dims.hidden_size))) == {FLASH}
        torch.testing.assert_close(tuned.run_layer(h), reference.run_layer(h), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("params", "expected"), [
    ({}, 0), ({"cpu_math_attention_tokens": 192}, 192), ({"cpu_math_attention_tokens": 64}, 64),
    ({"cpu_ops": "reference", "cpu_math_attention_tokens": 192}, 0),
])  # fmt: skip
def test_the_model_passes_its_threshold_to_every_attention(params, expected, make_cfg, llm_cache_dir):
    model = build_model(make_cfg(**params), llm_cache_dir=llm_cache_dir)
    assert {block.attn.math_attention_tokens for block in model.blocks} == {expected}
    assert model.llm.math_attention_tokens == expected


def test_a_negative_threshold_is_refused():
    with pytest.raises(ValueError, match="cpu_math_attention_tokens must be >= 0"):
        MedVisionLlamaConfig(cpu_math_attention_tokens=-1)
