"""Encoder building blocks of MedVisionLlama, read top to bottom:

patch embedding -> positional embedding -> hybrid attention -> MLP -> encoder block, then the
bridge that runs one frozen decoder layer of a pre-trained LLM on the tokens, and the LoRA
adapter it may use. Shapes: B batch, T tokens, E encoder width, H LLM width, (X, Y, Z) grids.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .depthwise import depthwise_conv3d
from .patch_ops import patchify

Grid = tuple[int, int, int]


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Non-causal attention as its maths: ``softmax(q k^T * scale) v``, both products in the
    inputs' dtype (bf16 under autocast: the matrix units) and the softmax computed in fp32 inside
    PyTorch's kernel (a bf16 input is read into fp32 and only the result is rounded, as an fp32
    softmax of the same scores cast back would be, without those two copies of the scores).
    q (B, h, T, d), k and v (B, hk, T, d) with hk dividing h (grouped-query: each key/value head
    serves h / hk consecutive query heads). Those query heads are stacked as rows of one product
    with their key/value head, so k and v are never repeated per query head. Autograd gives its
    backward as matmuls too."""
    B, h, T, d = q.shape
    hk = k.shape[-3]
    q = q.reshape(B, hk, (h // hk) * T, d)  # (B, hk, g T, d): query head j*g + i is rows i*T.. of j
    scores = torch.matmul(q * (d**-0.5 if scale is None else scale), k.transpose(-1, -2))  # (B, hk, g T, T)
    return torch.matmul(torch.softmax(scores, dim=-1), v).reshape(B, h, T, d)


def use_math_attention(q: torch.Tensor, math_up_to: int) -> bool:
    """:func:`math_attention` for a training step on CPU over at most ``math_up_to`` tokens (the
    model's ``cpu_math_attention_tokens`` under ``cpu_ops: tuned``, else 0); otherwise SDPA (its
    flash kernel on CPU). PyTorch's CPU flash kernel is fast forward but slow backward on short
    sequences: at 175 tokens (the Hippocampus crop), 2 x 9 query heads over 3 key/value heads (the
    LLM layer), bf16 fwd+bwd 9.8-11.0 ms against 3.3-3.8 ms for these matmuls at 1 thread, 5.7
    against 2.1 at 2 (an earlier run 5.4 against 4.5, not reproduced); 2 x 3 heads (the encoder)
    3.6-3.9 against 1.4-1.6 and 2.0 against 0.9; at 256 tokens 1.15-1.6x, at 512 slower
    (2026-12-06, Xeon with AMX; later that day, with the query heads stacked on their key/value
    head and no casts of the scores, the matmuls took 2.5 ms for the LLM layer's shape and
    1.2-1.3 ms for the encoder's at 1 thread, against 3.4-3.7 and 1.3-1.4 before, side by side).
    Forward alone the flash kernel
    is faster, so inference (no autograd) keeps it. The same attention either way, up to rounding
    (tested)."""
    return q.device.type == "cpu" and torch.is_grad_enabled() and q.shape[-2] <= math_up_to


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, math_up_to: int) -> torch.Tensor:
    """Non-causal multi-head attention of (B, h, T, d) tensors (see :func:`use_math_attention`)."""
    if use_math_attention(q, math_up_to):
        return math_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=k.shape[-3] != q.shape[-3])


#: The frozen LLM layer's attention (transformers' ``AttentionInterface``, registered on first
#: use): :func:`math_attention` where :func:`use_math_attention` says so, else transformers' SDPA.
LLM_ATTENTION = "mvl_pipeline_sdpa_or_math"


def _llm_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    math_up_to = getattr(module, "math_attention_tokens", 0)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal  # as transformers' SDPA reads it
    if attention_mask is None and not causal and not kwargs.get("dropout") and use_math_attention(query, math_up_to):
        out = math_attention(query, key, value, scale=kwargs.get("scaling"))  # (B, h, T, d)
        return out.transpose(1, 2).contiguous(), None  # (B, T, h, d), as transformers' own functions
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_llm_attention() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(LLM_ATTENTION, _llm_attention)
    return LLM_ATTENTION


