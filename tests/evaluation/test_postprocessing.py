"""Post-processing decided on validation data (nnU-Net): the largest 26-connected component per
class, kept only where it raises validation Dice; applied by ``predict_case`` and decided by the
``fit`` pipeline's ``decide_postprocessing`` node."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy import ndimage

from mvl_pipeline.core.case import Case
from mvl_pipeline.core.volume import Volume
from mvl_pipeline.evaluation.leakage import RECORD_KEY, shared_cases, shared_patients
from mvl_pipeline.evaluation.postprocessing import (
    apply_postprocessing,
    decide_postprocessing,
    largest_component,
)
from mvl_pipeline.evaluation.scoring import EvaluateConfig, decide_postprocessing_on, predict_case
from mvl_pipeline.formats.model_bundle import weights_sha256
from mvl_pipeline.formats.volumes import read_volume
from mvl_pipeline.model import MedVisionLlamaConfig, build_model, model_weights
from mvl_pipeline.pipelines.fit.nodes import decide_postprocessing as decide_postprocessing_node
from mvl_pipeline.pipelines.preprocess.nodes import fingerprint_dataset, plan_dataset

PROJECT = Path(__file__).resolve().parents[2]
CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


def voxels(shape, *points) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for point in points:
        mask[point] = True
    return mask


# -- largest_component ------------------------------------------------------------------------------
def test_corner_touching_voxels_are_one_component():
    # a diagonal chain of 3 voxels touching only at corners, and a face-connected pair elsewhere:
    # with 26-connectivity the chain (3) is the largest; with 6-connectivity the pair (2) would be
    mask = voxels((8, 8, 8), (0, 0, 0), (1, 1, 1), (2, 2, 2), (5, 5, 5), (5, 5, 6))
    before = mask.copy()
    kept = largest_component(mask)
    np.testing.assert_array_equal(kept, voxels((8, 8, 8), (0, 0, 0), (1, 1, 1), (2, 2, 2)))
    assert kept.dtype == bool
    np.testing.assert_array_equal(mask, before)  # the input is not modified


def test_largest_component_keeps_the_biggest_blob_and_a_single_blob_whole():
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[1:4, 1:4, 1:4] = True  # 27
    mask[7:9, 7:9, 7:9] = True  # 8
    expected = np.zeros_like(mask)
    expected[1:4, 1:4, 1:4] = True
    np.testing.assert_array_equal(largest_component(mask), expected)
    np.testing.assert_array_equal(largest_component(expected), expected)


def test_an_empty_mask_stays_empty():
    kept = largest_component(np.zeros((4, 5, 6), dtype=bool))
    assert kept.shape == (4, 5, 6) and kept.dtype == bool and not kept.any()


# -- apply_postprocessing ---------------------------------------------------------------------------
def prediction_with_specks() -> np.ndarray:
    """Class 1: a 4^3 block + a one-voxel speck touching class 2; class 2: a 3^3 and a 2^3 block."""
    prediction = np.zeros((16, 16, 16), dtype=np.uint8)
    prediction[1:5, 1:5, 1:5] = 1
    prediction[10:13, 10:13, 10:13] = 2
    prediction[13, 13, 13] = 1  # speck of class 1, corner-touching class 2's block
    prediction[1:3, 12:14, 12:14] = 2
    return prediction


def test_apply_postprocessing_only_touches_the_listed_classes_and_sets_removed_voxels_to_background():
    prediction = prediction_with_specks()
    before = prediction.copy()
    result = apply_postprocessing(prediction, {"largest_component": [1]})
    np.testing.assert_array_equal(prediction, before)  # not modified in place
    assert result.dtype == np.uint8
    assert result[13, 13, 13] == 0  # class 1's speck -> background, not the neighbouring class 2
    changed = result != prediction
    assert int(changed.sum()) == 1
    assert int((result == 2).sum()) == int((prediction == 2).sum()) == 27 + 8  # class 2 untouched

    both = apply_postprocessing(prediction, {"largest_component": [2, 1]})
    assert int((both == 2).sum()) == 27 and not both[1:3, 12:14, 12:14].any()
    assert int((both == 1).sum()) == 64


@pytest.mark.parametrize("spec", [None, {}, {"largest_component": []}])
def test_no_decision_leaves_the_prediction_as_is(spec):
    prediction = prediction_with_specks()
    np.testing.assert_array_equal(apply_postprocessing(prediction, spec), prediction)


# -- decide_postprocessing ---------------------------------------------------------------------------
def validation_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    """Class 1 is one blob, predicted with stray specks in case 0; class 2 is truly two blobs."""
    label = np.zeros((20, 20, 20), dtype=np.uint8)
    label[2:8, 2:8, 2:8] = 1  # 216 voxels
    label[12:16, 2:6, 2:6] = 2  # 64
    label[12:16, 12:16, 12:16] = 2  # 64, far from the other block
    specks = label.copy()
    specks[18, 18, 2] = specks[2, 18, 18] = 1  # isolated false positives of class 1
    return [(specks, label), (label.copy(), label)]


def test_lcc_is_kept_where_it_removes_specks_and_not_where_the_truth_has_two_components():
    decision = decide_postprocessing(validation_cases(), [1, 2])
    assert decision["largest_component"] == [1]
    assert decision["n_cases"] == 2
    scores = decision["validation_dice"]
    raw_case0 = 2 * 216 / (218 + 216)
    assert scores["1"]["raw"] == pytest.approx((raw_case0 + 1.0) / 2)
    assert scores["1"]["largest_component"] == pytest.approx(1.0)
    assert scores["2"]["raw"] == pytest.approx(1.0)
    assert scores["2"]["largest_component"] == pytest.approx(2 * 64 / (64 + 128))  # a true blob lost


def test_a_gain_below_min_gain_or_an_absent_class_is_not_post_processed():
    cases = validation_cases()
    assert decide_postprocessing(cases, [1], min_gain=0.01)["largest_component"] == []  # gain 0.0023
    absent = decide_postprocessing(cases, [3])  # neither predicted nor labelled: Dice 1 either way
    assert absent["largest_component"] == []
    assert absent["validation_dice"]["3"] == {"raw": 1.0, "largest_component": 1.0}


def test_deciding_on_no_validation_cases_raises():
    with pytest.raises(ValueError, match="none were given"):
        decide_postprocessing([], [1, 2])


# -- predict_case and the fit node, with a tiny model on real Hippocampus cases ------------------
HIPPOCAMPUS_CASES = ("hippocampus_001", "hippocampus_003")
TINY = {"embed_dim": 32, "depth": 1, "num_heads": 2, "precision": "fp32", "llm": {"mode": "none"},
        "decoder": {"taps": [], "channels": [16, 8, 8], "stem_channels": 4}}  # fmt: skip


def base_block(name: str) -> dict:
    return yaml.safe_load((PROJECT / "conf" / "base" / f"parameters_{name}.yml").read_text())[name]


@pytest.fixture(scope="module")
def tiny_setup(shared_data, llm_cache_dir):
    task = shared_data / "msd" / "Task04_Hippocampus"
    cases = {}
    for name in HIPPOCAMPUS_CASES:
        image = read_volume((task / "imagesTr" / f"{name}.nii.gz").read_bytes(), name + ".nii.gz")
        label = read_volume((task / "labelsTr" / f"{name}.nii.gz").read_bytes(), name + ".nii.gz")
        cases[name] = Case(
            name, name,
            Volume(image.array.astype(np.float32), image.affine, {"modality": "MR"}),
            Volume(label.array.astype(np.uint8), image.affine, {}),
            {"modality": "MR", "label_names": {"1": "anterior", "2": "posterior"}},
        )  # fmt: skip
    loaders = {name: (lambda case=case: case) for name, case in cases.items()}
    preprocess = base_block("preprocess")
    preprocess["apply"]["workers"] = 1
    model_params = base_block("model") | TINY
    development = {"train": list(HIPPOCAMPUS_CASES), "validation": []}
    plan = plan_dataset(fingerprint_dataset(loaders, development, None, preprocess), None, preprocess, model_params)
    assert plan["patch_size"] == [40, 56, 40] and plan["label_values"] == [0, 1, 2]
    torch.manual_seed(0)
    cfg = MedVisionLlamaConfig.from_params(model_params).for_plan(plan)
    model = build_model(cfg, llm_cache_dir=llm_cache_dir).eval()
    return {"cases": cases, "loaders": loaders, "plan": plan, "model": model}


def n_components(mask: np.ndarray) -> int:
    return int(ndimage.label(mask, structure=CONNECTIVITY_26)[1])


def test_predict_case_applies_the_stored_decision_on_the_original_grid(tiny_setup):
    model, plan = tiny_setup["model"], tiny_setup["plan"]
    case = tiny_setup["cases"]["hippocampus_001"]
    params = EvaluateConfig()
    raw = predict_case(model, case, plan, num_classes=3, params=params)
    assert raw.shape == case.image.shape and raw.dtype == np.uint8
    # the untrained model's map is fragmented, so the decision has something to remove
    assert n_components(raw == 1) > 1 or n_components(raw == 2) > 1
    spec = {"largest_component": [1, 2]}
    processed = predict_case(model, case, plan, num_classes=3, params=params, postprocessing=spec)
    np.testing.assert_array_equal(processed, apply_postprocessing(raw, spec))
    assert not np.array_equal(processed, raw)
    assert all(n_components(processed == c) <= 1 for c in (1, 2))
    only_two = predict_case(model, case, plan, num_classes=3, params=params, postprocessing={"largest_component": [2]})
    np.testing.assert_array_equal(only_two == 1, raw == 1)  # class 1 as predicted


def test_the_fit_node_stores_the_decision_made_on_the_validation_cases_with_the_model(tiny_setup, llm_cache_dir):
    model, plan, loaders = tiny_setup["model"], tiny_setup["plan"], tiny_setup["loaders"]
    state, config = model_weights(model)
    split = {"train": [], "validation": list(HIPPOCAMPUS_CASES), "patients": {"train": ["pt-x"], "validation": ["pt-y"]}}
    new_state, new_config = decide_postprocessing_node((state, config), loaders, split, plan, llm_cache_dir, {})
    assert new_state is state and "postprocessing" not in config  # the input is not modified
    assert RECORD_KEY not in config
    assert {k: v for k, v in new_config.items() if k not in ("postprocessing", RECORD_KEY, "plan_id")} == config
    assert new_config["plan_id"] == plan["plan_id"]  # the plan it was trained under (evaluation.leakage.check_plan)
    # the model carries (salted hashes of) the patients it was developed on, salted by its weights
    record = new_config[RECORD_KEY]
    assert record["n"] == 2 and record["salt"] == weights_sha256(state)[:32]
    assert shared_patients(record, ["pt-x", "pt-y", "pt-z"]) == 2
    assert shared_cases(record, [*HIPPOCAMPUS_CASES, "another-case"]) == len(set(HIPPOCAMPUS_CASES))

    params = EvaluateConfig()
    pairs = [
        (predict_case(model, tiny_setup["cases"][c], plan, num_classes=3, params=params),
         np.asarray(tiny_setup["cases"][c].label.array))
        for c in HIPPOCAMPUS_CASES
    ]  # fmt: skip
    expected = decide_postprocessing(pairs, [1, 2])
    assert new_config["postprocessing"] == expected
    assert set(expected["validation_dice"]) == {"1", "2"} and expected["n_cases"] == 2
    on = decide_postprocessing_on(model, sorted(loaders.items()), plan, {1: "anterior", 2: "posterior"}, params=params)
    assert on == expected
