"""What a model takes from the preprocessing plan it trains under (and checks against it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mvl_pipeline.core.channels import n_channels


def plan_in_channels(plan: Mapping[str, Any]) -> int:
    """Input channels of a model trained under ``plan``: one per planned channel (1 without)."""
    return n_channels(plan)


def token_grid(plan: Mapping[str, Any], patch_size: Sequence[int]) -> tuple[int, int, int]:
    """The training crop's token grid: plan patch size / embedding patch size, per axis."""
    return tuple(int(p) // int(e) for p, e in zip(plan["patch_size"], patch_size, strict=True))  # type: ignore[return-value]


def check_plan_fits(cfg: Any, plan: Mapping[str, Any]) -> None:
    """The plan must have been made for this model: the same embedding patch (crops are whole
    tokens of it) and no more tokens than the model's budget. Otherwise re-run ``preprocess``."""
    if cfg.preset == "cnn":
        return
    embed = [int(v) for v in plan.get("embed_patch_size", cfg.patch_size)]
    if embed != list(cfg.patch_size):
        raise ValueError(
            f"the preprocessing plan was made for embedding patches {embed} but model.patch_size is "
            f"{list(cfg.patch_size)}: run the preprocess pipeline again with this model configuration"
        )
    if any(int(p) % int(e) for p, e in zip(plan["patch_size"], cfg.patch_size, strict=True)):
        raise ValueError(f"plan patch_size {plan['patch_size']} is not whole tokens of {list(cfg.patch_size)}")
