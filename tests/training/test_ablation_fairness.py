"""The ablation is fair by construction: from the same seed, every arm (built the way a trial
builds it: ``tune_driver.arm_models`` + ``ablation_trial.train_config``) starts bit-identical in
everything it shares with the others, sees the same patches (sampling AND augmentation) in the same
order through the real training loop, and gets the same optimiser steps and learning-rate
schedule; another seed changes all of that."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mvl_pipeline.core.case import Case
from mvl_pipeline.core.volume import Volume
from mvl_pipeline.model import MedVisionLlamaConfig, build_model
from mvl_pipeline.training import loop as loop_module
from mvl_pipeline.training import tune_driver
from mvl_pipeline.training.ablation_config import AblationConfig
from mvl_pipeline.training.ablation_trial import TrialContext, model_config_for, train_config
from mvl_pipeline.training.config import LoopConfig
from mvl_pipeline.training.session import Session

VIT_ARMS = ("pretrained", "shuffled", "random", "bridge_only", "none")
BRIDGE_ARMS = ("pretrained", "shuffled", "random", "bridge_only")
MODEL = {
    "embed_dim": 16, "depth": 2, "num_heads": 2, "patch_size": [4, 4, 4], "precision": "fp32", "token_budget": 8,
    "decoder": {"taps": [1], "channels": [8, 8], "stem_channels": 4},
    "llm": {"mode": "pretrained", "source": "smollm2-offline", "layer_index": -1},
}  # fmt: skip
PLAN = {"patch_size": [16, 16, 16], "embed_patch_size": [4, 4, 4], "label_values": [0, 1], "label_names": {"1": "cube"},
        "target_spacing": [1.0, 1.0, 1.0]}  # fmt: skip


def cube_case(case_id: str, offset: int, seed: int) -> Case:
    label = np.zeros((16, 16, 16), np.uint8)
    label[offset : offset + 6, offset : offset + 6, offset : offset + 6] = 1
    image = (2.0 * label - 1.0 + np.random.default_rng(seed).normal(0.0, 0.1, label.shape)).astype(np.float32)
    return Case(case_id, f"pt-{case_id}", Volume(image, np.eye(4)), Volume(label, np.eye(4)))


CASES = {f"case-{i}": cube_case(f"case-{i}", offset, seed=i) for i, offset in enumerate((2, 5, 8, 4))}


def context(llm_cache_dir: str) -> TrialContext:
    """The context a trial gets, with the project's arm definitions and a tiny budget."""
    config = AblationConfig()
    models = tune_driver.arm_models(MODEL, config, PLAN)
    loop = LoopConfig.from_params({"epochs": 2, "steps_per_epoch": 3, "val_every": 2, "batch_size": 2,
                                   "torch_threads": 1}).to_dict()  # fmt: skip
    return TrialContext(
        trials_dir="unused", run_names=tune_driver.run_names(models, config), model_configs=models, loop=loop,
        plan=PLAN, class_names={1: "cube"}, train_ids=["case-0", "case-1", "case-2"], val_ids=["case-3"],
        loaders={c: (lambda case=case: case) for c, case in CASES.items()}, test_cases=[], llm_cache_dir=llm_cache_dir,
        scaling={"num_workers": 1, "cpus_per_worker": 1, "use_gpu": False, "gpus_per_worker": 0}, max_failures=0,
        num_to_keep=1, storage_timeouts={}, evaluate={}, scoring_id="", mlflow=None, score_in_trial=True, train_in_trial=True, tags={},
    )  # fmt: skip


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def built(ctx: TrialContext, arm: str, seed: int) -> torch.nn.Module:
    cfg = MedVisionLlamaConfig.from_params(model_config_for(ctx, arm, seed))
    return build_model(cfg, llm_cache_dir=ctx.llm_cache_dir, seed=seed)


def test_every_arm_starts_bit_identical_in_what_it_shares(llm_cache_dir):
    ctx = context(llm_cache_dir)
    weights = {arm: trainable(built(ctx, arm, seed=5)) for arm in VIT_ARMS}
    # what the plain ViT has, every bridge arm has too; the bridge arms have the same trainables
    assert set(weights["none"]) < set(weights["pretrained"])
    assert all(set(weights[a]) == set(weights["pretrained"]) for a in BRIDGE_ARMS)
    assert {n for n in weights["pretrained"] if n not in weights["none"]} == {
        "llm.proj_in.weight", "llm.proj_in.bias", "llm.proj_out.weight", "llm.proj_out.bias"
    }  # fmt: skip
    for arm in VIT_ARMS[1:]:
        for name, tensor in weights[arm].items():
            assert torch.equal(tensor, weights["pretrained"][name]), f"{arm}: {name} starts otherwise than in pretrained"
    # another seed starts elsewhere (the comparison above can fail)
    other = trainable(built(ctx, "none", seed=6))
    moved = [n for n, t in other.items() if not torch.equal(t, weights["none"][n])]
    assert len(moved) >= 5 and "patch_embed.proj.weight" in moved, moved

