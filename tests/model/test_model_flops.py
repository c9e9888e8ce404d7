"""The analytic FLOP count equals what torch's FlopCounterMode measures on a real
forward+backward, for every mode, LoRA, anisotropic patches and LLM positions."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, conv_backward_flop

from mvl_pipeline.model import KNOWN_LLM_DIMS, MedVisionLlamaConfig, build_model, flops_per_sample

_conv_backward = conv_backward_flop.__wrapped__


def grouped_conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation,
                               transposed, output_padding, groups, output_mask, out_shape=None,
                               **kwargs):  # fmt: skip
    """torch 2.13's formula ignores ``groups`` in the weight gradient (it counts a depthwise
    conv's weight gradient ``groups`` times): same formula, divided by groups for that term."""
    args = (grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
            output_padding, groups)  # fmt: skip
    flops = 0
    if output_mask[0]:
        flops += _conv_backward(*args, [True, False, False], out_shape)
    if output_mask[1]:
        flops += _conv_backward(*args, [False, True, False], out_shape) // groups
    return flops


def measured_flops(model, spatial) -> int:
    x = torch.randn(1, model.cfg.in_channels, *spatial)
    mapping = {torch.ops.aten.convolution_backward: grouped_conv_backward_flop}
    # the math SDPA backend runs attention as bmm, which FlopCounterMode sees on CPU
    with (
        sdpa_kernel(SDPBackend.MATH),
        FlopCounterMode(display=False, custom_mapping=mapping) as counter,
    ):
        model(x).sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize(
    ("overrides", "spatial"),
    [
        ({}, (16, 16, 8)),
        ({"llm": {"mode": "none"}, "num_classes": 1}, (16, 8, 8)),
        ({"llm": {"mode": "random", "position": 0}}, (8, 16, 8)),
        (
            {
                "llm": {
                    "position": 1,
                    "lora": {"rank": 2, "targets": ["q_proj", "down_proj", "proj_in"]},
                },
                "depth": 3,
                "mlp_ratio": 3.0,
            },
            (16, 16, 8),
        ),
        ({"patch_size": 8, "decoder": {"taps": [1, 2], "channels": [16, 8, 8]}}, (16, 16, 16)),
        ({"decoder": {"full_res": "space_to_depth"}, "in_channels": 2}, (16, 16, 8)),
    ],
    ids=["pretrained", "none-binary", "random-first", "lora-midway", "patch8-two-taps", "space-to-depth"],
)
def test_analytic_flops_equal_measured(overrides, spatial, make_cfg, llm_cache_dir):
    # cpu_ops: reference runs the depthwise conv's backward as aten.convolution_backward, which
    # FlopCounterMode counts; the tuned backward (model/depthwise.py) is the same maths in
    # elementwise ops it does not see (tests/model/test_depthwise.py holds them equal)
    model = build_model(make_cfg(**overrides, cpu_ops="reference"), llm_cache_dir=llm_cache_dir)
    analytic = flops_per_sample(model.cfg, spatial, model.llm_dims)
    assert analytic == measured_flops(model, spatial)


def test_default_flops_without_loading_use_the_known_llm_sizes():
    cfg = MedVisionLlamaConfig()
    assert flops_per_sample(cfg, (64, 64, 32)) == flops_per_sample(
        cfg, (64, 64, 32), KNOWN_LLM_DIMS["smollm2-offline"]
    )
    # the LLM layer costs something, and more tokens cost more
    none = MedVisionLlamaConfig.from_params({"llm": {"mode": "none"}})
    assert flops_per_sample(none, (64, 64, 32)) < flops_per_sample(cfg, (64, 64, 32))
    assert flops_per_sample(cfg, (64, 64, 64)) > 2 * flops_per_sample(cfg, (64, 64, 32)) * 0.99
    with pytest.raises(ValueError, match="divisible"):
        flops_per_sample(cfg, (64, 64, 30))
    unknown = MedVisionLlamaConfig.from_params({"llm": {"source": "org/unknown-model"}})
    with pytest.raises(ValueError, match="pass llm_dims"):
        flops_per_sample(unknown, (64, 64, 32))
