"""Initialisation that is fair across model variants: every trainable tensor is drawn from a
generator of its own, seeded by ``(seed, the tensor's qualified name)``.

With the global RNG, a variant that builds one module more or fewer (the plain ViT has no
bridge; ``bridge_only`` has no layer) shifts the random stream, and every later module starts
from other weights: "same seed" would then not mean same start. Here the encoder of ``none`` and
of ``pretrained`` start bit-identical, and so do the bridge projections of ``pretrained``,
``shuffled``, ``random`` and ``bridge_only`` (tests/model/test_model_init.py). The frozen LLM
layer is left alone (it is made by its own mode, seeded by ``llm.random_seed``).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from .blocks import HybridAttention, LoRALinear, PositionalEmbedding3d

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"init|{seed}|{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") & (2**63 - 1))


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int, *, skip_prefix: str = "llm.layer.") -> None:
    """Re-initialise every trainable parameter of ``model`` from its own named generator."""
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if full.startswith(skip_prefix) and not param_name.startswith("lora_"):
                continue
            g = _generator(seed, full)
            if isinstance(module, LoRALinear):
                if param_name == "lora_a":
                    nn.init.kaiming_uniform_(param, a=math.sqrt(5), generator=g)
                else:
                    nn.init.zeros_(param)  # B = 0: the adapted linear starts as its base
            elif isinstance(module, nn.Linear):
                if param_name == "weight":
                    nn.init.trunc_normal_(param, std=0.02, a=-0.04, b=0.04, generator=g)
                else:
                    nn.init.zeros_(param)
            elif isinstance(module, nn.modules.conv._ConvNd):
                if param_name == "weight":
                    nn.init.kaiming_uniform_(param, a=math.sqrt(5), generator=g)  # PyTorch's default
                else:
                    fan_in = module.weight[0].numel() if not module.transposed else module.weight.shape[0] * module.weight[0, 0].numel()
                    bound = 1.0 / math.sqrt(fan_in) if fan_in else 0.0
                    nn.init.uniform_(param, -bound, bound, generator=g)
            elif isinstance(module, _NORMS):
                (nn.init.ones_ if param_name == "weight" else nn.init.zeros_)(param)
            elif isinstance(module, PositionalEmbedding3d):
                nn.init.trunc_normal_(param, std=0.02, a=-0.04, b=0.04, generator=g)
            elif isinstance(module, HybridAttention) and param_name == "gate_logit":
                nn.init.zeros_(param)  # sigmoid(0) = 0.5: global and local branches mixed evenly
            else:
                raise TypeError(f"no initialisation rule for {full} ({type(module).__name__})")
