"""The run's parameters, checked before its first node (``hooks.RunLockHook``): a name the
project does not have (``--params epochs=1``), and each parameter block the run's ``--params``
name or its pipeline reads, built by the block's own dataclass (a typo in ``fit.loop`` or in
``conf/local/parameters.yml`` is refused before ingest runs, not when the fit starts)."""

from __future__ import annotations

import copy
import difflib
import importlib
from collections.abc import Iterable
from typing import Any

from kedro.config import MissingConfigException


def _paths(tree: Any, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict):
        return [prefix]
    return [p for key, value in tree.items() for p in _paths(value, f"{prefix}{key}.")]


def file_parameters(loader: Any) -> dict[str, Any]:
    """The parameters the project's files define: the run's loader merges ``--params`` into its
    ``parameters``, so a copy of it without them is read ({} where there are none to read)."""
    if getattr(loader, "runtime_params", None):
        loader = copy.copy(loader)  # its own attributes: the run's loader keeps its runtime_params
        loader.runtime_params = {}
    return run_parameters(loader)


def run_parameters(loader: Any) -> dict[str, Any]:
    """The run's parameters: the project's files with ``--params`` merged in."""
    try:
        return dict(loader["parameters"])
    except (KeyError, MissingConfigException):
        return {}


def refuse_unknown_parameters(runtime: dict[str, Any], parameters: dict[str, Any]) -> None:
    """``--params epochs=1`` set a parameter nothing reads, and the run went on with its defaults:
    a top-level name the project's parameters do not have is refused, with the paths it may have
    meant (nested names: ``refuse_invalid_blocks``)."""
    unknown = sorted(set(runtime) - set(parameters))
    if not unknown or not parameters:
        return
    paths = [p.rstrip(".") for p in _paths(parameters)]
    hints = []
    for name in unknown:
        meant = [p for p in paths if p.rsplit(".", 1)[-1] == name] or difflib.get_close_matches(name, list(parameters), n=3)
        hints.append(f"{name}" + (f" (did you mean {', '.join(meant[:4])}?)" if meant else ""))
    raise ValueError(f"--params: no parameter named {'; '.join(hints)}. The parameters are {', '.join(sorted(parameters))}; "
                     "a nested one is named with dots (fit.loop.epochs=2)")  # fmt: skip


#: Each parameter block and the dataclass that builds it ("module:Class"), imported only when a
#: run's --params name the block or its pipeline reads it (training's and the model's modules import torch).
BLOCKS = {
    "ingest": "mvl_pipeline.ingestion.config:IngestConfig",
    "preprocess": "mvl_pipeline.preprocessing.config:PreprocessConfig",
    "model": "mvl_pipeline.model.config:MedVisionLlamaConfig",
    "fit": "mvl_pipeline.training.config:FitConfig",
    "evaluate": "mvl_pipeline.evaluation.scoring:EvaluateConfig",
    "register": "mvl_pipeline.evaluation.gate:RegisterConfig",
    "ablation": "mvl_pipeline.training.ablation_config:AblationConfig",
    "sample_data": "mvl_pipeline.synthetic.sample_drop:SampleDataConfig",
    "run": "mvl_pipeline.core.run_lock:RunConfig",
}


def blocks_read(pipeline: Any) -> set[str]:
    """The parameter blocks ``pipeline``'s nodes read whole (``params:fit``; not ``params:fit.llm_cache_dir``)."""
    names = pipeline.inputs() if pipeline is not None else ()
    return {name[len("params:") :] for name in names if name.startswith("params:") and name[len("params:") :] in BLOCKS}


def refuse_invalid_blocks(runtime: dict[str, Any], parameters: dict[str, Any], read: Iterable[str] = ()) -> None:
    """``--params fit.loop.lrr=0.1`` (a nested typo) or ``fit.loop.epochs=0`` was refused only when
    its stage started, after ingest and preprocessing had run, or never by a pipeline without
    that stage; so was the same typo in a parameters file (conf/local). Each block the --params
    name, and each block the run's pipeline reads (``read``), is built here before the run from the
    run's parameters (files and --params merged), and its own error is raised."""
    for name in sorted((set(runtime) | set(read)) & set(BLOCKS)):
        module, _, cls = BLOCKS[name].partition(":")
        block = getattr(importlib.import_module(module), cls)
        where = "--params" if name in runtime else "parameters"
        try:
            built = block.from_params(parameters.get(name))
            if name == "ablation":  # each arm's changes to the model block (ablation.arm_models)
                from mvl_pipeline.training.tune_driver import check_arm_models

                check_arm_models(parameters.get("model") or {}, built)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}: {exc}") from exc
