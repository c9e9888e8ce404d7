"""TorchWeightsDataset: safetensors + JSON folder, local and S3, versioned, crash-safe."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from kedro.io.core import DatasetError, Version

from mvl_pipeline.core import storage
from mvl_pipeline.datasets.torch_weights import TorchWeightsDataset, WeightsFileError
from mvl_pipeline.formats.model_bundle import CONFIG_FILE, WEIGHTS_FILE, encode_state_dict


def _model_state(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3), torch.nn.BatchNorm3d(4), torch.nn.Linear(4, 2)
    )
    state = dict(model.state_dict())
    state["head.tied"] = state["2.weight"]  # tied weights share storage
    state["lm.bf16"] = torch.randn(3, 5).to(torch.bfloat16)
    config = {"in_channels": 1, "widths": [4], "name": f"unet-{seed}", "dropout": 0.1}
    return state, config


def _assert_same(loaded, expected) -> None:
    state, config = loaded
    expected_state, expected_config = expected
    assert config == expected_config
    assert sorted(state) == sorted(expected_state)
    for name, tensor in expected_state.items():
        assert state[name].dtype == tensor.dtype and state[name].shape == tensor.shape
        assert torch.equal(state[name], tensor), name


def _s3(s3_bucket, name: str, **kwargs) -> TorchWeightsDataset:
    return TorchWeightsDataset(
        filepath=f"s3://{s3_bucket['bucket']}/models/{name}",
        credentials=s3_bucket["credentials"],
        **kwargs,
    )


def test_round_trip_local_loads_into_a_model(tmp_path):
    data = _model_state()
    dataset = TorchWeightsDataset(filepath=str(tmp_path / "model"))
    assert not dataset.exists()
    dataset.save(data)
    assert dataset.exists()
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == sorted(
        [WEIGHTS_FILE, CONFIG_FILE, storage.COMPLETE_MARKER]
    )
    loaded = dataset.load()
    _assert_same(loaded, data)
    state, _ = loaded
    model = torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3), torch.nn.BatchNorm3d(4), torch.nn.Linear(4, 2)
    )
    model.load_state_dict({k: v for k, v in state.items() if k[0].isdigit()})
    assert torch.equal(model[2].weight, data[0]["2.weight"])


def test_round_trip_s3(s3_bucket):
    data = _model_state(1)
    dataset = _s3(s3_bucket, "seg")
    dataset.save(data)
    assert dataset.exists()
    _assert_same(dataset.load(), data)
    dataset.save(_model_state(2))  # overwrite in place
    _assert_same(dataset.load(), _model_state(2))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_versioned_saves_and_incomplete_versions_are_invisible(tmp_path, s3_bucket, monkeypatch, where):
    def dataset(version: Version) -> TorchWeightsDataset:
        if where == "local":
            return TorchWeightsDataset(filepath=str(tmp_path / "model"), version=version)
        return _s3(s3_bucket, "versioned", version=version)

    dataset(Version(None, "2026-01-01T00.00.00.000Z")).save(_model_state(1))
    dataset(Version(None, "2026-01-02T00.00.00.000Z")).save(_model_state(2))
    _assert_same(dataset(Version(None, None)).load(), _model_state(2))
    _assert_same(dataset(Version("2026-01-01T00.00.00.000Z", None)).load(), _model_state(1))

    real_write = storage.write_bytes_atomic

    def crash_on_config(fs, protocol, path, data):
        if path.endswith(CONFIG_FILE):
            raise OSError("killed mid-save")
        real_write(fs, protocol, path, data)

    monkeypatch.setattr(storage, "write_bytes_atomic", crash_on_config)
    with pytest.raises(DatasetError):
        dataset(Version(None, "2026-01-03T00.00.00.000Z")).save(_model_state(3))
    monkeypatch.undo()
    _assert_same(dataset(Version(None, None)).load(), _model_state(2))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_crash_mid_save_never_leaves_a_loadable_mix(tmp_path, s3_bucket, monkeypatch, where):
    dataset = (
        TorchWeightsDataset(filepath=str(tmp_path / "model")) if where == "local" else _s3(s3_bucket, "m")
    )
    dataset.save(_model_state(1))
    real_write = storage.write_bytes_atomic

    def crash_on_config(fs, protocol, path, data):
        if path.endswith(CONFIG_FILE):
            raise OSError("killed mid-save")
        real_write(fs, protocol, path, data)

    monkeypatch.setattr(storage, "write_bytes_atomic", crash_on_config)
    with pytest.raises(DatasetError):
        dataset.save(_model_state(2))
    monkeypatch.undo()
    if where == "local":  # the old folder is still in place, no temporary folder left over
        _assert_same(dataset.load(), _model_state(1))
        assert [p.name for p in tmp_path.iterdir()] == ["model"]
    else:  # a half-written folder without its _COMPLETE marker: rejected
        with pytest.raises(WeightsFileError, match="incomplete"):
            dataset.load()
        assert not dataset.exists()


def _write_folder(folder, files: dict[str, bytes]) -> None:
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content)


def _good_files() -> dict[str, bytes]:
    state, config = _model_state()
    return {
        WEIGHTS_FILE: encode_state_dict(state),
        CONFIG_FILE: json.dumps(config).encode(),
        storage.COMPLETE_MARKER: b"",
    }


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing", "no such weights folder"),
        ("empty", "incomplete"),
        ("no_marker", "incomplete"),
        ("no_config", "config.json missing"),
        ("truncated", "safetensors"),
        ("pickle", "safetensors"),
        ("bad_json", "not JSON"),
        ("json_list", "not a JSON object"),
    ],
)
def test_bad_input_raises_a_specific_error_naming_the_path(tmp_path, case, match):
    good = TorchWeightsDataset(filepath=str(tmp_path / "good"))
    good.save(_model_state(4))
    folder = tmp_path / "bad"
    files = _good_files()
    if case == "empty":
        folder.mkdir()
    elif case == "no_marker":
        _write_folder(folder, {k: v for k, v in files.items() if k != storage.COMPLETE_MARKER})
    elif case == "no_config":
        _write_folder(folder, {k: v for k, v in files.items() if k != CONFIG_FILE})
    elif case == "truncated":
        _write_folder(folder, {**files, WEIGHTS_FILE: files[WEIGHTS_FILE][:-64]})
    elif case == "pickle":  # a torch.save pickle under the safetensors name is never unpickled
        _write_folder(folder, {**files, WEIGHTS_FILE: pickle.dumps({"w": [1, 2]})})
    elif case == "bad_json":
        _write_folder(folder, {**files, CONFIG_FILE: b"{not json"})
    elif case == "json_list":
        _write_folder(folder, {**files, CONFIG_FILE: b"[1, 2]"})
    with pytest.raises(WeightsFileError, match=match) as info:
        TorchWeightsDataset(filepath=str(folder)).load()
    assert isinstance(info.value, DatasetError)
    assert str(folder) in str(info.value) and info.value.path.startswith(str(folder))
    _assert_same(good.load(), _model_state(4))


def test_save_rejects_what_is_not_a_state_dict(tmp_path):
    dataset = TorchWeightsDataset(filepath=str(tmp_path / "m"))
    with pytest.raises(DatasetError, match="tuple"):
        dataset.save({"w": torch.zeros(2)})
    with pytest.raises(DatasetError, match="not a tensor"):
        dataset.save(({"w": [1.0]}, {}))
    assert not (tmp_path / "m").exists()


def test_describe_never_shows_credentials(s3_bucket):
    credentials = {**s3_bucket["credentials"], "secret": "very-secret-value"}
    dataset = TorchWeightsDataset(filepath=f"s3://{s3_bucket['bucket']}/m", credentials=credentials)
    assert "very-secret-value" not in repr(dataset)


def test_the_same_weights_and_metadata_give_the_same_bytes_every_time():
    """An audit (2026-12-04): safetensors wrote its metadata keys in a different order from run to
    run (in separate processes), so two trainings with the same weights gave different files."""
    import subprocess
    import sys

    script = (
        "import hashlib, sys, torch\n"
        "from mvl_pipeline.formats.model_bundle import encode_state_dict, decode_state_dict\n"
        "state = {'a.weight': torch.arange(6.0).reshape(2, 3), 'b.bias': torch.ones(4, dtype=torch.bfloat16)}\n"
        "data = encode_state_dict(state, {'llm_sha256': 'f' * 64, 'model': 'x', 'z': '1'})\n"
        "back = decode_state_dict(data, path='m')\n"
        "assert all(torch.equal(back[k], state[k]) for k in state)\n"
        "print(hashlib.sha256(data).hexdigest())\n"
    )
    digests = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
               for _ in range(6)}  # fmt: skip
    assert len(digests) == 1, digests
