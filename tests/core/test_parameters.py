"""One rule for every parameter block: built by core.config.build, unknown keys rejected with the
place and the known keys, nested blocks and tuples built from the field types, and the defaults
users read in conf/base/parameters_*.yml equal to the dataclasses' own."""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from mvl_pipeline.core.config import ConfigBlock
from mvl_pipeline.core.run_lock import RunConfig
from mvl_pipeline.evaluation.gate import RegisterConfig
from mvl_pipeline.evaluation.scoring import EvaluateConfig
from mvl_pipeline.ingestion.config import IngestConfig
from mvl_pipeline.model import MedVisionLlamaConfig
from mvl_pipeline.preprocessing.config import PreprocessConfig
from mvl_pipeline.synthetic.sample_drop import SampleDataConfig
from mvl_pipeline.training.ablation_config import AblationConfig
from mvl_pipeline.training.augmentation import AugmentConfig
from mvl_pipeline.training.config import FitConfig, LoopConfig

CONF = Path(__file__).resolve().parents[2] / "conf"
#: block -> (its file under conf/base, its dataclass)
BLOCKS = {
    "ingest": ("ingest", IngestConfig),
    "preprocess": ("preprocess", PreprocessConfig),
    "model": ("model", MedVisionLlamaConfig),
    "fit": ("fit", FitConfig),
    "evaluate": ("evaluate", EvaluateConfig),
    "register": ("register", RegisterConfig),
    "sample_data": ("sample_data", SampleDataConfig),
    "run": ("run", RunConfig),
    "ablation": ("ablation", AblationConfig),
}
#: Fields that have no place in the shipped YAML (none: faults are tested with real processes).
NOT_IN_YAML: set[str] = set()
#: Fields without a meaningful default: the YAML must give them.
REQUIRED = {"ingest.labels", "ingest.label_aliases"}  # the site's label map


def _loader(env: str):
    from kedro.config import OmegaConfigLoader

    from mvl_pipeline.settings import CONFIG_LOADER_ARGS

    args = {k: v for k, v in CONFIG_LOADER_ARGS.items() if k != "default_run_env"}
    return OmegaConfigLoader(conf_source=str(CONF), env=env, **args)


def _yaml(block: str) -> dict:
    """The block as a `kedro run` sees it under conf/base (globals resolved)."""
    return _loader("base")["parameters"][block]


def _fields(cls: type, prefix: str):
    hints = __import__("typing").get_type_hints(cls)
    for f in dataclasses.fields(cls):
        where = f"{prefix}.{f.name}"
        kind = hints[f.name]
        if isinstance(kind, type) and issubclass(kind, ConfigBlock):
            yield from _fields(kind, where)
        else:
            yield where, f


def _lookup(document: dict, dotted: str):
    value = document
    for part in dotted.split(".")[1:]:
        value = value[part]
    return value


def test_every_parameter_file_holds_exactly_the_blocks_of_one_pipeline():
    files = sorted(p.name for p in (CONF / "base").glob("parameters_*.yml"))
    assert files == sorted(f"parameters_{name}.yml" for name, _ in BLOCKS.values())
    for block, (name, _) in BLOCKS.items():
        assert list(yaml.safe_load((CONF / "base" / f"parameters_{name}.yml").read_text())) == [block]


@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_the_shipped_block_builds_and_the_dataclass_defaults_equal_the_yaml(block):
    cls = BLOCKS[block][1]
    document = _yaml(block)
    shipped = cls.from_params(document)
    required = {k.split(".", 1)[1]: document[k.split(".", 1)[1]] for k in REQUIRED if k.startswith(f"{block}.")}
    # The YAML is where users read defaults: built from nothing (but what is required), a block
    # equals the block built from the YAML. This fails on any default that disagrees.
    assert cls.from_params(required) == shipped
    for where, _ in _fields(cls, block):
        if where in NOT_IN_YAML:
            with pytest.raises(KeyError):
                _lookup(document, where)
        else:
            _lookup(document, where)  # every field is shown to users in the YAML


def test_the_cluster_overrides_are_known_keys():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MVL_DATA_ROOT", "s3://bucket/mvl")
        patch.setenv("MVL_DROP_URL", "s3://bucket/drop")
        patch.setenv("MVL_LLM_SOURCE", "meta-llama/Llama-3.1-8B")
        merged = _loader("cluster")["parameters"]
    for block, (_, cls) in BLOCKS.items():
        cls.from_params(merged[block])
    assert FitConfig.from_params(merged["fit"]).scaling.use_gpu


def test_nested_blocks_and_tuples_are_built_from_the_field_types():
    fit = FitConfig.from_params({"loop": {"betas": [0.8, 0.9], "augment": {"scale_range": [0.9, 1.1]}}})
    assert isinstance(fit.loop, LoopConfig) and fit.loop.betas == (0.8, 0.9)
    assert isinstance(fit.loop.augment, AugmentConfig) and fit.loop.augment.scale_range == (0.9, 1.1)
    assert fit.scaling.num_workers == FitConfig().scaling.num_workers  # untouched sub-block: default
    assert isinstance(FitConfig.from_params({"loop": {"lr": 1}}).loop.lr, float)
    model = MedVisionLlamaConfig.from_params({"llm": {"lora": {"rank": 4, "targets": ["proj_in"]}}})
    assert model.llm.lora.targets == ("proj_in",)
    assert MedVisionLlamaConfig.from_params(model.to_dict()) == model  # to_dict round trip
    with pytest.raises(ValueError, match="fit.loop.betas needs 2 values"):
        FitConfig.from_params({"loop": {"betas": [0.9]}})
    with pytest.raises(ValueError, match="fit.loop must be a mapping"):
        FitConfig.from_params({"loop": 3})


