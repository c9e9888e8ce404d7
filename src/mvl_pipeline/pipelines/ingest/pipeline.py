"""Wiring of the ``ingest`` pipeline."""

from kedro.pipeline import Pipeline, node

from mvl_pipeline.pipelines.ingest.nodes import ingest_drop, report_ingest


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                ingest_drop,
                inputs=["hospital_drop", "previous_ingest_manifest", "pseudonymisation_key", "params:ingest"],
                outputs=["ingested_cases", "ingest_manifest"],
                name="ingest_drop_node",
            ),
            node(
                report_ingest,
                inputs="ingest_manifest",
                outputs=["quarantine_report", "ingest_summary"],
                name="report_ingest_node",
            ),
        ],
        namespace="ingest",
        inputs={"hospital_drop", "previous_ingest_manifest", "pseudonymisation_key"},
        outputs={"ingested_cases", "ingest_manifest", "quarantine_report", "ingest_summary"},
        parameters={"params:ingest"},
        tags="ingest",
    )
