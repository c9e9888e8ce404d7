"""What the model costs: parameter counts and an analytic FLOP count per training sample.

FLOPs count the multiply-adds (x2) of every matmul, convolution and attention product, as
``torch.utils.flop_counter`` does (norms, activations, softmax, biases and interpolation are not
counted; gradient-checkpoint recomputation is not counted either: these are model FLOPs). The
backward pass costs one forward per gradient actually computed: the input gradient (skipped for
layers that see the raw image) and the weight gradient (skipped for frozen weights, e.g. the LLM
layer), so a frozen layer costs 2x its forward and a trainable one 3x.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from .config import MedVisionLlamaConfig
from .decoder import cumulative_factor
from .llm_layer import KNOWN_LLM_DIMS, LLMDims


def count_parameters(model: nn.Module) -> dict[str, int]:
    """{"total", "trainable", "frozen"} numbers of parameter elements."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


def _pass_multiplier(weight_grad: bool, input_grad: bool) -> int:
    return 1 + int(weight_grad) + int(input_grad)


def _matmul(rows: int, fan_in: int, fan_out: int, *, weight_grad=True, input_grad=True) -> int:
    """Forward + backward FLOPs of ``rows`` vectors through a (fan_in -> fan_out) linear map."""
    return 2 * rows * fan_in * fan_out * _pass_multiplier(weight_grad, input_grad)


def _lora_linear(rows: int, fan_in: int, fan_out: int, rank: int) -> int:
    """A frozen base plus trainable A (fan_in -> rank) and B (rank -> fan_out)."""
    return (
        _matmul(rows, fan_in, fan_out, weight_grad=False)
        + _matmul(rows, fan_in, rank)
        + _matmul(rows, rank, fan_out)
    )


def _attention_core(tokens: int, heads: int, head_dim: int) -> int:
    """q k^T and attn v (gradients flow to both operands of each): 3x forward."""
    return 3 * 2 * 2 * tokens * tokens * heads * head_dim


def _encoder_block(cfg: MedVisionLlamaConfig, tokens: int) -> int:
    E = cfg.embed_dim
    hidden = int(E * cfg.mlp_ratio)
    return (
        _matmul(tokens, E, 3 * E)
        + _attention_core(tokens, cfg.num_heads, cfg.head_dim)
        + _matmul(tokens, cfg.local_kernel**3, E)  # depthwise: k^3 taps per channel, E channels
        + _matmul(tokens, E, E)
        + _matmul(tokens, E, hidden)
        + _matmul(tokens, hidden, E)
    )


def _llm_bridge(cfg: MedVisionLlamaConfig, tokens: int, dims: LLMDims) -> int:
    E, H, r = cfg.embed_dim, dims.hidden_size, cfg.llm.lora.rank
    targets = set(cfg.llm.lora.targets) if cfg.llm.lora.enabled else set()

    def linear(name: str, fan_in: int, fan_out: int, trainable: bool) -> int:
        if name in targets:
            return _lora_linear(tokens, fan_in, fan_out, r)
        return _matmul(tokens, fan_in, fan_out, weight_grad=trainable)

    q_out, kv_out = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    layer = {
        "q_proj": (H, q_out),
        "k_proj": (H, kv_out),
        "v_proj": (H, kv_out),
        "o_proj": (q_out, H),
        "gate_proj": (H, dims.intermediate_size),
        "up_proj": (H, dims.intermediate_size),
        "down_proj": (dims.intermediate_size, H),
    }
    inside = 0 if cfg.llm.mode == "bridge_only" else (
        sum(linear(name, i, o, trainable=False) for name, (i, o) in layer.items())
        + _attention_core(tokens, dims.num_heads, dims.head_dim)
    )
    return linear("proj_in", E, H, trainable=True) + inside + linear("proj_out", H, E, trainable=True)


def _conv(out_voxels: int, c_in: int, c_out: int, kernel: int, *, input_grad=True) -> int:
    return _matmul(out_voxels, c_in * kernel**3, c_out, input_grad=input_grad)


