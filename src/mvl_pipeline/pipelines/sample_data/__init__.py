"""The ``sample_data`` pipeline: a seeded, byte-reproducible synthetic hospital drop."""

from mvl_pipeline.pipelines.sample_data.pipeline import create_pipeline

__all__ = ["create_pipeline"]
