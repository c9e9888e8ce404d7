"""The training loop in one plain process (``Session``): history, checkpoints, resume,
determinism and validation, on a tiny model and 16^3 synthetic cases with a cube label."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from mvl_pipeline.core.case import Case
from mvl_pipeline.core.volume import Volume
from mvl_pipeline.formats.model_bundle import read_weights
from mvl_pipeline.model import MedVisionLlamaConfig, build_model
from mvl_pipeline.training.loop import eta_s, run_training, validate
from mvl_pipeline.training.session import Session

TINY_MODEL = {
    "num_classes": 2,
    "embed_dim": 16,
    "depth": 1,
    "num_heads": 2,
    "patch_size": [4, 4, 4],
    "pos_grid": [2, 2, 2],
    "precision": "fp32",
    "llm": {"mode": "none"},
    "decoder": {"taps": [1], "channels": [8, 8], "stem_channels": 4},
}
NO_AUGMENT = {"flip_prob": 0.0, "rotate_prob": 0.0, "scale_prob": 0.0, "intensity_prob": 0.0, "noise_prob": 0.0}


def cube_case(case_id: str, offset: int, seed: int) -> Case:
    """16^3: a bright 6^3 cube (label 1) on a dark, slightly noisy background."""
    label = np.zeros((16, 16, 16), np.uint8)
    label[offset : offset + 6, offset : offset + 6, offset : offset + 6] = 1
    noise = np.random.default_rng(seed).normal(0.0, 0.1, label.shape)
    image = (2.0 * label - 1.0 + noise).astype(np.float32)
    affine = np.eye(4)
    return Case(case_id, f"pt-{case_id}", Volume(image, affine), Volume(label, affine))


CASES = {f"case-{i}": cube_case(f"case-{i}", offset, seed=i) for i, offset in enumerate((2, 5, 8, 4))}


def training_config(tmp_path: Path, **loop: Any) -> dict[str, Any]:
    return {
        "loop": {
            "epochs": 2, "steps_per_epoch": 2, "batch_size": 2, "lr": 0.01, "warmup_epochs": 0.0,
            "val_every": 1, "seed": 3, "torch_threads": 1, "augment": NO_AUGMENT, **loop,
        },  # fmt: skip
        "model": TINY_MODEL,
        "plan": {"patch_size": [8, 8, 8]},
        "classes": [1],
        "loaders": {case_id: (lambda case=case: case) for case_id, case in CASES.items()},
        "train_ids": ["case-0", "case-1", "case-2"],
        "val_ids": ["case-3"],
        "llm_cache_dir": str(tmp_path / "llm-cache"),
    }


class RecordingSession(Session):
    """The plain session on the CPU; copies every reported checkpoint (the loop deletes its own)."""

    def __init__(self, keep: Path, restore: Path | None = None) -> None:
        self.keep, self.restore = keep, restore
        self.reports: list[tuple[dict[str, Any], Path | None]] = []
        self.closed = 0

    def close(self) -> None:
        self.closed += 1

    def get_checkpoint_dir(self) -> str | None:
        return None if self.restore is None else str(self.restore)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        kept = None
        if checkpoint_dir is not None:
            kept = self.keep / f"report-{len(self.reports)}"
            shutil.copytree(checkpoint_dir, kept)
        self.reports.append((dict(metrics), kept))

    def device(self) -> torch.device:
        return torch.device("cpu")



def train(tmp_path: Path, name: str, restore: Path | None = None, **loop: Any):
    session = RecordingSession(tmp_path / name, restore)
    (tmp_path / name).mkdir()
    return run_training(training_config(tmp_path, **loop), session), session


def test_history_has_one_entry_per_epoch_with_loss_and_validation_dice(tmp_path):
    state, session = train(tmp_path, "run", epochs=3, val_every=1)
    assert session.closed == 1  # what the session holds is given back (RaySession: a restored checkpoint's copy)
    history = state["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert state["epoch"] == 2 and state["global_step"] == 3 * 2
    for entry in history:
        assert np.isfinite(entry["train_loss"])
        assert entry["skipped_steps"] == 0
        assert 0.0 <= entry["val_dice"] <= 1.0
        assert entry["val_dice"] == entry["val_dice_1"]  # one class: the mean is that class
    assert state["best_val_dice"] == max(h["val_dice"] for h in history)
    assert state["resumed_after_epochs"] == []


def test_loss_decreases_on_a_trivially_learnable_task(tmp_path):
    state, _ = train(tmp_path, "run", epochs=6, steps_per_epoch=4, val_every=6, lr=0.02)
    losses = [h["train_loss"] for h in state["history"]]
    assert losses[-1] < 0.8 * losses[0], losses
    assert state["history"][-1]["val_dice"] > 0.5  # and it finds the cube of the held-out case


def test_checkpoints_are_reported_only_on_validated_epochs_and_hold_the_model(tmp_path):
    state, session = train(tmp_path, "run", epochs=3, val_every=2)
    epochs = [m["epoch"] for m, _ in session.reports]
    with_checkpoint = [m["epoch"] for m, kept in session.reports if kept is not None]
    assert epochs == [0, 1, 2]
    assert with_checkpoint == [1, 2]  # every 2nd epoch and the last one
    assert "val_dice" not in session.reports[0][0]
    assert all("val_dice" in m for m, kept in session.reports if kept is not None)

    weights_1, config_1 = read_weights(session.reports[1][1] / "model")
    weights_2, config_2 = read_weights(session.reports[2][1] / "model")
    expected = MedVisionLlamaConfig.from_params(TINY_MODEL).to_dict()
    assert config_1["model"] == expected and config_2["model"] == expected
    assert config_2["llm_reference"] is None  # llm mode none: nothing frozen to refer to
    assert weights_1.keys() == weights_2.keys() and weights_1
    assert any(not torch.equal(weights_1[k], weights_2[k]) for k in weights_1)  # it trained on
    saved_state = json.loads((session.reports[2][1] / "trainer_state.json").read_text())
    assert saved_state["epoch"] == 2 and len(saved_state["history"]) == 3
    assert saved_state["history"] == json.loads(json.dumps(state["history"]))


def test_resume_continues_after_the_saved_epoch_as_if_never_stopped(tmp_path):
    full, full_session = train(tmp_path, "full", epochs=3, val_every=1)
    after_epoch_0 = full_session.reports[0][1]
    resumed, session = train(tmp_path, "resumed", restore=after_epoch_0, epochs=3, val_every=1)

    assert [m["epoch"] for m, _ in session.reports] == [1, 2]  # epoch 0 is not trained again
    assert resumed["resumed_after_epochs"] == [0]
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2]
    assert resumed["global_step"] == full["global_step"]
    for got, want in zip(resumed["history"][1:], full["history"][1:], strict=True):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)
        assert got["lr"] == pytest.approx(want["lr"])
    saved = json.loads((session.reports[-1][1] / "trainer_state.json").read_text())
    assert saved["resumed_after_epochs"] == [0]


def test_resuming_a_finished_run_reports_its_last_epoch_and_trains_nothing(tmp_path):
    full, full_session = train(tmp_path, "full", epochs=2, val_every=1)
    final = full_session.reports[-1][1]
    again, session = train(tmp_path, "again", restore=final, epochs=2, val_every=1)
    assert len(again["history"]) == 2 and again["global_step"] == full["global_step"]
    assert again["resumed_after_epochs"] == [1]
    [(metrics, kept)] = session.reports
    assert metrics == json.loads(json.dumps(full["history"][-1]))
    assert kept is not None


def test_same_seed_gives_identical_losses_and_another_seed_does_not(tmp_path):
    first, _ = train(tmp_path, "a", epochs=2, val_every=2, seed=7)
    second, _ = train(tmp_path, "b", epochs=2, val_every=2, seed=7)
    other, _ = train(tmp_path, "c", epochs=2, val_every=2, seed=8)
    losses = [h["train_loss"] for h in first["history"]]
    assert losses == [h["train_loss"] for h in second["history"]]
    assert first["history"][-1]["val_dice"] == second["history"][-1]["val_dice"]
    assert losses != [h["train_loss"] for h in other["history"]]


def overflowing(case_id: str) -> Case:
    """Finite voxels so large (1e30) that the fp32 forward overflows: the loss and gradients of
    every step that samples this case are NaN, as a numerically failing step is."""
    case = CASES[case_id]
    return Case(case_id, case.patient_id, Volume(case.image.array * 1e30, case.image.affine), case.label)


def test_a_step_with_a_non_finite_gradient_is_skipped_and_the_weights_stay_finite(tmp_path):
    config = training_config(tmp_path, epochs=3, steps_per_epoch=4, val_every=3)
    config["loaders"] = {**config["loaders"], "case-1": lambda: overflowing("case-1")}
    session = RecordingSession(tmp_path)
    state = run_training(config, session)
    skipped = [h["skipped_steps"] for h in state["history"]]
    assert 0 < sum(skipped) < 3 * 4, skipped  # batches without case-1 still train
    assert state["skipped_steps"] == sum(skipped) and state["global_step"] == 3 * 4  # the schedule kept its pace
    assert all(np.isfinite(h["train_loss"]) for h in state["history"])  # the mean of the steps taken
    weights, _ = read_weights(session.reports[-1][1] / "model")
    assert all(torch.isfinite(w).all() for w in weights.values())  # without the guard: NaN everywhere
    assert 0.0 <= state["history"][-1]["val_dice"] <= 1.0


def test_a_skipped_first_step_does_not_warn_of_a_wrong_scheduler_call_order(tmp_path):
    config = training_config(tmp_path, epochs=1)
    config["loaders"] = {case_id: (lambda case_id=case_id: overflowing(case_id)) for case_id in CASES}
    with warnings.catch_warnings(record=True) as caught:  # every step skipped, the first one too
        warnings.simplefilter("always")
        with pytest.raises(FloatingPointError):
            run_training(config, RecordingSession(tmp_path))
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]


def test_an_epoch_in_which_every_step_is_non_finite_stops_the_run_with_a_clear_error(tmp_path):
    config = training_config(tmp_path)
    config["loaders"] = {case_id: (lambda case_id=case_id: overflowing(case_id)) for case_id in CASES}
    session = RecordingSession(tmp_path)
    with pytest.raises(FloatingPointError, match="epoch 1: every one of its 2 steps had a non-finite gradient"):
        run_training(config, session)
    assert session.closed == 1  # given back when the run fails too


def test_a_training_case_without_label_is_refused(tmp_path):
    config = training_config(tmp_path)
    unlabelled = Case("case-0", "pt-0", CASES["case-0"].image)
    config["loaders"] = {**config["loaders"], "case-0": lambda: unlabelled}
    with pytest.raises(ValueError, match="training case case-0 has no label"):
        run_training(config, RecordingSession(tmp_path))


class NearestLabel(nn.Module):
    """Logits ``-(x - c)^2`` for class c: the argmax is the label value the image holds."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("values", torch.arange(num_classes, dtype=torch.float32).view(1, -1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -((x - self.values) ** 2)  # (B, 1, X, Y, Z) - (1, C, 1, 1, 1) -> (B, C, X, Y, Z)


