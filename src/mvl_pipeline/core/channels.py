"""Input channels of a case: several MR contrasts (or CT phases) that the model reads together.

A task declares its channels in order (``ingest.channels``); the first is the reference channel,
whose grid the others are resampled onto::

    channels:
      t1: {SeriesDescription: "(?i)t1"}
      t2: {SeriesDescription: "(?i)t2", Modality: "MR"}

A channel is a rule: attribute -> regular expression (``re.search``; every entry must match).
A DICOM series offers its header attributes (any keyword of its first slice: SeriesDescription,
ProtocolName, SequenceName, ScanningSequence, ImageType, Modality ...); the volumes of a 4-D image
offer ``index`` (0, 1 ...) and ``name`` (the MSD ``dataset.json`` modality of that index).
``name`` of a DICOM series is its SeriesDescription. An empty rule matches a source whose
``name`` equals the channel's name (case-insensitive). Exactly one source must match each channel:
none is a :class:`MissingChannelError` naming the channel, several an :class:`AmbiguousChannelError`.

What a case records of its channels (``meta["channels"]``: name, modality, rule, source index;
no PHI) goes through the fingerprint into the plan (``plan["channels"]``), which travels with the
model, so that predict applies the same rules to a new study.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mvl_pipeline.core.errors import AmbiguousChannelError, MissingChannelError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


@dataclass(frozen=True)
class ChannelRule:
    """One declared channel: its name and the attribute patterns a source must match."""

    name: str
    match: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _NAME.match(str(self.name)):
            raise ValueError(f"channel name {self.name!r}: letters, digits, '_', '.', '+', '-' only")
        match = {str(k): str(v) for k, v in (self.match or {}).items()}
        for key, pattern in match.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"channel {self.name!r}: {key} is not a regular expression ({exc})") from exc
        object.__setattr__(self, "match", match)

    def matches(self, attributes: Mapping[str, Any]) -> bool:
        if not self.match:
            return str(attributes.get("name", "")).strip().lower() == self.name.lower()
        return all(re.search(pattern, str(attributes.get(key, ""))) for key, pattern in self.match.items())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "match": dict(self.match)}


def rules_from_params(channels: Mapping[str, Mapping[str, Any] | None] | None) -> tuple[ChannelRule, ...]:
    """``ingest.channels`` (name -> rule, in order) as rules; empty: a single-channel task."""
    rules = tuple(ChannelRule(str(name), dict(rule or {})) for name, rule in (channels or {}).items())
    names = [r.name.lower() for r in rules]
    if len(set(names)) != len(names):
        raise ValueError(f"channel names must be distinct (case-insensitive); got {[r.name for r in rules]}")
    return rules


def msd_rules(modalities: Mapping[int, str]) -> tuple[ChannelRule, ...]:
    """The channels of an MSD task: its ``dataset.json`` modalities, by index, in index order."""
    rules = []
    for index, name in sorted(modalities.items()):
        safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", str(name)).strip("_") or f"channel{index}"
        rules.append(ChannelRule(safe, {"index": f"^{int(index)}$"}))
    return tuple(rules)


def modality_of(name: str) -> str:
    """The modality of an MSD channel name: ``CT`` for CT, ``MR`` for every MR contrast."""
    return "CT" if str(name).strip().upper() == "CT" else "MR"


def pick(rules: Sequence[ChannelRule], sources: Sequence[Mapping[str, Any]], *, what: str = "series") -> list[int]:
    """For each rule, the index of the one source that matches it (see module doc)."""
    chosen: list[int] = []
    for rule in rules:
        hits = [i for i, source in enumerate(sources) if rule.matches(source)]
        if not hits:
            raise MissingChannelError(
                f"channel {rule.name!r} is missing: none of the {len(sources)} {what} matches its rule"
            )
        if len(hits) > 1:
            raise AmbiguousChannelError(f"channel {rule.name!r}: {len(hits)} {what} match its rule")
        chosen.append(hits[0])
    for a, first in enumerate(chosen):
        for b in range(a + 1, len(chosen)):
            if chosen[b] == first:
                raise AmbiguousChannelError(
                    f"channels {rules[a].name!r} and {rules[b].name!r} match the same source ({what})"
                )
    return chosen


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def dicom_attributes(header: Any, rules: Sequence[ChannelRule]) -> dict[str, str]:
    """What the rules may look at in one series (its first slice's header): the keywords they
    name, and ``name`` = SeriesDescription. Kept in memory only (never logged or stored)."""
    keys = {key for rule in rules for key in rule.match} - {"name", "index"}
    attributes = {key: _text(header.get(key)) for key in sorted(keys)}
    attributes["name"] = _text(header.get("SeriesDescription"))
    return attributes


def plan_channels(plan: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The channels a plan (or a fingerprint, or a case's meta) records; [] for one channel."""
    return [dict(c) for c in plan.get("channels") or []]


def n_channels(plan: Mapping[str, Any]) -> int:
    """Input channels of a model trained under ``plan`` (1 for a single-channel plan)."""
    return len(plan_channels(plan)) or 1


def rules_of(channels: Sequence[Mapping[str, Any]]) -> tuple[ChannelRule, ...]:
    """The rules recorded with channels (``plan["channels"]``)."""
    return tuple(ChannelRule(str(c["name"]), dict(c.get("match") or {})) for c in channels)
