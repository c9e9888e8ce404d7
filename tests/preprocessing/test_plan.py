"""Planning from a fingerprint: nnU-Net's target spacing (real pyradiomics volumes), patch size
within the token budget, overrides, stable plan ids."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mvl_pipeline.core.case import Case
from mvl_pipeline.datasets.volume import VolumeDataset
from mvl_pipeline.preprocessing.fingerprint import (
    FingerprintConfig,
    aggregate_fingerprint,
    case_fingerprint,
)
from mvl_pipeline.preprocessing.plan import (
    PlanConfig,
    nnunet_target_spacing,
    patch_size_for_budget,
    plan_preprocessing,
    reconcile_plan,
)

MODALITY = {"brain1": "MR", "breast1": "MR", "lung1": "CT"}
CONFIG = FingerprintConfig()


@pytest.fixture(scope="module")
def pyradiomics_records(shared_data) -> dict[str, dict]:
    records = {}
    for name, modality in MODALITY.items():
        folder = shared_data / "pyradiomics"
        image = VolumeDataset(filepath=str(folder / f"{name}_image.nrrd")).load()
        label = VolumeDataset(filepath=str(folder / f"{name}_label.nrrd")).load()
        case = Case(name, f"p-{name}", image, label, {"modality": modality, "source_hash": name})
        records[name] = case_fingerprint(case, CONFIG)
    return records


def _fingerprint(records, names):
    return aggregate_fingerprint([records[n] for n in names], CONFIG)


def test_real_volumes_get_the_nnunet_coarse_axis_rule(pyradiomics_records):
    fingerprint = _fingerprint(pyradiomics_records, ["brain1", "breast1", "lung1"])
    spacings = np.array([r["spacing"] for r in fingerprint["cases"].values()])
    # RAS axis order: in-plane 0.57-0.78 mm, slices 2.1 / 5.0 / 6.5 mm
    assert sorted(spacings[:, 2]) == pytest.approx([2.1, 5.0, 6.5])
    plan = plan_preprocessing(fingerprint, PlanConfig(), embed_patch_size=8)
    target = plan["target_spacing"]
    assert plan["coarse_axis"] == 2
    # in-plane: the median; through-plane: the 10th percentile (2.68 mm), not the median (5 mm)
    assert target[0] == pytest.approx(np.median(spacings[:, 0]), rel=1e-5)
    assert target[1] == pytest.approx(np.median(spacings[:, 1]), rel=1e-5)
    assert target[2] == pytest.approx(np.percentile([2.1, 5.0, 6.5], 10), rel=1e-5)
    assert target[2] < np.median(spacings[:, 2])
    assert plan["normalization"] == {
        "CT": plan["normalization"]["CT"],
        "MR": {"scheme": "zscore_body"},
    }
    assert plan["normalization"]["CT"]["scheme"] == "ct"


def test_lung1_plan_keeps_its_own_grid_and_an_isotropic_in_mm_patch(pyradiomics_records):
    fingerprint = _fingerprint(pyradiomics_records, ["lung1"])
    plan = plan_preprocessing(
        fingerprint, PlanConfig(), embed_patch_size=[16, 16, 8], token_budget=512
    )
    assert plan["target_spacing"] == pytest.approx([0.5703125, 0.5703125, 5.0])
    assert plan["coarse_axis"] == 2  # anisotropic, with a single spacing to take the percentile of
    patch = np.array(plan["patch_size"])
    assert all(p % e == 0 for p, e in zip(patch, [16, 16, 8], strict=True))
    assert plan["tokens"] == np.prod(patch // [16, 16, 8]) <= 512
    extent = patch * np.array(plan["target_spacing"])
    assert patch[2] < patch[0]  # fewer voxels along the thick-slice axis ...
    assert extent.max() / extent.min() < 2.5  # ... for a patch of comparable millimetres
    ct = plan["normalization"]["CT"]
    assert ct["clip"][0] < ct["mean"] < ct["clip"][1]
    assert -1024 <= ct["clip"][0] and ct["clip"][1] <= 3071


def test_isotropic_spacings_use_the_plain_median():
    spacings = [[1.0, 1.0, 1.2], [0.8, 0.8, 1.0], [1.1, 1.1, 1.5]]
    shapes = [[200, 200, 180]] * 3
    target, coarse = nnunet_target_spacing(spacings, shapes)
    assert coarse is None
    assert target == pytest.approx([1.0, 1.0, 1.2])


def test_coarse_axis_percentile_never_goes_below_the_in_plane_spacing():
    spacings = [[0.8, 0.8, 5.0]] * 8 + [[0.8, 0.8, 0.5]] * 2
    shapes = [[512, 512, 60]] * 10
    target, coarse = nnunet_target_spacing(spacings, shapes)
    assert coarse == 2
    assert target[2] == pytest.approx(0.8 + 1e-5)
    # anisotropic spacing but not anisotropic voxel counts: the median stays
    target, coarse = nnunet_target_spacing(spacings, [[100, 100, 90]] * 10)
    assert coarse is None and target[2] == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("median_shape", "spacing", "embed", "budget"),
    [
        ((300, 300, 300), (1.0, 1.0, 1.0), (16, 16, 16), 512),
        ((300, 300, 75), (1.0, 1.0, 4.0), (16, 16, 16), 512),
        ((100, 70, 40), (3.0, 3.0, 5.0), (8, 8, 8), 512),
        ((20, 20, 20), (1.0, 1.0, 1.0), (8, 8, 8), 512),
        ((500, 500, 500), (1.0, 1.0, 1.0), (8, 8, 8), 7),
    ],
)
def test_patch_size_fits_the_token_budget(median_shape, spacing, embed, budget):
    patch = np.array(patch_size_for_budget(median_shape, spacing, embed, budget))
    tokens = patch // np.array(embed)
    assert np.all(patch % np.array(embed) == 0) and np.all(tokens >= 1)
    assert np.prod(tokens) <= budget
    # never more than one token beyond the median image
    assert np.all(patch < np.array(median_shape) + np.array(embed))
    if median_shape == (300, 300, 300):
        assert tuple(patch) == (128, 128, 128)


def _synthetic_fingerprint(ct_mean_shift: float = 0.0) -> dict:
    cases = {}
    for n in range(4):
        quantiles = list(np.linspace(-50, 250, 11) + ct_mean_shift)
        cases[f"c{n}"] = {
            "case_id": f"c{n}", "patient_id": f"p{n}", "source_hash": f"h{n}", "modality": "CT",
            "spacing": [0.8, 0.8, 2.5], "shape": [512, 512, 100], "body_box_shape": [400, 300, 100],
            "label_counts": {"0": 1000, "1": 50}, "label_names": {"1": "organ"},
            "foreground_source": "label",
            "intensity": {"mean": 100.0 + ct_mean_shift, "std": 60.0, "quantiles": quantiles},
        }  # fmt: skip
    return {
        "orientation": "RAS", "fingerprint_id": f"f{ct_mean_shift}", "cases": cases,
        "modalities": {"CT": {}}, "label_names": {"1": "organ"},
    }  # fmt: skip


def test_every_planned_value_can_be_overridden():
    fingerprint = _synthetic_fingerprint()
    base = plan_preprocessing(fingerprint, PlanConfig(), embed_patch_size=16)
    config = PlanConfig.from_params(
        {
            "orientation": "LPS",
            "target_spacing": [1.5, 1.5, 3.0],
            "patch_size": [96, 96, 32],
            "embed_patch_size": [16, 16, 8],
            "token_budget": 300,
            "interpolation": {"image": "cubic", "label": "onehot_linear"},
            "normalization": {
                "overrides": {"CT": {"clip": [-200, 300], "mean": 50.0, "std": 70.0}}
            },
            "crop_margin_mm": 4,
        }
    )
    with pytest.raises(ValueError, match="orientation"):  # a fingerprint in RAS order
        plan_preprocessing(fingerprint, config, embed_patch_size=16)
    fingerprint_lps = {**fingerprint, "orientation": "LPS"}
    plan = plan_preprocessing(fingerprint_lps, config, embed_patch_size=16)
    assert plan["orientation"] == "LPS"
    assert plan["target_spacing"] == [1.5, 1.5, 3.0] and plan["coarse_axis"] is None
    assert plan["patch_size"] == [96, 96, 32] and plan["embed_patch_size"] == [16, 16, 8]
    assert plan["tokens"] == 6 * 6 * 4 and plan["token_budget"] == 300
    assert plan["interpolation"] == {"image": "cubic", "label": "onehot_linear"}
    assert plan["normalization"]["CT"] == {
        "scheme": "ct",
        "clip": [-200.0, 300.0],
        "mean": 50.0,
        "std": 70.0,
    }
    assert plan["crop_margin_mm"] == 4.0
    assert plan["plan_id"] != base["plan_id"]
    switched = PlanConfig.from_params(
        {"normalization": {"overrides": {"CT": {"scheme": "zscore_body"}}}}
    )
    assert plan_preprocessing(fingerprint, switched, embed_patch_size=16)["normalization"][
        "CT"
    ] == {"scheme": "zscore_body"}


def test_bad_parameters_fail_early():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \[.target_spacng.\] in preprocess.plan"):
        PlanConfig.from_params({"target_spacng": [1, 1, 1]})
    with pytest.raises(ValueError, match="interpolation.label"):
        PlanConfig.from_params({"interpolation": {"label": "linear"}})
    with pytest.raises(ValueError, match="multiple"):
        plan_preprocessing(
            _synthetic_fingerprint(), PlanConfig(patch_size=(100, 96, 96)), embed_patch_size=16
        )
    with pytest.raises(ValueError, match="over the budget"):
        plan_preprocessing(
            _synthetic_fingerprint(), PlanConfig(patch_size=(160, 160, 160)), embed_patch_size=16
        )
    with pytest.raises(ValueError, match="embed_patch_size is unknown"):
        plan_preprocessing(_synthetic_fingerprint(), PlanConfig())


def test_plan_id_is_deterministic_and_survives_json():
    a = plan_preprocessing(_synthetic_fingerprint(), PlanConfig(), embed_patch_size=16)
    b = plan_preprocessing(_synthetic_fingerprint(), PlanConfig(), embed_patch_size=16)
    assert a == b
    loaded = json.loads(json.dumps(a))
    assert reconcile_plan(a, loaded, 0.0) == (loaded, True)


def test_small_drift_keeps_the_previous_plan_and_a_real_change_replaces_it():
    previous = plan_preprocessing(_synthetic_fingerprint(), PlanConfig(), embed_patch_size=16)
    drifted = plan_preprocessing(_synthetic_fingerprint(0.5), PlanConfig(), embed_patch_size=16)
    assert drifted["plan_id"] != previous["plan_id"]
    plan, reused = reconcile_plan(drifted, previous, tolerance=0.02)
    assert reused and plan["plan_id"] == previous["plan_id"]
    moved = plan_preprocessing(_synthetic_fingerprint(40.0), PlanConfig(), embed_patch_size=16)
    plan, reused = reconcile_plan(moved, previous, tolerance=0.02)
    assert not reused and plan["plan_id"] == moved["plan_id"]
    # a changed discrete choice is never "within tolerance"
    cubic = plan_preprocessing(
        _synthetic_fingerprint(), PlanConfig.from_params({"interpolation": {"image": "cubic"}}), embed_patch_size=16
    )
    assert reconcile_plan(cubic, previous, tolerance=0.5) == (cubic, False)
    # a tampered previous plan (id does not match its content) is not trusted
    tampered = {**previous, "target_spacing": [9.0, 9.0, 9.0]}
    assert reconcile_plan(drifted, tampered, tolerance=1.0)[1] is False


def test_a_planned_patch_size_jump_alone_keeps_the_previous_plan():
    previous = plan_preprocessing(_synthetic_fingerprint(), PlanConfig(), embed_patch_size=16)
    grown = {k: v for k, v in previous.items() if k not in ("plan_id", "patch_size", "tokens")} | {
        "patch_size": [128, 112, 48],
        "tokens": 8 * 7 * 3,
    }
    assert reconcile_plan(grown, previous, tolerance=0.0)[1] is True
    # ... but not when the embedding patch or budget changed, or the patch was configured
    finer = plan_preprocessing(_synthetic_fingerprint(), PlanConfig(), embed_patch_size=8)
    assert reconcile_plan(finer, previous, tolerance=0.5)[1] is False
    smaller = plan_preprocessing(
        _synthetic_fingerprint(), PlanConfig(token_budget=64), embed_patch_size=16
    )
    assert reconcile_plan(smaller, previous, tolerance=0.5)[1] is False
    pinned = PlanConfig(patch_size=(96, 96, 32))
    a = plan_preprocessing(_synthetic_fingerprint(), pinned, embed_patch_size=16)
    b = plan_preprocessing(
        _synthetic_fingerprint(), PlanConfig(patch_size=(64, 64, 32)), embed_patch_size=16
    )
    assert reconcile_plan(b, a, tolerance=0.5)[1] is False
