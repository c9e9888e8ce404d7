"""Forward + backward of the encoder's depthwise local branch, every way the model can run it.

The branch is a depthwise 3-D conv (192 channels, kernel 3) on the token grid (8x8x4 for the
default 64x64x32 crop). The model hands it a channels-last view of its tokens. Ways timed, on the
GPU when there is one, else on the CPU:

- ``library_bf16_channels_last``: the conv as PyTorch runs it under bf16 autocast on the model's
  layout (cuDNN / oneDNN; the GPU path before 2026-12-04);
- ``library_fp32_channels_last``: the same in fp32 (the GPU path now; ``cpu_ops: reference`` on CPU);
- ``library_bf16`` / ``library_fp32``: the same on a contiguous (NCDHW) tensor, for reference;
- ``composed_fp32`` / ``composed_bf16``: ``model/depthwise.py``'s backward of fast ops on the
  model's layout (the CPU path now; its filter gradient one conv);
- ``composed_taps_fp32``: the same with the filter gradient as one product and reduction per tap
  (the CPU path until 2026-12-05, and now on grids over ``CONV_WEIGHT_GRAD_MAX_VOXELS``).

Median of ``--iters`` timed iterations after 5 warm-ups, per batch size. Last line: one JSON
object with the times (ms) and the ratios that decided the paths.

    python benchmarks/bench_depthwise.py [--batch 2 8] [--iters 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from bench_model import machine, synchronize  # CPU flags, GPU name and capability; CUDA sync

from mvl_pipeline.model import depthwise
from mvl_pipeline.model.depthwise import depthwise_conv3d

CHANNELS, GRID, KERNEL = 192, (8, 8, 4), 3
WAYS = (
    "library_bf16_channels_last",
    "library_fp32_channels_last",
    "library_bf16",
    "library_fp32",
    "composed_fp32",
    "composed_bf16",
    "composed_taps_fp32",
)


def forward(way: str, conv: torch.nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    device_type = x.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled="bf16" in way):
        if way.startswith("composed"):
            return depthwise_conv3d(x, conv)
        return conv(x)


def time_way(way: str, batch: int, device: torch.device, iters: int) -> float:
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(CHANNELS, CHANNELS, KERNEL, padding=KERNEL // 2, groups=CHANNELS).to(device)
    x = torch.randn(batch, CHANNELS, *GRID, device=device)
    if way.endswith("_channels_last") or way.startswith("composed"):
        # the model's layout, made before the clock starts: the model hands the branch a
        # channels-last view of its tokens, no copy (until 2026-12-05 the copy and its backward
        # were timed in these ways, diluting their ratios)
        x = x.to(memory_format=torch.channels_last_3d)
    x.requires_grad_(True)

    def once() -> None:
        forward(way, conv, x).float().square().mean().backward()
        synchronize(device)

    limit = depthwise.CONV_WEIGHT_GRAD_MAX_VOXELS
    depthwise.CONV_WEIGHT_GRAD_MAX_VOXELS = 0 if way == "composed_taps_fp32" else limit
    try:
        return _median_ms(once, iters)
    finally:
        depthwise.CONV_WEIGHT_GRAD_MAX_VOXELS = limit


def _median_ms(once, iters: int) -> float:
    for _ in range(5):
        once()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result: dict = {"machine": machine() | {"device": device.type, "torch": torch.__version__}}
    for batch in args.batch:
        ms = {way: time_way(way, batch, device, args.iters) for way in WAYS}
        print(f"batch {batch}: " + ", ".join(f"{w} {t} ms" for w, t in ms.items()), flush=True)
        result[f"batch_{batch}_ms"] = ms
        result[f"batch_{batch}_fp32_vs_bf16_channels_last"] = round(
            ms["library_bf16_channels_last"] / ms["library_fp32_channels_last"], 2
        )
        result[f"batch_{batch}_composed_vs_library_fp32_channels_last"] = round(
            ms["library_fp32_channels_last"] / ms["composed_fp32"], 2
        )
        result[f"batch_{batch}_composed_vs_taps_fp32"] = round(ms["composed_taps_fp32"] / ms["composed_fp32"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
