"""Which source is which channel (ingestion/channels.py) and the ``ingest.channels`` settings:
the README's example is a valid block, declaring no channels keeps the settings id of a
single-channel project, and predict takes a 4-D image's channels where training found them."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from mvl_pipeline.core.channels import rules_from_params
from mvl_pipeline.core.errors import AmbiguousChannelError, ChannelError, MissingChannelError
from mvl_pipeline.core.volume import Volume, affine_from_geometry
from mvl_pipeline.ingestion.channels import (
    recorded_volume_channels,
    rules_for_unit,
    volume_channels,
)
from mvl_pipeline.ingestion.config import IngestConfig

PROJECT = Path(__file__).resolve().parents[2]


def four_d() -> Volume:
    air = np.full((6, 5, 4), -1000.0)
    air[2:4, 2:4, :] = 40.0
    mr = np.arange(120, dtype=np.float64).reshape(6, 5, 4)
    return Volume(np.stack([air, mr, 2 * mr]).astype(np.float32), affine_from_geometry((1.0, 1.0, 2.0)))


def test_the_readme_example_is_a_valid_ingest_block():
    readme = (PROJECT / "README.md").read_text()
    section = readme.split("## Multi-modal inputs", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    config = IngestConfig.from_params({**yaml.safe_load(block)["ingest"], "labels": {"organ": 1}})
    assert [r.name for r in config.channel_rules] == ["t1", "t2"]
    assert config.channel_min_overlap == 0.5


def test_no_channels_keep_the_settings_id_and_declared_ones_change_it():
    plain = IngestConfig.from_params({"labels": {"organ": 1}})
    assert plain.channel_rules == ()
    declared = IngestConfig.from_params({"labels": {"organ": 1}, "channels": {"t1": {}}})
    assert declared.settings_id() != plain.settings_id()
    legacy = {k: v for k, v in plain.to_dict().items() if k not in ("workers", "batch_size", "progress",
                                                                       "channels", "channel_min_overlap",
                                                                       "spacing_range_mm")}  # fmt: skip
    from mvl_pipeline.core.hashing import json_digest

    assert plain.settings_id() == json_digest(legacy)  # what a project ingested before channels existed
    with pytest.raises(ValueError, match="not a regular expression"):
        IngestConfig.from_params({"channels": {"t1": {"SeriesDescription": "(("}}})
    with pytest.raises(ValueError, match=r"channel_min_overlap must be in \[0, 1\]"):
        IngestConfig.from_params({"channel_min_overlap": 1.5})


def test_declared_rules_win_and_an_msd_task_with_several_modalities_brings_its_own():
    declared = rules_from_params({"t1": {}})
    assert rules_for_unit(declared, ("FLAIR", "T1w")) == declared
    assert [r.name for r in rules_for_unit((), ("FLAIR", "T1w"))] == ["FLAIR", "T1w"]
    assert rules_for_unit((), ("MRI",)) == () and rules_for_unit((), ()) == ()


def test_volumes_of_a_4d_image_become_channels_with_their_modality():
    image = four_d()
    rules = rules_from_params({"mr": {"index": "^1$"}, "ct": {"index": "^0$"}})
    stacked, records = volume_channels(image, rules)
    np.testing.assert_array_equal(stacked.array, image.array[[1, 0]])
    assert [(r["name"], r["modality"], r["index"]) for r in records] == [("mr", "MR", 1), ("ct", "CT", 0)]
    assert stacked.meta == {"modality": "MR"}
    _, named = volume_channels(image, rules_from_params({"venous": {"name": "(?i)^ct$"}}), ["T1", "CT", "T2"])
    assert (named[0]["index"], named[0]["modality"]) == (1, "CT")  # the MSD name gives the modality


def test_predict_takes_a_4d_images_channels_where_training_found_them():
    image = four_d()
    channels = [{"name": "t2", "modality": "MR", "index": 2, "n_volumes": 3},
                {"name": "t1", "modality": "MR", "index": 1, "n_volumes": 3}]  # fmt: skip
    picked = recorded_volume_channels(image, channels)
    np.testing.assert_array_equal(picked.array, image.array[[2, 1]])
    with pytest.raises(MissingChannelError, match=r"channel 't2' is missing: the image holds 1 volume\(s\), the model takes the channels \['t2', 't1'\]"):
        recorded_volume_channels(image.channel(1), channels)


def test_predict_finds_an_msd_inputs_channels_by_their_names_whatever_their_order():
    """An audit (2026-12-04): an MSD test folder listing T2 before T1 had its volumes swapped."""
    image = four_d()  # volumes: [ct, mr, 2 * mr]
    channels = [{"name": "T1", "modality": "MR", "match": {"index": "^0$"}, "index": 0, "n_volumes": 2, "source_name": "T1"},
                {"name": "T2", "modality": "MR", "match": {"index": "^1$"}, "index": 1, "n_volumes": 2, "source_name": "T2"}]  # fmt: skip
    picked = recorded_volume_channels(image, channels, ["FLAIR", "t2", "T1"])  # another order, one more
    np.testing.assert_array_equal(picked.array, image.array[[2, 1]])
    with pytest.raises(MissingChannelError, match="channel 'T1' is missing: the training images held it in a volume named 'T1'"):
        recorded_volume_channels(image, channels, ["FLAIR", "T2", "PD"])
    with pytest.raises(AmbiguousChannelError, match="2 volumes of the input share its name"):
        recorded_volume_channels(image, channels, ["T1", "T2", "t1"])
    # a plan without the training volumes' names: the rules pick, as at ingest
    declared = [{"name": "t1", "modality": "MR", "match": {"name": "(?i)^t1$"}, "index": None},
                {"name": "t2", "modality": "MR", "match": {"name": "(?i)^t2$"}, "index": None}]  # fmt: skip
    np.testing.assert_array_equal(recorded_volume_channels(image, declared, ["T2", "x", "T1"]).array, image.array[[2, 0]])


def test_a_model_that_recorded_a_raw_site_name_still_finds_its_channel_under_the_index_name():
    """Since 2026-12-07 an MSD modality name that is no contrast term is ``channel<index>``, at ingest
    and in predict's names of the input's volumes. A model trained before recorded the raw name:
    it goes through the same rule, and the error never quotes it."""
    image = four_d()  # volumes: [ct, mr, 2 * mr]
    old = [{"name": "T1", "modality": "MR", "match": {"index": "^0$"}, "index": 0, "n_volumes": 2, "source_name": "T1"},
           {"name": "T2_St_Elsewhere", "modality": "MR", "match": {"index": "^1$"}, "index": 1, "n_volumes": 2,
            "source_name": "T2 St Elsewhere"}]  # fmt: skip
    picked = recorded_volume_channels(image, old, ["T1", "channel1", "FLAIR"])  # as read_task names them now
    np.testing.assert_array_equal(picked.array, image.array[[0, 1]])
    with pytest.raises(MissingChannelError, match="held it in a volume named 'channel1'") as refused:
        recorded_volume_channels(image, old, ["T1", "FLAIR", "T2"])
    assert "elsewhere" not in str(refused.value).lower()


def test_predict_refuses_an_unnamed_4d_image_whose_volumes_cannot_be_told_apart():
    image = four_d()  # three volumes
    channels = [{"name": "T1", "modality": "MR", "match": {"index": "^0$"}, "index": 0, "n_volumes": 2},
                {"name": "T2", "modality": "MR", "match": {"index": "^1$"}, "index": 1, "n_volumes": 2}]  # fmt: skip
    with pytest.raises(ChannelError, match="the image holds 3 volumes, the training images held 2: without the volumes' names"):
        recorded_volume_channels(image, channels)  # [FLAIR, T1, T2] given to a [T1, T2] model
    two = Volume(image.array[1:], image.affine)  # as many volumes as the training images: by their indices
    np.testing.assert_array_equal(recorded_volume_channels(two, channels).array, image.array[[1, 2]])
    legacy = [{k: v for k, v in c.items() if k != "n_volumes"} for c in channels]  # a plan from before the count
    with pytest.raises(ChannelError, match="the image holds 3 volumes, the training images held 2"):
        recorded_volume_channels(image, legacy)
    varied = [{**channels[0], "index": None}, channels[1]]  # the training images disagreed on its index
    with pytest.raises(ChannelError, match=r"held the channel\(s\) \['T1'\] at different volume indices"):
        recorded_volume_channels(image, varied)


def test_the_order_of_the_declared_channels_is_part_of_the_settings_id():
    """An audit (2026-12-04): swapping two channels' order re-ingested nothing (the id hashed
    them with sorted keys), though the first is the reference grid and the model's first input."""
    t1_first = IngestConfig.from_params({"channels": {"t1": {"SeriesDescription": "t1"}, "t2": {"SeriesDescription": "t2"}}})
    t2_first = IngestConfig.from_params({"channels": {"t2": {"SeriesDescription": "t2"}, "t1": {"SeriesDescription": "t1"}}})
    assert t1_first.settings_id() != t2_first.settings_id()
    again = IngestConfig.from_params({"channels": {"t1": {"SeriesDescription": "t1"}, "t2": {"SeriesDescription": "t2"}}})
    assert again.settings_id() == t1_first.settings_id()


