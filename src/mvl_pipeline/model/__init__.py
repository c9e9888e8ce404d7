"""MedVisionLlama: the network (read top to bottom: blocks -> decoder -> config -> network),
LLM layer loading, save/load without LLM weights, optimiser and cost accounting."""

from .config import DecoderConfig, LLMConfig, LoRAConfig, MedVisionLlamaConfig
from .flops import count_parameters, flops_breakdown, flops_per_sample
from .io import load_model, model_from_weights, model_weights, save_model
from .llm_layer import (
    KNOWN_LLM_DIMS,
    SUPPORTED_MODEL_TYPES,
    LLMDims,
    LLMLayerMismatchError,
    LLMReference,
    load_llm_layer,
)
from .network import MedVisionLlama, build_model
from .optim import configure_optimizers

__all__ = [
    "KNOWN_LLM_DIMS",
    "SUPPORTED_MODEL_TYPES",
    "DecoderConfig",
    "LLMConfig",
    "LLMDims",
    "LLMLayerMismatchError",
    "LLMReference",
    "LoRAConfig",
    "MedVisionLlama",
    "MedVisionLlamaConfig",
    "build_model",
    "configure_optimizers",
    "count_parameters",
    "flops_breakdown",
    "flops_per_sample",
    "load_llm_layer",
    "load_model",
    "model_from_weights",
    "model_weights",
    "save_model",
]
