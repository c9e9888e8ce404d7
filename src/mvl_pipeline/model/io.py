"""Save and load a trained MedVisionLlama without ever copying the frozen LLM weights.

A model is ``(state_dict, config)``, the pair ``TorchWeightsDataset`` stores:

- the state_dict holds every tensor except the frozen LLM layer's own weights (trainable
  parameters, LoRA adapters, any other frozen or buffer tensor);
- the config is ``{"format", "model": MedVisionLlamaConfig.to_dict(), "llm_reference"}``, where
  ``llm_reference`` says where the frozen layer comes from and holds the sha256 of its tensors
  (``null`` for ``llm.mode: none``).

On disk (local or any fsspec URL, e.g. s3://) that is the bundle of
:mod:`mvl_pipeline.formats.model_bundle` (``model.safetensors`` + ``config.json``).
Loading rebuilds the frozen layer from its source and refuses (:class:`LLMLayerMismatchError`)
when its sha256 differs from the recorded one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mvl_pipeline.formats.model_bundle import read_weights, write_weights

from .config import MedVisionLlamaConfig
from .llm_layer import LLMLayerMismatchError
from .network import MedVisionLlama, build_model

logger = logging.getLogger(__name__)

FORMAT = "medvisionllama/1"


def _unwrap(model: torch.nn.Module) -> MedVisionLlama:
    model = getattr(model, "module", model)  # DDP (ray.train.torch.prepare_model) wrapper
    return getattr(model, "_orig_mod", model)  # torch.compile(model) wrapper


def model_weights(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict without the frozen LLM weights, config)`` of a model, on the CPU."""
    model = _unwrap(model)
    frozen = set(model.frozen_llm_state_names())
    state = {
        name: tensor.detach().to("cpu").contiguous()
        for name, tensor in model.state_dict().items()
        if name not in frozen
    }
    reference = model.llm_reference.to_dict() if model.llm_reference is not None else None
    return state, {"format": FORMAT, "model": model.cfg.to_dict(), "llm_reference": reference}


def model_from_weights(
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    llm_cache_dir: str | Path,
    device: str | torch.device = "cpu",
    llm_source: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> MedVisionLlama:
    """Rebuild a model from ``model_weights`` output. ``llm_source`` may point at another copy
    of the same LLM (e.g. a local folder instead of the hub); the sha256 check guarantees it is
    the same layer. ``storage_options`` reach an ``s3://`` LLM source."""
    if config.get("format") != FORMAT:
        raise ValueError(
            f"not a MedVisionLlama config (format {config.get('format')!r} != {FORMAT!r})"
        )
    params = dict(config["model"])
    decoder = dict(params.get("decoder") or {})
    if "deep_supervision" not in decoder:  # saved before the key existed: trained without the heads
        decoder["deep_supervision"] = False
    if "full_res" not in decoder:  # saved before the key existed: the full-resolution convs
        decoder["full_res"] = "conv"
    params["decoder"] = decoder
    cfg = MedVisionLlamaConfig.from_params(params)
    saved = config.get("llm_reference") or {}
    if llm_source is not None:
        cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, source=llm_source))
    model = build_model(
        cfg, device=device, llm_cache_dir=llm_cache_dir, storage_options=storage_options
    )
    if model.llm_reference is not None and saved.get("sha256") != model.llm_reference.sha256:
        raise LLMLayerMismatchError(
            f"the model was trained with LLM layer sha256 {saved.get('sha256')} ({saved.get('source')} "
            f"layer {saved.get('layer_index')}), but {cfg.llm.source} layer "
            f"{model.llm_reference.layer_index} has sha256 {model.llm_reference.sha256}"
        )
    frozen = set(model.frozen_llm_state_names())
    result = model.load_state_dict(dict(state_dict), strict=False)
    missing = set(result.missing_keys) - frozen
    if missing or result.unexpected_keys:
        raise KeyError(
            f"missing tensors {sorted(missing)}, unexpected {sorted(result.unexpected_keys)}"
        )
    return model


def save_model(
    model: torch.nn.Module, directory: str | Path, *, storage_options: dict[str, Any] | None = None
) -> None:
    """Write the model's bundle (``formats.model_bundle``: weights + config with the LLM
    reference and hash) to ``directory``."""
    state, config = model_weights(model)
    reference = config["llm_reference"]
    metadata = {"llm_sha256": reference["sha256"] if reference else "none"}
    write_weights(directory, (state, config), metadata=metadata, storage_options=storage_options)
    logger.debug("saved %d tensors (no frozen LLM weights) to %s", len(state), directory)


def load_model(
    directory: str | Path,
    *,
    llm_cache_dir: str | Path,
    device: str | torch.device = "cpu",
    llm_source: str | None = None,
    storage_options: dict[str, Any] | None = None,
    llm_storage_options: dict[str, Any] | None = None,
) -> MedVisionLlama:
    """Rebuild a model saved by ``save_model`` (see ``model_from_weights`` for the checks)."""
    state, config = read_weights(directory, storage_options=storage_options)
    return model_from_weights(
        state,
        config,
        llm_cache_dir=llm_cache_dir,
        device=device,
        llm_source=llm_source,
        storage_options=llm_storage_options,
    )
