"""Wiring of the ``evaluate`` pipeline."""

from kedro.pipeline import Pipeline, node

from mvl_pipeline.pipelines.evaluate.nodes import (
    evaluate_holdout,
    metrics_for_mlflow,
    plot_learning_curves,
    plot_overlays,
    plot_per_case,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                evaluate_holdout,
                inputs=[
                    "trained_model", "ingested_cases", "test_split", "preprocessing_plan",
                    "params:fit.llm_cache_dir", "params:evaluate",
                ],  # fmt: skip
                outputs=["evaluation_per_case", "evaluation_summary", "evaluation_overlays"],
                name="evaluate_holdout_node",
            ),
            node(metrics_for_mlflow, "evaluation_summary", "evaluation_metrics", name="log_metrics_node"),
            node(plot_learning_curves, "fit_history", "learning_curves_plot", name="plot_learning_curves_node"),
            node(plot_per_case, "evaluation_per_case", "per_case_plot", name="plot_per_case_node"),
            node(plot_overlays, "evaluation_overlays", "overlay_plot", name="plot_overlays_node"),
        ],
        namespace="evaluate",
        inputs={"trained_model", "ingested_cases", "test_split", "preprocessing_plan", "fit_history"},
        outputs={
            "evaluation_per_case", "evaluation_summary", "evaluation_metrics",
            "learning_curves_plot", "per_case_plot", "overlay_plot",
        },  # fmt: skip
        parameters={"params:fit.llm_cache_dir", "params:evaluate"},
        tags="evaluate",
    )
