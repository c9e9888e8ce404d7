"""``ingest``: hospital drop -> de-identified, validated cases (incremental, with quarantine)."""

from mvl_pipeline.pipelines.ingest.pipeline import create_pipeline

__all__ = ["create_pipeline"]
