"""``fit``: Ray Train distributed training of MedVisionLlama on the model-input cases."""

from mvl_pipeline.pipelines.fit.pipeline import create_pipeline

__all__ = ["create_pipeline"]
