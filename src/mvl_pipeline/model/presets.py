"""Model presets, selected by ``model.preset`` (one parameter, the same fit/evaluate/register):

- ``medvisionllama``: the network as configured in parameters_model.yml (nothing overridden);
- ``paper``: as close to the paper and its reference code as they allow: the frozen LLM layer
  right after the patch embedding, 8^3 patches, LoRA rank 4 on the two dimension mappers
  (proj_in / proj_out), no skip taps into the decoder (the reference decodes the final tokens),
  convolutions at full resolution;
- ``cnn``: MONAI's DynUNet configured the nnU-Net way from the plan (``model/cnn.py``).

A preset fixes the keys listed here, whatever the YAML says for them (to vary one of them, use
``medvisionllama`` and set it); every other key keeps its YAML value. No preset fixes
``in_channels``: for every preset it comes from the plan (one per input channel of the data,
``MedVisionLlamaConfig.for_plan``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "medvisionllama": {},
    "paper": {
        "patch_size": [8, 8, 8],
        "llm": {"position": 0, "lora": {"rank": 4, "alpha": 8.0, "targets": ["proj_in", "proj_out"]}},
        "decoder": {"taps": [], "deep_supervision": False, "full_res": "conv"},
    },
    "cnn": {"llm": {"mode": "none"}},
}


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            base[key] = _merge(dict(base[key]), value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def apply_preset(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The model block with its preset's keys applied (unknown presets name the known ones)."""
    params = dict(params or {})
    preset = str(params.get("preset", "medvisionllama"))
    if preset not in PRESETS:
        raise ValueError(f"model.preset must be one of {sorted(PRESETS)}; got {preset!r}")
    return _merge(params, PRESETS[preset])
