"""``ablation``: does the frozen LLM layer help? A Ray Tune grid of arms x seeds, scored per case
on the test patients, with paired statistics and a report."""

from mvl_pipeline.pipelines.ablation.pipeline import create_pipeline

__all__ = ["create_pipeline"]
