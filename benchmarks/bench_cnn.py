"""The ``cnn`` preset's bf16 train step and inference against MONAI's DynUNet as MONAI builds it
(the same topology and weights, default layout, MONAI's InstanceNorm3d): what the ablation's CNN
arm and a user's own MONAI script would run.

The preset runs the network in the channels_last_3d layout with norms that keep it
(``model/cnn.py``). Both sides are timed in alternating rounds in one process, on the
Hippocampus patch (40x56x40, batch 2) with ``--threads`` threads (1: what an ablation trial gets
on 2 cores); a step is forward, cross-entropy, backward and AdamW. Each round: 5 warm-up steps,
then the median of ``--steps`` timed steps per side. Last line: one JSON object with
``preset_step_s``, ``monai_step_s``, ``speedup_vs_monai`` (medians over rounds, and each round's),
the same for inference (``torch.no_grad``), the last steps' losses of each side, and the machine.

    .venv/bin/python benchmarks/bench_cnn.py [--rounds 3] [--steps 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
import yaml
from bench_depthwise import _median_ms  # warm-ups, then the median time of the timed calls
from bench_model import machine  # CPU flags, GPU name and capability

from mvl_pipeline.model import MedVisionLlamaConfig, build_model
from mvl_pipeline.model.cnn import monai_dynunet

ROOT = Path(__file__).resolve().parents[1]
HIPPOCAMPUS_PLAN = {"patch_size": [40, 56, 40], "target_spacing": [1.0, 1.0, 1.0], "embed_patch_size": [8, 8, 8],
                    "label_values": [0, 1, 2], "label_names": {"1": "anterior", "2": "posterior"}}  # fmt: skip


def networks() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the preset's segmenter, MONAI's DynUNet with the same weights) in bf16-mixed."""
    block = yaml.safe_load((ROOT / "conf/base/parameters_model.yml").read_text())["model"]
    cfg = MedVisionLlamaConfig.from_params({**block, "preset": "cnn"}).for_plan(HIPPOCAMPUS_PLAN)
    cache = Path(tempfile.gettempdir()) / "mvl_pipeline-llm-cache"
    torch.manual_seed(0)
    preset = build_model(cfg, llm_cache_dir=cache)
    monai = monai_dynunet(cfg)
    monai.load_state_dict(preset.net.state_dict())
    return preset, monai


class Side:
    """One network with its own optimiser, trained on a fixed batch."""

    def __init__(self, net: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], autocast: bool):
        self.net, (self.x, self.y), self.autocast = net, batch, autocast
        self.optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
        self.losses: list[float] = []

    def forward(self) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            return self.net(self.x).float()

    def step(self) -> None:
        loss = torch.nn.functional.cross_entropy(self.forward(), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.losses.append(round(loss.item(), 4))

    def infer(self) -> None:
        with torch.no_grad():
            self.forward()


def timed(action, steps: int) -> float:
    """Seconds: the median of ``steps`` calls after 5 warm-ups."""
    return _median_ms(action, steps) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset, monai = networks()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 40, 56, 40, generator=generator)
    y = torch.randint(0, 3, (2, 40, 56, 40), generator=generator)
    # the same weights (loaded above) and batch; the preset autocasts itself (model.precision: bf16-mixed)
    sides = {"preset": Side(preset, (x, y), autocast=False), "monai": Side(monai, (x, y), autocast=True)}
    rounds: dict[str, dict[str, list[float]]] = {"step": {s: [] for s in sides}, "infer": {s: [] for s in sides}}
    for r in range(args.rounds):
        for name in (sides if r % 2 == 0 else reversed(list(sides))):
            rounds["step"][name].append(timed(sides[name].step, args.steps))
            rounds["infer"][name].append(timed(sides[name].infer, args.steps))
        print(f"round {r + 1}: step preset {rounds['step']['preset'][-1]:.3f} s, MONAI {rounds['step']['monai'][-1]:.3f} s; "
              f"inference preset {rounds['infer']['preset'][-1]:.3f} s, MONAI {rounds['infer']['monai'][-1]:.3f} s", flush=True)  # fmt: skip
    result: dict = {"crop": [40, 56, 40], "batch": 2, "threads": args.threads, "rounds": args.rounds}
    for kind, label in (("step", "step_s"), ("infer", "infer_s")):
        per_round = [m / p for p, m in zip(rounds[kind]["preset"], rounds[kind]["monai"], strict=True)]
        result[f"preset_{label}"] = statistics.median(rounds[kind]["preset"])
        result[f"monai_{label}"] = statistics.median(rounds[kind]["monai"])
        result[f"{'speedup' if kind == 'step' else 'infer_speedup'}_vs_monai"] = statistics.median(per_round)
        result[f"{kind}_speedup_per_round"] = [round(v, 3) for v in per_round]
    result["last_losses"] = {name: side.losses[-3:] for name, side in sides.items()}
    result["machine"] = machine() | {"device": "cpu", "torch": torch.__version__}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
