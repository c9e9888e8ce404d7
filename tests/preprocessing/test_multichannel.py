"""Plan and preprocessing of multi-channel cases: statistics and normalisation per channel (a CT
phase with the CT scheme, an MR contrast with its per-case z-score), one target spacing and one
crop for all channels, and inference's inverse unchanged. Single-channel plans are untouched."""

from __future__ import annotations

import numpy as np
import pytest

from mvl_pipeline.core.case import Case
from mvl_pipeline.core.errors import ChannelError, MissingChannelError
from mvl_pipeline.core.volume import Volume, affine_from_geometry
from mvl_pipeline.preprocessing.apply import preprocess_case, restore_to_original
from mvl_pipeline.preprocessing.fingerprint import (
    FingerprintConfig,
    aggregate_fingerprint,
    case_fingerprint,
)
from mvl_pipeline.preprocessing.plan import PlanConfig, plan_preprocessing

CONFIG = FingerprintConfig(quantile_points=101)
CHANNELS = [
    {"name": "venous", "modality": "CT", "match": {"SeriesDescription": "(?i)venous"}, "index": None, "coverage": 1.0},
    {"name": "t2", "modality": "MR", "match": {"SeriesDescription": "(?i)t2"}, "index": None, "coverage": 0.98},
]
SHAPE = (40, 36, 14)


