"""With ``model.cpu_math_attention_tokens: N`` (``cpu_ops: tuned``; default 256) a training step on
CPU computes attention over at most N tokens as two matmuls and an fp32 softmax
(``model/blocks.py`` ``math_attention``), in the encoder blocks and in the frozen LLM layer;
inference, longer sequences and ``cpu_ops: reference`` keep PyTorch's flash kernel. Which kernel
ran is read from the profiler, and the two paths give the same attention and gradients up to
rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from mvl_pipeline.model import MedVisionLlamaConfig, build_model, load_llm_layer
from mvl_pipeline.model.blocks import HybridAttention, LLMBridge, math_attention

FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"
FLASH_BACKWARD = "aten::_scaled_dot_product_flash_attention_for_cpu_backward"
SOFTMAX = "aten::_softmax"  # the math path's; the flash kernel computes its softmax inside
GRIDS = {64: (4, 4, 4), 175: (5, 7, 5), 256: (8, 8, 4)}
LIMIT = 192  # a threshold between the grids' token counts, so both sides are exercised


def kernels(step) -> set[str]:
    with profile() as prof:
        step()
    return {e.key for e in prof.key_averages()} & {FLASH, FLASH_BACKWARD, SOFTMAX}


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
def test_a_training_step_uses_the_matmuls_up_to_the_threshold_and_flash_above(tokens):
    tuned, reference, x = pair(tokens)
    grid = GRIDS[tokens]
    expected = {SOFTMAX} if tokens <= LIMIT else {FLASH, FLASH_BACKWARD}
    assert kernels(lambda: attention_step(tuned, x, grid, bf16=True)) == expected
    assert kernels(lambda: attention_step(reference, x, grid, bf16=True)) == {FLASH, FLASH_BACKWARD}  # cpu_ops: reference


def test_inference_keeps_the_flash_kernel():
    """Forward alone the flash kernel is the faster one (model/blocks.py use_math_attention)."""
    tuned, _, x = pair(64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels(lambda: tuned(x, GRIDS[64])) == {FLASH}


@pytest.mark.parametrize("bf16", [False, True])
def test_the_matmuls_and_flash_attention_agree_forward_and_backward(bf16):
    tuned, reference, x = pair(64)
    y, grad = attention_step(tuned, x, GRIDS[64], bf16)
    y_ref, grad_ref = attention_step(reference, x, GRIDS[64], bf16)
    tolerance = {"rtol": 3e-2, "atol": 3e-2} if bf16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(y, y_ref, **tolerance)
    torch.testing.assert_close(grad, grad_ref, **tolerance)
    for (name, p), p_ref in zip(tuned.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, **tolerance, msg=name)


@pytest.mark.parametrize(("heads", "kv_heads", "scale"), [(4, 4, None), (6, 2, None), (6, 3, 0.3)])
def test_math_attention_equals_sdpa_with_grouped_query_heads_and_a_scale(heads, kv_heads, scale):
    torch.manual_seed(1)
    q = torch.randn(2, heads, 50, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, kv_heads, 50, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, kv_heads, 50, 16, dtype=torch.float64, requires_grad=True)
    out = math_attention(q, k, v, scale=scale)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=heads != kv_heads)
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    # the softmax runs in fp32 (as under bf16 autocast), so fp32 rounding, not fp64
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_the_frozen_llm_layer_uses_the_matmuls_in_a_training_step_with_the_same_output_and_gradient(
    tiny_llama_dir, llm_cache_dir
):
    loaded = load_llm_layer(str(tiny_llama_dir), -1, cache_dir=llm_cache_dir)
    dims = loaded.dims
    tuned = LLMBridge(8, loaded.layer, dims.hidden_size, dims.head_dim, math_attention_tokens=LIMIT)
    torch.manual_seed(0)
    h = torch.randn(2, 64, dims.hidden_size, requires_grad=True)

    def grad_step(bridge: LLMBridge, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = hidden.detach().clone().requires_grad_(True)
        out = bridge.run_layer(hidden)
        out.square().sum().backward()
        return out.detach(), hidden.grad

    assert kernels(lambda: grad_step(tuned, h)) == {SOFTMAX}
    assert kernels(lambda: grad_step(tuned, torch.randn(1, LIMIT + 1, dims.hidden_size))) == {FLASH, FLASH_BACKWARD}
    with torch.no_grad():
        assert kernels(lambda: tuned.run_layer(h)) == {FLASH}
        flash_out = tuned.run_layer(h)
    out, grad = grad_step(tuned, h)
    # the same layer on the flash kernel, under autograd: threshold 0 (cpu_ops: reference)
    reference = LLMBridge(8, loaded.layer, dims.hidden_size, dims.head_dim, math_attention_tokens=0)
    assert kernels(lambda: grad_step(reference, h)) == {FLASH, FLASH_BACKWARD}
    out_ref, grad_ref = grad_step(reference, h)
    torch.testing.assert_close(out, flash_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-5)


def test_a_causal_layer_keeps_transformers_sdpa(tiny_llama_dir, llm_cache_dir):
    """The matmuls are bidirectional: a layer left causal is handed back to transformers' SDPA."""
    loaded = load_llm_layer(str(tiny_llama_dir), -1, cache_dir=llm_cache_dir)
    dims = loaded.dims
    bridge = LLMBridge(8, loaded.layer, dims.hidden_size, dims.head_dim, math_attention_tokens=LIMIT)
    bridge.layer.self_attn.is_causal = True
    h = torch.randn(1, 16, dims.hidden_size, requires_grad=True)
    assert kernels(lambda: bridge.run_layer(h).sum().backward()) == {FLASH, FLASH_BACKWARD}


@pytest.mark.parametrize(("params", "expected"), [
    ({}, 256), ({"cpu_math_attention_tokens": 192}, 192), ({"cpu_math_attention_tokens": 0}, 0),
    ({"cpu_ops": "reference", "cpu_math_attention_tokens": 192}, 0),
])  # fmt: skip
def test_the_model_passes_its_threshold_to_every_attention(params, expected, make_cfg, llm_cache_dir):
    model = build_model(make_cfg(**params), llm_cache_dir=llm_cache_dir)
    assert {block.attn.math_attention_tokens for block in model.blocks} == {expected}
    assert model.llm.math_attention_tokens == expected
    assert model.llm.layer.self_attn.math_attention_tokens == expected


def test_a_negative_threshold_is_refused():
    with pytest.raises(ValueError, match="cpu_math_attention_tokens must be >= 0"):
        MedVisionLlamaConfig(cpu_math_attention_tokens=-1)