def tokens_to_grid(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """(B, T, E) tokens -> (B, E, X, Y, Z), a channels_last_3d view (no copy)."""
    B, _, E = x.shape
    return x.view(B, *grid, E).permute(0, 4, 1, 2, 3)  # (B, E, X, Y, Z)


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, E, X, Y, Z) -> (B, T, E); free when ``x`` is channels_last_3d."""
    B, E = x.shape[:2]
    return x.permute(0, 2, 3, 4, 1).reshape(B, -1, E)  # (B, T, E)


class PatchEmbed3d(nn.Module):
    """Non-overlapping 3D patches -> tokens: Conv3d with kernel = stride = patch size, run as
    one matmul over the patches (``matmul``, see ``patch_ops``) or as the convolution."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: Grid, matmul: bool = True):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.matmul = matmul

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        grid = tuple(s // p for s, p in zip(x.shape[2:], self.patch_size, strict=True))
        if self.matmul:
            return patchify(x, self.proj.weight, self.proj.bias, self.patch_size), grid  # type: ignore[return-value]
        x = self.proj(x)  # (B, E, X/px, Y/py, Z/pz)
        x = x.flatten(2).transpose(1, 2)  # (B, T, E), tokens in (X, Y, Z) row-major order
        return x, grid  # type: ignore[return-value]


class PositionalEmbedding3d(nn.Module):
    """Learned positional embedding stored on a reference token grid and trilinearly resampled
    to the grid of the input, so the model runs on crops of any size (timm's dynamic size)."""

    def __init__(self, embed_dim: int, grid: Grid, init_std: float = 0.02):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, embed_dim, *grid))
        nn.init.trunc_normal_(self.weight, std=init_std, a=-2 * init_std, b=2 * init_std)

    def forward(self, grid: Grid) -> torch.Tensor:
        weight = self.weight  # (1, E, X0, Y0, Z0)
        if tuple(grid) != tuple(weight.shape[2:]):
            weight = F.interpolate(weight, size=grid, mode="trilinear", align_corners=False)
        return weight.flatten(2).transpose(1, 2)  # (1, T, E)


class HybridAttention(nn.Module):
    """Global multi-head self-attention over all tokens plus a local depthwise 3D conv over the
    token grid, mixed per channel by a learnable gate (sigmoid, starts at 0.5), then projected."""

    def __init__(self, dim: int, num_heads: int, local_kernel: int, qkv_bias: bool = True, tuned_cpu: bool = True,
                 math_attention_tokens: int = 0):  # fmt: skip
        super().__init__()
        self.tuned_cpu = tuned_cpu
        self.math_attention_tokens = math_attention_tokens
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.local = nn.Conv3d(dim, dim, local_kernel, padding=local_kernel // 2, groups=dim)
        self.gate_logit = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        B, T, E = x.shape
        q, k, v = (
            self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )  # each (B, nh, T, hd)
        glob = attention(q, k, v, self.math_attention_tokens)  # (B, nh, T, hd)
        glob = glob.transpose(1, 2).reshape(B, T, E)  # (B, T, E)
        local = self._local(tokens_to_grid(x, grid))  # (B, E, X, Y, Z)
        local = grid_to_tokens(local).to(glob.dtype)  # (B, T, E)
        gate = torch.sigmoid(self.gate_logit).to(glob.dtype)  # (E,)
        return self.proj(gate * glob + (1.0 - gate) * local)

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        # On CPU in fp32 (oneDNN's bf16 depthwise conv3d backward is ~2x slower still, and this
        # branch is a negligible share of the FLOPs), with oneDNN's own backward (``cpu_ops:
        # reference``, the step before) or the same maths in fast ops (model/depthwise.py: its
        # fwd+bwd take about a third of the time on a grid of a few hundred tokens)
        if x.device.type != "cpu":
            # On a GPU in fp32 too, with cuDNN's own backward. In bf16 on this channels-last token
            # layout cuDNN's weight gradient runs a per-channel engine (768 launches a step): 84% of
            # an H200 train step; in fp32 it is one implicit GEMM (README, "GPU"). ``cpu_ops:
            # reference`` keeps the step before (autocast dtype) for the side-by-side benchmark.
            if not self.tuned_cpu:
                return self.local(x)
            with torch.autocast(x.device.type, enabled=False):
                return self.local(x.float())
        with torch.autocast("cpu", enabled=False):
            if self.tuned_cpu and torch.is_grad_enabled():
                return depthwise_conv3d(x.float(), self.local)
            return self.local(x.float())


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act_layer: Callable[[], nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block with hybrid (global + local) attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        local_kernel: int,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        tuned_cpu: bool = True,
        math_attention_tokens: int = 0,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = HybridAttention(dim, num_heads, local_kernel, tuned_cpu=tuned_cpu,
                                    math_attention_tokens=math_attention_tokens)  # fmt: skip
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), grid)  # (B, T, E)
        return x + self.mlp(self.norm2(x))  # (B, T, E)


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * x A^T B^T`` with ``base`` frozen; B starts at zero, so the
    wrapped linear starts out exactly as ``base``. A and B are float32 whatever ``base`` is (the
    frozen LLM layer may be bfloat16): optimiser state stays in full precision."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.rank = rank
        self.scaling = alpha / rank
        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return self.base(x) + self.scaling * update


