"""The ``preprocess`` pipeline: fingerprint -> plan -> resample / orient / normalise / crop -> split."""

from mvl_pipeline.pipelines.preprocess.pipeline import create_pipeline

__all__ = ["create_pipeline"]
