"""Fixtures of the model tests: tiny random Llama-family checkpoints written like real ones
(config.json + sharded safetensors + index), a tiny non-Llama (BERT) folder, an S3 server
(moto, over real HTTP: s3fs cannot use the in-process ``mock_aws``) and small model configs."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from mvl_pipeline.model import MedVisionLlamaConfig

TINY_LAYERS = 4


def tiny_hf_config(model_type: str = "llama"):
    """A 4-layer, 64-wide config of the family, with GQA (4 query heads, 2 kv heads)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[
        model_type
    ]
    return config_class(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=TINY_LAYERS,
        vocab_size=1024,  # big embedding: reading the whole first shard would be visible
        max_position_embeddings=128,
    )


def write_checkpoint(
    folder: Path, model_type: str = "llama", seed: int = 0, shards: bool = True
) -> Path:
    """Save a random causal LM of the family like a hub snapshot: 3 shards + index (embeddings
    and layers 0-1 | layer 2 | layer 3, norm and head), or one model.safetensors."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_hf_config(model_type)
    model = AutoModelForCausalLM.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if not shards:
        save_file(state, folder / "model.safetensors")
        return folder

    def shard_of(name: str) -> str:
        if "layers.3." in name or not name.startswith("model.layers.") and "embed" not in name:
            return "model-00003-of-00003.safetensors"
        if "layers.2." in name:
            return "model-00002-of-00003.safetensors"
        return "model-00001-of-00003.safetensors"

    weight_map = {name: shard_of(name) for name in state}
    for shard in sorted(set(weight_map.values())):
        save_file({k: v for k, v in state.items() if weight_map[k] == shard}, folder / shard)
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
             "weight_map": weight_map}  # fmt: skip
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny-llama") / "ckpt")


@pytest.fixture(scope="session")
def other_llama_dir(tmp_path_factory) -> Path:
    """Same architecture as tiny_llama_dir, different weights."""
    return write_checkpoint(tmp_path_factory.mktemp("other-llama") / "ckpt", seed=1)


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory) -> Callable[[str], Path]:
    made: dict[str, Path] = {}

    def make(model_type: str) -> Path:
        if model_type not in made:
            root = tmp_path_factory.mktemp(f"tiny-{model_type}") / "ckpt"
            made[model_type] = write_checkpoint(root, model_type, shards=False)
        return made[model_type]

    return make


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    from transformers import BertConfig

    folder = tmp_path_factory.mktemp("tiny-bert") / "ckpt"
    BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               vocab_size=100).save_pretrained(folder)  # fmt: skip
    return folder


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, Any]]:
    """A moto S3 server on 127.0.0.1 (random port) with bucket ``models``; yields the fsspec
    storage options that reach it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    credentials = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **credentials).create_bucket(
        Bucket="models"
    )
    yield {
        "key": "testing",
        "secret": "testing",
        "endpoint_url": endpoint,
        "client_kwargs": {"region_name": "us-east-1"},
        "skip_instance_cache": True,
    }
    server.stop()


@pytest.fixture
def make_cfg(tiny_llama_dir) -> Callable[..., MedVisionLlamaConfig]:
    """Tiny model configs (E=32, 2 blocks, patch 4x4x2 unless overridden) on the tiny Llama."""

    def make(**overrides: Any) -> MedVisionLlamaConfig:
        llm = {"source": str(tiny_llama_dir), "layer_index": -1, **overrides.pop("llm", {})}
        decoder = {
            "taps": [1],
            "channels": [16, 8],
            "stem_channels": 4,
            **overrides.pop("decoder", {}),
        }
        params = {
            "in_channels": 1,
            "num_classes": 3,
            "patch_size": [4, 4, 2],
            "embed_dim": 32,
            "depth": 2,
            "num_heads": 2,
            "pos_grid": [4, 4, 4],
            "precision": "fp32",
            "llm": llm,
            "decoder": decoder,
            **overrides,
        }
        return MedVisionLlamaConfig.from_params(params)

    return make