def apply_lora(module: nn.Module, targets: Iterable[str], rank: int, alpha: float) -> list[str]:
    """Wrap every ``nn.Linear`` child of ``module`` whose attribute name is in ``targets`` (e.g.
    ``q_proj``) with :class:`LoRALinear`, in place. Returns the qualified names wrapped."""
    targets = set(targets)
    wrapped = []
    for parent_name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(parent, child_name, LoRALinear(child, rank, alpha))
                wrapped.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return wrapped


class LLMBridge(nn.Module):
    """Tokens -> Linear(E->H) -> one frozen LLM decoder layer -> Linear(H->E), with a residual.

    The layer runs with full bidirectional attention and without rotary positions (as in Pang
    et al., ICLR 2024): ``self_attn.is_causal`` is set False (transformers' SDPA path is causal
    when no mask is given otherwise) and RoPE gets ``cos = 1, sin = 0``, which makes
    ``q * cos + rotate_half(q) * sin == q`` exactly. The layer stays in eval mode (no dropout)
    whatever ``train()`` is called with; its parameters must already be frozen.
    """

    def __init__(
        self,
        embed_dim: int,
        layer: nn.Module | None,
        hidden_size: int,
        head_dim: int,
        linear: Callable[[int, int], nn.Module] = nn.Linear,
        math_attention_tokens: int = 0,
    ):
        super().__init__()
        self.math_attention_tokens = math_attention_tokens
        self.proj_in = linear(embed_dim, hidden_size)
        self.layer = layer  # None: the projections only (the ablation's bridge_only control)
        self.proj_out = linear(hidden_size, embed_dim)
        self.head_dim = head_dim
        if self.layer is not None:
            self.layer.self_attn.is_causal = False
            self.layer.self_attn.math_attention_tokens = math_attention_tokens
            self.layer.self_attn.config._attn_implementation = _register_llm_attention()
            self.layer.eval()

    def train(self, mode: bool = True) -> LLMBridge:
        super().train(mode)
        if self.layer is not None:
            self.layer.eval()
        return self

    def run_layer(self, h: torch.Tensor) -> torch.Tensor:
        """The frozen layer on (B, T, H) hidden states, bidirectional and position-free."""
        if self.layer is None:
            return h
        layer_dtype = self.layer.input_layernorm.weight.dtype
        device_type = h.device.type
        rope_dtype = (
            torch.get_autocast_dtype(device_type)
            if torch.is_autocast_enabled(device_type)
            else layer_dtype
        )
        B, T, _ = h.shape
        cos = torch.ones(B, T, self.head_dim, device=h.device, dtype=rope_dtype)  # (B, T, hd)
        sin = torch.zeros_like(cos)  # (B, T, hd): rotation by angle 0 = identity
        out = self.layer(h.to(layer_dtype), attention_mask=None, position_embeddings=(cos, sin))
        if isinstance(out, tuple):  # older transformers return (hidden_states, ...)
            out = out[0]
        return out  # (B, T, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)  # (B, T, H)
        h = self.run_layer(h).to(x.dtype)  # (B, T, H), back from the layer's dtype
        return x + self.proj_out(h).to(x.dtype)  # (B, T, E)
