"""Which source is which input channel of a case, at ingest and at predict (the same rules).

- :func:`rules_for_unit`: the declared channels (``ingest.channels``) or, when none are declared,
  those of an MSD task whose ``dataset.json`` lists several modalities (by index).
- :func:`volume_channels`: the volumes of a 4-D image (already on one grid) -> the channels.
- :func:`series_for_channels` + :func:`check_frames`: the image series of a DICOM study -> the
  series of each channel, all in the reference channel's Frame of Reference; the caller assembles
  them and :func:`~mvl_pipeline.preprocessing.channels.stack_channels` puts them on one grid.

At predict, :func:`recorded_volume_channels` takes a 4-D image's channels by the names of its
volumes when the input names them (an MSD task folder's ``dataset.json``), else by the indices
the training images had them at. What a case records of its channels (:func:`channel_record`) is
PHI-free: the channel's name and rule (from the configuration), its modality, its index in a 4-D
source, that source's volume count and the name a task's ``dataset.json`` gives that volume, and
its coverage of the reference grid; never a SeriesDescription or a UID.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mvl_pipeline.core.channels import (
    ChannelRule,
    dicom_attributes,
    modality_of,
    msd_rules,
    pick,
)
from mvl_pipeline.core.errors import (
    AmbiguousChannelError,
    ChannelError,
    ChannelFrameMismatchError,
    MissingChannelError,
)
from mvl_pipeline.core.volume import Volume, guess_modality
from mvl_pipeline.formats.msd import channel_name


def rules_for_unit(channel_rules: Sequence[ChannelRule], channel_names: Sequence[str]) -> tuple[ChannelRule, ...]:
    """The channels a unit is assembled into; () for a single-channel case."""
    if channel_rules:
        return tuple(channel_rules)
    if len(channel_names) > 1:  # an MSD task with several modalities: its own channels
        return msd_rules(dict(enumerate(channel_names)))
    return ()


def channel_record(
    rule: ChannelRule,
    modality: str,
    *,
    index: int | None = None,
    coverage: float = 1.0,
    n_volumes: int | None = None,
    source_name: str | None = None,
) -> dict[str, Any]:
    record = {"name": rule.name, "modality": modality, "match": dict(rule.match), "index": index,
              "coverage": round(float(coverage), 4)}  # fmt: skip
    if n_volumes is not None:  # a 4-D source: how many volumes it held, and the picked one's name
        record["n_volumes"] = int(n_volumes)
        record["source_name"] = source_name
    return record


def volume_channels(
    image: Volume,
    rules: Sequence[ChannelRule],
    names: Sequence[str] = (),
    *,
    volume_modality: str = "auto",
) -> tuple[Volume, list[dict[str, Any]]]:
    """The declared channels of a (4-D) image: the volume each rule picks, channel-first float32,
    and what the case records of each channel. A 3-D image offers one volume (index 0).

    ``names`` are the MSD modality names by index (``name`` for the rules; also the modality:
    ``CT`` or MR); without them the modality is ``volume_modality`` (``auto``: guessed per volume).
    """
    sources = [{"index": str(i), "name": names[i] if i < len(names) else ""} for i in range(image.n_channels)]
    picked = pick(rules, sources, what="volumes of the image")
    records = []
    for rule, index in zip(rules, picked, strict=True):
        if index < len(names):
            modality = modality_of(names[index])
        elif volume_modality == "auto":
            modality = guess_modality(image.channel(index))
        else:
            modality = volume_modality.upper()
        records.append(channel_record(rule, modality, index=index, n_volumes=image.n_channels,
                                      source_name=names[index] if index < len(names) else None))  # fmt: skip
    array = np.stack([np.asarray(image.channel(i).array, dtype=np.float32) for i in picked])
    return Volume(array, image.affine.copy(), {"modality": records[0]["modality"]}), records


def series_for_channels(rules: Sequence[ChannelRule], first_headers: Mapping[str, Any]) -> list[str]:
    """The series (keys of ``first_headers``: series -> its first slice's header) of each channel."""
    keys = sorted(first_headers)
    sources = [dicom_attributes(first_headers[key], rules) for key in keys]
    return [keys[i] for i in pick(rules, sources, what="image series")]


def check_frames(rules: Sequence[ChannelRule], headers: Sequence[Any]) -> None:
    """Every channel's series lies in the reference channel's Frame of Reference."""
    frames = [str(header.get("FrameOfReferenceUID", "") or "") for header in headers]
    for rule, frame in zip(rules[1:], frames[1:], strict=True):
        if frame != frames[0]:
            raise ChannelFrameMismatchError(
                f"channel {rule.name!r} lies in another Frame of Reference than channel {rules[0].name!r}"
            )


def _same_name(a: Any, b: Any) -> bool:
    return str(a).strip().lower() == str(b).strip().lower()


def recorded_volume_channels(image: Volume, channels: Sequence[Mapping[str, Any]], names: Sequence[str] = ()) -> Volume:
    """The channels a model was trained on (``plan["channels"]``) out of a 4-D image at predict.

    With ``names`` (the input's volumes named by an MSD task folder's ``dataset.json``) each
    channel is the volume named as its training volume was (``source_name``), or, where the
    training images' names are not recorded or disagreed, the volume its rule picks, as at ingest.
    Without names, each channel is the volume at the index the training images had it at, and only
    when the image holds as many volumes as they did: otherwise which volume is which channel
    cannot be known, and the image is refused (never a channel from the wrong volume)."""
    wanted = [str(c["name"]) for c in channels]
    if names:
        sources = [{"index": str(i), "name": names[i] if i < len(names) else ""} for i in range(image.n_channels)]
        indices = []
        for channel in channels:
            if channel.get("source_name"):
                # by the rule the input's names went through (a model trained before it recorded the raw name)
                index = int(channel.get("index") or 0)
                recorded, shown = channel_name(index, channel["source_name"]), channel_name(index, channel["name"])
                hits = [i for i, source in enumerate(sources) if _same_name(source["name"], recorded)]
                if not hits:
                    raise MissingChannelError(
                        f"channel {shown!r} is missing: the training images held it in a volume named "
                        f"{recorded!r}, and no volume of the input is named so"
                    )
                if len(hits) > 1:
                    raise AmbiguousChannelError(f"channel {shown!r}: {len(hits)} volumes of the input share its name")
                indices.append(hits[0])
            else:
                rule = ChannelRule(str(channel["name"]), dict(channel.get("match") or {}))
                indices.extend(pick([rule], sources, what="volumes of the image"))
        if len(set(indices)) != len(indices):
            raise AmbiguousChannelError(f"two of the channels {wanted} are the same volume of the input")
    else:
        varied = [str(c["name"]) for c in channels if c.get("index") is None]
        if varied:
            raise ChannelError(
                f"the training images held the channel(s) {varied} at different volume indices, and this image does "
                "not name its volumes: give it as an MSD task folder whose dataset.json names them, or as a DICOM study"
            )
        held = sorted({int(c["n_volumes"]) for c in channels if c.get("n_volumes") is not None}) or [len(channels)]
        indices = [int(c["index"]) for c in channels]
        for name, index in zip(wanted, indices, strict=True):
            if index >= image.n_channels:
                raise MissingChannelError(
                    f"channel {name!r} is missing: the image holds {image.n_channels} volume(s), "
                    f"the model takes the channels {wanted}"
                )
        if image.n_channels not in held:
            raise ChannelError(
                f"the image holds {image.n_channels} volumes, the training images held {held[0]}: without the "
                f"volumes' names, which of them is which of the channels {wanted} cannot be known. Give it as an "
                "MSD task folder whose dataset.json names them, or with exactly the training images' volumes"
            )
    array = np.stack([np.asarray(image.channel(i).array, dtype=np.float32) for i in indices])
    return Volume(array, image.affine.copy(), {"modality": str(channels[0]["modality"])})
