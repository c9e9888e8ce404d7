"""Project pipelines: one per stage, ``train`` chains them, ``__default__`` is ``train``."""

from __future__ import annotations

from pathlib import Path

from kedro.framework.project import find_pipelines
from kedro.framework.project import pipelines as project_pipelines
from kedro.pipeline import Pipeline

#: The registered pipelines: the packages under pipelines/.
NAMES = tuple(sorted(p.name for p in (Path(__file__).parent / "pipelines").iterdir() if (p / "pipeline.py").is_file()))


def register_pipelines() -> dict[str, Pipeline]:
    # Kedro 1.7 imports only the pipelines a run asks for, each a package under pipelines/, and
    # reports a name with no package (`kedro run --pipelines trian`) as "An error occurred while
    # importing the 'mvl_pipeline.pipelines.trian' module". A KeyError instead lets `kedro run`
    # say "Failed to find the pipeline named 'trian' ... Did you mean one of these instead? train".
    requested = getattr(project_pipelines, "_requested_pipelines", None) or []
    unknown = sorted(set(requested) - set(NAMES) - {"__default__"})
    if unknown:
        raise KeyError(f"no pipeline named {', '.join(unknown)}; the pipelines are {', '.join(NAMES)}")
    pipelines = find_pipelines(raise_errors=True)
    if "train" in pipelines:
        pipelines["__default__"] = pipelines["train"]
    return pipelines