def labelled(image: np.ndarray, label: np.ndarray) -> Case:
    return Case("c", "p", Volume(image.astype(np.float32), np.eye(4)), Volume(label.astype(np.uint8), np.eye(4)))


def test_validate_returns_per_class_dice_sums_and_the_case_count():
    label = np.zeros((12, 12, 12), np.uint8)
    label[2:6, 2:6, 2:6] = 1
    label[8:10, 8:10, 8:10] = 2
    shifted = np.zeros_like(label)
    shifted[2:6, 2:6, 4:8] = 1  # half of the class-1 cube overlaps; class 2 missed entirely
    loaders = {
        "exact": lambda: labelled(label, label),  # Dice 1, 1
        "shifted": lambda: labelled(shifted, label),  # Dice 0.5, 0
    }
    sums = validate(
        NearestLabel(3), loaders, ["exact", "shifted"], roi_size=(8, 8, 8), num_classes=3,
        classes=[1, 2], overlap=0.25, sw_batch_size=2, device=torch.device("cpu"),
    )  # fmt: skip
    np.testing.assert_allclose(sums, [1.5, 1.0, 2.0])
    assert validate(
        NearestLabel(3), loaders, [], roi_size=(8, 8, 8), num_classes=3, classes=[1, 2],
        overlap=0.25, sw_batch_size=2, device=torch.device("cpu"),
    ).tolist() == [0.0, 0.0, 0.0]  # fmt: skip


