"""`--env cluster`: the configuration a hospital's cluster runs, tested short of the cluster.

The pod's environment (ConfigMap + Secret of k8s/) is simulated; S3 is a moto server. The hosted
model (meta-llama/Llama-3.1-8B) and the MLflow server are not reached: their configuration is.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml
from kedro.config import OmegaConfigLoader
from kedro.io import DataCatalog, DatasetError

from mvl_pipeline.model import KNOWN_LLM_DIMS, MedVisionLlamaConfig, flops_per_sample
from mvl_pipeline.settings import CONFIG_LOADER_ARGS
from mvl_pipeline.training.ablation_config import AblationConfig
from mvl_pipeline.training.config import FitConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cluster_env(monkeypatch, s3_bucket):
    bucket = s3_bucket["bucket"]
    env = {
        "MVL_DATA_ROOT": f"s3://{bucket}/mvl",
        "MVL_DROP_URL": f"s3://{bucket}/drop",
        "MLFLOW_TRACKING_URI": "http://mlflow.mlflow.svc.cluster.local:5000",
        "MVL_LLM_SOURCE": "meta-llama/Llama-3.1-8B",
        "MVL_PSEUDONYM_KEY": hashlib.sha256(b"cluster-test").hexdigest(),
        "AWS_ENDPOINT_URL": s3_bucket["endpoint_url"],
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def cluster_config() -> OmegaConfigLoader:
    args = {k: v for k, v in CONFIG_LOADER_ARGS.items() if k != "default_run_env"}
    return OmegaConfigLoader(conf_source=str(ROOT / "conf"), env="cluster", **args)


def cluster_catalog() -> DataCatalog:
    """The catalog as `kedro run --env cluster` builds it: conf/cluster holds no credentials file
    (the pod's environment has them), which Kedro reads as no credentials."""
    from kedro.config import MissingConfigException

    config = cluster_config()
    try:
        credentials = config["credentials"]
    except MissingConfigException:
        credentials = {}
    return DataCatalog.from_config(config["catalog"], credentials=credentials)


def test_cluster_parameters_are_the_papers_setup_on_gpu_workers(cluster_env):
    params = cluster_config()["parameters"]
    model = MedVisionLlamaConfig.from_params(params["model"] | {"num_classes": 3})
    assert (model.llm.source, model.llm.layer_index, model.llm.mode) == ("meta-llama/Llama-3.1-8B", 31, "pretrained")
    assert "meta-llama/Llama-3.1-8B" in KNOWN_LLM_DIMS  # FLOPs can be planned without the download
    assert flops_per_sample(model, (128, 128, 64)) > 0
    fit = FitConfig.from_params(params["fit"])
    assert fit.scaling.use_gpu and fit.scaling.num_workers >= 2 and fit.scaling.gpus_per_worker == 1
    assert fit.storage_path.startswith(cluster_env["MVL_DATA_ROOT"])
    # scheduled retraining starts from the champion, for the share of epochs measured (bench_retrain)
    base = FitConfig.from_params(yaml.safe_load((ROOT / "conf/base/parameters_fit.yml").read_text(encoding="utf-8"))["fit"])
    assert fit.init == "champion" and base.init == "scratch"
    assert fit.champion_epochs / fit.loop.epochs == base.champion_epochs / base.loop.epochs
    # soft merge: cluster overrides keys, base keeps the rest (e.g. the label map)
    assert params["ingest"]["labels"] == {"organ": 1, "lesion": 2}
    assert params["model"]["mlp_ratio"] == 4.0  # a base value the cluster does not override
    # the ablation's longer GPU trials keep fit.loop's peak learning rate: the base 0.004 was chosen
    # for 980-step trials on 2 cores (conf/base/parameters_ablation.yml), not measured at this budget
    trial = AblationConfig.from_params(params["ablation"]).trial
    assert trial.epochs * trial.steps_per_epoch == 50_000 and trial.lr == fit.loop.lr == base.loop.lr == 0.002


def test_cluster_mlflow_and_credentials_come_from_the_environment(cluster_env):
    config = cluster_config()
    assert config["mlflow"]["server"]["mlflow_tracking_uri"] == cluster_env["MLFLOW_TRACKING_URI"]
    catalog = cluster_catalog()
    assert catalog.load("pseudonymisation_key") == bytes.fromhex(cluster_env["MVL_PSEUDONYM_KEY"])
    # only the environment: a conf/local key file on the machine is not read under --env cluster
    assert catalog.get("pseudonymisation_key")._describe()["filepath"] is None
    assert not any(cluster_env["MVL_PSEUDONYM_KEY"] in p.read_text() for p in (ROOT / "conf").rglob("*.yml"))


def test_without_the_key_variable_the_cluster_run_says_where_to_put_it(cluster_env, monkeypatch):
    monkeypatch.delenv("MVL_PSEUDONYM_KEY")
    catalog = cluster_catalog()
    with pytest.raises(DatasetError, match="MVL_PSEUDONYM_KEY"):
        catalog.load("pseudonymisation_key")


def test_every_data_layer_of_train_lives_on_s3(cluster_env):
    catalog = cluster_catalog()
    described = {name: str(catalog.get(name)._describe()) for name in catalog.keys() if not name.startswith("params:")}
    on_s3 = {name for name, text in described.items() if cluster_env["MVL_DATA_ROOT"].split("://")[1] in text}
    for name in ("ingested_cases", "ingest_manifest", "model_input_cases", "data_split", "preprocessing_plan",
                 "trained_model", "evaluation_summary", "fit_history"):
        assert name in on_s3, (name, described.get(name))  # fmt: skip
    assert cluster_env["MVL_DROP_URL"].split("://")[1] in described["hospital_drop"]


def test_ingest_runs_with_the_cluster_catalog_against_s3(cluster_env, tmp_path):
    """The cluster catalog, as is, reads a drop from S3 and writes the cases to S3 (credentials
    and endpoint from the environment, as in the pod)."""
    import s3fs
    from kedro.runner import SequentialRunner

    from mvl_pipeline.datasets.drop import DropFolderDataset
    from mvl_pipeline.pipelines.ingest import create_pipeline
    from mvl_pipeline.pipelines.sample_data.nodes import generate_sample_drop

    sample = cluster_config()["parameters"]["sample_data"] | {
        "n_patients": 2, "followup_fraction": 0.0, "image_size": 32, "n_slices": [10, 12], "slice_spacing_mm": 10.0,
        "thin_slice_studies": 0, "non_axial_studies": 0,
    }  # fmt: skip
    DropFolderDataset(filepath=cluster_env["MVL_DROP_URL"]).save(generate_sample_drop(sample))
    config = cluster_config()
    catalog = cluster_catalog()
    catalog["params:ingest"] = config["parameters"]["ingest"] | {"workers": 1, "progress": False}
    SequentialRunner().run(create_pipeline(), catalog)
    cases = catalog.load("ingested_cases")
    assert len(cases) == 2
    fs = s3fs.S3FileSystem()
    root = cluster_env["MVL_DATA_ROOT"].split("://")[1]
    assert fs.exists(f"{root}/02_intermediate/ingest_manifest.json")
    assert all(fs.exists(f"{root}/02_intermediate/cases/{case_id}/_COMPLETE") for case_id in cases)


def test_a_missing_data_root_stops_naming_the_variable_and_a_trailing_slash_is_dropped(cluster_env, monkeypatch):
    """An audit (2026-12-04): without MVL_DATA_ROOT the run wrote to the example bucket
    s3://hospital-imaging/mvl, and s3://b/mvl/ put every layer under "mvl//" (another key on S3)."""
    monkeypatch.setenv("MVL_DATA_ROOT", cluster_env["MVL_DATA_ROOT"] + "/")
    monkeypatch.setenv("MVL_DROP_URL", cluster_env["MVL_DROP_URL"] + "//")
    config = cluster_config()
    assert config["globals"]["data_root"] == cluster_env["MVL_DATA_ROOT"]
    assert config["globals"]["drop_url"] == cluster_env["MVL_DROP_URL"]
    assert "//02_intermediate" not in str(config["catalog"])
    for variable in ("MVL_DATA_ROOT", "MVL_DROP_URL"):
        with monkeypatch.context() as patch:
            patch.delenv(variable)
            with pytest.raises(Exception, match=f"Environment variable '{variable}' not found"):
                cluster_config()["catalog"]
