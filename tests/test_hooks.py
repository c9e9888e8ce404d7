"""The fit node's data version, plan and Ray run land on the MLflow run as tags."""

import mlflow

from mvl_pipeline.hooks import LineageTagsHook


def test_fit_history_tags_the_active_run(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        hook = LineageTagsHook()
        with mlflow.start_run() as run:
            hook.after_node_run(node=None, outputs={"fit_history": {"data_version": "65bfe89362b8",
                                                                    "plan_id": "0e4e", "run_name": "mvl-x"}})  # fmt: skip
            hook.after_node_run(node=None, outputs={"evaluation_summary": {"mean_dice": 1.0}})  # not fit: ignored
        tags = mlflow.get_run(run.info.run_id).data.tags
        assert (tags["data_version"], tags["plan_id"], tags["fit_run"]) == ("65bfe89362b8", "0e4e", "mvl-x")
        hook.after_node_run(node=None, outputs={"fit_history": {"data_version": "v"}})  # no active run: no-op
    finally:
        mlflow.set_tracking_uri(None)