def test_spacing_outside_the_plausible_range_is_refused_with_the_range_and_validated():
    """A header in metres (0.001 mm voxels) became a 1x1x1 model input with its label gone; one
    with 40 mm voxels blew preprocessing up (an audit, 2026-12-04)."""
    import numpy as np

    from mvl_pipeline.core.errors import ImplausibleGeometryError
    from mvl_pipeline.core.volume import Volume, affine_from_geometry
    from mvl_pipeline.ingestion.result import validate_image

    config = IngestConfig.from_params({})
    array = np.random.default_rng(0).normal(size=(10, 10, 10)).astype(np.float32)
    validate_image(Volume(array, affine_from_geometry((0.5, 0.5, 3.0))), config)
    for spacing in ((0.001, 0.001, 0.001), (40.0, 40.0, 40.0), (1.0, 1.0, 25.0)):
        with pytest.raises(ImplausibleGeometryError, match=r"outside ingest.spacing_range_mm \[0.01, 20.0\]"):
            validate_image(Volume(array, affine_from_geometry(spacing)), config)
    wide = IngestConfig.from_params({"spacing_range_mm": [0.0001, 50]})
    validate_image(Volume(array, affine_from_geometry((40.0, 40.0, 40.0))), wide)
    assert wide.settings_id() != config.settings_id()  # a changed range re-ingests
    with pytest.raises(ValueError, match="spacing_range_mm must be"):
        IngestConfig.from_params({"spacing_range_mm": [5, 1]})
