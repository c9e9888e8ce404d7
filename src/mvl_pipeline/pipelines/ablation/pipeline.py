"""Wiring of the ``ablation`` pipeline: the Tune grid, its statistics, the report and figures."""

from kedro.pipeline import Pipeline, node

from mvl_pipeline.pipelines.ablation.nodes import (
    ablation_metrics,
    forest_plot,
    learning_curves,
    render_report,
    run_ablation,
    summarise_ablation,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                run_ablation,
                inputs=[
                    "model_input_cases", "ingested_cases", "development_split", "test_split", "preprocessing_plan",
                    "ingest_manifest", "lineage", "params:model", "params:fit", "params:evaluate", "params:ablation",
                ],  # fmt: skip
                outputs=["ablation_results", "ablation_histories"],
                name="run_ablation_node",
            ),
            node(
                summarise_ablation,
                inputs=["ablation_results", "ablation_histories", "params:ablation"],
                outputs="ablation_summary",
                name="summarise_ablation_node",
            ),
            node(render_report, "ablation_summary", "ablation_report", name="write_ablation_report_node"),
            node(forest_plot, "ablation_summary", "ablation_forest_plot", name="plot_ablation_forest_node"),
            node(learning_curves, "ablation_histories", "ablation_curves_plot", name="plot_ablation_curves_node"),
            node(ablation_metrics, "ablation_summary", "ablation_metrics", name="log_ablation_metrics_node"),
        ],
        tags="ablation",
    )
