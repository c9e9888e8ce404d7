"""Training-step and inference throughput against this machine's own matrix-unit roofline.

Variants, timed round-robin in one process (each round: the bf16 and fp32 matmul rates, then
every variant's steps), so a burst of someone else's load on a shared machine hits all alike:

- ``new``: the default model (conf/base/parameters_model.yml) as it trains: bf16 autocast,
  ``patch_ops: matmul`` (patch embedding and decoder upsampling as GEMMs), the frozen LLM layer
  stored in bf16 (``cpu_dtype: auto``);
- ``previous``: the step before that change (``patch_ops: conv``, LLM layer in fp32, cast on
  every step), kept selectable for this side-by-side;
- ``fp32``: the default model in fp32; ``none``: the plain ViT (``llm.mode: none``), bf16;
- with ``--also full_res_conv`` (or ``full_res_s2d``): the default model with that
  ``decoder.full_res``, and new's speed-up over it; ``--also attention_flash``: the default model
  with ``cpu_math_attention_tokens: 0`` (every attention on PyTorch's flash kernel, as before 2026-12-06);
- with ``--compile``: ``compiled``, ``new`` under ``model.compile: true`` (TorchInductor; its
  first step, the compile, timed apart, with whether Inductor's on-disk cache was warm), in
  ``--compile-mode`` (``reduce-overhead``: CUDA graphs on a GPU).

For each: the training step as the training loop runs it (forward with the deep-supervision
heads where the model has them, Dice+CE loss on every level, backward, gradient norm check and
clip, AdamW) on random crops, the
analytic FLOPs per sample and the achieved FLOP/s as a fraction of a 2048^3 matmul's rate in the
same dtype measured in the SAME round; per-round ratios are reported with their median and
spread. Then sliding-window inference of Hippocampus-sized volumes (35x50x36, the plan's 40x56x40
roi): ``new`` predicts ``--case-batch`` cases per forward pass (``predict_many``: each fits one
window), ``previous`` one case at a time with the previous step's model, ``new_per_case`` the
new model one case at a time (what batching alone adds); medians of ``--infer-rounds``
round-robin rounds; and the bf16/fp32 agreement of the new path's labels. The machine's
matrix units (AMX / AVX-512-BF16 from the CPU flags; GPU name and compute capability) are printed
beside the figures. Last line: one JSON object.

    python benchmarks/bench_model.py [--crop 64 64 32] [--batch 2] [--rounds 8] [--profile] [--compile] [--also full_res_conv attention_flash]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from mvl_pipeline.evaluation.inference import predict_many, predict_probabilities
from mvl_pipeline.model import (
    MedVisionLlamaConfig,
    build_model,
    configure_optimizers,
    flops_breakdown,
)
from mvl_pipeline.training.loop import _gradients_finite
from mvl_pipeline.training.losses import make_loss, supervised_loss

ROOT = Path(__file__).resolve().parents[1]
FULL_RES_VARIANTS = {"full_res_conv": "conv", "full_res_s2d": "space_to_depth"}  # the default model, decoder.full_res set
ALSO = sorted([*FULL_RES_VARIANTS, "attention_flash"])  # --also choices
MATMUL_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
INFER_SHAPE = (35, 50, 36)  # a median Hippocampus case (1 mm)
INFER_ROI = (40, 56, 40)  # its plan's patch
GRAD_CLIP = yaml.safe_load((ROOT / "conf/base/parameters_fit.yml").read_text())["fit"]["loop"]["grad_clip"]


def machine() -> dict:
    """What the machine has for matrix maths: CPU flags, or the GPU's name and capability."""
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    model_name = ""
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name") and not model_name:
                model_name = line.split(":", 1)[1].strip()
    units = "amx_bf16" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else "none"
    info = {"cpu": model_name, "cpu_bf16_units": units, "amx_bf16": "amx_bf16" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "threads": torch.get_num_threads()}  # fmt: skip
    if torch.cuda.is_available():
        info |= {"gpu": torch.cuda.get_device_name(), "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability()))}
    return info


def profiler_activities(device: torch.device) -> list[ProfilerActivity]:
    """The CPU's operators, and on a GPU their kernels too."""
    return [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if device.type == "cuda" else [])]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(dtype: torch.dtype, device: torch.device, n: int = 2048, seconds: float = 0.4) -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    synchronize(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or reps < 3:
        a @ b
        reps += 1
    synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def variant_params(base: dict, name: str) -> dict:
    params = {**base, "llm": dict(base["llm"]), "decoder": dict(base["decoder"])}
    if name == "previous":
        params |= {"patch_ops": "conv", "cpu_ops": "reference"}
        params["llm"]["cpu_dtype"] = "float32"
        params["decoder"]["full_res"] = "conv"
    elif name in FULL_RES_VARIANTS:
        params["decoder"]["full_res"] = FULL_RES_VARIANTS[name]
    elif name == "attention_flash":
        params["cpu_math_attention_tokens"] = 0
    elif name == "fp32":
        params |= {"precision": "fp32"}
    elif name == "none":
        params["llm"]["mode"] = "none"
    elif name == "compiled":
        params |= {"compile": True}
    return params


def inductor_cache_dir() -> Path:
    """Where TorchInductor keeps compiled kernels across processes (its default, or $TORCHINDUCTOR_CACHE_DIR)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


class Variant:
    """One model with its optimiser and a fixed random batch."""

    def __init__(self, params: dict, args, device: torch.device, cache: Path):
        self.cfg = MedVisionLlamaConfig.from_params(params)
        self.model = build_model(self.cfg, device=device, llm_cache_dir=cache).train()
        self.optimizer = configure_optimizers(self.model, lr=1e-4, weight_decay=0.01)
        self.loss_fn = make_loss(self.cfg.num_classes)
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn((args.batch, self.cfg.in_channels, *args.crop), generator=generator).to(device)
        self.y = torch.randint(0, self.cfg.num_classes, (args.batch, *args.crop), generator=generator).to(device)
        self.device, self.batch = device, args.batch
        self.flops = flops_breakdown(self.cfg, args.crop, self.model.llm_dims)
        self.round_best: list[float] = []
        self.precision = "fp32" if self.cfg.precision == "fp32" else "bf16"
        self.deep = getattr(self.model, "deep_supervision", 0)  # as the loop: the CNN preset has none

    def step(self) -> float:
        """One step as the training loop runs it (training/loop.py): with deep supervision the
        coarser levels' logits and their losses too, the gradient norm check and clip, the loss read."""
        self.optimizer.zero_grad(set_to_none=True)
        logits, coarse = self.model(self.x, aux=True) if self.deep else (self.model(self.x), [])
        loss = supervised_loss(self.loss_fn, logits, coarse, self.y, self.cfg.num_classes)
        loss.backward()
        if _gradients_finite(self.model, GRAD_CLIP):
            self.optimizer.step()
        return float(loss.detach())

    def timed(self, steps: int) -> float:
        best = float("inf")
        for _ in range(steps):
            synchronize(self.device)
            start = time.perf_counter()
            self.step()
            synchronize(self.device)
            best = min(best, time.perf_counter() - start)
        return best

    @property
    def flops_per_sample(self) -> int:
        return sum(self.flops.values())


def time_shares(variant: Variant) -> dict[str, float]:
    """Share of operator self time in two steps: convolutions, matmul + attention, copies and
    casts, everything else (norms, activations, optimiser). On a GPU the operators' self DEVICE
    time (their kernels), since their CPU time there is only the launch."""
    groups: dict[str, float] = defaultdict(float)
    with profile(activities=profiler_activities(variant.device)) as prof:
        for _ in range(2):
            variant.step()
        synchronize(variant.device)
    for event in prof.key_averages():
        if event.device_type != DeviceType.CPU:  # a kernel's own row: counted under its operator
            continue
        name = event.key
        t = event.self_device_time_total if variant.device.type == "cuda" else event.self_cpu_time_total
        if "conv" in name:
            groups["convolutions"] += t
        elif any(k in name for k in ("aten::mm", "aten::addmm", "aten::bmm", "scaled_dot_product", "aten::linear")):
            groups["matmul_attention"] += t
        elif name in ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous"):
            groups["copies_casts"] += t
        elif name.startswith("aten::") or "Optimizer" in name:
            groups["other_ops"] += t
    total = sum(groups.values()) or 1.0
    return {k: round(v / total, 3) for k, v in sorted(groups.items())}


def inference(model: torch.nn.Module, num_classes: int, volumes: list[np.ndarray], device: torch.device,
              case_batch: int = 1) -> tuple[float, list[np.ndarray]]:  # fmt: skip
    """Cases/s and label maps: one case at a time (``predict_probabilities``, the previous path)
    or ``case_batch`` cases that fit one window per forward pass (``predict_many``)."""
    start = time.perf_counter()
    if case_batch == 1:
        labels = [
            predict_probabilities(model, v, roi_size=INFER_ROI, num_classes=num_classes, overlap=0.5, device=device).argmax(0)
            for v in volumes
        ]
    else:
        labels = [
            probs.argmax(0)
            for _, probs in predict_many(model, volumes, lambda v: v, roi_size=INFER_ROI, num_classes=num_classes,
                                         overlap=0.5, case_batch=case_batch, device=device)  # fmt: skip
        ]
    return len(volumes) / (time.perf_counter() - start), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "conf/base/parameters_model.yml")
    parser.add_argument("--crop", type=int, nargs=3, default=[64, 64, 32])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    parser.add_argument("--infer-cases", type=int, default=20)
    parser.add_argument("--infer-rounds", type=int, default=3, help="round-robin rounds of the inference runs (median)")
    parser.add_argument("--case-batch", type=int, default=4, help="cases per forward pass of the new inference path")
    parser.add_argument("--profile", action="store_true", help="print the top operators of new and previous")
    parser.add_argument("--compile", action="store_true", help="add new + model.compile (needs a C++ compiler; minutes when cold)")
    parser.add_argument("--compile-mode", default="default", help="model.compile_mode of the compiled variant (reduce-overhead: CUDA graphs)")
    parser.add_argument("--also", nargs="+", default=[], choices=ALSO,
                        help="time these variants too (the default model with decoder.full_res set, or with attention over "
                             "every attention on PyTorch's flash kernel: attention_flash), with new's speed-up over each")  # fmt: skip
    parser.add_argument("--llm-cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "mvl_pipeline-llm-cache")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = yaml.safe_load(args.params.read_text())["model"]
    base["pos_grid"] = [c // p for c, p in zip(args.crop, base["patch_size"], strict=True)]
    started = time.perf_counter()
    variants = {name: Variant(variant_params(base, name), args, device, args.llm_cache_dir)
                for name in ("new", "previous", "fp32", "none", *args.also)}  # fmt: skip
    compiled: dict = {}
    if args.compile:  # new + torch.compile: the first step compiles (from Inductor's cache if warm)
        cache = inductor_cache_dir()
        compiled["inductor_cache_warm"] = cache.is_dir() and any(cache.iterdir())
        compiled["compile_mode"] = args.compile_mode
        variants["compiled"] = Variant(variant_params(base, "compiled") | {"compile_mode": args.compile_mode}, args, device, args.llm_cache_dir)
        first = time.perf_counter()
        variants["compiled"].step()
        compiled["compile_first_step_s"] = round(time.perf_counter() - first, 1)
        compiled["compiled"] = getattr(variants["compiled"].model, "_compiled_call_impl", None) is not None  # False: fell back to eager
        print(f"compiled variant: first step {compiled['compile_first_step_s']} s (Inductor cache {'warm' if compiled['inductor_cache_warm'] else 'cold'}: {cache})", flush=True)
    for variant in variants.values():  # warm-up: allocator, oneDNN primitive caches
        variant.step()
        variant.step()
    rounds: list[dict] = []
    for index in range(args.rounds):
        peak = {p: matmul_gflops(d, device) for p, d in MATMUL_DTYPES.items()}
        entry = {"matmul_gflops": {p: round(v, 1) for p, v in peak.items()}}
        for name, variant in variants.items():
            best = variant.timed(args.steps)
            achieved = variant.flops_per_sample * variant.batch / best / 1e9
            entry[name] = {"step_s": round(best, 4), "roofline_fraction": round(achieved / peak[variant.precision], 4)}
        entry["speedup_vs_previous_step"] = round(entry["previous"]["step_s"] / entry["new"]["step_s"], 3)
        rounds.append(entry)
        print(f"round {index + 1}/{args.rounds}: bf16 matmul {peak['bf16']:.0f} GFLOP/s, new {entry['new']['step_s']:.3f} s "
              f"({entry['new']['roofline_fraction']:.1%}), previous {entry['previous']['step_s']:.3f} s, "
              f"speed-up {entry['speedup_vs_previous_step']:.2f}x", flush=True)  # fmt: skip

    def spread(values: list[float]) -> dict:
        return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4)}

    summary = {}
    for name, variant in variants.items():
        steps = [r[name]["step_s"] for r in rounds]
        summary[name] = {
            "samples_per_s": round(variant.batch / statistics.median(steps), 3),
            "step_s": spread(steps),
            "roofline_fraction": spread([r[name]["roofline_fraction"] for r in rounds]),
            "flops_per_sample": variant.flops_per_sample,
        }
    speedups = [r["speedup_vs_previous_step"] for r in rounds]
    shares = {name: time_shares(variants[name]) for name in ("new", "previous")}
    if args.profile:
        for name in ("new", "previous"):
            with profile(activities=profiler_activities(device), record_shapes=True) as prof:
                variants[name].step()
                synchronize(device)
            sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(f"--- {name}\n" + prof.key_averages().table(sort_by=sort_by, row_limit=20), flush=True)

    rng = np.random.default_rng(0)
    volumes = [rng.normal(size=INFER_SHAPE).astype(np.float32) for _ in range(args.infer_cases)]
    infer = {}
    # new: predict_many, args.case_batch cases a pass; previous: the previous step's model one case
    # at a time; new_per_case: what batching alone adds; fp32: the new path in fp32. Round-robin.
    runs = {"new": ("new", args.case_batch), "previous": ("previous", 1), "new_per_case": ("new", 1), "fp32": ("fp32", args.case_batch)}
    for variant in variants.values():
        variant.model.eval()
    rates: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.infer_rounds):
        for run, (name, case_batch) in runs.items():
            rate, labels = inference(variants[name].model, variants[name].cfg.num_classes, volumes, device, case_batch)
            rates[run].append(rate)
            infer[run] = (statistics.median(rates[run]), labels)
    # bf16 vs fp32 agreement on the same weights (the fp32 variant's weights in the bf16 model)
    variants["new"].model.load_state_dict(variants["fp32"].model.state_dict(), strict=False)
    _, bf16_labels = inference(variants["new"].model, variants["new"].cfg.num_classes, volumes, device, args.case_batch)
    agreement = float(np.mean([np.mean(a == b) for a, b in zip(bf16_labels, infer["fp32"][1], strict=True)]))

    result = {
        "machine": machine(),
        "crop": list(args.crop), "batch": args.batch, "rounds": len(rounds),
        "roofline_fraction_bf16": summary["new"]["roofline_fraction"]["median"],
        "roofline_fraction_bf16_spread": summary["new"]["roofline_fraction"],
        "roofline_fraction_bf16_previous": summary["previous"]["roofline_fraction"]["median"],
        "roofline_fraction_fp32": summary["fp32"]["roofline_fraction"]["median"],
        "speedup_vs_previous_step": round(statistics.median(speedups), 3),
        "speedup_vs_previous_step_spread": spread(speedups),
        "samples_per_s": summary["new"]["samples_per_s"],
        "samples_per_s_previous": summary["previous"]["samples_per_s"],
        "samples_per_s_fp32": summary["fp32"]["samples_per_s"],
        "samples_per_s_none": summary["none"]["samples_per_s"],
        "matmul_gflops_bf16": spread([r["matmul_gflops"]["bf16"] for r in rounds]),
        "matmul_gflops_fp32": spread([r["matmul_gflops"]["fp32"] for r in rounds]),
        "flops_per_sample": summary["new"]["flops_per_sample"],
        "time_share_new": shares["new"], "time_share_previous": shares["previous"],
        **{f"speedup_vs_{name}": round(statistics.median(r[name]["step_s"] / r["new"]["step_s"] for r in rounds), 3)
           for name in args.also},
        **({"samples_per_s_compiled": summary["compiled"]["samples_per_s"],
            "speedup_compiled_vs_previous": round(statistics.median(r["previous"]["step_s"] / r["compiled"]["step_s"] for r in rounds), 3),
            "roofline_fraction_bf16_compiled": summary["compiled"]["roofline_fraction"]["median"], **compiled}
           if "compiled" in variants else {}),
        "infer_cases_per_s": round(infer["new"][0], 2),
        "infer_cases_per_s_previous": round(infer["previous"][0], 2),
        "infer_cases_per_s_new_per_case": round(infer["new_per_case"][0], 2),
        "infer_cases_per_s_fp32": round(infer["fp32"][0], 2),
        "infer_speedup_vs_previous": round(infer["new"][0] / infer["previous"][0], 3),
        "infer_case_batch": args.case_batch, "infer_rounds": args.infer_rounds,
        "infer_label_agreement_bf16_fp32": round(agreement, 5),
        "variants": summary, "per_round": rounds,
        "wall_s": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
