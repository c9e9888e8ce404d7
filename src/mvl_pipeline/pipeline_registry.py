"""Project pipelines: one per stage, ``train`` chains them, ``__default__`` is ``train``."""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline


def register_pipelines() -> dict[str, Pipeline]:
    # Kedro 1.7 imports only the pipelines a run asks for; each is a package under pipelines/.
    pipelines = find_pipelines(raise_errors=True)
    if "train" in pipelines:
        pipelines["__default__"] = pipelines["train"]
    return pipelines
