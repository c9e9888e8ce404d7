"""The champion/challenger gate: the statistic and the decision.

The challenger (this run's model) becomes ``champion`` only if its holdout Dice beats the current
champion's by at least ``margin``, both scored *now* on the same holdout cases with the same
evaluation code (each model under its own preprocessing plan). Otherwise it is registered as
``challenger`` with the comparison recorded. The first model becomes champion.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mvl_pipeline.core.config import ConfigBlock


@dataclass(frozen=True)
class RegisterConfig(ConfigBlock):
    """``params:register`` (conf/base/parameters_register.yml)."""

    WHERE = "register"

    margin: float = 0.005  # a challenger must beat the champion's holdout Dice by this much
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"


def gate_score(summary_classes: Mapping[str, Any]) -> float:
    """The gate's figure: mean over classes of the mean holdout Dice."""
    means = [entry["dice"]["mean"] for entry in summary_classes.values() if entry["dice"]["mean"] is not None]
    return float(np.mean(means)) if means else float("nan")


def decide(challenger: float, champion: float | None, config: RegisterConfig) -> tuple[bool, str]:
    """``(promoted, reason)`` for a challenger's and a champion's gate scores (None: no champion)."""
    if champion is None:
        return True, "first model"
    promoted = bool(challenger >= champion + config.margin)
    relation = ">=" if promoted else "<"
    return promoted, f"holdout Dice {challenger:.4f} {relation} champion {champion:.4f} + margin {config.margin}"