def test_the_arms_differ_where_they_should_and_only_there(llm_cache_dir):
    ctx = context(llm_cache_dir)
    layers = {}
    for arm in ("pretrained", "shuffled", "random"):
        model = built(ctx, arm, seed=5)
        layers[arm] = {n: p.detach().float() for n, p in model.llm.layer.named_parameters()}
    assert built(ctx, "bridge_only", seed=5).llm.layer is None and built(ctx, "none", seed=5).llm is None
    name = next(n for n in layers["pretrained"] if n.endswith("q_proj.weight"))
    pretrained, shuffled, random = (layers[a][name] for a in ("pretrained", "shuffled", "random"))
    assert not torch.equal(shuffled, pretrained) and torch.equal(shuffled.flatten().sort().values, pretrained.flatten().sort().values)
    assert not torch.equal(random, pretrained)
    assert random.mean().item() == pytest.approx(pretrained.mean().item(), abs=2e-3)
    assert random.std().item() == pytest.approx(pretrained.std().item(), rel=0.05)
    # the trial's seed is the layer's draw: shuffled with another seed is another permutation
    other = built(ctx, "shuffled", seed=6)
    assert not torch.equal(dict(other.llm.layer.named_parameters())[name].float(), shuffled)
    assert ctx.model_configs["cnn"]["preset"] == "cnn" and ctx.model_configs["none"]["llm"]["mode"] == "none"


class Recorder:
    """Wraps the loop's augmentation and optimiser to record every batch and every step's lr."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.lrs: list[list[float]] = []
        self.hyper: list[dict[str, Any]] = []
        real_augment, real_optimizers = loop_module.augment, loop_module.configure_optimizers

        def augment(x, y, rng, config):
            out = real_augment(x, y, rng, config)
            self.batches.append((out[0].clone(), out[1].clone()))
            return out

        def configure_optimizers(model, **kwargs):
            optimizer = real_optimizers(model, **kwargs)
            self.hyper.append({k: v for k, v in optimizer.defaults.items() if k in ("lr", "betas", "eps", "weight_decay")}
                              | {"decay": sorted(g["weight_decay"] for g in optimizer.param_groups)})  # fmt: skip
            optimizer.register_step_pre_hook(lambda opt, args, kw: self.lrs.append([g["lr"] for g in opt.param_groups]))
            return optimizer

        monkeypatch.setattr(loop_module, "augment", augment)
        monkeypatch.setattr(loop_module, "configure_optimizers", configure_optimizers)


class CPUSession(Session):
    def device(self) -> torch.device:
        return torch.device("cpu")



def trained(ctx: TrialContext, arm: str, seed: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Recorder:
    with monkeypatch.context() as patch:
        recorder = Recorder(patch)
        loop_module.run_training(train_config(ctx, arm, seed, None), CPUSession())
    return recorder


def test_same_patches_in_the_same_order_and_the_same_schedule_whatever_the_arm(llm_cache_dir, monkeypatch, tmp_path):
    ctx = context(llm_cache_dir)
    runs = {arm: trained(ctx, arm, 7, monkeypatch, tmp_path) for arm in ("pretrained", "none", "cnn")}
    reference = runs["pretrained"]
    steps = ctx.loop["epochs"] * ctx.loop["steps_per_epoch"]
    assert len(reference.batches) == steps and len(reference.lrs) == steps
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(reference.batches, reference.batches[1:], strict=False))
    for arm in ("none", "cnn"):
        run = runs[arm]
        assert len(run.batches) == steps
        for index, ((x, y), (rx, ry)) in enumerate(zip(run.batches, reference.batches, strict=True)):
            assert torch.equal(x, rx) and torch.equal(y, ry), f"{arm}: batch {index} differs from pretrained's"
        assert [lrs[0] for lrs in run.lrs] == [lrs[0] for lrs in reference.lrs], arm  # the schedule, step by step
        assert run.hyper == reference.hyper, arm  # lr, betas, eps, weight decay (matrices only)
    # another seed, another stream of patches (the comparison above can fail)
    other = trained(ctx, "pretrained", 8, monkeypatch, tmp_path)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(other.batches, reference.batches, strict=True))
