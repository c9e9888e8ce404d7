"""``model.decoder.full_res: space_to_depth``: the image folded into channels at the finest
decoder level, fused there and unfolded to full-resolution logits by one GEMM, so that no conv,
norm or activation runs on full-resolution maps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mvl_pipeline.model import build_model, model_from_weights, model_weights
from mvl_pipeline.model.patch_ops import space_to_depth

S2D = {"full_res": "space_to_depth"}


def test_space_to_depth_is_the_strided_selection_conv_and_keeps_every_voxel():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 6, 4)
    factor = (2, 3, 2)
    k = 2 * 3 * 2
    # a Conv3d with kernel = stride = factor whose weight picks one voxel per output channel
    # (channels ordered (C, fx, fy, fz)) is space-to-depth by definition
    weight = torch.zeros(3 * k, 3, *factor)
    for c in range(3):
        for i, (a, b, d) in enumerate((a, b, d) for a in range(2) for b in range(3) for d in range(2)):
            weight[c * k + i, c, a, b, d] = 1.0
    expected = torch.nn.functional.conv3d(x, weight, stride=factor)
    folded = space_to_depth(x, factor)
    assert folded.shape == (2, 3 * k, 4, 2, 2)
    torch.testing.assert_close(folded, expected, rtol=0, atol=0)
    assert torch.equal(folded.flatten().sort().values, x.flatten().sort().values)  # nothing lost


def test_the_decoder_yields_logits_with_nothing_convolved_at_full_resolution(make_cfg, llm_cache_dir):
    model = build_model(make_cfg(decoder=S2D), llm_cache_dir=llm_cache_dir, seed=2).train()
    assert isinstance(model.classifier, nn.Identity)
    assert "classifier.weight" not in model.state_dict()
    full = (16, 16, 8)
    seen: list[tuple[str, tuple[int, ...]]] = []
    hooks = [
        module.register_forward_hook(lambda m, args, out, name=name: seen.append((name, tuple(args[0].shape[2:]))))
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv3d | nn.InstanceNorm3d | nn.LeakyReLU) and not isinstance(module, nn.ConvTranspose3d)
    ]
    x = torch.randn(2, 1, *full, requires_grad=False)
    logits, coarse = model(x, aux=True)
    for hook in hooks:
        hook.remove()
    assert logits.shape == (2, 3, *full) and logits.dtype == torch.float32
    assert seen and all(shape != full for _, shape in seen), [s for s in seen if s[1] == full]
    labels = torch.randint(0, 3, (2, *full))
    loss = torch.nn.functional.cross_entropy(logits, labels) + sum(c.mean() for c in coarse)
    loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert trainable and not missing, missing


def test_the_image_reaches_the_output_through_the_folded_stem(make_cfg, llm_cache_dir):
    """A changed voxel moves the logits of its own 2x2x2 block differently when the folded stem's
    output is silenced: the stem path carries the image's fine detail to the output. (Without
    that comparison the check could not fail: global attention spreads any change everywhere.)"""
    model = build_model(make_cfg(decoder=S2D), llm_cache_dir=llm_cache_dir, seed=0).eval()
    x = torch.randn(1, 1, 16, 16, 8)
    y = x.clone()
    y[0, 0, 9, 5, 3] += 3.0
    with torch.no_grad():
        with_stem = (model(y) - model(x))[0, :, 8:10, 4:6, 2:4]
        silenced = model.decoder.stem.register_forward_hook(lambda m, args, out: torch.zeros_like(out))
        without_stem = (model(y) - model(x))[0, :, 8:10, 4:6, 2:4]
        silenced.remove()
    assert float((with_stem - without_stem).abs().min()) > 0


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_matmul_and_conv_patch_ops_agree(make_cfg, llm_cache_dir, precision):
    gemm = build_model(make_cfg(decoder=S2D, precision=precision), llm_cache_dir=llm_cache_dir, seed=4).eval()
    conv = build_model(make_cfg(decoder=S2D, precision=precision, patch_ops="conv"), llm_cache_dir=llm_cache_dir, seed=4).eval()
    x = torch.randn(2, 1, 16, 16, 8)
    with torch.no_grad():
        tolerance = {"rtol": 0, "atol": 1e-4} if precision == "fp32" else {"rtol": 0.05, "atol": 0.05}
        torch.testing.assert_close(gemm(x), conv(x), **tolerance)


def test_saved_weights_rebuild_the_same_model(make_cfg, llm_cache_dir):
    model = build_model(make_cfg(decoder=S2D), llm_cache_dir=llm_cache_dir, seed=5).eval()
    state, config = model_weights(model)
    assert config["model"]["decoder"]["full_res"] == "space_to_depth"
    loaded = model_from_weights(state, config, llm_cache_dir=llm_cache_dir).eval()
    x = torch.randn(1, 1, 16, 16, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_weights_saved_before_the_key_existed_load_with_the_full_resolution_convs(make_cfg, llm_cache_dir):
    old = build_model(make_cfg(decoder={"full_res": "conv"}), llm_cache_dir=llm_cache_dir, seed=1).eval()
    state, config = model_weights(old)
    config = {**config, "model": {**config["model"], "decoder": {
        k: v for k, v in config["model"]["decoder"].items() if k != "full_res"}}}  # fmt: skip
    loaded = model_from_weights(state, config, llm_cache_dir=llm_cache_dir).eval()
    assert loaded.cfg.decoder.full_res == "conv"
    x = torch.randn(1, 1, 16, 16, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), old(x), rtol=0, atol=0)


def test_an_unknown_mode_is_refused(make_cfg):
    with pytest.raises(ValueError, match="decoder.full_res must be conv or space_to_depth"):
        make_cfg(decoder={"full_res": "pixel_shuffle"})
