"""MedVisionLlama: a 3D ViT segmenter with one frozen LLM decoder layer in its encoder.

    x (B, C_in, X, Y, Z)
      -> patch embedding + positional embedding            tokens (B, T, E)
      -> L hybrid-attention encoder blocks, with the frozen LLM bridge after block
         ``llm.position`` (default: after the last one); token maps tapped at ``decoder.taps``
      -> multi-scale fusion decoder + the image folded to its finest level, unfolded by one
         GEMM                                               logits (B, num_classes, X, Y, Z)
         (``decoder.full_res: conv``: a full-resolution conv stem and fusion, features
         (B, c_stem, X, Y, Z), then a 1x1x1 classifier)

``llm.mode`` picks the method (``pretrained``), the random-init frozen control (``random``) or
the plain ViT baseline (``none``) from this one class; ``build_model`` loads and freezes the layer.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import (
    EncoderBlock,
    LLMBridge,
    LoRALinear,
    PatchEmbed3d,
    PositionalEmbedding3d,
    apply_lora,
    tokens_to_grid,
)
from .config import LORA_LAYER_TARGETS, LORA_PROJECTION_TARGETS, MedVisionLlamaConfig
from .decoder import FusionDecoder, PointwiseConv3d, default_conv_act, default_conv_norm
from .init import init_parameters
from .llm_layer import LLMDims, LLMReference, LoadedLLMLayer, load_llm_layer
from .norms import channels_last_norms

logger = logging.getLogger(__name__)

FROZEN_LLM_PREFIX = "llm.layer."


class MedVisionLlama(nn.Module):
    def __init__(
        self,
        cfg: MedVisionLlamaConfig,
        llm: LoadedLLMLayer | None = None,
        *,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        conv_norm_layer: Callable[[int], nn.Module] = default_conv_norm,
        conv_act_layer: Callable[[], nn.Module] = default_conv_act,
    ):
        super().__init__()
        if (cfg.llm.mode == "none") != (llm is None):
            raise ValueError(f"llm.mode {cfg.llm.mode!r} and the LLM layer given disagree")
        self.cfg = cfg
        E = cfg.embed_dim
        matmul = cfg.patch_ops == "matmul"
        self.patch_embed = PatchEmbed3d(cfg.in_channels, E, cfg.patch_size, matmul=matmul)
        if cfg.pos_grid is None:
            raise ValueError("model.pos_grid is unknown: it is the plan's token grid (MedVisionLlamaConfig.for_plan)")
        self.pos_embed = PositionalEmbedding3d(E, cfg.pos_grid)
        tuned = cfg.cpu_ops == "tuned"
        math_tokens = cfg.cpu_math_attention_tokens if tuned else 0
        self.blocks = nn.ModuleList(
            EncoderBlock(E, cfg.num_heads, cfg.mlp_ratio, cfg.local_kernel, norm_layer, act_layer, tuned, math_tokens)
            for _ in range(cfg.depth)
        )
        self.llm = (
            LLMBridge(E, llm.layer, llm.dims.hidden_size, llm.dims.head_dim, math_attention_tokens=math_tokens)
            if llm is not None
            else None
        )
        self.llm_reference: LLMReference | None = llm.reference if llm is not None else None
        self.llm_dims: LLMDims | None = llm.dims if llm is not None else None
        self.norm = norm_layer(E)
        self.decoder = FusionDecoder(
            E,
            cfg.in_channels,
            cfg.decoder.channels,
            cfg.decoder.stem_channels,
            cfg.stage_factors,
            len(cfg.decoder.taps),
            conv_norm_layer,
            conv_act_layer,
            matmul=matmul,
            num_classes=cfg.num_classes,
            deep_supervision=cfg.decoder.deep_supervision,
            full_res=cfg.decoder.full_res,
        )
        if tuned:  # its InstanceNorms normalise channels-last maps in place (same maths, same state dict)
            channels_last_norms(self.decoder)
        # with decoder.full_res space_to_depth the decoder's unfolding GEMM already yields logits
        self.classifier = (PointwiseConv3d(cfg.decoder.stem_channels, cfg.num_classes)
                           if cfg.decoder.full_res == "conv" else nn.Identity())  # fmt: skip
        for name, module in self.named_modules():
            if not name.startswith(FROZEN_LLM_PREFIX.rstrip(".")):
                self._init_weights(module)
        if self.llm is not None and cfg.llm.lora.enabled:
            self._add_lora()
        if self.llm is not None and self.llm.layer is None:
            inside = [t for t in cfg.llm.lora.targets if t in LORA_LAYER_TARGETS] if cfg.llm.lora.enabled else []
            if inside:
                raise ValueError(f"llm.mode bridge_only has no layer for LoRA targets {inside}")
        self._taps_deepest_first = sorted(cfg.decoder.taps, reverse=True)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def _add_lora(self) -> None:
        lora = self.cfg.llm.lora
        inside = [t for t in lora.targets if t in LORA_LAYER_TARGETS]
        wrapped = apply_lora(self.llm.layer, inside, lora.rank, lora.alpha) if self.llm.layer is not None else []
        for target in (t for t in lora.targets if t in LORA_PROJECTION_TARGETS):
            setattr(self.llm, target, LoRALinear(getattr(self.llm, target), lora.rank, lora.alpha))
            wrapped.append(target)
        logger.info("LoRA rank %d on %s", lora.rank, wrapped)

    # -- forward ---------------------------------------------------------------------------------
    def _autocast(self, x: torch.Tensor) -> contextlib.AbstractContextManager:
        enabled = self.cfg.precision == "bf16-mixed"
        return torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=enabled)

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(
                f"expected input (B, {self.cfg.in_channels}, X, Y, Z); got {tuple(x.shape)}"
            )
        spatial = tuple(x.shape[2:])
        if any(s % p for s, p in zip(spatial, self.cfg.patch_size, strict=True)):
            raise ValueError(
                f"input spatial shape {spatial} is not divisible by patch_size {self.cfg.patch_size}"
            )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encoder only: the bottleneck map and the tapped maps (deepest first), each a grid
        (B, E, X/px, Y/py, Z/pz)."""
        self.check_input(x)
        tokens, grid = self.patch_embed(x)  # (B, T, E)
        tokens = tokens + self.pos_embed(grid)  # (B, T, E)
        position = self.cfg.llm_position
        if self.llm is not None and position == 0:
            tokens = self.llm(tokens)
        tapped = {}
        for depth, block in enumerate(self.blocks, start=1):
            if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, grid, use_reentrant=False)
            else:
                tokens = block(tokens, grid)  # (B, T, E)
            if self.llm is not None and depth == position:
                tokens = self.llm(tokens)  # (B, T, E)
            if depth in self.cfg.decoder.taps:
                tapped[depth] = tokens
        tokens = self.norm(tokens)  # (B, T, E)
        taps = [tokens_to_grid(tapped[d], grid) for d in self._taps_deepest_first]
        return tokens_to_grid(tokens, grid), taps

    def features(self, x: torch.Tensor, aux: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Full-resolution fused features (B, decoder.out_channels, X, Y, Z); with ``aux``, also the
        deep-supervision logits of the coarser levels, finest first."""
        with self._autocast(x):
            bottleneck, taps = self.encode(x)
            return self.decoder(x, bottleneck, taps, aux=aux)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes, X, Y, Z), float32, contiguous."""
        with self._autocast(features):
            features = features.contiguous(memory_format=torch.channels_last_3d)  # oneDNN-friendly
            return self.classifier(features).float().contiguous()

    @property
    def deep_supervision(self) -> int:
        """How many coarser decoder levels have a training head (all with
        ``model.decoder.deep_supervision``, else none)."""
        return len(self.decoder.aux_heads)

    def forward(self, x: torch.Tensor, aux: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits (B, num_classes, X, Y, Z); with ``aux`` (training with deep supervision), also
        the coarser levels' logits, finest first (float32). Through ``forward`` so that a
        DistributedDataParallel wrapper sees the call."""
        if not aux:
            return self.head(self.features(x))
        features, coarse = self.features(x, aux=True)
        return self.head(features), [c.float() for c in coarse]

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over classes, or sigmoid for a single binary channel."""
        return torch.sigmoid(logits) if self.cfg.num_classes == 1 else torch.softmax(logits, dim=1)

    # -- bookkeeping -----------------------------------------------------------------------------
    def frozen_llm_state_names(self) -> Iterator[str]:
        """state_dict keys of the frozen LLM layer's own weights (reloadable from the source,
        hence never saved); LoRA adapters inside the layer are not among them."""
        for name in self.state_dict():
            if name.startswith(FROZEN_LLM_PREFIX) and ".lora_" not in name:
                yield name


def llm_dtype(cfg: MedVisionLlamaConfig, device: torch.device) -> torch.dtype:
    """bf16 on GPU; on CPU the configured dtype, ``auto`` = the model's compute dtype (bf16 under
    bf16-mixed: the frozen weights are then never cast again on a step)."""
    if device.type == "cuda":
        return torch.bfloat16
    if cfg.llm.cpu_dtype == "auto":
        return torch.bfloat16 if cfg.precision == "bf16-mixed" else torch.float32
    return getattr(torch, cfg.llm.cpu_dtype)


def build_model(
    cfg: MedVisionLlamaConfig,
    *,
    device: str | torch.device = "cpu",
    llm_cache_dir: str | Path,
    storage_options: dict[str, Any] | None = None,
    seed: int = 0,
) -> MedVisionLlama:
    """The model of ``cfg`` on ``device``, its LLM layer loaded per ``cfg.llm.mode`` and frozen.

    ``llm_cache_dir`` holds converted GGUF checkpoints and hub downloads; ``storage_options``
    go to fsspec for an ``s3://`` source (endpoint, credentials from conf/local). ``seed`` fixes
    the initial weights, tensor by tensor (``model/init.py``: the same for every variant).
    """
    device = torch.device(device)
    if cfg.preset == "cnn":
        from .cnn import CNNSegmenter

        torch.manual_seed(seed)  # MONAI's own initialisation, seeded
        model: nn.Module = CNNSegmenter(cfg).to(device)
        if cfg.compile:
            compile_in_place(model, device, cfg.compile_mode)
        return model
    llm = None
    if cfg.llm.mode != "none":
        llm = load_llm_layer(
            cfg.llm.source,
            cfg.llm.layer_index,
            cache_dir=llm_cache_dir,
            mode=cfg.llm.mode,
            random_seed=cfg.llm.random_seed,
            dtype=llm_dtype(cfg, device),
            device=device,
            storage_options=storage_options,
        )
    model = MedVisionLlama(cfg, llm)
    init_parameters(model, seed)
    model = model.to(device)
    if cfg.compile:
        compile_in_place(model, device, cfg.compile_mode)
    return model


def c_compiler() -> str | None:
    """The C++ compiler TorchInductor would use on CPU ($CXX, else g++ / c++ / clang++), or None."""
    import os
    import shutil

    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and (found := shutil.which(name)):
            return found
    return None


def compile_in_place(model: nn.Module, device: torch.device, mode: str = "default") -> bool:
    """``model.compile(mode=mode)`` (``model.compile: true``, ``model.compile_mode``) where it
    can work; False, with a warning and the eager model unchanged, where it cannot: TorchInductor
    generates C++ for CPU and fails at the first step (minutes into a run) without a compiler."""
    if device.type == "cpu" and c_compiler() is None:
        logger.warning(
            "model.compile: true, but no C++ compiler ($CXX, g++, c++, clang++) is on PATH: "
            "running the model uncompiled (install one, e.g. Debian's g++, to compile)"
        )
        return False
    model.compile(mode=mode)
    return True