def two_channel_case(seed: int, *, shift: int = 0) -> Case:
    """A CT channel (air -1000 HU, body 40 +- 20) and an MR channel (background ~0, body ~500,
    organ 800) with the same body, on one grid; label 1 = the organ."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    body = ((x - 20 - shift) / 14.0) ** 2 + ((y - 18) / 12.0) ** 2 < 1
    organ = body & (((x - 22 - shift) / 5.0) ** 2 + ((y - 18) / 4.0) ** 2 + ((z - 7) / 4.0) ** 2 < 1)
    ct = np.where(body, 40.0, -1000.0) + np.where(organ, 60.0, 0.0) + rng.normal(0, 20, SHAPE) * body
    mr = np.where(body, 500.0, 0.0) + np.where(organ, 300.0, 0.0) + np.abs(rng.normal(0, 10, SHAPE))
    affine = affine_from_geometry((1.5, 1.5, 3.0), (-30.0, -27.0, 0.0))
    image = Volume(np.stack([ct, mr]).astype(np.float32), affine, {"modality": "CT"})
    label = Volume(organ.astype(np.uint8), affine)
    meta = {"modality": "CT", "channels": CHANNELS, "channel_min_overlap": 0.5, "source_hash": f"h{seed}"}
    return Case(f"case-{seed}", f"pt-{seed}", image, label, meta)


@pytest.fixture(scope="module")
def planned():
    cases = [two_channel_case(seed, shift=seed % 3) for seed in range(3)]
    fingerprint = aggregate_fingerprint([case_fingerprint(c, CONFIG) for c in cases], CONFIG)
    plan = plan_preprocessing(fingerprint, PlanConfig(target_spacing=(3.0, 3.0, 3.0)), embed_patch_size=8)
    return cases, fingerprint, plan


def test_the_fingerprint_keeps_statistics_per_channel(planned):
    cases, fingerprint, _ = planned
    record = fingerprint["cases"]["case-0"]
    assert [c["name"] for c in record["channels"]] == ["venous", "t2"]
    ct, mr = (c["intensity"] for c in record["channels"])
    assert record["intensity"] == ct and record["foreground_source"] == "label"
    assert ct["mean"] == pytest.approx(100.0, abs=5) and mr["mean"] == pytest.approx(800.0, abs=10)
    channels = fingerprint["channels"]
    assert [(c["name"], c["modality"]) for c in channels] == [("venous", "CT"), ("t2", "MR")]
    assert channels[1]["foreground_intensity"]["n_cases"] == 3 and fingerprint["channel_min_overlap"] == 0.5


def test_the_plan_normalises_each_channel_by_its_modality(planned):
    _, _, plan = planned
    ct, mr = plan["channels"]
    assert ct["normalization"]["scheme"] == "ct" and mr["normalization"] == {"scheme": "zscore_body"}
    assert ct["normalization"]["mean"] == pytest.approx(100.0, abs=5)  # this channel's own foreground
    assert ct["match"] == CHANNELS[0]["match"] and plan["channel_min_overlap"] == 0.5


def test_channels_share_one_grid_and_crop_and_each_gets_its_own_normalisation(planned):
    cases, _, plan = planned
    case = cases[1]
    result = preprocess_case(case.image, plan, label=case.label, modality=case.modality)
    assert result.image.shape[0] == 2 and result.image.shape[1:] == result.label.shape
    assert result.record["channels"] == ["venous", "t2"]
    assert [n["scheme"] for n in result.record["normalization"]] == ["ct", "zscore_body"]
    # each channel equals that channel preprocessed alone under the same plan (same box: one body)
    for index, modality in enumerate(["CT", "MR"]):
        single_plan = {k: v for k, v in plan.items() if k not in ("channels", "channel_min_overlap")}
        single_plan["normalization"] = {modality: plan["channels"][index]["normalization"]}
        alone = preprocess_case(case.image.channel(index), single_plan, label=case.label, modality=modality)
        assert alone.record["crop_box"] == result.record["crop_box"]
        np.testing.assert_allclose(result.image[index], alone.image, atol=1e-6)
    body = result.image[1] > result.image[1].min() + 1.0
    assert abs(float(result.image[1][body].mean())) < 0.5  # MR: per-case z-score inside the body
    # inference's inverse: probabilities back on the original grid
    probabilities = np.stack([1.0 - (result.label > 0), result.label > 0]).astype(np.float32)
    restored = restore_to_original(probabilities, result.record, is_label=False)
    assert restored.shape == (2, *SHAPE)
    dice = 2 * np.sum((restored.argmax(0) == 1) & (case.label.array == 1)) / (
        np.sum(restored.argmax(0) == 1) + np.sum(case.label.array == 1))  # fmt: skip
    assert dice > 0.8


def test_an_image_with_other_channels_than_the_plan_is_a_clear_error(planned):
    cases, fingerprint, plan = planned
    with pytest.raises(MissingChannelError, match=r"takes 2 channel\(s\) \['venous', 't2'\], the image holds 1"):
        preprocess_case(cases[0].image.channel(0), plan, modality="CT")
    single = plan_preprocessing(
        aggregate_fingerprint([case_fingerprint(Case("c", "p", cases[0].image.channel(0), cases[0].label, {"modality": "CT"}), CONFIG)], CONFIG),
        PlanConfig(target_spacing=(3.0, 3.0, 3.0)), embed_patch_size=8,
    )  # fmt: skip
    with pytest.raises(ChannelError, match=r"takes 1 channel\(s\) \['image'\], the image holds 2"):
        preprocess_case(cases[0].image, single, modality="CT")


def test_single_channel_fingerprints_and_plans_carry_no_channel_keys(planned):
    cases, _, _ = planned
    case = Case("c", "p", cases[0].image.channel(0), cases[0].label, {"modality": "CT"})
    record = case_fingerprint(case, CONFIG)
    fingerprint = aggregate_fingerprint([record], CONFIG)
    plan = plan_preprocessing(fingerprint, PlanConfig(), embed_patch_size=8)
    assert "channels" not in record and "channels" not in fingerprint
    assert not {"channels", "channel_min_overlap"} & set(plan)


def test_cases_with_other_channels_cannot_be_planned_together(planned):
    cases, _, _ = planned
    single = Case("c", "p", cases[0].image.channel(0), cases[0].label, {"modality": "CT"})
    records = [case_fingerprint(cases[0], CONFIG), case_fingerprint(single, CONFIG)]
    with pytest.raises(ValueError, match="do not share one channel layout"):
        aggregate_fingerprint(records, CONFIG)


def test_a_case_whose_channels_are_not_the_plans_in_its_order_is_refused(planned):
    """An audit (2026-12-04): gate and test cases were checked by their channel count only, so a
    case ingested t2-first went through a t1-first model with its channels swapped."""
    cases, _, plan = planned
    case = cases[0]
    preprocess_case(case.image, plan, modality="CT", channels=case.meta["channels"])  # the plan's own
    swapped = [case.meta["channels"][1], case.meta["channels"][0]]
    with pytest.raises(ChannelError, match=r"the case's channels are \['t2', 'venous'\], the model's plan takes \['venous', 't2'\] in that order"):
        preprocess_case(case.image, plan, modality="CT", channels=swapped)


def test_the_plan_keeps_where_a_4d_source_held_each_channel_only_where_every_case_agrees():
    def case(seed: int, names: tuple[str, str]) -> Case:
        base = two_channel_case(seed)
        channels = [{**c, "index": i, "n_volumes": 2, "source_name": names[i]} for i, c in enumerate(CHANNELS)]
        return Case(base.case_id, base.patient_id, base.image, base.label, {**base.meta, "channels": channels})

    agreed = aggregate_fingerprint([case_fingerprint(case(s, ("CT", "T2")), CONFIG) for s in range(2)], CONFIG)
    plan = plan_preprocessing(agreed, PlanConfig(target_spacing=(3.0, 3.0, 3.0)), embed_patch_size=8)
    assert [(c["n_volumes"], c["source_name"]) for c in plan["channels"]] == [(2, "CT"), (2, "T2")]
    mixed = aggregate_fingerprint([case_fingerprint(case(0, ("CT", "T2")), CONFIG), case_fingerprint(case(1, ("CT", "t2w")), CONFIG)], CONFIG)
    assert mixed["channels"][0]["source_name"] == "CT" and "source_name" not in mixed["channels"][1]
    dicom = aggregate_fingerprint([case_fingerprint(two_channel_case(s), CONFIG) for s in range(2)], CONFIG)
    assert not {"n_volumes", "source_name"} & {k for c in dicom["channels"] for k in c}  # the plan id of DICOM channels is unchanged
