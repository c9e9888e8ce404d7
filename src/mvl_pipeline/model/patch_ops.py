"""Patch-sized convolutions (kernel = stride) computed as matrix products.

A Conv3d whose kernel equals its stride (the patch embedding) and a ConvTranspose3d whose kernel
equals its stride (the decoder's x2 / xN upsampling) touch every voxel once: each is exactly one
matrix product over reshaped views. oneDNN runs them as convolutions with tiny spatial
windows, which leaves a CPU's matrix units (AMX) and a GPU's tensor cores mostly idle; as
``F.linear`` they are single large GEMMs. The modules keep their Conv3d / ConvTranspose3d
parameters (same shapes, same state_dict), so ``model.patch_ops`` (``matmul`` or ``conv``) only
chooses how they run: a model trained one way loads and runs the other way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def patchify(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, patch: Sequence[int]) -> torch.Tensor:
    """Conv3d(kernel = stride = ``patch``) as a matmul: x (B, C, X, Y, Z) -> tokens (B, T, E),
    tokens in (X, Y, Z) row-major order; ``weight`` (E, C, px, py, pz)."""
    B, C, X, Y, Z = x.shape
    px, py, pz = patch
    gx, gy, gz = X // px, Y // py, Z // pz
    patches = x.reshape(B, C, gx, px, gy, py, gz, pz).permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, gx, gy, gz, C, px, py, pz)
    patches = patches.reshape(B, gx * gy * gz, C * px * py * pz)  # (B, T, C * px * py * pz)
    return F.linear(patches, weight.reshape(weight.shape[0], -1), bias)  # (B, T, E)


def space_to_depth(x: torch.Tensor, factor: Sequence[int]) -> torch.Tensor:
    """Fold each ``factor`` block of voxels into channels: x (B, C, X, Y, Z) ->
    (B, C * fx * fy * fz, X/fx, Y/fy, Z/fz), channels ordered (C, fx, fy, fz) like a Conv3d
    weight's input dimensions. Lossless: every voxel value is kept, at a coarser grid."""
    B, C, X, Y, Z = x.shape
    fx, fy, fz = factor
    x = x.reshape(B, C, X // fx, fx, Y // fy, fy, Z // fz, fz).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(B, C * fx * fy * fz, X // fx, Y // fy, Z // fz)


def unpatchify(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, factor: Sequence[int]) -> torch.Tensor:
    """ConvTranspose3d(kernel = stride = ``factor``) as a matmul: x (B, C_in, gx, gy, gz) ->
    (B, C_out, gx*fx, gy*fy, gz*fz) in channels_last_3d; ``weight`` (C_in, C_out, fx, fy, fz)."""
    B, C_in, gx, gy, gz = x.shape
    C_out = weight.shape[1]
    fx, fy, fz = factor
    tokens = x.permute(0, 2, 3, 4, 1)  # (B, gx, gy, gz, C_in): free for a channels_last_3d input
    w = weight.permute(0, 2, 3, 4, 1).reshape(C_in, fx * fy * fz * C_out)  # columns (fx, fy, fz, C_out)
    # the bias once per output column, added inside the GEMM (addmm) rather than afterwards on
    # the x8 larger channels_last output, where a broadcast add over 8-16 channels is slow on CPU
    column_bias = None if bias is None else bias.repeat(fx * fy * fz)  # columns (fx, fy, fz, C_out)
    out = F.linear(tokens, w.t(), column_bias)  # (B, gx, gy, gz, fx * fy * fz * C_out)
    out = out.reshape(B, gx, gy, gz, fx, fy, fz, C_out).permute(0, 1, 4, 2, 5, 3, 6, 7)  # (B, gx, fx, gy, fy, gz, fz, C_out)
    out = out.reshape(B, gx * fx, gy * fy, gz * fz, C_out)  # (B, X, Y, Z, C_out)
    return out.permute(0, 4, 1, 2, 3)  # (B, C_out, X, Y, Z), a channels_last_3d view


class PatchConvTranspose3d(torch.nn.ConvTranspose3d):
    """``ConvTranspose3d(kernel = stride)`` that runs as one matmul when ``matmul`` is set."""

    def __init__(self, in_channels: int, out_channels: int, factor: Sequence[int], *, bias: bool = True, matmul: bool = True):
        super().__init__(in_channels, out_channels, tuple(factor), stride=tuple(factor), bias=bias)
        self.matmul = matmul

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if not self.matmul:
            return super().forward(x, output_size)
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled(x.device.type):  # as autocast would cast a convolution's operands
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        return unpatchify(x, weight, bias, self.kernel_size)