def _conv_transpose(in_voxels: int, c_in: int, c_out: int, factor: Sequence[int]) -> int:
    return _matmul(in_voxels, c_in, c_out * math.prod(factor))


def _decoder(cfg: MedVisionLlamaConfig, grid: Sequence[int]) -> int:
    ch, stem, E = cfg.decoder.channels, cfg.decoder.stem_channels, cfg.embed_dim
    factors = cfg.stage_factors
    levels = len(factors)
    voxels = [math.prod(g * f for g, f in zip(grid, cumulative_factor(factors, s), strict=True))
              for s in range(levels + 1)]  # fmt: skip
    num_taps = len(cfg.decoder.taps)
    flops = _conv(voxels[0], E, ch[0], 3)  # bottleneck
    for i in range(num_taps):  # tap i lifted straight to level i + 1
        flops += _conv_transpose(voxels[0], E, ch[i + 1], cumulative_factor(factors, i + 1))
    for s in range(1, levels):
        flops += _conv_transpose(voxels[s - 1], ch[s - 1], ch[s], factors[s - 1])
        flops += _conv(voxels[s], ch[s] * (2 if s <= num_taps else 1), ch[s], 3)
    if cfg.decoder.full_res == "conv":
        flops += _conv(voxels[levels], cfg.in_channels, stem, 3, input_grad=False)  # stem on the image
        flops += _conv_transpose(voxels[levels - 1], ch[-1], stem, factors[-1])
        flops += _conv(voxels[levels], 2 * stem, stem, 3)  # full-resolution fusion
    else:  # the folded image's stem and the fusion at the finest level, then one unfolding GEMM
        folded = cfg.in_channels * math.prod(factors[-1])
        flops += _conv(voxels[levels - 1], folded, ch[-1], 3, input_grad=False)
        flops += _conv(voxels[levels - 1], 2 * ch[-1], 2 * ch[-1], 3)
        flops += _conv_transpose(voxels[levels - 1], 2 * ch[-1], cfg.num_classes, factors[-1])
        return flops  # the unfolding GEMM yields the logits: no classifier
    flops += _conv(voxels[levels], stem, cfg.num_classes, 1)  # classifier
    return flops


def flops_breakdown(
    cfg: MedVisionLlamaConfig, spatial_shape: Sequence[int], llm_dims: LLMDims | None = None
) -> dict[str, int]:
    """Forward+backward FLOPs of one sample, by part: patch_embed, encoder, llm, decoder."""
    spatial = tuple(int(s) for s in spatial_shape)
    if len(spatial) != 3 or any(s % p for s, p in zip(spatial, cfg.patch_size, strict=True)):
        raise ValueError(f"spatial shape {spatial} is not 3 sizes divisible by {cfg.patch_size}")
    grid = [s // p for s, p in zip(spatial, cfg.patch_size, strict=True)]
    tokens = math.prod(grid)
    parts = {
        "patch_embed": _matmul(
            tokens, cfg.in_channels * math.prod(cfg.patch_size), cfg.embed_dim, input_grad=False
        ),
        "encoder": cfg.depth * _encoder_block(cfg, tokens),
        "llm": 0,
        "decoder": _decoder(cfg, grid),
    }
    if cfg.llm.mode != "none":
        if llm_dims is None:
            if cfg.llm.source not in KNOWN_LLM_DIMS:
                raise ValueError(
                    f"LLM layer sizes of {cfg.llm.source!r} unknown: pass llm_dims "
                    "(e.g. model.llm_dims of a built model)"
                )
            llm_dims = KNOWN_LLM_DIMS[cfg.llm.source]
        parts["llm"] = _llm_bridge(cfg, tokens, llm_dims)
    return parts


def flops_per_sample(
    cfg: MedVisionLlamaConfig, spatial_shape: Sequence[int], llm_dims: LLMDims | None = None
) -> int:
    """Analytic forward+backward FLOPs of one training sample of ``spatial_shape`` (X, Y, Z)."""
    return sum(flops_breakdown(cfg, spatial_shape, llm_dims).values())
