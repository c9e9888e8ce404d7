"""A decoder conv block under bf16 autocast on a grid 2 voxels deep: torch 2.13's oneDNN Conv3d
backward returns a NaN weight gradient there at random (it reads memory it did not write; seen
on an AMD EPYC with avx512_bf16, in 28-70% of steps once freed memory held NaN). The block
convolves such grids in fp32 (``decoder._bf16_conv_unsafe``); these tests fail without that.

Freed NaN-filled blocks make the stale memory the kernel reads visible; one thread, as a Ray
Train worker of the ablation runs."""

from __future__ import annotations

import pytest
import torch

from mvl_pipeline.model.decoder import ConvNormAct, _bf16_conv_unsafe


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def leave_nan_in_freed_memory() -> None:
    junk = [
        torch.full((n,), float("nan"), dtype=dtype)
        for n in (64, 512, 2048, 8192, 32768, 131072, 524288)
        for dtype in (torch.float32, torch.bfloat16)
    ]
    del junk


@pytest.mark.parametrize("spatial", [(2, 4, 4), (2, 7, 5), (2, 2, 2)])
def test_conv_block_gradients_stay_finite_on_a_two_deep_grid_under_bf16(spatial, one_thread):
    torch.manual_seed(0)
    block = ConvNormAct(32, 16, 3).train()
    for step in range(25):
        leave_nan_in_freed_memory()
        x = torch.randn(2, 32, *spatial)
        block.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = block(x)
        assert y.dtype == torch.bfloat16  # the rest of the decoder still sees bf16
        y.float().square().mean().backward()
        for name, p in block.named_parameters():
            assert torch.isfinite(p.grad).all(), f"step {step}: {name} has a non-finite gradient"


def test_the_fp32_fallback_applies_only_where_the_bug_is_and_only_under_cpu_bf16_autocast():
    conv = ConvNormAct(8, 8, 3).conv
    two_deep, deeper = torch.zeros(1, 8, 2, 4, 4), torch.zeros(1, 8, 4, 4, 4)
    assert not _bf16_conv_unsafe(two_deep, conv)  # no autocast: fp32 already
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _bf16_conv_unsafe(two_deep, conv)
        assert not _bf16_conv_unsafe(deeper, conv)  # real crops (token grids of 4 and up) keep bf16
        assert not _bf16_conv_unsafe(two_deep, ConvNormAct(8, 8, 1).conv)  # 1x1x1: not affected
    with torch.autocast("cpu", dtype=torch.float16):
        assert not _bf16_conv_unsafe(two_deep, conv)


def test_the_fp32_fallback_computes_the_same_block_output():
    torch.manual_seed(1)
    block = ConvNormAct(16, 8, 3).eval()
    x = torch.randn(2, 16, 2, 6, 6)
    with torch.no_grad():
        reference = block(x)  # fp32 throughout
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = block(x)
    assert torch.allclose(mixed.float(), reference, atol=3e-2)  # bf16 rounding of the output only
