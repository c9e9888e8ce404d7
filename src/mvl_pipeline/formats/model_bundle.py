"""The on-disk model bundle: the one module that reads and writes it.

    <folder>/model.safetensors   tensors (safetensors: no pickle, no code execution on load),
                                 every tensor of the model except the frozen LLM layer's own
             config.json         {"format": "medvisionllama/1", "model": ..., "llm_reference": ...}
             plan.json           the preprocessing plan (registered bundles only)

Users: ``model.io`` (save/load a model, Ray checkpoints), the ``TorchWeightsDataset`` (the
versioned ``trained_model``, written atomically), the MLflow pyfunc and registry (bundles with
their plan), and the Ray driver (reading the best checkpoint back). Any fsspec URL works
(local, ``s3://``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import fsspec

from mvl_pipeline.core.errors import UnreadableFileError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PLAN_FILE = "plan.json"

Weights = tuple[dict[str, Any], dict[str, Any]]  # (state_dict, config)


class BundleError(UnreadableFileError):
    """A bundle folder is missing, incomplete, or holds unreadable files."""


def encode_state_dict(state_dict: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """safetensors bytes of ``state_dict`` (CPU, contiguous; tensors sharing storage copied apart,
    which is what ``load_state_dict`` needs), the same bytes for the same weights and metadata."""
    return _canonical_header(_safetensors_bytes(state_dict, metadata))


def _safetensors_bytes(state_dict: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    import torch
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if tensor.numel() and storage in seen:
            tensor = tensor.clone()
        seen.add(storage)
        tensors[name] = tensor
    return save(tensors, metadata={"format": "pt", **dict(metadata or {})})


def _canonical_header(data: bytes) -> bytes:
    """safetensors bytes with their JSON header written with sorted keys: safetensors writes its
    metadata keys in a different order from run to run, so two trainings with the same weights gave
    files that differ byte for byte (DVC saw a new model; an audit, 2026-12-04). The tensor offsets
    count from the end of the header, so a header of another length reads the same."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes with spaces
    return len(text).to_bytes(8, "little") + text + data[8 + length :]


def decode_state_dict(data: bytes, *, path: str) -> dict[str, Any]:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as exc:  # safetensors raises SafetensorError for truncated/corrupt files
        raise BundleError(f"not a readable safetensors file ({exc})", path=path) from exc


def encode_json(document: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(document), indent=2, sort_keys=True).encode("utf-8")


def decode_json(data: bytes, *, path: str) -> dict[str, Any]:
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"not JSON ({exc})", path=path) from exc
    if not isinstance(document, dict):
        raise BundleError("not a JSON object", path=path)
    return document


def _fs(
    folder: str, storage_options: Mapping[str, Any] | None, fs: fsspec.AbstractFileSystem | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path)``: ``fs`` as given (``folder`` is then a path on it), else from the URL."""
    if fs is not None:
        return fs, str(folder).rstrip("/")
    return fsspec.core.url_to_fs(str(folder), **dict(storage_options or {}))


def _read(fs: fsspec.AbstractFileSystem, root: str, name: str) -> bytes:
    try:
        return fs.cat_file(f"{root}/{name}")
    except FileNotFoundError as exc:
        raise BundleError(f"{name} missing", path=root) from exc


def write_weights(
    folder: str | Any,
    weights: Weights,
    *,
    plan: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Write the bundle's files into ``folder`` (created). Not atomic by itself: callers write
    into a temporary or versioned folder (``TorchWeightsDataset`` swaps it in atomically)."""
    state, config = weights
    fs, root = _fs(str(folder), storage_options)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/{WEIGHTS_FILE}", encode_state_dict(state, metadata))
    fs.pipe_file(f"{root}/{CONFIG_FILE}", encode_json(config))
    if plan is not None:
        fs.pipe_file(f"{root}/{PLAN_FILE}", encode_json(plan))


def read_weights(
    folder: str | Any,
    *,
    storage_options: Mapping[str, Any] | None = None,
    fs: fsspec.AbstractFileSystem | None = None,
) -> Weights:
    """``(state_dict, config)`` of a bundle folder; :class:`BundleError` naming what is wrong."""
    fs, root = _fs(str(folder), storage_options, fs)
    state = decode_state_dict(_read(fs, root, WEIGHTS_FILE), path=f"{root}/{WEIGHTS_FILE}")
    config = decode_json(_read(fs, root, CONFIG_FILE), path=f"{root}/{CONFIG_FILE}")
    return state, config


def read_bundle(folder: str | Any, *, storage_options: Mapping[str, Any] | None = None) -> tuple[Weights, dict[str, Any]]:
    """``((state_dict, config), plan)`` of a registered bundle."""
    fs, root = _fs(str(folder), storage_options)
    plan = decode_json(_read(fs, root, PLAN_FILE), path=f"{root}/{PLAN_FILE}")
    return read_weights(folder, storage_options=storage_options), plan


def weights_sha256(state_dict: Mapping[str, Any]) -> str:
    """The identity of a model's weights: sha256 of its tensors as the bundle stores them (names,
    dtypes, shapes, bytes; the config, which may carry run bookkeeping, is not part of it)."""
    import hashlib

    # safetensors' own bytes, with the one metadata key (always in the same order): the identity
    # registered models already carry
    return hashlib.sha256(_safetensors_bytes(state_dict)).hexdigest()
