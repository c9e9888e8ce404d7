"""``plan_classes``: the foreground classes (value -> name) a model trained under a plan predicts."""

from __future__ import annotations

import pytest

from mvl_pipeline.preprocessing.plan import plan_classes


def test_classes_are_the_plans_foreground_values_with_the_recorded_names():
    plan = {"label_values": [0, 1, 2], "label_names": {"1": "anterior", "2": "posterior"}}
    assert plan_classes(plan) == {1: "anterior", 2: "posterior"}


def test_a_value_without_a_name_is_named_by_its_value_and_names_alone_suffice():
    assert plan_classes({"label_values": [0, 3, 1], "label_names": {"1": "organ"}}) == {1: "organ", 3: "label 3"}
    assert plan_classes({"label_names": {"2": "lesion", "1": "organ"}}) == {1: "organ", 2: "lesion"}


@pytest.mark.parametrize("plan", [{}, {"label_values": [0]}, {"label_values": [0], "label_names": {}}])
def test_a_plan_without_foreground_classes_is_refused(plan):
    with pytest.raises(ValueError, match="lists no foreground label"):
        plan_classes(plan)
