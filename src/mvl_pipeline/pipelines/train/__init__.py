"""``train``: the user's "train a model" button, the stages in order."""

from mvl_pipeline.pipelines.train.pipeline import create_pipeline

__all__ = ["create_pipeline"]
