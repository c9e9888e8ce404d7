"""Training-step throughput of MedVisionLlama against this machine's own matmul roofline.

For the default config (conf/base/parameters_model.yml) and each ``llm.mode``, in bf16 autocast
and in fp32: samples/s of a full training step (forward, cross-entropy, backward, AdamW) on
random crops, the analytic FLOPs per sample (``flops_per_sample``: matmuls, convs, attention)
and the achieved FLOP/s as a fraction of a large square matmul's rate in the same dtype,
measured in the same process. Runs on CUDA (bf16) when present, otherwise CPU.

The machine may be shared: variants are timed round-robin, several rounds, and each keeps its
best step time (as does the matmul rate), so a burst of someone else's load hits all alike.
The last line printed is one JSON object.

    python benchmarks/bench_model.py [--crop 64 64 32] [--batch 2] [--rounds 12]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch.profiler import ProfilerActivity, profile

from mvl_pipeline.model import (
    MedVisionLlamaConfig,
    build_model,
    configure_optimizers,
    count_parameters,
    flops_breakdown,
)

ROOT = Path(__file__).resolve().parents[1]
MODES = ("pretrained", "random", "none")
PRECISIONS = {"bf16": "bf16-mixed", "fp32": "fp32"}
MATMUL_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(
    dtype: torch.dtype, device: torch.device, n: int = 2048, seconds: float = 0.5
) -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    synchronize(device)
    reps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or reps < 3:
        a @ b
        reps += 1
        if reps % 4 == 0:
            synchronize(device)
    synchronize(device)
    elapsed = time.perf_counter() - start
    return 2 * n**3 * reps / elapsed / 1e9


class Variant:
    """One model (mode x precision) with its optimiser and a fixed random batch."""

    def __init__(self, params: dict, mode: str, precision: str, args, device, cache_dir: Path):
        params = {
            **params,
            "precision": PRECISIONS[precision],
            "llm": {**params["llm"], "mode": mode},
        }
        self.cfg = MedVisionLlamaConfig.from_params(params)
        self.model = build_model(self.cfg, device=device, llm_cache_dir=cache_dir).train()
        self.optimizer = configure_optimizers(self.model, lr=1e-4, weight_decay=0.01)
        generator = torch.Generator().manual_seed(0)
        shape = (args.batch, self.cfg.in_channels, *args.crop)
        self.x = torch.randn(shape, generator=generator).to(device)
        self.y = torch.randint(
            0, max(self.cfg.num_classes, 2), (args.batch, *args.crop), generator=generator
        ).to(device)
        self.device = device
        self.batch = args.batch
        self.flops = flops_breakdown(self.cfg, args.crop, self.model.llm_dims)
        self.best_s = float("inf")

    def loss(self) -> torch.Tensor:
        logits = self.model(self.x)
        if self.cfg.num_classes == 1:
            return F.binary_cross_entropy_with_logits(logits[:, 0], self.y.float())
        return F.cross_entropy(logits, self.y)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss().backward()
        self.optimizer.step()

    def timed_steps(self, steps: int) -> None:
        for _ in range(steps):
            synchronize(self.device)
            start = time.perf_counter()
            self.step()
            synchronize(self.device)
            self.best_s = min(self.best_s, time.perf_counter() - start)

    @property
    def flops_per_sample(self) -> int:
        return sum(self.flops.values())


def time_shares(variant: Variant) -> dict[str, float]:
    """Share of operator self time in two training steps: convolutions (decoder, patch embedding,
    local branch), matmuls + attention (encoder and LLM layer), everything else (norms,
    activations, copies, optimiser)."""
    groups: dict[str, float] = defaultdict(float)
    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if variant.device.type == "cuda" else []
    )
    with profile(activities=activities) as prof:
        for _ in range(2):
            variant.step()
    for event in prof.key_averages():
        name = event.key
        self_time = (
            event.self_device_time_total
            if variant.device.type == "cuda"
            else event.self_cpu_time_total
        )
        if "conv" in name:
            groups["convolutions"] += self_time
        elif any(
            k in name
            for k in ("aten::mm", "aten::addmm", "aten::bmm", "scaled_dot_product", "gemm")
        ):
            groups["matmul_attention"] += self_time
        elif name.startswith("aten::") or "Backward" in name or "Optimizer" in name:
            groups["other_ops"] += self_time
    total = sum(groups.values()) or 1.0
    return {k: round(v / total, 3) for k, v in sorted(groups.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "conf/base/parameters_model.yml")
    parser.add_argument("--crop", type=int, nargs=3, default=[64, 64, 32])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12, help="round-robin rounds over variants")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    parser.add_argument("--llm-cache-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "mvl_pipeline-llm-cache")  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    params = yaml.safe_load(args.params.read_text())["model"]
    started = time.perf_counter()

    variants = {
        (mode, precision): Variant(params, mode, precision, args, device, args.llm_cache_dir)
        for mode in MODES
        for precision in PRECISIONS
    }
    for variant in variants.values():  # warm-up: allocator, oneDNN primitive caches
        variant.step()
    peak = {p: 0.0 for p in PRECISIONS}
    for round_index in range(args.rounds):
        for precision, dtype in MATMUL_DTYPES.items():
            peak[precision] = max(peak[precision], matmul_gflops(dtype, device))
        for variant in variants.values():
            variant.timed_steps(args.steps)
        print(
            f"round {round_index + 1}/{args.rounds} done ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )

    default = variants[("pretrained", "bf16")]
    per_mode: dict[str, dict] = {}
    for mode in MODES:
        entry: dict[str, float | int | dict] = {}
        for precision in PRECISIONS:
            variant = variants[(mode, precision)]
            achieved = variant.flops_per_sample * variant.batch / variant.best_s / 1e9
            entry[f"step_s_{precision}"] = round(variant.best_s, 4)
            entry[f"samples_per_s_{precision}"] = round(variant.batch / variant.best_s, 3)
            entry[f"achieved_gflops_{precision}"] = round(achieved, 1)
            entry[f"roofline_fraction_{precision}"] = round(achieved / peak[precision], 3)
        entry["flops_per_sample"] = variants[(mode, "bf16")].flops_per_sample
        entry["flops_per_sample_by_part"] = variants[(mode, "bf16")].flops
        entry["parameters"] = count_parameters(variants[(mode, "bf16")].model)
        per_mode[mode] = entry
        print(
            f"{mode:10s} bf16 {entry['samples_per_s_bf16']:7.2f} samples/s "
            f"({entry['roofline_fraction_bf16']:.0%} of bf16 matmul) | fp32 "
            f"{entry['samples_per_s_fp32']:7.2f} samples/s ({entry['roofline_fraction_fp32']:.0%} of fp32)",
            flush=True,
        )

    result = {
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu x{torch.get_num_threads()} threads",
        "crop": list(args.crop),
        "batch": args.batch,
        "mode": "pretrained",
        "samples_per_s": per_mode["pretrained"]["samples_per_s_bf16"],
        "samples_per_s_fp32": per_mode["pretrained"]["samples_per_s_fp32"],
        "flops_per_sample": per_mode["pretrained"]["flops_per_sample"],
        "roofline_fraction_bf16": per_mode["pretrained"]["roofline_fraction_bf16"],
        "roofline_fraction_fp32": per_mode["pretrained"]["roofline_fraction_fp32"],
        "matmul_gflops_bf16": round(peak["bf16"], 1),
        "matmul_gflops_fp32": round(peak["fp32"], 1),
        "time_share_pretrained_bf16": time_shares(default),
        "modes": per_mode,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
