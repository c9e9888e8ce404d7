"""The ``preprocess`` parameter block (conf/base/parameters_preprocess.yml) as one typed object:
where the body is, the fingerprint, the plan, how cases are computed, and the patient split."""

from __future__ import annotations

from dataclasses import dataclass, field

from mvl_pipeline.core.config import ConfigBlock
from mvl_pipeline.preprocessing.crop import BodyMaskConfig
from mvl_pipeline.preprocessing.drift import DriftConfig
from mvl_pipeline.preprocessing.fingerprint import FingerprintConfig
from mvl_pipeline.preprocessing.plan import PlanConfig
from mvl_pipeline.preprocessing.split import SplitConfig


@dataclass(frozen=True)
class ApplyConfig(ConfigBlock):
    """``preprocess.apply``: computing the model-input cases."""

    WHERE = "preprocess.apply"

    workers: int = 0  # threads; 0: one per core (max 8)
    window: int = 0  # cases computed ahead of the save; 0: 2 x workers
    progress_every: int = 10


@dataclass(frozen=True)
class PreprocessConfig(ConfigBlock):
    """``params:preprocess``."""

    WHERE = "preprocess"

    body_mask: BodyMaskConfig = field(default_factory=BodyMaskConfig)
    fingerprint: FingerprintConfig = field(default_factory=FingerprintConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    apply: ApplyConfig = field(default_factory=ApplyConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
