"""The ``ingest`` parameter block (conf/base/parameters_ingest.yml) as one typed object, handed
whole to the worker processes (it is picklable)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mvl_pipeline.core.channels import ChannelRule, rules_from_params
from mvl_pipeline.core.config import ConfigBlock
from mvl_pipeline.core.hashing import json_digest
from mvl_pipeline.core.parallel import resolve_workers

#: Settings that do not change what a unit ingests into (so a change re-ingests nothing).
_NOT_SHAPING = ("workers", "batch_size", "progress")
DEFAULT_SPACING_RANGE_MM = (0.01, 20.0)


@dataclass(frozen=True)
class IngestConfig(ConfigBlock):
    """``params:ingest``: the label map, pairing rules, validation tolerances, de-identification."""

    WHERE = "ingest"

    #: name -> value of the project's label map; null (or empty) = the source's own map (an MSD
    #: task's dataset.json, a SEG's segment numbers): the right choice for one task at a time.
    labels: Mapping[str, int] | None = None
    label_aliases: Mapping[str, str] = field(default_factory=dict)
    label_suffixes: tuple[str, ...] = ("_label", "_labels", "_seg", "_mask")
    image_suffixes: tuple[str, ...] = ("_image", "_img", "_ct", "_0000")
    workers: int = 0
    batch_size: int = 8
    min_slices: int = 8
    #: the plausible voxel spacing in mm, every axis: outside it a header is taken to be wrong
    #: (e.g. in metres) and the case is quarantined as implausible_geometry
    spacing_range_mm: tuple[float, float] = DEFAULT_SPACING_RANGE_MM
    spacing_tolerance: float = 0.05
    retain_longitudinal_temporal: bool = False
    quarantine_burned_in: bool = True
    keep_unlabelled: bool = False
    volume_modality: str = "auto"
    #: name -> rule (attribute -> regex) of each input channel, in order (core/channels.py);
    #: empty: one channel per case (an MSD task with several modalities: those, by index).
    channels: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    channel_min_overlap: float = 0.5  # share of the reference grid every channel must cover
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", dict(self.labels or {}))
        object.__setattr__(self, "channels", {str(k): dict(v or {}) for k, v in (self.channels or {}).items()})
        rules_from_params(self.channels)  # names and regular expressions are valid
        rule = f"ingest.spacing_range_mm must be [low, high] with 0 < low < high; got {self.spacing_range_mm!r}"
        if not isinstance(self.spacing_range_mm, list | tuple) or len(self.spacing_range_mm) != 2:
            raise ValueError(rule)
        low, high = (float(v) for v in self.spacing_range_mm)
        if not 0 < low < high:
            raise ValueError(rule)
        object.__setattr__(self, "spacing_range_mm", (low, high))
        if not 0.0 <= self.channel_min_overlap <= 1.0:
            raise ValueError("ingest.channel_min_overlap must be in [0, 1]")
        bad = {name: value for name, value in self.labels.items() if not 0 < int(value) < 256}
        if bad:
            raise ValueError(f"ingest.labels values must be 1-255 (0 is background): {bad}")

    @property
    def aliases(self) -> dict[str, str]:
        """Label aliases, lower-cased on both sides (names are matched case-insensitively)."""
        return {str(k).lower(): str(v).lower() for k, v in self.label_aliases.items()}

    @property
    def channel_rules(self) -> tuple[ChannelRule, ...]:
        """The declared input channels; () for single-channel cases."""
        return rules_from_params(self.channels)

    @property
    def label_names(self) -> dict[int, str]:
        """Project label value -> name (0, background, is not listed)."""
        return {int(v): str(k) for k, v in self.labels.items()}

    def settings_id(self) -> str:
        """Hash of everything that shapes a unit's result: a change re-ingests every unit."""
        shaping: dict[str, Any] = {k: v for k, v in self.to_dict().items() if k not in _NOT_SHAPING}
        if not self.channels:  # single channel: the same id as before channels existed
            shaping.pop("channels")
            shaping.pop("channel_min_overlap")
        else:  # in order: the first channel is the reference grid, and the order is the model's input
            shaping["channels"] = [[name, rule] for name, rule in self.channels.items()]
        if tuple(self.spacing_range_mm) == DEFAULT_SPACING_RANGE_MM:  # the same id as before it existed
            shaping.pop("spacing_range_mm")
        return json_digest(shaping)

    def n_workers(self) -> int:
        return resolve_workers(self.workers)
