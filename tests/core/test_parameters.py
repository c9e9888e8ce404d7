"""Every parameter block rejects keys it does not know, naming them and the known ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mvl_pipeline.evaluation.scoring import EvaluateParams
from mvl_pipeline.model import MedVisionLlamaConfig
from mvl_pipeline.pipelines.fit.nodes import FitParams
from mvl_pipeline.pipelines.ingest.nodes import IngestParams
from mvl_pipeline.pipelines.register.nodes import RegisterParams
from mvl_pipeline.training.loop import LoopConfig
from mvl_pipeline.training.sampling import AugmentConfig

CONF = Path(__file__).resolve().parents[2] / "conf"


def _base(name: str) -> dict:
    return yaml.safe_load((CONF / "base" / f"parameters_{name}.yml").read_text())


def test_the_shipped_parameters_are_all_known():
    train = _base("train")
    fit = FitParams.from_params(train["fit"])
    assert fit.loop.epochs == train["fit"]["loop"]["epochs"]
    assert fit.loop.augment.scale_range == tuple(train["fit"]["loop"]["augment"]["scale_range"])
    assert EvaluateParams.from_params(train["evaluate"]).nsd_tolerance_mm == train["evaluate"]["nsd_tolerance_mm"]
    assert RegisterParams.from_params(train["register"]).margin == train["register"]["margin"]
    assert IngestParams.from_params(_base("ingest")["ingest"]).labels
    MedVisionLlamaConfig.from_params(_base("model")["model"])


@pytest.mark.parametrize(
    ("build", "where"),
    [
        (lambda bad: LoopConfig.from_params({"epochs": 2, **bad}), "fit.loop"),
        (lambda bad: AugmentConfig.from_params({"flip_prob": 0.5, **bad}), "fit.loop.augment"),
        (lambda bad: FitParams.from_params({"loop": {"epochs": 2}, **bad}), "fit parameters"),
        (lambda bad: FitParams.from_params({"scaling": {"num_workers": 1, **bad}}), "fit.scaling"),
        (lambda bad: FitParams.from_params({"loop": {"augment": bad}}), "fit.loop.augment"),
        (EvaluateParams.from_params, "evaluate parameters"),
        (lambda bad: RegisterParams.from_params({"margin": 0.0, **bad}), "register parameters"),
        (lambda bad: IngestParams.from_params({"labels": {"organ": 1}, **bad}), "ingest parameters"),
        (MedVisionLlamaConfig.from_params, "model parameters"),
    ],
)
def test_a_misspelt_key_fails_naming_it_and_where(build, where):
    # A typo used to be dropped silently by fit.loop: `epcohs: 5` trained the default epochs.
    with pytest.raises(ValueError, match=rf"unknown key\(s\) \['epcohs'\] in {where}; known keys: \["):
        build({"epcohs": 5})
