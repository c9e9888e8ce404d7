"""Wiring of the ``preprocess`` pipeline (the functions are in ``nodes.py``).

ingested_case_index + previous_data_split -> split_node -> data_split (+ the development, gate
    and test views each later stage reads)
ingested_cases + development_split -> fingerprint_node -> dataset_fingerprint (development only)
dataset_fingerprint + previous_preprocessing_plan + params -> plan_node -> preprocessing_plan
ingested_cases + dataset_fingerprint + preprocessing_plan + model_input_records
    -> preprocess_node -> model_input_cases (development cases)
"""

from kedro.pipeline import Pipeline, node

from mvl_pipeline.pipelines.preprocess.nodes import (
    fingerprint_dataset,
    plan_dataset,
    preprocess_dataset,
    split_dataset,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                split_dataset,
                inputs=["ingested_case_index", "previous_data_split", "legacy_data_split", "params:preprocess"],
                outputs=["data_split", "development_split", "gate_split", "test_split"],
                name="split_node",
                tags=["split"],
            ),
            node(
                fingerprint_dataset,
                inputs=["ingested_cases", "development_split", "previous_dataset_fingerprint", "params:preprocess"],
                outputs="dataset_fingerprint",
                name="fingerprint_node",
                tags=["fingerprint"],
            ),
            node(
                plan_dataset,
                inputs=[
                    "dataset_fingerprint",
                    "previous_preprocessing_plan",
                    "params:preprocess",
                    "params:model",
                ],
                outputs="preprocessing_plan",
                name="plan_node",
                tags=["plan"],
            ),
            node(
                preprocess_dataset,
                inputs=[
                    "ingested_cases",
                    "dataset_fingerprint",
                    "preprocessing_plan",
                    "model_input_records",
                    "params:preprocess",
                ],
                outputs="model_input_cases",
                name="preprocess_node",
                tags=["apply"],
            ),
        ],
        # No namespace, unlike the other stages: kedro-viz draws a namespace as one node whose
        # inputs include the read-back documents (model_input layer) and whose outputs include the
        # fingerprint and plan (feature layer), a feature <-> model_input cycle that makes it drop
        # the layers of the whole graph. The tag groups these nodes instead.
        tags="preprocess",
    )
