"""Constructed ablation results whose answer is known, shared by the ablation's statistics and
report tests: the rows of results.csv and the histories the ``ablation`` pipeline writes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def results(effects: dict[str, float], *, patients: int = 30, seeds=(0, 1, 2), noise: float = 0.03,
            seed_shift: dict[int, float] | None = None, rng: int = 0) -> pd.DataFrame:  # fmt: skip
    """Rows (arm, seed, case, class) like the ablation's results.csv. Dice = the patient's own
    difficulty + the arm's effect + noise; HD95 moves against Dice, NSD with it."""
    generator = np.random.default_rng(rng)
    difficulty = generator.uniform(0.70, 0.85, patients)
    rows = []
    for arm, effect in effects.items():
        for seed in seeds:
            shift = (seed_shift or {}).get(seed, 0.0)
            for p in range(patients):
                for value, name in ((1, "anterior"), (2, "posterior")):
                    dice = difficulty[p] + effect + shift + generator.normal(0.0, noise)
                    rows.append({
                        "arm": arm, "seed": seed, "case_id": f"case-{p:03d}", "patient_id": f"pt-{p:03d}",
                        "class_value": value, "class_name": name, "voxels_label": 500, "dice": dice,
                        "hd95_mm": 4.0 - 20.0 * (dice - 0.8), "nsd": min(1.0, dice + 0.1),
                    })  # fmt: skip
    return pd.DataFrame(rows)


def histories(arms: list[str], seeds: list[int], *, epochs: int = 6) -> dict[str, Any]:
    """What run_ablation_node returns beside the results: the design and per-trial curves."""
    curve = lambda seed: [{"epoch": e, "train_loss": 1.0 / (e + 1 + seed), "val_dice": 0.8 - 0.5 / (e + 1)}  # noqa: E731
                          for e in range(epochs)]  # fmt: skip
    design = {"experiment": "ablation-test", "data_version": "d" * 12, "plan_id": "p" * 16, "git_commit": "c" * 40,
              "arms": arms, "seeds": seeds, "reference": arms[0], "trial": {"epochs": epochs, "steps_per_epoch": 5,
              "val_every": 1}, "crop_size": [40, 56, 40], "n_train_cases": 110, "n_validation_cases": 30}  # fmt: skip
    trials = {arm: {str(s): {"history": curve(s), "best_epoch": epochs - 1, "best_val_dice": curve(s)[-1]["val_dice"]}
                    for s in seeds} for arm in arms}  # fmt: skip
    return {"design": design, "arms": trials}
