"""Wiring of the ``register`` pipeline."""

from kedro.pipeline import Pipeline, node

from mvl_pipeline.pipelines.register.nodes import decide_registration, report_registration


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                decide_registration,
                inputs=[
                    "trained_model", "evaluation_summary", "registry_before", "ingested_cases", "data_split",
                    "preprocessing_plan", "fit_history", "lineage",
                    "params:fit.llm_cache_dir", "params:evaluate", "params:register",
                ],  # fmt: skip
                outputs=["model_registry", "registration_decision"],
                name="decide_registration_node",
            ),
            node(
                report_registration,
                inputs=["model_registry", "registration_decision"],
                outputs="registration_report",
                name="report_registration_node",
            ),
        ],
        namespace="register",
        inputs={
            "trained_model", "evaluation_summary", "registry_before", "ingested_cases", "data_split",
            "preprocessing_plan", "fit_history", "lineage",
        },  # fmt: skip
        outputs={"model_registry", "registration_report"},
        parameters={"params:fit.llm_cache_dir", "params:evaluate", "params:register"},
        tags="register",
    )
