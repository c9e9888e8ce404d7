"""The ``ablation`` parameter block (conf/base/parameters_ablation.yml): the grid of arms x seeds,
what each arm changes in the model, the per-trial training budget, how Ray Tune runs it, and the
statistics plan (``evaluation.ablation.StatisticsPlan``). Defaults equal the YAML
(tests/core/test_parameters.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mvl_pipeline.core.config import ConfigBlock
from mvl_pipeline.evaluation.ablation import StatisticsPlan

#: What each default arm changes in ``params:model`` (everything else is shared by all arms).
DEFAULT_ARM_MODELS: dict[str, dict[str, Any]] = {
    "pretrained": {"llm": {"mode": "pretrained"}},
    "shuffled": {"llm": {"mode": "shuffled"}},
    "random": {"llm": {"mode": "random"}},
    "bridge_only": {"llm": {"mode": "bridge_only"}},
    "none": {"llm": {"mode": "none"}},
    "cnn": {"preset": "cnn"},
}


#: How a local Ray trains a trial of one worker: in the Tune trial's own process, or as a Ray Train
#: run (as on a cluster, where a trial is always a Ray Train run).
LOCAL_ENGINES = ("tune", "ray_train")


@dataclass(frozen=True)
class TrialBudget(ConfigBlock):
    """``ablation.trial``: the overrides of ``fit.loop`` every trial trains with (same for all arms)."""

    WHERE = "ablation.trial"

    epochs: int = 70
    steps_per_epoch: int = 35
    val_every: int = 2
    lr: float = 0.004  # peak learning rate (fit.loop's schedule: warm-up, then cosine decay)

    def __post_init__(self) -> None:
        if min(self.epochs, self.steps_per_epoch, self.val_every) < 1:
            raise ValueError("ablation.trial: epochs, steps_per_epoch and val_every must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"ablation.trial.lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class AblationConfig(ConfigBlock):
    """The ``ablation`` block."""

    WHERE = "ablation"

    arms: tuple[str, ...] = ("pretrained", "shuffled", "random", "bridge_only", "none", "cnn")
    reference: str = "pretrained"
    seeds: tuple[int, ...] = (0, 1, 2)
    arm_models: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: dict(DEFAULT_ARM_MODELS))
    trial: TrialBudget = field(default_factory=TrialBudget)
    crop_size: tuple[int, int, int] | None = None
    max_concurrent_trials: int = 4
    local_concurrent_trials: int = 2
    local_engine: str = "tune"
    storage_path: str = "data/06_models/ablation"
    name: str = "auto"
    statistics: StatisticsPlan = field(default_factory=StatisticsPlan)

    def __post_init__(self) -> None:
        object.__setattr__(self, "arms", tuple(str(a) for a in self.arms))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if len(self.arms) < 2 or len(set(self.arms)) != len(self.arms):
            raise ValueError(f"ablation.arms needs at least two distinct arms; got {list(self.arms)}")
        unknown = [a for a in self.arms if a not in self.arm_models]
        if unknown:
            raise ValueError(f"ablation.arms {unknown} have no entry in ablation.arm_models (known: {sorted(self.arm_models)})")
        bad_names = [a for a in self.arms if not a.replace("_", "").isalnum()]
        if bad_names:
            raise ValueError(f"ablation.arms {bad_names}: names are letters, digits and '_' (they name folders and runs)")
        if self.reference not in self.arms:
            raise ValueError(f"ablation.reference {self.reference!r} is not one of ablation.arms {list(self.arms)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"ablation.seeds must be distinct and not empty; got {list(self.seeds)}")
        if self.max_concurrent_trials < 1:
            raise ValueError("ablation.max_concurrent_trials must be >= 1")
        if self.local_concurrent_trials < 1:
            raise ValueError("ablation.local_concurrent_trials must be >= 1")
        if self.local_engine not in LOCAL_ENGINES:
            raise ValueError(f"ablation.local_engine must be one of {list(LOCAL_ENGINES)}; got {self.local_engine!r}")
        if self.crop_size is not None and (len(self.crop_size) != 3 or min(self.crop_size) < 1):
            raise ValueError(f"ablation.crop_size must be null or 3 positive ints; got {self.crop_size}")
