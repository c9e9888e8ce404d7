"""Project pipelines: one per stage, ``train`` chains them, ``__default__`` is ``train``."""

from __future__ import annotations

import logging

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

logger = logging.getLogger(__name__)

#: The stages of ``train`` in order (each is also its own pipeline and DVC stage).
TRAIN_STAGES = ("ingest", "preprocess", "fit", "evaluate", "register")


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = find_pipelines(raise_errors=True)
    missing = [stage for stage in TRAIN_STAGES if stage not in pipelines]
    if missing:
        logger.warning("not built yet, left out of 'train': %s", ", ".join(missing))
    stages = [pipelines[stage] for stage in TRAIN_STAGES if stage in pipelines]
    pipelines["train"] = sum(stages, start=Pipeline([]))
    pipelines["__default__"] = pipelines["train"]
    return pipelines
