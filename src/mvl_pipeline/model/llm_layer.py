"""Build ONE frozen decoder layer of a pre-trained causal LM (Llama family) for the bridge.

The tensors come from :mod:`mvl_pipeline.model.llm_sources` (mode ``pretrained``) or a seeded
initialisation (mode ``random``); the layer is frozen, in eval mode and bidirectional. Its
identity is a sha256 over its tensors as stored in the source (names, dtypes, shapes, bytes), so
it does not depend on the device or dtype the layer later runs in: a saved model records it and
refuses to load against another layer (:class:`LLMLayerMismatchError`).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import SMOLLM2_OFFLINE
from .llm_sources import (
    SUPPORTED_MODEL_TYPES,
    read_hf_config,
    read_layer_tensors,
    resolve_layer_index,
    resolve_source,
)

logger = logging.getLogger(__name__)

class LLMLayerMismatchError(RuntimeError):
    """A saved model was trained with a different frozen LLM layer than the one loaded now."""


@dataclass(frozen=True)
class LLMDims:
    """The sizes of one decoder layer that the FLOP count needs."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_hf_config(cls, config: Any) -> LLMDims:
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        return cls(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
        )


# Layer sizes of the two documented defaults (from their config.json), so that FLOPs can be
# counted without loading anything; tests check the SmolLM2 entry against the real file.
KNOWN_LLM_DIMS: dict[str, LLMDims] = {
    SMOLLM2_OFFLINE: LLMDims(576, 1536, 9, 3, 64),
    "meta-llama/Llama-3.1-8B": LLMDims(4096, 14336, 32, 8, 128),
}


@dataclass(frozen=True)
class LLMReference:
    """What a saved model records about its frozen layer (never the weights themselves)."""

    mode: str  # one of LAYER_MODES
    source: str
    layer_index: int  # resolved, >= 0
    model_type: str
    num_hidden_layers: int
    hidden_size: int
    sha256: str
    random_seed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedLLMLayer:
    layer: nn.Module | None  # None for bridge_only
    config: Any  # the transformers PretrainedConfig of the source model
    dims: LLMDims
    reference: LLMReference


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """Deterministic sha256 over (name, dtype, shape, bytes) of each tensor, sorted by name."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------
# Building the frozen layer
# ------------------------------------------------------------------------------------------------
def decoder_layer_class(model_type: str) -> type[nn.Module]:
    module_name, class_name = SUPPORTED_MODEL_TYPES[model_type]
    return getattr(importlib.import_module(module_name), class_name)


#: How the frozen layer's tensors are made, per ``llm.mode`` (the ablation's arms): the
#: pre-trained tensors; the same tensors with their elements permuted within each tensor (same
#: statistics, no learnt structure); fresh draws matched to each pre-trained tensor's mean and
#: standard deviation (norm gains too); or no layer at all between the two trainable projections.
LAYER_MODES = ("pretrained", "shuffled", "random", "bridge_only")


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}|{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") & (2**63 - 1))


def shuffled_tensors(tensors: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Each tensor's elements permuted (seeded per tensor name): identical statistics and value
    histogram, none of the learnt arrangement."""
    out = {}
    for name, tensor in sorted(tensors.items()):
        flat = tensor.reshape(-1)
        order = torch.randperm(flat.numel(), generator=_generator(seed, name))
        out[name] = flat[order].reshape(tensor.shape).clone()
    return out


def matched_random_tensors(tensors: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Fresh normal draws with each tensor's own mean and standard deviation (seeded per tensor
    name), in its dtype: the pre-trained layer's per-tensor statistics, nothing else of it. Each
    draw is standardised before it is scaled, so the statistics match exactly, not only in
    expectation (an audit, 2026-12-05, found an RMSNorm gain vector's SD 7.9% off)."""
    out = {}
    for name, tensor in sorted(tensors.items()):
        values = tensor.double()
        mean, std = values.mean(), values.std() if values.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
        draw = torch.randn(tensor.shape, generator=_generator(seed, name), dtype=torch.float64)
        if draw.numel() > 1:
            draw = (draw - draw.mean()) / draw.std()
        out[name] = (draw * std + mean).to(tensor.dtype)
    return out


def load_llm_layer(
    source: str,
    layer_index: int,
    *,
    cache_dir: str | Path,
    mode: str = "pretrained",
    random_seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    storage_options: Mapping[str, Any] | None = None,
) -> LoadedLLMLayer:
    """One decoder layer of ``source`` made per ``mode`` (:data:`LAYER_MODES`), frozen:
    ``requires_grad=False``, eval mode, bidirectional attention. ``bridge_only`` loads no layer
    (only its sizes: the bridge's projections keep the same shapes and parameter count)."""
    if mode not in LAYER_MODES:
        raise ValueError(f"mode must be one of {list(LAYER_MODES)}; got {mode!r}")
    cache_dir = Path(cache_dir)
    files = resolve_source(source, cache_dir, storage_options)
    config = read_hf_config(files)
    index = resolve_layer_index(layer_index, config.num_hidden_layers)
    if mode == "bridge_only":
        reference = LLMReference(
            mode=mode, source=source, layer_index=index, model_type=config.model_type,
            num_hidden_layers=config.num_hidden_layers, hidden_size=config.hidden_size, sha256="none",
        )  # fmt: skip
        return LoadedLLMLayer(layer=None, config=config, dims=LLMDims.from_hf_config(config), reference=reference)
    with torch.device("meta"):
        layer = decoder_layer_class(config.model_type)(config, layer_idx=index)
    tensors = read_layer_tensors(files, index)
    if mode == "shuffled":
        tensors = shuffled_tensors(tensors, random_seed)
    elif mode == "random":
        tensors = matched_random_tensors(tensors, random_seed)
    expected = set(layer.state_dict())
    if set(tensors) != expected:
        raise KeyError(
            f"{files.description} layer {index}: missing {sorted(expected - set(tensors))}, "
            f"unexpected {sorted(set(tensors) - expected)}"
        )
    sha256 = tensors_sha256(tensors)
    layer.load_state_dict(tensors, assign=True, strict=True)
    layer.to(device=device, dtype=dtype)
    layer.requires_grad_(False)
    layer.eval()
    layer.self_attn.is_causal = False
    reference = LLMReference(
        mode=mode,
        source=source,
        layer_index=index,
        model_type=config.model_type,
        num_hidden_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        sha256=sha256,
        random_seed=random_seed if mode in ("shuffled", "random") else None,
    )
    logger.info(
        "LLM layer %d/%d of %s (%s, %s) loaded frozen in %s, sha256 %s",
        index, config.num_hidden_layers, files.description, config.model_type, mode, dtype, sha256[:12],
    )  # fmt: skip
    return LoadedLLMLayer(
        layer=layer, config=config, dims=LLMDims.from_hf_config(config), reference=reference
    )
