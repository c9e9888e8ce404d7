"""The ``cnn`` preset runs MONAI's DynUNet in the channels_last_3d layout, with instance norms
that keep that layout (``model/norms.py``): the same maths and state dict as the network MONAI
builds, checked against it here in fp32 (forward and every gradient) and under bf16 autocast.
The ViT's decoder (``cpu_ops: tuned``) uses the same norms in its conv blocks."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.nets import DynUNet
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mvl_pipeline.model import build_model
from mvl_pipeline.model.cnn import monai_dynunet
from mvl_pipeline.model.decoder import ConvNormAct
from mvl_pipeline.model.norms import ChannelsLastInstanceNorm3d, channels_last_norms
from tests.model.test_model_presets import model_block, preset_config

CL = torch.channels_last_3d


@pytest.mark.parametrize("affine", [False, True])
def test_the_norm_equals_instance_norm_on_a_channels_last_map_and_keeps_its_layout(affine):
    torch.manual_seed(0)
    plain = nn.InstanceNorm3d(6, affine=affine)
    if affine:
        with torch.no_grad():
            plain.weight.uniform_(0.5, 1.5)
            plain.bias.uniform_(-0.5, 0.5)
    fast = ChannelsLastInstanceNorm3d.replacing(plain)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    x = (torch.randn(3, 6, 5, 7, 4) * 3 + 1).contiguous(memory_format=CL)
    upstream = torch.randn(3, 6, 5, 7, 4)
    outputs, grads = [], []
    for norm in (plain, fast):
        xi = x.detach().clone(memory_format=CL).requires_grad_()
        out = norm(xi)
        (out * upstream).sum().backward()
        outputs.append(out)
        grads.append([xi.grad, *(p.grad for p in norm.parameters())])
    assert outputs[1].is_contiguous(memory_format=CL) and not outputs[1].is_contiguous()
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    assert len(grads[1]) == (3 if affine else 1)
    for fast_grad, plain_grad in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(fast_grad, plain_grad, rtol=1e-4, atol=1e-5)


def test_the_norm_leaves_other_layouts_and_running_statistics_to_instance_norm(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.functional, "batch_norm", lambda *a, **k: calls.append(1))
    x = torch.randn(2, 4, 3, 5, 6)  # the default layout
    torch.testing.assert_close(ChannelsLastInstanceNorm3d(4)(x), nn.InstanceNorm3d(4)(x))
    tracked = ChannelsLastInstanceNorm3d(4, track_running_stats=True)
    tracked(x.contiguous(memory_format=CL))
    assert calls == [] and not torch.equal(tracked.running_mean, torch.zeros(4))  # InstanceNorm3d updated them


def test_on_a_full_resolution_map_the_norm_stays_within_fp32_rounding_of_the_exact_one():
    torch.manual_seed(3)
    x = torch.randn(2, 16, 40, 56, 40, dtype=torch.float64) * 2 + 5
    upstream = torch.randn(2, 16, 40, 56, 40, dtype=torch.float64)

    def run(norm: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        xi = x.to(dtype).contiguous(memory_format=CL).requires_grad_()
        out = norm(xi)
        (out * upstream.to(dtype)).sum().backward()
        return out.detach().double(), xi.grad.double()

    exact_out, exact_grad = run(nn.InstanceNorm3d(16).double(), torch.float64)
    out, grad = run(ChannelsLastInstanceNorm3d(16), torch.float32)
    assert float((out - exact_out).norm() / exact_out.norm()) < 2e-5  # 6e-6 measured
    assert float((grad - exact_grad).norm() / exact_grad.norm()) < 2e-5  # 3e-6 measured


def test_under_bf16_autocast_the_norm_agrees_with_instance_norm():
    torch.manual_seed(1)
    x = torch.randn(2, 16, 10, 14, 10).contiguous(memory_format=CL)
    conv = nn.Conv3d(16, 16, 3, padding=1).to(memory_format=CL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
        fast, plain = ChannelsLastInstanceNorm3d(16)(y), nn.InstanceNorm3d(16)(y)
    assert fast.dtype == plain.dtype
    torch.testing.assert_close(fast.float(), plain.float(), rtol=0.02, atol=0.02)


def test_the_cnn_preset_is_monais_dynunet_in_the_channels_last_layout(llm_cache_dir):
    torch.manual_seed(2)
    cfg = preset_config("cnn", precision="fp32")
    model = build_model(cfg, llm_cache_dir=llm_cache_dir)
    norms = [m for m in model.net.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert norms and all(isinstance(m, ChannelsLastInstanceNorm3d) for m in norms)
    convs = [m.weight for m in model.net.modules() if isinstance(m, nn.Conv3d) and m.in_channels > 1 and max(m.kernel_size) > 1]
    assert convs and all(w.is_contiguous(memory_format=CL) and not w.is_contiguous() for w in convs)
    monai = monai_dynunet(cfg)
    assert isinstance(monai, DynUNet) and not any(isinstance(m, ChannelsLastInstanceNorm3d) for m in monai.modules())
    assert model.net.state_dict().keys() == monai.state_dict().keys()
    monai.load_state_dict(model.net.state_dict())
    exact = copy.deepcopy(monai).double()  # the maths, to compare both fp32 networks with
    x, target = torch.randn(2, 1, 40, 56, 40), torch.randn(2, 3, 40, 56, 40)

    def run(net: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = net(x.to(dtype))
        ((out - target.to(dtype)) ** 2).mean().backward()
        return out.detach().double(), {name.removeprefix("net."): p.grad.double() for name, p in net.named_parameters()}

    expected, exact_grads = run(exact, torch.float64)
    error = {}
    for name, net in (("ours", model), ("monai", monai)):  # model: the segmenter, as training runs it
        out, grads = run(net, torch.float32)
        assert float((out - expected).abs().max()) < 1e-4
        error[name] = max(float((grads[n] - g).norm() / g.norm()) for n, g in exact_grads.items())
    # An fp32 network's gradients stray from the exact ones as rounding is amplified through 14
    # norms: 0.3% for MONAI's, 1.1% for ours (its norms' own error is 3e-6 against InstanceNorm's
    # 6e-8 on full-resolution maps: batch_norm sums 90k voxels in one fp32 pass; both far below
    # bf16's 4e-3, in which training runs). A norm over the wrong axes strays by tens of percent.
    assert error["monai"] < 0.01 and error["ours"] < 0.03, error


def test_channels_last_norms_replaces_each_norm_once():
    net = nn.Sequential(nn.Conv3d(1, 4, 3), nn.Sequential(nn.InstanceNorm3d(4, affine=True), nn.ReLU()))
    channels_last_norms(net)
    first = net[1][0]
    assert isinstance(first, ChannelsLastInstanceNorm3d) and first.affine
    channels_last_norms(net)
    assert net[1][0] is first


class _FullSizeCopies(TorchDispatchMode):
    """Counts the copies (clone, copy_, _to_copy) of tensors with ``numel`` elements."""

    COPIES = {torch.ops.aten.clone.default, torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default}

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.COPIES and args[0].numel() == self.numel:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_vit_decoders_conv_blocks_normalise_channels_last_maps_where_they_lie():
    torch.manual_seed(4)
    plain = ConvNormAct(8, 16, 3)  # InstanceNorm3d: the map goes to the default layout and back
    with torch.no_grad():
        plain.norm.weight.uniform_(0.5, 1.5)
        plain.norm.bias.uniform_(-0.5, 0.5)
    fast = copy.deepcopy(plain)
    channels_last_norms(fast)
    assert isinstance(fast.norm, ChannelsLastInstanceNorm3d)
    x = torch.randn(2, 8, 10, 14, 10).contiguous(memory_format=CL)
    upstream = torch.randn(2, 16, 10, 14, 10)
    results = {}
    for name, block in (("plain", plain), ("fast", fast)):
        xi = x.detach().clone(memory_format=CL).requires_grad_()
        with _FullSizeCopies(upstream.numel()) as copies:
            out = block(xi)
        (out * upstream).sum().backward()
        results[name] = (copies.count, out, [xi.grad, *(p.grad for p in block.parameters())])
    assert results["plain"][0] == 2 and results["fast"][0] == 0  # forward copies of the block's output map
    assert results["fast"][1].is_contiguous(memory_format=CL) and not results["fast"][1].is_contiguous()
    torch.testing.assert_close(results["fast"][1], results["plain"][1], rtol=1e-5, atol=1e-5)
    for fast_grad, plain_grad in zip(results["fast"][2], results["plain"][2], strict=True):
        # the conv's weight gradient sums 2 x 10 x 14 x 10 voxels: compared as a whole (fp32 rounding)
        assert float((fast_grad - plain_grad).norm() / plain_grad.norm()) < 1e-5


def test_the_vit_decoder_gets_the_layout_keeping_norms_under_tuned_cpu_ops_only(llm_cache_dir):
    for ops, expected in (("tuned", True), ("reference", False)):
        llm = {**model_block()["llm"], "mode": "none"}  # the decoder does not depend on the LLM layer
        model = build_model(preset_config("medvisionllama", cpu_ops=ops, llm=llm), llm_cache_dir=llm_cache_dir)
        norms = [m for m in model.decoder.modules() if isinstance(m, nn.InstanceNorm3d)]
        assert norms and all(isinstance(m, ChannelsLastInstanceNorm3d) == expected for m in norms), ops
