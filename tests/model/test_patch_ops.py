"""Patch-sized convolutions as matmuls (model/patch_ops.py) equal the convolutions they replace,
values and gradients, with and without bias."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mvl_pipeline.model.patch_ops import PatchConvTranspose3d, patchify


def test_patchify_equals_the_strided_conv3d_as_tokens():
    torch.manual_seed(0)
    conv = nn.Conv3d(2, 8, kernel_size=(4, 2, 2), stride=(4, 2, 2))
    x = torch.randn(3, 2, 8, 6, 4)
    expected = conv(x).flatten(2).transpose(1, 2)  # (B, T, E)
    torch.testing.assert_close(patchify(x, conv.weight, conv.bias, (4, 2, 2)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_transposed_conv_as_matmul_equals_conv_transpose3d_values_and_gradients(bias):
    torch.manual_seed(0)
    module = PatchConvTranspose3d(6, 4, (2, 2, 1), bias=bias)
    x = torch.randn(2, 6, 3, 4, 5)
    grad = torch.randn(2, 4, 6, 8, 5)
    results = {}
    for matmul in (True, False):
        module.matmul = matmul
        module.zero_grad()
        inp = x.clone().requires_grad_()
        out = module(inp)
        out.backward(grad)
        results[matmul] = [out.detach(), inp.grad, module.weight.grad] + ([module.bias.grad] if bias else [])
    assert results[True][0].shape == (2, 4, 6, 8, 5)
    for new, ref in zip(results[True], results[False], strict=True):
        torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-5)
