"""``register``: MLflow registry with a champion/challenger gate on the fixed holdout."""

from mvl_pipeline.pipelines.register.pipeline import create_pipeline

__all__ = ["create_pipeline"]
