"""Deep supervision (``model.decoder.deep_supervision``): class heads on the coarser decoder
levels, trained on the downsampled label map; inference and every shared weight unchanged."""

from __future__ import annotations

import pytest
import torch

from mvl_pipeline.model import build_model
from mvl_pipeline.model.decoder import PointwiseConv3d
from mvl_pipeline.training.losses import (
    deep_supervision_weights,
    make_loss,
    prepare_target,
    supervised_loss,
)


def test_the_heads_give_coarser_logits_and_leave_the_output_and_every_shared_weight_as_without(
    make_cfg, llm_cache_dir
):
    plain = build_model(make_cfg(decoder={"deep_supervision": False}), llm_cache_dir=llm_cache_dir, seed=3)
    deep = build_model(make_cfg(decoder={"deep_supervision": True}), llm_cache_dir=llm_cache_dir, seed=3)
    assert plain.deep_supervision == 0 and deep.deep_supervision == 2
    shared = plain.state_dict()
    extra = {k for k in deep.state_dict() if k not in shared}
    assert extra == {f"decoder.aux_heads.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}
    for name, tensor in shared.items():  # each tensor has its own init stream: nothing shifted
        assert torch.equal(deep.state_dict()[name], tensor), name
    x = torch.randn(2, 1, 16, 16, 8)
    deep.eval()
    plain.eval()
    with torch.no_grad():
        logits, coarse = deep(x, aux=True)
        torch.testing.assert_close(logits, deep(x))  # the aux heads never touch the output
        torch.testing.assert_close(logits, plain(x))
    # the levels below full resolution, finest first: patch 4x4x2 makes a 4x4x4 token grid, then
    # x2 on every axis (level 1: 8x8x8), then x2 on x and y only (full resolution 16x16x8)
    assert [tuple(c.shape) for c in coarse] == [(2, 3, 8, 8, 8), (2, 3, 4, 4, 4)]
    assert all(c.dtype == torch.float32 for c in coarse)


def test_the_heads_learn_through_the_loss(make_cfg, llm_cache_dir):
    deep = build_model(make_cfg(decoder={"deep_supervision": True}), llm_cache_dir=llm_cache_dir).train()
    x = torch.randn(2, 1, 16, 16, 8)
    labels = torch.randint(0, 3, (2, 16, 16, 8))
    logits, coarse = deep(x, aux=True)
    supervised_loss(make_loss(3), logits, coarse, labels, 3).backward()
    for head in deep.decoder.aux_heads:
        assert head.weight.grad is not None and float(head.weight.grad.abs().sum()) > 0


def test_a_class_head_is_the_1x1x1_convolution_with_its_gradient_in_the_parameters_layout():
    torch.manual_seed(0)
    head = PointwiseConv3d(6, 3)
    conv = torch.nn.Conv3d(6, 3, kernel_size=1)
    conv.load_state_dict(head.state_dict())  # same parameters, same state_dict keys and shapes
    x = torch.randn(2, 6, 4, 5, 3).contiguous(memory_format=torch.channels_last_3d)  # as the decoder's levels
    grad = torch.randn(2, 3, 4, 5, 3)
    for module in (head, conv):
        module(x).backward(grad)
    torch.testing.assert_close(head(x), conv(x), rtol=0, atol=0)
    torch.testing.assert_close(head.weight.grad, conv.weight.grad, rtol=0, atol=0)
    assert head.weight.grad.stride() == head.weight.stride()


@pytest.mark.parametrize("decoder", [{"deep_supervision": True}, {"deep_supervision": True, "full_res": "conv"}])
def test_distributed_data_parallel_takes_the_heads_gradients_without_copying_them(
    make_cfg, llm_cache_dir, tmp_path, decoder
):
    """A real gloo process group (world size 1) and DDP as ``prepare_model`` wraps the model: the
    heads' (and with ``full_res: conv`` the classifier's) gradients match their bucket views, so
    DDP neither warns about strides nor copies them."""
    import warnings

    import torch.distributed as dist

    deep = build_model(make_cfg(decoder=decoder), llm_cache_dir=llm_cache_dir).train()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(deep, find_unused_parameters=False)
        x = torch.randn(2, 1, 16, 16, 8)
        labels = torch.randint(0, 3, (2, 16, 16, 8))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                logits, coarse = model(x, aux=True)
                supervised_loss(make_loss(3), logits, coarse, labels, 3).backward()
        # DDP goes before the group. Its Reducer holds the gloo group: were it the last holder, the
        # group's destructor would run under the GIL and join gloo's threads, one of which may
        # still need the GIL to free its last work item. That deadlock hung a CI run.
        del model
    finally:
        dist.destroy_process_group()
    assert not [w for w in caught if "strides" in str(w.message)], [str(w.message)[:120] for w in caught]
    for name, param in deep.named_parameters():
        if param.grad is not None:
            assert param.grad.stride() == param.stride(), name
    assert all(float(head.weight.grad.abs().sum()) > 0 for head in deep.decoder.aux_heads)


def test_a_level_count_is_refused(make_cfg):
    with pytest.raises(ValueError, match="deep_supervision must be true or false"):
        make_cfg(decoder={"deep_supervision": 2})


def test_the_weights_halve_per_level_and_sum_to_one():
    assert deep_supervision_weights(0) == [1.0]
    assert deep_supervision_weights(2) == pytest.approx([4 / 7, 2 / 7, 1 / 7])


def test_the_loss_without_heads_is_the_plain_loss_and_with_heads_the_weighted_sum():
    torch.manual_seed(0)
    loss_fn = make_loss(3)
    labels = torch.zeros(2, 8, 8, 4, dtype=torch.long)
    labels[:, 2:6, 2:6, :2] = 1
    labels[:, 4:6, 4:6, 2:] = 2
    logits = torch.randn(2, 3, 8, 8, 4)
    plain = loss_fn(logits, prepare_target(labels, 3))
    assert torch.equal(supervised_loss(loss_fn, logits, [], labels, 3), plain)
    half = torch.randn(2, 3, 4, 4, 2)
    small = labels[:, ::2, ::2, ::2]  # nearest downsampling by 2 keeps every other voxel
    expected = (2 / 3) * plain + (1 / 3) * loss_fn(half, prepare_target(small, 3))
    torch.testing.assert_close(supervised_loss(loss_fn, logits, [half], labels, 3), expected)


def test_weights_saved_before_the_key_existed_load_without_the_heads(make_cfg, llm_cache_dir):
    from mvl_pipeline.model import model_from_weights, model_weights

    old = build_model(make_cfg(decoder={"deep_supervision": False}), llm_cache_dir=llm_cache_dir, seed=1)
    state, config = model_weights(old)
    config = {**config, "model": {**config["model"], "decoder": {
        k: v for k, v in config["model"]["decoder"].items() if k != "deep_supervision"}}}  # fmt: skip
    loaded = model_from_weights(state, config, llm_cache_dir=llm_cache_dir)
    assert loaded.deep_supervision == 0
    x = torch.randn(1, 1, 16, 16, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), old.eval()(x))
