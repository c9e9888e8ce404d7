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

from collections.abc import Mapping
from copy import deepcopy
from pathlib import PurePosixPath
from typing import Any

from kedro.io.core import AbstractVersionedDataset, DatasetError, Version, get_filepath_str

from mvl_pipeline.core import storage
from mvl_pipeline.formats import model_bundle
from mvl_pipeline.formats.model_bundle import BundleError


class WeightsFileError(BundleError, DatasetError):
    """The weights folder is missing, incomplete, or holds unreadable files."""


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
        try:
            return model_bundle.read_weights(path, fs=self._fs)
        except BundleError as exc:
            raise WeightsFileError(exc.detail, path=exc.path) from exc

    def save(self, data: tuple[Mapping[str, Any], Mapping[str, Any]]) -> None:
        if not (isinstance(data, tuple | list) and len(data) == 2):
            raise DatasetError("TorchWeightsDataset saves a (state_dict, config) tuple")
        state_dict, config = data
        if not isinstance(config, Mapping):
            raise DatasetError(f"config must be a mapping, got {type(config).__name__}")
        try:
            weights = model_bundle.encode_state_dict(state_dict, self._save_args["metadata"])
        except TypeError as exc:
            raise DatasetError(str(exc)) from exc
        config_bytes = model_bundle.encode_json(config)
        path = get_filepath_str(self._get_save_path(), self._protocol)
        with storage.atomic_directory(self._fs, self._protocol, path) as folder:
            storage.write_bytes_atomic(self._fs, self._protocol, storage.join(folder, model_bundle.WEIGHTS_FILE), weights)
            storage.write_bytes_atomic(
                self._fs, self._protocol, storage.join(folder, model_bundle.CONFIG_FILE), config_bytes
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
