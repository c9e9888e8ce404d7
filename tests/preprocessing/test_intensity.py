"""Normalisation: CT uses the fingerprint's dataset statistics, MR is per case, always finite."""

from __future__ import annotations

import numpy as np
import pytest

from mvl_pipeline.core.case import Case
from mvl_pipeline.core.errors import NonFiniteValuesError
from mvl_pipeline.core.volume import Volume, affine_from_geometry
from mvl_pipeline.preprocessing.apply import preprocess_case
from mvl_pipeline.preprocessing.fingerprint import (
    FingerprintConfig,
    aggregate_fingerprint,
    case_fingerprint,
)
from mvl_pipeline.preprocessing.intensity import Normalization, denormalize, normalize
from mvl_pipeline.preprocessing.plan import PlanConfig, plan_preprocessing

SPACING = (3.0, 3.0, 5.0)


def _case(
    case_id: str, modality: str, organ: float, seed: int, *, scale: float = 1.0, offset: float = 0.0
) -> Case:
    """A 40x36x12 body (ellipse) with an organ (label 1); CT in HU or MR-like intensities."""
    rng = np.random.default_rng(seed)
    shape = (40, 36, 12)
    i, j, _ = np.indices(shape, dtype=np.float64)
    body = ((i - 20) / 15) ** 2 + ((j - 18) / 12) ** 2 <= 1.0
    organ_mask = ((i - 24) / 6) ** 2 + ((j - 18) / 5) ** 2 <= 1.0
    if modality == "CT":
        image = np.full(shape, -1000.0) + rng.normal(0, 5, shape)
        image[body] = 40.0 + rng.normal(0, 15, body.sum())
        image[organ_mask] = organ + rng.normal(0, 15, organ_mask.sum())
    else:
        image = np.abs(rng.normal(0, 3, shape))
        image[body] = 400.0 + rng.normal(0, 40, body.sum())
        image[organ_mask] = organ + rng.normal(0, 40, organ_mask.sum())
        image = image * scale + offset
    affine = affine_from_geometry(SPACING, origin=(-60.0, -50.0, 0.0))
    label = organ_mask.astype(np.uint8)
    return Case(
        case_id, f"patient-{case_id}", Volume(image.astype(np.float32), affine),
        Volume(label, affine.copy()), {"modality": modality, "source_hash": case_id},
    )  # fmt: skip


def _plan(cases: list[Case], **overrides) -> dict:
    config = FingerprintConfig()
    fingerprint = aggregate_fingerprint([case_fingerprint(c, config) for c in cases], config)
    plan_config = PlanConfig(target_spacing=SPACING, crop_margin_mm=1000.0, **overrides)
    return plan_preprocessing(fingerprint, plan_config, embed_patch_size=8)


def test_ct_normalisation_uses_the_fingerprint_statistics_not_the_case_statistics():
    a, b = _case("a", "CT", organ=60.0, seed=1), _case("b", "CT", organ=160.0, seed=2)
    plan = _plan([a, b])
    ct = plan["normalization"]["CT"]
    assert ct["scheme"] == "ct"
    # pooled with equal weight per case: the mean of the two organs' means
    organ_means = [float(c.image.array[c.label.array > 0].mean()) for c in (a, b)]
    assert ct["mean"] == pytest.approx(np.mean(organ_means), abs=0.01)
    exact = np.concatenate([c.image.array[c.label.array > 0] for c in (a, b)])  # equal sizes
    assert ct["clip"][0] == pytest.approx(np.percentile(exact, 0.5), abs=2.0)
    assert ct["clip"][1] == pytest.approx(np.percentile(exact, 99.5), abs=2.0)
    assert ct["std"] == pytest.approx(exact.std(), rel=0.01)

    for case in (a, b):
        image, _, record = preprocess_case(case.image, plan, label=case.label, modality="CT")
        # same grid (target spacing = source spacing, box = whole volume): no interpolation
        expected = (np.clip(case.image.array, *ct["clip"]) - ct["mean"]) / ct["std"]
        assert np.allclose(image, expected, atol=1e-4)
        assert record["normalization"] == {"scheme": "ct", **ct}
    # the case's own statistics were not used: b's organ is far from zero mean
    image_b, _, _ = preprocess_case(b.image, plan, label=b.label, modality="CT")
    assert image_b[b.label.array > 0].mean() > 0.5


def test_mr_normalisation_is_per_case_inside_the_body():
    plain = _case("m1", "MR", organ=900.0, seed=3)
    rescaled = _case("m1", "MR", organ=900.0, seed=3, scale=3.0, offset=100.0)
    plan = _plan([plain])
    assert plan["normalization"]["MR"] == {"scheme": "zscore_body"}
    out_plain, _, record = preprocess_case(plain.image, plan, modality="MR")
    out_rescaled, _, _ = preprocess_case(rescaled.image, plan, modality="MR")
    # a per-case z-score does not care about the scanner's scale and offset
    assert np.allclose(out_plain, out_rescaled, atol=1e-4)
    body = plain.image.array > record["body_threshold"]
    assert abs(out_plain[body].mean()) < 1e-4
    assert out_plain[body].std() == pytest.approx(1.0, abs=1e-4)
    assert record["normalization"]["scheme"] == "zscore_body"


@pytest.mark.parametrize(
    "normalization",
    [
        Normalization("zscore_body"),
        Normalization("zscore"),
        Normalization("ct", clip=(-100.0, 200.0), mean=50.0, std=40.0),
        Normalization("none"),
    ],
)
def test_normalised_output_is_finite_even_for_constant_images(normalization):
    for image in (
        np.full((6, 6, 6), 7.0, np.float32),
        np.random.default_rng(0).normal(0, 1e4, (6, 6, 6)),
    ):
        out, applied = normalize(image, normalization, body_mask=np.zeros(image.shape, bool))
        assert out.dtype == np.float32 and np.isfinite(out).all()
        assert applied["scheme"] == normalization.scheme


def test_non_finite_input_is_an_error_not_a_silent_nan():
    case = _case("n", "CT", organ=60.0, seed=4)
    plan = _plan([case])
    array = case.image.array.copy()
    array[20, 18, 5] = np.nan
    with pytest.raises(NonFiniteValuesError):
        preprocess_case(case.image.with_array(array), plan, modality="CT")
    with pytest.raises(NonFiniteValuesError):
        normalize(np.array([[[np.inf]]], np.float32), Normalization("zscore"))


def test_denormalize_inverts_zscore_and_ct_inside_the_clip_range():
    rng = np.random.default_rng(5)
    image = rng.normal(50, 30, (5, 5, 5)).astype(np.float32)
    before = image.copy()
    for normalization in (
        Normalization("zscore"),
        Normalization("ct", clip=(-1e4, 1e4), mean=40.0, std=25.0),
    ):
        out, applied = normalize(image, normalization)
        assert np.allclose(denormalize(out, applied), image, atol=1e-3)
    assert np.array_equal(image, before)  # normalize copies unless asked to work in place


def test_ct_scheme_without_statistics_or_unknown_scheme_is_rejected():
    with pytest.raises(ValueError, match="clip, mean and std"):
        Normalization("ct")
    with pytest.raises(ValueError, match="scheme"):
        Normalization("minmax")
    with pytest.raises(ValueError, match="std > 0"):
        Normalization("ct", clip=(0.0, 1.0), mean=0.0, std=0.0)
