"""The depthwise conv with its CPU-tuned backward (model/depthwise.py) gives the gradients of
``nn.Conv3d``'s own autograd, and ``cpu_ops`` picks it without changing the model's output."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mvl_pipeline.model import build_model, depthwise
from mvl_pipeline.model.depthwise import depthwise_conv3d


def conv_and_input(kernel: int, bias: bool, seed: int = 0) -> tuple[nn.Conv3d, torch.Tensor]:
    torch.manual_seed(seed)
    conv = nn.Conv3d(6, 6, kernel, padding=kernel // 2, groups=6, bias=bias)
    x = torch.randn(2, 6, 5, 4, 3).contiguous(memory_format=torch.channels_last_3d)
    return conv, x


@pytest.mark.parametrize("filter_grad", ["conv", "taps"])
@pytest.mark.parametrize(("kernel", "bias"), [(3, True), (3, False), (5, True), (1, True)])
def test_gradients_equal_autograd_of_nn_conv3d_in_fp32(kernel, bias, filter_grad, monkeypatch):
    # both forms of the filter gradient: one conv on grids up to the threshold, one product per tap above it
    monkeypatch.setattr(depthwise, "CONV_WEIGHT_GRAD_MAX_VOXELS", 2048 if filter_grad == "conv" else 0)
    conv, x = conv_and_input(kernel, bias)
    grad = torch.randn(2, 6, 5, 4, 3)
    results = []
    for fn in (conv, lambda t: depthwise_conv3d(t, conv)):
        conv.zero_grad()
        inp = x.clone().requires_grad_()
        out = fn(inp)
        out.backward(grad)
        results.append([out.detach(), inp.grad, conv.weight.grad] + ([conv.bias.grad] if bias else []))
    for ref, new in zip(*results, strict=True):
        torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_voxels", [2048, 0])
def test_gradcheck_in_double(max_voxels, monkeypatch):
    monkeypatch.setattr(depthwise, "CONV_WEIGHT_GRAD_MAX_VOXELS", max_voxels)
    torch.manual_seed(1)
    conv = nn.Conv3d(3, 3, 3, padding=1, groups=3).double()
    x = torch.randn(1, 3, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, w, b: depthwise_conv3d(t, conv), (x, conv.weight, conv.bias))


def test_under_bf16_autocast_it_runs_in_bf16_and_its_gradients_match_fp32():
    conv, x = conv_and_input(3, True)
    grad = torch.randn(2, 6, 5, 4, 3)
    inp = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = depthwise_conv3d(inp, conv)
    assert out.dtype == torch.bfloat16
    out.float().backward(grad)
    assert conv.weight.grad.dtype == torch.float32 and inp.grad.dtype == torch.float32
    conv_ref, _ = conv_and_input(3, True)
    ref_inp = x.clone().requires_grad_()
    conv_ref(ref_inp).backward(grad)
    # bf16 operands: agreement to bf16 precision (8 bits of mantissa), not bit-for-bit
    torch.testing.assert_close(conv.weight.grad, conv_ref.weight.grad, rtol=0.05, atol=0.05)
    torch.testing.assert_close(inp.grad, ref_inp.grad, rtol=0.05, atol=0.05)


def test_rejects_a_conv_that_is_not_depthwise_same_padding():
    with pytest.raises(ValueError, match="depthwise"):
        depthwise_conv3d(torch.randn(1, 4, 3, 3, 3), nn.Conv3d(4, 8, 3, padding=1, groups=4))
    with pytest.raises(ValueError, match="stride 1"):
        depthwise_conv3d(torch.randn(1, 4, 4, 4, 4), nn.Conv3d(4, 4, 3, padding=1, groups=4, stride=2))


def test_cpu_ops_tuned_and_reference_give_the_same_output_and_gradients(make_cfg, llm_cache_dir):
    # the attention's backend (the other tuned path) held the same: it has its own test (test_attention_backend)
    models = {ops: build_model(make_cfg(cpu_ops=ops, cpu_math_attention_tokens=0), llm_cache_dir=llm_cache_dir, seed=3)
              for ops in ("tuned", "reference")}  # fmt: skip
    x = torch.randn(2, 1, 16, 16, 8, generator=torch.Generator().manual_seed(0))
    grid = torch.randn(2, 32, 4, 4, 4, requires_grad=True)  # (B, E, X, Y, Z), E = make_cfg's width
    backward_of = {ops: type(model.blocks[0].attn._local(grid).grad_fn).__name__ for ops, model in models.items()}
    assert backward_of == {"tuned": "_DepthwiseConv3dBackward", "reference": "ConvolutionBackward0"}
    grads = {}
    for ops, model in models.items():
        out = model(x)
        out.square().mean().backward()
        grads[ops] = (out.detach(), model.blocks[0].attn.local.weight.grad)
    # the same weights (seeded), the local branch in fp32 both ways: the same forward op; the
    # decoder's instance norms as one batch_norm a sample in the channels-last layout (tuned;
    # which norms each setting builds: test_cnn_layout) against InstanceNorm3d: the same maths,
    # statistics summed in another order, as is the filter gradient
    torch.testing.assert_close(grads["tuned"][0], grads["reference"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads["tuned"][1], grads["reference"][1], rtol=1e-4, atol=1e-6)


def test_cpu_ops_must_be_known(make_cfg):
    with pytest.raises(ValueError, match="cpu_ops"):
        make_cfg(cpu_ops="fast")
