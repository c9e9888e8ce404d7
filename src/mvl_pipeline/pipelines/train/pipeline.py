"""``train`` = ingest -> preprocess -> fit -> evaluate -> register.

A package of its own (not only a sum in the registry) because Kedro 1.7 loads just the
pipelines named on the command line: ``kedro run --pipelines train`` imports this module.
"""

from kedro.pipeline import Pipeline

from mvl_pipeline.pipelines import evaluate, fit, ingest, preprocess, register

STAGES = (ingest, preprocess, fit, evaluate, register)


def create_pipeline(**kwargs) -> Pipeline:
    return sum((stage.create_pipeline() for stage in STAGES), start=Pipeline([]))
