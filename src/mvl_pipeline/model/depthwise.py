"""Depthwise 3-D convolution (one filter per channel, stride 1, "same" padding) whose backward
pass is composed of ops that are fast on CPU.

oneDNN runs the forward of a depthwise 3-D conv on a small token grid in ~0.1 ms, but its
backward (``convolution_backward``) is slow there: forward + backward of the default model's
local branch (2 x 192 x 8 x 8 x 4, channels-last) took 3.7 ms in fp32 and 7.2 ms in bf16 on 2
Xeon cores, against 2.1 ms in fp32 with the per-tap form below (2026-12-01); the train step runs
four of them. The backward here is
the same mathematics written with other PyTorch ops: the input gradient is the forward
convolution with the flipped filters (a depthwise conv again, the fast path), the filter gradient
the correlation of each (sample, channel) input map with its output gradient, which is a
depthwise forward conv again (the gradient map as the filter, the batch folded into the groups),
the bias gradient a sum. The filter gradient took 1.2 ms as one product and reduction per filter
tap (k^3 = 27 of each) and 0.4 ms as that conv (2 x 192 x 8 x 8 x 4, fp32, 2 Xeon cores with
AMX, 2026-12-05), 2.2-3.9x as fast on grids of 27 to 2048 tokens; on larger grids the conv was
at times the slower (0.73x at 2 x 384 x 16 x 16 x 12), so they keep the per-tap form.
Exact up to floating-point rounding; ``tests/model/test_depthwise.py`` checks it against autograd and
``torch.autograd.gradcheck``.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

#: Largest token grid whose filter gradient runs as one conv (above); larger grids take the taps.
CONV_WEIGHT_GRAD_MAX_VOXELS = 2048


def weight_grad(x: torch.Tensor, grad: torch.Tensor, k: int) -> torch.Tensor:
    """The (E, 1, k, k, k) filter gradient, in float32, of a depthwise "same" conv with input
    ``x`` and output gradient ``grad`` (both (B, E, X, Y, Z)): per channel, the sum over samples
    of the input (zero-padded by k // 2) correlated with the gradient."""
    B, E, *spatial = x.shape
    pad = k // 2
    if math.prod(spatial) <= CONV_WEIGHT_GRAD_MAX_VOXELS:  # one depthwise conv, the gradient maps as filters
        maps = x.transpose(0, 1).reshape(1, E * B, *spatial)  # (1, E B, X, Y, Z)
        filters = grad.transpose(0, 1).reshape(E * B, 1, *spatial)  # (E B, 1, X, Y, Z)
        corr = F.conv3d(maps, filters, padding=pad, groups=E * B)  # (1, E B, k, k, k)
        return corr.view(E, B, k, k, k).sum(1, dtype=torch.float32).unsqueeze(1)
    X, Y, Z = spatial  # one product and reduction per tap, in the channels-last token layout
    tokens = F.pad(x.permute(0, 2, 3, 4, 1), (0, 0, pad, pad, pad, pad, pad, pad))  # (B, X+2p, Y+2p, Z+2p, E)
    grad_tokens = grad.permute(0, 2, 3, 4, 1)  # (B, X, Y, Z, E)
    taps = [
        (tokens[:, dx : dx + X, dy : dy + Y, dz : dz + Z] * grad_tokens).sum((0, 1, 2, 3), dtype=torch.float32)
        for dx, dy, dz in itertools.product(range(k), repeat=3)
    ]  # k^3 x (E,)
    return torch.stack(taps, dim=1).reshape(E, 1, k, k, k)


class _DepthwiseConv3d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv3d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        k = weight.shape[-1]
        pad = k // 2
        grad = grad.to(x.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv3d(grad, weight.flip(2, 3, 4), padding=pad, groups=x.shape[1])
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(x, grad, k).to(weight.dtype)  # (E, 1, k, k, k)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3, 4), dtype=torch.float32)
        return grad_x, grad_w, grad_b


def depthwise_conv3d(x: torch.Tensor, conv: torch.nn.Conv3d) -> torch.Tensor:
    """``conv(x)`` for a depthwise ``conv`` (groups = channels, odd cubic kernel, stride 1, "same"
    padding), with the backward above. Under autocast it runs in the autocast dtype, as
    ``conv(x)`` would; the gradients reach ``conv``'s parameters in their own dtype."""
    k = conv.kernel_size
    if conv.groups != conv.in_channels or conv.out_channels != conv.in_channels or len(set(k)) != 1 or k[0] % 2 == 0:
        raise ValueError(f"not a depthwise conv with an odd cubic kernel: {conv}")
    if conv.stride != (1, 1, 1) or conv.padding != (k[0] // 2,) * 3 or conv.dilation != (1, 1, 1):
        raise ValueError(f"depthwise_conv3d needs stride 1, same padding, no dilation: {conv}")
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    bias = None if conv.bias is None else conv.bias.to(dtype)
    with torch.autocast(device_type, enabled=False):
        return _DepthwiseConv3d.apply(x.to(dtype), conv.weight.to(dtype), bias)