@pytest.mark.parametrize(
    ("build", "where"),
    [
        (lambda bad: FitConfig.from_params({"loop": {"epochs": 2, **bad}}), "fit.loop"),
        (lambda bad: FitConfig.from_params({"loop": {"augment": bad}}), "fit.loop.augment"),
        (FitConfig.from_params, "fit"),
        (lambda bad: FitConfig.from_params({"scaling": {"num_workers": 1, **bad}}), "fit.scaling"),
        (EvaluateConfig.from_params, "evaluate"),
        (lambda bad: RegisterConfig.from_params({"margin": 0.0, **bad}), "register"),
        (lambda bad: IngestConfig.from_params({"labels": {"organ": 1}, **bad}), "ingest"),
        (MedVisionLlamaConfig.from_params, "model"),
        (lambda bad: MedVisionLlamaConfig.from_params({"llm": {"lora": bad}}), "model.llm.lora"),
        (lambda bad: MedVisionLlamaConfig.from_params({"decoder": bad}), "model.decoder"),
        (PreprocessConfig.from_params, "preprocess"),
        (lambda bad: PreprocessConfig.from_params({"plan": {"interpolation": bad}}), "preprocess.plan.interpolation"),
        (lambda bad: PreprocessConfig.from_params({"split": {"ratios": bad}}), "preprocess.split.ratios"),
        (lambda bad: PreprocessConfig.from_params({"body_mask": bad}), "preprocess.body_mask"),
        (SampleDataConfig.from_params, "sample_data"),
        (AblationConfig.from_params, "ablation"),
        (lambda bad: AblationConfig.from_params({"trial": bad}), "ablation.trial"),
        (lambda bad: AblationConfig.from_params({"statistics": bad}), "ablation.statistics"),
    ],
)
def test_a_misspelt_key_fails_naming_it_and_where(build, where):
    # A typo used to be dropped silently by fit.loop: `epcohs: 5` trained the default epochs.
    with pytest.raises(ValueError, match=rf"unknown key\(s\) \['epcohs'\] in {where}; known keys: \["):
        build({"epcohs": 5})


@pytest.mark.parametrize(
    ("loop", "message"),
    [
        ({"epochs": 0}, r"fit.loop.epochs must be a whole number >= 1, got 0"),
        ({"epochs": -3}, r"fit.loop.epochs must be a whole number >= 1, got -3"),
        ({"epochs": "abc"}, r"fit.loop.epochs must be a whole number, got 'abc'"),
        ({"epochs": 2.5}, r"fit.loop.epochs must be a whole number, got 2.5"),
        ({"steps_per_epoch": 0}, r"fit.loop.steps_per_epoch must be"),
        ({"batch_size": 0}, r"fit.loop.batch_size must be"),
        ({"val_every": 0}, r"fit.loop.val_every must be"),
        ({"lr": 0}, r"fit.loop.lr must be a number > 0"),
        ({"lr": "fast"}, r"fit.loop.lr must be a number, got 'fast'"),
    ],
)
def test_a_loop_that_cannot_train_fails_when_the_block_is_built(loop, message):
    # `--params fit.loop.epochs=0` used to start Ray and build the model, then fail with
    # "training reported no checkpoint"; `=abc` failed in a Ray worker with a TypeError
    with pytest.raises(ValueError, match=message):
        FitConfig.from_params({"loop": loop})


def test_the_run_hook_checks_every_block_with_its_own_dataclass():
    # `--params` naming a block are checked before the run (run_checks.refuse_invalid_blocks): a new
    # block the hook did not know would be checked only when its stage starts
    from mvl_pipeline.run_checks import BLOCKS as CHECKED

    assert {name: ref.rpartition(":")[2] for name, ref in CHECKED.items()} == {
        name: cls.__name__ for name, (_, cls) in BLOCKS.items()}  # fmt: skip


def _plain_fields(cls, path=()):
    """(path, type) of every field of ``cls`` and its nested blocks whose type is int/float/str/bool."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if isinstance(hint, type) and issubclass(hint, ConfigBlock):
            yield from _plain_fields(hint, (*path, field.name))
        elif hint in (int, float, str, bool):
            yield (*path, field.name), hint


@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_a_value_of_the_wrong_kind_fails_naming_its_place_not_as_a_type_error_deep_in_a_check(block):
    # `--params model.depth=abc` failed as "'<' not supported between instances of 'str' and 'int'",
    # `ingest.spacing_range_mm=3` as "'int' object is not iterable": no place, and not a ValueError
    file, cls = BLOCKS[block]
    shipped = yaml.safe_load((CONF / "base" / f"parameters_{file}.yml").read_text())[block]
    wrong = {int: ("abc", 2.5, None, [1], True), float: ("fast", None, [0.1], {"a": 1}, False),
             str: (None, ["x"], {"a": 1}, True), bool: ("yes", 1, None)}  # fmt: skip
    fields = list(_plain_fields(cls))
    assert fields, block
    for path, hint in fields:
        for value in wrong[hint]:
            params = copy.deepcopy(shipped)
            node = params
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = value
            place = ".".join((block, *path))
            with pytest.raises(ValueError, match=rf"^{re.escape(place)} must be "):
                cls.from_params(params)
    # a number where a name goes is that name (`--params fit.run_name=2026`: YAML reads 2026)
    assert FitConfig.from_params({"run_name": 2026}).run_name == "2026"
    # values whose shape a block's own checks cannot handle fail as ValueError naming the block
    for params in ({"spacing_range_mm": 3}, {"labels": [1, "a"]}, {"channels": {"t1": 1}}, {"label_suffixes": 3}):
        with pytest.raises(ValueError, match=r"^ingest"):
            IngestConfig.from_params(params)