def test_with_deep_supervision_the_loop_trains_the_coarse_heads_too(tmp_path):
    """The loop asks the model for its coarse logits and trains on them: the loss differs from
    the same run without the heads, the heads move, and the checkpoint holds them."""
    from mvl_pipeline.model import load_model

    runs = {}
    for deep in (False, True):
        config = training_config(tmp_path, epochs=1, steps_per_epoch=3, val_every=1)
        config["model"] = {**TINY_MODEL, "decoder": {**TINY_MODEL["decoder"], "deep_supervision": deep}}
        session = RecordingSession(tmp_path / f"ds-{deep}")
        (tmp_path / f"ds-{deep}").mkdir()
        runs[deep] = (run_training(config, session), session)
    (plain, _), (deep, session) = runs[False], runs[True]
    assert np.isfinite(deep["history"][0]["train_loss"])
    assert deep["history"][0]["train_loss"] != plain["history"][0]["train_loss"]
    [checkpoint] = [path for _, path in session.reports if path is not None]
    model = load_model(checkpoint / "model", llm_cache_dir=str(tmp_path / "llm-cache"))
    assert model.deep_supervision == 2  # channels [8, 8]: the token grid and the level above it
    untrained = build_model(MedVisionLlamaConfig.from_params(config["model"]), llm_cache_dir=str(tmp_path / "llm-cache"), seed=3)
    assert not torch.equal(model.decoder.aux_heads[0].weight, untrained.decoder.aux_heads[0].weight)


