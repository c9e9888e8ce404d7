"""``TorchWeightsDataset``: a model's ``state_dict`` and its JSON config as one folder.

    <filepath>/model.safetensors   tensors (safetensors: no pickle, no code execution on load)
               config.json         the model config (JSON object)
               _COMPLETE           written last (see ``storage.atomic_directory``)

``load()`` returns ``(state_dict, config)`` and ``save()`` takes the same tuple. Tensors come back
on the CPU, contiguous, with their dtypes. Tensors that share storage (tied weights) are stored
once each as independent copies, which is what ``load_state_dict`` needs.

The folder is written atomically (a crash mid-save leaves the previous version, or on object
stores a folder without ``_COMPLETE`` that ``load()`` rejects). ``versioned: true`` works as for
any Kedro file dataset: ``<filepath>/<version>/<basename>/...``; versions without ``_COMPLETE``
are invisible to version resolution.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from copy import deepcopy
from pathlib import PurePosixPath
from typing import Any

from kedro.io.core import AbstractVersionedDataset, DatasetError, Version, get_filepath_str

from mvl_pipeline.core import storage
from mvl_pipeline.core.errors import UnreadableFileError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class WeightsFileError(UnreadableFileError, DatasetError):
    """The weights folder is missing, incomplete, or holds unreadable files."""

    reason = "unreadable_file"


def encode_state_dict(state_dict: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """safetensors bytes of ``state_dict`` (CPU, contiguous; shared storage copied apart)."""
    import torch
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            raise DatasetError(f"state_dict[{name!r}] is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if tensor.numel() and storage in seen:
            tensor = tensor.clone()
        seen.add(storage)
        tensors[name] = tensor
    return save(tensors, metadata={"format": "pt", **dict(metadata or {})})


def decode_state_dict(data: bytes, *, path: str) -> dict[str, Any]:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as exc:  # safetensors raises SafetensorError for truncated/corrupt files
        raise WeightsFileError(f"not a readable safetensors file ({exc})", path=path) from exc


class TorchWeightsDataset(AbstractVersionedDataset[tuple[dict[str, Any], dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]]):
    """``(state_dict, config)`` in a folder of safetensors + JSON (see module doc).

    Example catalog entry::

        trained_weights:
          type: mvl_pipeline.datasets.torch_weights.TorchWeightsDataset
          filepath: data/06_models/segmenter
          versioned: true
    """

    def __init__(  # noqa: PLR0913
        self,
        *,
        filepath: str,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
        load_args: dict[str, Any] | None = None,
        save_args: dict[str, Any] | None = None,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._fs, self._protocol, path = storage.filesystem(
            str(filepath).rstrip("/"), deepcopy(credentials), deepcopy(fs_args)
        )
        if load_args:
            raise DatasetError(f"TorchWeightsDataset takes no load_args, got {sorted(load_args)}")
        self._save_args = {"metadata": {}, **(save_args or {})}
        if set(self._save_args) - {"metadata"}:
            raise DatasetError(f"unknown save_args {sorted(set(self._save_args) - {'metadata'})}")
        self.metadata = metadata
        super().__init__(
            filepath=PurePosixPath(path),
            version=version,
            exists_function=self._complete,
            glob_function=self._fs.glob,
        )

    def _complete(self, path: str) -> bool:
        return storage.is_complete(self._fs, self._protocol, path)

    def _describe(self) -> dict[str, Any]:
        return {
            "filepath": self._filepath,
            "protocol": self._protocol,
            "save_args": self._save_args,
            "version": self._version,
        }

    def load(self) -> tuple[dict[str, Any], dict[str, Any]]:
        path = get_filepath_str(self._get_load_path(), self._protocol)
        self._fs.invalidate_cache(path)
        if not self._fs.isdir(path):
            raise WeightsFileError("no such weights folder", path=path)
        if not self._complete(path):
            raise WeightsFileError(f"incomplete weights folder (no {storage.COMPLETE_MARKER})", path=path)
        files = {}
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            try:
                files[name] = self._fs.cat_file(storage.join(path, name))
            except FileNotFoundError as exc:
                raise WeightsFileError(f"{name} missing", path=path) from exc
        state_dict = decode_state_dict(files[WEIGHTS_FILE], path=storage.join(path, WEIGHTS_FILE))
        try:
            config = json.loads(files[CONFIG_FILE].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WeightsFileError(f"{CONFIG_FILE} is not JSON ({exc})", path=path) from exc
        if not isinstance(config, dict):
            raise WeightsFileError(f"{CONFIG_FILE} is not a JSON object", path=path)
        return state_dict, config

    def save(self, data: tuple[Mapping[str, Any], Mapping[str, Any]]) -> None:
        if not (isinstance(data, tuple | list) and len(data) == 2):
            raise DatasetError("TorchWeightsDataset saves a (state_dict, config) tuple")
        state_dict, config = data
        if not isinstance(config, Mapping):
            raise DatasetError(f"config must be a mapping, got {type(config).__name__}")
        weights = encode_state_dict(state_dict, self._save_args["metadata"])
        config_bytes = json.dumps(dict(config), indent=2, sort_keys=True).encode("utf-8")
        path = get_filepath_str(self._get_save_path(), self._protocol)
        with storage.atomic_directory(self._fs, self._protocol, path) as folder:
            storage.write_bytes_atomic(self._fs, self._protocol, storage.join(folder, WEIGHTS_FILE), weights)
            storage.write_bytes_atomic(
                self._fs, self._protocol, storage.join(folder, CONFIG_FILE), config_bytes
            )
        self._invalidate_cache()

    def _exists(self) -> bool:
        try:
            path = get_filepath_str(self._get_load_path(), self._protocol)
        except DatasetError:
            return False
        return self._complete(path)

    def _release(self) -> None:
        super()._release()
        self._invalidate_cache()

    def _invalidate_cache(self) -> None:
        self._fs.invalidate_cache(get_filepath_str(self._filepath, self._protocol))
