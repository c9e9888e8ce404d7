"""Model presets (``model.preset``): each builds from conf/base's model block on a plan like the
Hippocampus one and trains a step; ``paper``'s layout; ``cnn`` is MONAI's DynUNet with the
nnU-Net topology; ``for_plan`` completes a config from the plan and refuses a foreign one."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from monai.networks.nets import DynUNet

from mvl_pipeline.model import (
    MedVisionLlamaConfig,
    build_model,
    configure_optimizers,
    model_from_weights,
    model_weights,
)
from mvl_pipeline.model.blocks import LoRALinear
from mvl_pipeline.model.cnn import CNNSegmenter, nnunet_topology
from mvl_pipeline.model.network import FROZEN_LLM_PREFIX, MedVisionLlama
from mvl_pipeline.model.presets import PRESETS
from mvl_pipeline.training.losses import make_loss, supervised_loss

PROJECT = Path(__file__).resolve().parents[2]

#: What the planner makes of MSD Hippocampus (~35x50x36 voxels at 1 mm, labels 0/1/2).
HIPPOCAMPUS_PLAN = {
    "patch_size": [40, 56, 40],
    "target_spacing": [1.0, 1.0, 1.0],
    "embed_patch_size": [8, 8, 8],
    "label_values": [0, 1, 2],
    "label_names": {"1": "anterior", "2": "posterior"},
}


def model_block() -> dict:
    """The shipped ``model`` block (conf/base/parameters_model.yml), a fresh copy each call."""
    return copy.deepcopy(yaml.safe_load((PROJECT / "conf" / "base" / "parameters_model.yml").read_text())["model"])


def preset_config(preset: str, plan: dict = HIPPOCAMPUS_PLAN, **overrides) -> MedVisionLlamaConfig:
    return MedVisionLlamaConfig.from_params({**model_block(), "preset": preset, **overrides}).for_plan(plan)


def test_the_shipped_block_selects_medvisionllama_with_the_pretrained_llm():
    block = model_block()
    assert block["preset"] == "medvisionllama" and block["llm"]["mode"] == "pretrained"
    assert sorted(PRESETS) == ["cnn", "medvisionllama", "paper"]


# -- one training step per preset -------------------------------------------------------------------
#: The two ViT presets load the packaged SmolLM2 layer: whichever test of the session comes first
#: converts the GGUF (~15-20 s on 2 cores), hence slow.
PRESET_CASES = [
    pytest.param("medvisionllama", marks=pytest.mark.slow),
    pytest.param("paper", marks=pytest.mark.slow),
    "cnn",
]


@pytest.mark.parametrize("preset", PRESET_CASES)
def test_each_preset_builds_on_the_hippocampus_plan_and_trains_one_step(preset, llm_cache_dir):
    cfg = preset_config(preset)
    assert cfg.preset == preset and cfg.num_classes == 3
    assert cfg.llm.mode == ("none" if preset == "cnn" else "pretrained")
    torch.manual_seed(0)
    model = build_model(cfg, llm_cache_dir=llm_cache_dir).train()
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    frozen = set(named) - trainable
    llm_weights = {n for n in named if n.startswith(FROZEN_LLM_PREFIX) and ".lora_" not in n}
    if preset == "cnn":
        assert not frozen and model.llm_reference is None
    else:
        assert llm_weights and llm_weights <= frozen  # the pretrained layer is loaded and frozen
        assert model.llm_reference.mode == "pretrained"
    lora = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert lora == (["llm.proj_in", "llm.proj_out"] if preset == "paper" else [])
    if preset == "paper":  # LoRA's base matrices are frozen, so the step below must not move them
        assert {"llm.proj_in.base.weight", "llm.proj_out.base.weight"} <= frozen

    optimizer = configure_optimizers(model, lr=1e-3, weight_decay=0.01)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(named[n]) for n in trainable}  # the optimiser sees only trainable ones
    before = {n: p.detach().clone() for n, p in named.items()}

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 40, 56, 40, generator=generator)
    target = torch.randint(0, 3, (2, 40, 56, 40), generator=generator)
    deep = getattr(model, "deep_supervision", 0)  # as the training loop asks (the CNN has no such heads)
    assert bool(deep) == (preset == "medvisionllama")  # the paper's reference trains its one output
    logits, coarse = model(x, aux=True) if deep else (model(x), [])
    assert logits.shape == (2, 3, 40, 56, 40) and logits.dtype == torch.float32
    loss = supervised_loss(make_loss(cfg.num_classes), logits, coarse, target, cfg.num_classes)
    assert torch.isfinite(loss) and loss.item() > 0
    optimizer.zero_grad()
    loss.backward()
    with_gradient = {n for n in trainable if named[n].grad is not None and named[n].grad.abs().sum() > 0}
    # LoRA's A gets no gradient at first (B starts at zero); every other trainable tensor does
    assert {n for n in trainable - with_gradient if not n.endswith("lora_a")} == set()
    optimizer.step()

    moved = {n for n in trainable if not torch.equal(named[n].detach(), before[n])}
    assert with_gradient <= moved, sorted(with_gradient - moved)[:5]
    unchanged_frozen = {n for n in frozen if torch.equal(named[n].detach(), before[n])}
    assert unchanged_frozen == frozen  # the frozen LLM layer (and LoRA bases) never move


# -- paper -----------------------------------------------------------------------------------------
def test_paper_puts_the_llm_right_after_the_patch_embedding_with_lora_on_the_mappers(
    llm_cache_dir, tiny_llama_dir
):
    # the layout does not depend on which Llama layer it is: a tiny one keeps this test fast
    cfg = preset_config("paper", llm={"mode": "pretrained", "source": str(tiny_llama_dir)})
    assert cfg.patch_size == (8, 8, 8) and cfg.pos_grid == (5, 7, 5)
    assert cfg.llm_position == 0 and cfg.decoder.taps == ()
    assert (cfg.llm.lora.rank, cfg.llm.lora.targets) == (4, ("proj_in", "proj_out"))
    model = build_model(cfg, llm_cache_dir=llm_cache_dir).eval()

    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert sorted(wrapped) == ["llm.proj_in", "llm.proj_out"]  # nothing inside the LLM layer
    for module in wrapped.values():
        assert not module.base.weight.requires_grad and not module.base.bias.requires_grad
        assert module.lora_a.requires_grad and module.lora_b.requires_grad and module.rank == 4

    calls: list[str] = []
    model.llm.register_forward_hook(lambda *_: calls.append("llm"))
    for index, block in enumerate(model.blocks):
        block.register_forward_hook(lambda *_, i=index: calls.append(f"block{i}"))
    with torch.no_grad():
        bottleneck, taps = model.encode(torch.randn(1, 1, 40, 56, 40))
    assert calls == ["llm", *(f"block{i}" for i in range(cfg.depth))]
    assert taps == [] and bottleneck.shape == (1, cfg.embed_dim, 5, 7, 5)  # no decoder taps


# -- cnn -------------------------------------------------------------------------------------------
def test_cnn_is_a_monai_dynunet_with_the_nnunet_topology_of_the_hippocampus_plan(llm_cache_dir):
    cfg = preset_config("cnn")
    # 40x56x40 at 1 mm: three x2 pools on every axis (then 5x7x5: odd, stop), 3x3x3 kernels
    assert cfg.cnn.strides == ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    assert cfg.cnn.kernel_sizes == ((3, 3, 3),) * 4
    assert cfg.cnn.filters == (16, 32, 64, 128)
    model = build_model(cfg, llm_cache_dir=llm_cache_dir)
    assert isinstance(model, CNNSegmenter) and isinstance(model.net, DynUNet)
    assert [list(s) for s in model.net.strides] == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert [list(k) for k in model.net.kernel_size] == [[3, 3, 3]] * 4
    assert list(model.net.filters) == [16, 32, 64, 128]
    assert model.divisor == (8, 8, 8)
    with pytest.raises(ValueError, match="not divisible by"):
        model(torch.zeros(1, 1, 40, 56, 36))


def test_cnn_topology_pools_a_thick_slice_axis_later_with_kernel_1_at_first():
    kernels, strides = nnunet_topology([128, 128, 32], [0.8, 0.8, 5.0])
    # z (5 mm) is more than 2x the finest spacing until x/y have been pooled twice (3.2 mm)
    assert strides == ((1, 1, 1), (2, 2, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    assert kernels == ((3, 3, 1), (3, 3, 1), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))
    total = [1, 1, 1]
    for stride in strides:
        total = [t * s for t, s in zip(total, stride, strict=True)]
    assert total == [32, 32, 8]  # every axis ends at 4 voxels: 128/32, 128/32, 32/8


def test_cnn_built_for_an_anisotropic_plan_runs_on_thick_slices(llm_cache_dir):
    plan = {**HIPPOCAMPUS_PLAN, "patch_size": [128, 128, 32], "target_spacing": [0.8, 0.8, 5.0]}
    cfg = preset_config("cnn", plan)
    assert cfg.cnn.kernel_sizes[0] == (3, 3, 1) and cfg.cnn.strides[1] == (2, 2, 1)
    model = build_model(cfg, llm_cache_dir=llm_cache_dir).eval()
    assert model.divisor == (32, 32, 8)
    with torch.no_grad():
        out = model(torch.randn(1, 1, 64, 64, 16))
    assert out.shape == (1, 3, 64, 64, 16) and torch.isfinite(out).all()


def test_cnn_saved_and_reloaded_without_its_plan_gives_identical_outputs(llm_cache_dir):
    torch.manual_seed(3)
    model = build_model(preset_config("cnn"), llm_cache_dir=llm_cache_dir).eval()
    state, config = model_weights(model)
    config = json.loads(json.dumps(config))  # what the bundle's config.json holds
    assert config["model"]["preset"] == "cnn"
    assert config["model"]["cnn"]["strides"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert config["llm_reference"] is None
    reloaded = model_from_weights(state, config, llm_cache_dir=llm_cache_dir).eval()
    assert isinstance(reloaded, CNNSegmenter) and reloaded.cfg == model.cfg
    x = torch.randn(1, 1, 40, 56, 40)
    with torch.no_grad():
        assert torch.equal(model(x), reloaded(x))


def test_cnn_without_a_plan_refuses_to_build(llm_cache_dir):
    cfg = MedVisionLlamaConfig.from_params({**model_block(), "preset": "cnn"})  # no for_plan
    with pytest.raises(ValueError, match="derived from the preprocessing plan"):
        build_model(cfg, llm_cache_dir=llm_cache_dir)


# -- for_plan and the preset parameter -------------------------------------------------------------
def test_for_plan_sets_classes_and_the_positional_grid_from_the_plan():
    base = MedVisionLlamaConfig.from_params({**model_block(), "llm": {"mode": "none"}})
    assert base.num_classes == 2 and base.pos_grid is None  # the block's values before the plan
    cfg = base.for_plan(HIPPOCAMPUS_PLAN)
    assert cfg.num_classes == 3 and cfg.pos_grid == (5, 7, 5)
    assert base.for_plan({**HIPPOCAMPUS_PLAN, "label_values": [0, 1]}).num_classes == 2
    assert base.for_plan({**HIPPOCAMPUS_PLAN, "label_values": [0, 1, 4]}).num_classes == 5


def test_for_plan_refuses_a_plan_made_for_another_embedding_patch():
    cfg = MedVisionLlamaConfig.from_params(model_block())
    foreign = {**HIPPOCAMPUS_PLAN, "embed_patch_size": [4, 4, 4]}
    with pytest.raises(ValueError, match=r"made for embedding patches \[4, 4, 4\].*run the preprocess pipeline again"):
        cfg.for_plan(foreign)
    with pytest.raises(ValueError, match="not whole tokens"):
        cfg.for_plan({**HIPPOCAMPUS_PLAN, "patch_size": [44, 56, 40]})
    # the CNN has no embedding patch: the same plan is fine for it
    assert MedVisionLlamaConfig.from_params({**model_block(), "preset": "cnn"}).for_plan(foreign).cnn.strides


def test_an_unknown_preset_fails_naming_the_known_ones():
    known = r"model.preset must be one of \['cnn', 'medvisionllama', 'paper'\]; got 'unet'"
    with pytest.raises(ValueError, match=known):
        MedVisionLlamaConfig.from_params({**model_block(), "preset": "unet"})


def test_a_preset_overrides_the_keys_it_fixes_even_when_the_block_sets_them_and_keeps_all_others():
    block = model_block()
    block.update(patch_size=[4, 4, 4], embed_dim=96, depth=3)
    block["llm"].update(position=2, lora={"rank": 16, "alpha": 2.0, "targets": ["q_proj"]})
    block["decoder"]["taps"] = [1, 2]
    paper = MedVisionLlamaConfig.from_params({**block, "preset": "paper"})
    assert paper.patch_size == (8, 8, 8) and paper.llm.position == 0 and paper.decoder.taps == ()
    assert (paper.llm.lora.rank, paper.llm.lora.alpha, paper.llm.lora.targets) == (4, 8.0, ("proj_in", "proj_out"))
    assert (paper.embed_dim, paper.depth, paper.llm.mode) == (96, 3, "pretrained")  # not the preset's keys
    assert paper.decoder.channels == (64, 32, 16)

    cnn = MedVisionLlamaConfig.from_params({**model_block(), "preset": "cnn", "llm": {"mode": "random"}})
    assert cnn.llm.mode == "none"

    own = MedVisionLlamaConfig.from_params({**model_block(), "llm": {"position": 2}})
    assert own.llm.position == 2  # medvisionllama fixes nothing


def test_paper_keeps_the_blocks_llm_mode_is_a_vit_and_reloads_as_paper(llm_cache_dir):
    cfg = preset_config("paper", llm={"mode": "none"})  # llm.mode is not a paper key: kept
    assert cfg.llm.mode == "none" and cfg.llm_position == 0
    model = build_model(cfg, llm_cache_dir=llm_cache_dir)
    assert isinstance(model, MedVisionLlama) and model.llm is None
    state, config = model_weights(model)
    reloaded = model_from_weights(state, json.loads(json.dumps(config)), llm_cache_dir=llm_cache_dir)
    assert reloaded.cfg == cfg
