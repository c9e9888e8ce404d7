"""Wiring of the ``fit`` pipeline."""

from kedro.pipeline import Pipeline, node

from mvl_pipeline.pipelines.fit.nodes import fit_model


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                fit_model,
                inputs=[
                    "model_input_cases", "data_split", "preprocessing_plan", "ingest_manifest",
                    "params:model", "params:fit", "params:ingest.labels",
                ],  # fmt: skip
                outputs=["trained_model", "fit_history"],
                name="fit_model_node",
            )
        ],
        namespace="fit",
        inputs={"model_input_cases", "data_split", "preprocessing_plan", "ingest_manifest"},
        outputs={"trained_model", "fit_history"},
        parameters={"params:model", "params:fit", "params:ingest.labels"},
        tags="fit",
    )
