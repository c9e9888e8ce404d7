"""Channel rules (core/channels.py) and multi-channel volumes (core/volume.py): which source is
which channel, and the exact error when a channel is missing or ambiguous."""

from __future__ import annotations

import numpy as np
import pytest

from mvl_pipeline.core.channels import (
    dicom_attributes,
    modality_of,
    msd_rules,
    n_channels,
    pick,
    rules_from_params,
    rules_of,
)
from mvl_pipeline.core.errors import AmbiguousChannelError, MissingChannelError
from mvl_pipeline.core.volume import Volume, affine_from_geometry, guess_modality

SERIES = [
    {"name": "T1 MPRAGE SAG", "Modality": "MR"},
    {"name": "T2 TSE AX", "Modality": "MR"},
    {"name": "LOCALIZER", "Modality": "MR"},
]


def test_rules_pick_one_series_per_channel_in_the_declared_order():
    rules = rules_from_params({"t2": {"name": "(?i)^t2"}, "t1": {"name": "(?i)t1.*mprage", "Modality": "^MR$"}})
    assert [r.name for r in rules] == ["t2", "t1"]
    assert pick(rules, SERIES) == [1, 0]


def test_an_empty_rule_matches_the_channel_name_case_insensitively():
    rules = rules_from_params({"localizer": {}})
    assert pick(rules, SERIES) == [2]


def test_a_missing_channel_is_an_error_naming_it():
    rules = rules_from_params({"t1": {"name": "(?i)t1"}, "flair": {"name": "(?i)flair"}})
    with pytest.raises(MissingChannelError, match="channel 'flair' is missing: none of the 3 series matches its rule") as info:
        pick(rules, SERIES)
    assert info.value.reason == "missing_channel"


def test_two_matching_series_or_one_series_for_two_channels_are_ambiguous():
    with pytest.raises(AmbiguousChannelError, match="channel 'mr': 3 series match its rule") as info:
        pick(rules_from_params({"mr": {"Modality": "MR"}}), SERIES)
    assert info.value.reason == "ambiguous_channel"
    with pytest.raises(AmbiguousChannelError, match="channels 'a' and 'b' match the same source"):
        pick(rules_from_params({"a": {"name": "T1"}, "b": {"name": "MPRAGE"}}), SERIES)


@pytest.mark.parametrize(
    ("channels", "message"),
    [({"t1": {"name": "(unclosed"}}, "not a regular expression"), ({"t 1": {}}, "channel name 't 1'"),
     ({"T1": {}, "t1": {}}, "distinct")],
)  # fmt: skip
def test_bad_rules_fail_when_the_configuration_is_built(channels, message):
    with pytest.raises(ValueError, match=message):
        rules_from_params(channels)


def test_msd_modalities_become_rules_by_index_and_names_give_the_modality():
    rules = msd_rules({1: "T1w", 0: "FLAIR", 2: "CT"})
    assert [r.to_dict() for r in rules] == [
        {"name": "FLAIR", "match": {"index": "^0$"}}, {"name": "T1w", "match": {"index": "^1$"}},
        {"name": "CT", "match": {"index": "^2$"}},
    ]  # fmt: skip
    volumes = [{"index": str(i)} for i in range(3)]
    assert pick(rules, volumes) == [0, 1, 2]
    assert [modality_of(n) for n in ("CT", "FLAIR", "MRI", "ADC")] == ["CT", "MR", "MR", "MR"]
    assert rules_of([r.to_dict() for r in rules]) == rules


def test_dicom_attributes_hold_only_what_the_rules_name():
    class Header(dict):
        pass

    header = Header(SeriesDescription="T2 AX", ImageType=["ORIGINAL", "PRIMARY"], PatientName="DOE^JANE")
    rules = rules_from_params({"t2": {"ImageType": "PRIMARY"}})
    assert dicom_attributes(header, rules) == {"ImageType": "ORIGINAL\\PRIMARY", "name": "T2 AX"}


def test_plans_without_channels_take_one_input_channel():
    assert n_channels({}) == 1 and n_channels({"channels": [{"name": "a"}, {"name": "b"}]}) == 2


def test_a_multi_channel_volume_is_channel_first_and_its_shape_is_spatial():
    affine = affine_from_geometry((1.0, 2.0, 3.0))
    array = np.stack([np.full((4, 5, 6), -1000.0), np.zeros((4, 5, 6))]).astype(np.float32)
    volume = Volume(array, affine, {"modality": "CT"})
    assert volume.shape == (4, 5, 6) and volume.n_channels == 2 and volume.spacing == (1.0, 2.0, 3.0)
    assert volume.channel(1).shape == (4, 5, 6) and not volume.channel(1).array.any()
    assert volume.same_grid(Volume(np.zeros((4, 5, 6), np.uint8), affine))
    assert guess_modality(volume) == "CT"  # the first channel holds air
    single = Volume(array[0], affine)
    assert single.n_channels == 1 and single.channel(0) is single
    with pytest.raises(IndexError):
        single.channel(1)
    with pytest.raises(ValueError, match="3-D"):
        Volume(np.zeros((2, 2)), affine)
