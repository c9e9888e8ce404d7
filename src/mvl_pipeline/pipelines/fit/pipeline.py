"""Wiring of the ``fit`` pipeline: train on Ray, then decide the post-processing on validation."""

from kedro.pipeline import Pipeline, node

from mvl_pipeline.pipelines.fit.nodes import decide_postprocessing, fit_model


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                fit_model,
                inputs=[
                    "model_input_cases", "development_split", "preprocessing_plan", "ingest_manifest",
                    "registry_before", "params:model", "params:fit",
                ],  # fmt: skip
                outputs=["fitted_model", "fit_history"],
                name="fit_model_node",
            ),
            node(
                decide_postprocessing,
                inputs=[
                    "fitted_model", "ingested_cases", "development_split", "preprocessing_plan",
                    "params:fit.llm_cache_dir", "params:evaluate",
                ],  # fmt: skip
                outputs="trained_model",
                name="decide_postprocessing_node",
            ),
        ],
        namespace="fit",
        inputs={"model_input_cases", "development_split", "preprocessing_plan", "ingest_manifest", "ingested_cases",
                "registry_before"},
        outputs={"trained_model", "fit_history"},
        parameters={"params:model", "params:fit", "params:fit.llm_cache_dir", "params:evaluate"},
        tags="fit",
    )
