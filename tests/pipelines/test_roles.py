"""Who reads which role of the split, asserted from the pipelines' wiring: fit and the gate never
read the test role (or the whole split, which holds it); the gate decides on the gate role only;
only evaluate reads the test role; the plan learns from the development role only."""

from __future__ import annotations

import pytest
from kedro.pipeline import Pipeline

from mvl_pipeline.pipelines import evaluate, fit, preprocess, register, train

VIEWS = {"development_split", "gate_split", "test_split"}
#: Documents that hold every role: only the split node itself may read them.
WHOLE_SPLIT = {"data_split", "previous_data_split", "legacy_data_split"}


def _inputs(pipeline: Pipeline) -> set[str]:
    return {d for node in pipeline.nodes for d in node.inputs}


def _node(pipeline: Pipeline, name: str):
    (found,) = [n for n in pipeline.nodes if n.name == name]
    return found


@pytest.fixture(scope="module")
def whole() -> Pipeline:
    return train.create_pipeline()


def test_fit_reads_the_development_role_only():
    pipeline = fit.create_pipeline()
    assert "development_split" in pipeline.inputs()
    assert not (VIEWS - {"development_split"} | WHOLE_SPLIT) & _inputs(pipeline)


def test_the_gate_node_reads_the_gate_role_and_no_test_figure():
    gate_node = _node(register.create_pipeline(), "register.gate_node")
    assert "gate_split" in gate_node.inputs
    forbidden = {"test_split", "development_split", *WHOLE_SPLIT, "evaluation_summary", "evaluation_per_case"}
    assert not forbidden & set(gate_node.inputs), gate_node.inputs


def test_only_evaluate_reads_the_test_role(whole):
    readers = {n.name for n in whole.nodes if "test_split" in n.inputs}
    assert readers == {"evaluate.evaluate_holdout_node"}
    evaluate_inputs = _inputs(evaluate.create_pipeline())
    assert "test_split" in evaluate_inputs and not ({"gate_split", "development_split"} | WHOLE_SPLIT) & evaluate_inputs


def test_each_role_has_the_readers_it_is_meant_for(whole):
    readers = {view: {n.name for n in whole.nodes if view in n.inputs} for view in VIEWS | WHOLE_SPLIT}
    assert readers["development_split"] == {"fingerprint_node", "fit.fit_model_node", "fit.decide_postprocessing_node"}
    assert readers["gate_split"] == {"register.gate_node"}
    assert readers["test_split"] == {"evaluate.evaluate_holdout_node"}
    assert readers["data_split"] == set()
    assert readers["previous_data_split"] == readers["legacy_data_split"] == {"split_node"}


def test_nothing_upstream_of_the_model_or_the_gate_decision_reads_the_test_role(whole):
    """Transitively: every node the trained model or the gate's decision depends on (the plan,
    the fingerprint, fit) reads no test case list; the gate decision none of evaluate's outputs."""
    for target in ("trained_model", "register.registration_decision"):
        upstream = whole.to_outputs(target)
        assert upstream.nodes, target
        read = _inputs(upstream)
        assert "test_split" not in read, target
        assert not {"evaluation_summary", "evaluation_per_case"} & read, target
        assert not read & {"data_split"}, target
    assert "gate_split" not in _inputs(whole.to_outputs("trained_model"))


def test_the_split_comes_first_and_needs_no_voxel():
    pipeline = preprocess.create_pipeline()
    split_node = _node(pipeline, "split_node")
    assert set(split_node.inputs) == {"ingested_case_index", "previous_data_split", "legacy_data_split", "params:preprocess"}
    assert set(split_node.outputs) == {"data_split", *VIEWS}
    assert "ingested_cases" not in split_node.inputs
    assert "development_split" in _node(pipeline, "fingerprint_node").inputs