def test_the_logged_learning_rate_is_the_mean_rate_the_epochs_steps_used(tmp_path):
    """An audit (2026-12-04): the rate logged for an epoch was the schedule's rate after its last
    step, the next epoch's: a warm-up epoch from 4e-5 to 0.002 logged 0.002."""
    from mvl_pipeline.training.loop import _lr_lambda

    steps, epochs = 4, 3
    state, _ = train(tmp_path, "run", epochs=epochs, steps_per_epoch=steps, warmup_epochs=1.0, lr=0.01)
    factor = _lr_lambda(epochs * steps, steps, 0.02)
    for entry in state["history"]:
        used = [0.01 * factor(step) for step in range(entry["epoch"] * steps, (entry["epoch"] + 1) * steps)]
        assert entry["lr"] == pytest.approx(float(np.mean(used)))
    assert state["history"][0]["lr"] < 0.01 * factor(steps)  # the warm-up epoch: below its end rate


def test_a_case_preprocessed_with_another_plan_stops_the_fit_naming_what_to_run():
    """An audit (2026-12-05, real processes): a preprocess killed after writing a new plan left
    cases of the old plan; a plain `kedro run --pipelines fit` trained on the mix and recorded the
    new plan id. Every training and validation case must carry the plan the run trains with."""
    from mvl_pipeline.training.loop import current_case

    label = np.zeros((12, 12, 12), np.uint8)
    label[2:6, 2:6, 2:6] = 1
    stale = labelled(label, label)
    stale.meta["plan_id"] = "old-plan"
    with pytest.raises(ValueError, match=r"case c was made with plan old-plan, not with the current plan new-plan .*"
                                         r"kedro run --pipelines preprocess"):  # fmt: skip
        current_case(stale, "c", "new-plan")
    assert current_case(stale, "c", "old-plan") is stale
    with pytest.raises(ValueError, match="made with plan old-plan"):
        validate(
            NearestLabel(3), {"c": lambda: stale}, ["c"], roi_size=(8, 8, 8), num_classes=3, classes=[1, 2],
            overlap=0.25, sw_batch_size=2, device=torch.device("cpu"), plan_id="new-plan",
        )  # fmt: skip


def test_the_eta_is_the_epochs_left_at_the_mean_pace_validations_included():
    # epochs of 10 s, every second one 4 s longer for its validation: the last epoch's time alone
    # gave an ETA of 4 x 10 or 4 x 14 s after the fourth epoch, by whether it validated
    assert eta_s(elapsed_s=10 + 14 + 10 + 14, epochs_run=4, epochs_left=4) == pytest.approx(48.0)
    assert eta_s(elapsed_s=24.0, epochs_run=2, epochs_left=0) == 0.0
    # a resumed run counts the epochs this process ran, not those before the restart
    assert eta_s(elapsed_s=12.0, epochs_run=1, epochs_left=3) == pytest.approx(36.0)
