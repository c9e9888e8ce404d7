"""``sample_data``: generate the synthetic sample hospital drop (``kedro run --pipelines sample_data``)."""

from kedro.pipeline import Pipeline, node

from mvl_pipeline.pipelines.sample_data.nodes import generate_sample_drop


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                generate_sample_drop,
                inputs="params:sample_data",
                outputs="sample_drop",
                name="generate_sample_drop_node",
            )
        ]
    )
