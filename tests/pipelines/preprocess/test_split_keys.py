"""The split node and pseudonymisation keys: the key the patients are named under travels with
every role's view (the leakage guard compares it), and cases named under two keys are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mvl_pipeline.pipelines.preprocess.nodes import split_dataset

PARAMS = yaml.safe_load((Path(__file__).resolve().parents[3] / "conf/base/parameters_preprocess.yml").read_text())["preprocess"]


def _index(n: int, key_ids: list[str | None]) -> dict:
    return {
        f"case-{k:04d}": {"patient_id": f"pt-{k:04d}", "meta": {} if key_ids[k % len(key_ids)] is None else {"key_id": key_ids[k % len(key_ids)]}}
        for k in range(n)
    }


def test_every_view_names_the_key_of_its_patients():
    split, development, gate, test = split_dataset(_index(12, ["key-aaaaaaaaaaaa"]), None, None, PARAMS)
    assert split["key_id"] == development["key_id"] == gate["key_id"] == test["key_id"] == "key-aaaaaaaaaaaa"


def test_cases_from_before_key_ids_give_a_split_without_one():
    split, development, _, _ = split_dataset(_index(12, [None]), None, None, PARAMS)
    assert "key_id" not in split and "key_id" not in development


def test_cases_named_under_two_keys_are_refused():
    with pytest.raises(ValueError, match="2 pseudonymisation keys"):
        split_dataset(_index(12, ["key-aaaaaaaaaaaa", "key-bbbbbbbbbbbb"]), None, None, PARAMS)


def test_a_split_that_leaves_a_role_empty_says_so_when_it_is_made(caplog):
    # 3 patients: evaluate refused "the test split is empty" only after a whole training
    caplog.set_level("WARNING")
    split, _, _, test = split_dataset(_index(3, [None]), None, None, PARAMS)
    empty = [role for role in ("train", "validation", "gate", "test") if not split["patients"][role]]
    assert empty  # which roles stay empty depends on how the patients hash
    assert f"split: no {' and no '.join(empty)} patient among 3: fit needs train and validation patients" in caplog.text
    assert "change preprocess.split.ratios" in caplog.text
    caplog.clear()
    split_dataset(_index(40, [None]), None, None, PARAMS)
    assert "split: no" not in caplog.text
