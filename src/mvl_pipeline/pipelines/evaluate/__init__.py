"""``evaluate``: sliding-window inference on the holdout, metrics in mm, report and plots."""

from mvl_pipeline.pipelines.evaluate.pipeline import create_pipeline

__all__ = ["create_pipeline"]
