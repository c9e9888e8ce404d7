"""Wiring of the ``register`` pipeline: the gate decides on the gate patients, the test report
of the same weights is attached, the registry records the result, and the report says it."""

from kedro.pipeline import Pipeline, node

from mvl_pipeline.pipelines.register.nodes import (
    attach_test_report,
    decide_registration,
    report_registration,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                decide_registration,
                inputs=[
                    "trained_model", "registry_before", "ingested_cases", "gate_split", "preprocessing_plan",
                    "fit_history", "lineage", "params:fit.llm_cache_dir", "params:evaluate", "params:register",
                ],  # fmt: skip
                outputs=["registration_request", "registration_decision"],
                name="gate_node",
            ),
            node(
                attach_test_report,
                inputs=["registration_request", "evaluation_summary"],
                outputs="model_registry",
                name="attach_test_report_node",
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
            "trained_model", "registry_before", "ingested_cases", "gate_split", "preprocessing_plan", "fit_history",
            "lineage", "evaluation_summary",
        },  # fmt: skip
        outputs={"model_registry", "registration_report"},
        parameters={"params:fit.llm_cache_dir", "params:evaluate", "params:register"},
        tags="register",
    )
