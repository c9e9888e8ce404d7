"""The ``fit`` parameter block (conf/base/parameters_fit.yml): the training loop, its augmentation,
and how Ray Train scales it. Defaults equal the YAML (tests/core/test_parameters.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mvl_pipeline.core.config import ConfigBlock
from mvl_pipeline.core.storage import S3_TIMEOUTS
from mvl_pipeline.training.augmentation import AugmentConfig


@dataclass(frozen=True)
class LoopConfig(ConfigBlock):
    """Hyper-parameters of ``train_loop_per_worker`` (``fit.loop``)."""

    WHERE = "fit.loop"

    epochs: int = 24
    steps_per_epoch: int = 50
    batch_size: int = 2  # per worker
    lr: float = 0.002
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.02
    grad_clip: float = 1.0
    foreground_fraction: float = 0.33
    rare_class_prob: float = 0.0  # of foreground crops: centre on the rarest class present
    seed: int = 42
    val_every: int = 2
    val_overlap: float = 0.25
    val_sw_batch_size: int = 2
    val_case_batch: int = 4  # validation cases that fit one window, predicted together
    torch_threads: int = 0  # 0: the worker's CPU share, at most OMP_NUM_THREADS when set
    flush_denormal: bool = False  # CPU: treat denormal floats as zero while the loop runs
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        # checked here, when the fit node starts, not after Ray and the model: `--params
        # fit.loop.epochs=0` ended a run in "training reported no checkpoint", `=abc` in a worker's TypeError
        for name in ("epochs", "steps_per_epoch", "batch_size", "val_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.WHERE}.{name} must be a whole number >= 1, got {value!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float) or not self.lr > 0:
            raise ValueError(f"{self.WHERE}.lr must be a number > 0, got {self.lr!r}")


@dataclass(frozen=True)
class ScalingConfig(ConfigBlock):
    """``fit.scaling``: Ray Train workers and what each holds."""

    WHERE = "fit.scaling"

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 0  # 0: the Ray cluster's CPUs shared by the workers
    gpus_per_worker: float = 1.0


@dataclass(frozen=True)
class StorageTimeouts(ConfigBlock):
    """``fit.storage_timeouts``: seconds Ray Train's S3 client (checkpoints on ``s3://``) waits
    for a connection / for an answer before an attempt fails (each request: at most
    ``core.storage.S3_RETRY`` attempts). A store that hangs costs at most about 4 x ``read_timeout``
    per request and worker-group start; a site lowers it to fail sooner."""

    WHERE = "fit.storage_timeouts"

    connect_timeout: float = float(S3_TIMEOUTS["connect_timeout"])
    read_timeout: float = float(S3_TIMEOUTS["read_timeout"])

    def __post_init__(self) -> None:
        if not (self.connect_timeout > 0 and self.read_timeout > 0):
            raise ValueError(f"fit.storage_timeouts must be > 0 s, got {self.to_dict()}")


@dataclass(frozen=True)
class FitConfig(ConfigBlock):
    """The ``fit`` block."""

    WHERE = "fit"

    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    ray_num_cpus: int | None = None  # local Ray only: None = every core of the machine
    ray_dashboard: bool = True  # local Ray only: Ray's dashboard head, which serves the state API Ray Train polls
    run_name: str = "auto"
    storage_path: str = "data/06_models/ray_results"
    storage_timeouts: StorageTimeouts = field(default_factory=StorageTimeouts)
    llm_cache_dir: str = "data/06_models/llm_cache"
    max_failures: int = 1
    num_to_keep: int = 2
    stream_to_mlflow: bool = True
    init: str = "scratch"  # scratch | champion: start from the registered champion's weights
    champion_epochs: int = 6  # epochs of a run started from the champion (scratch: loop.epochs)
    loop: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self) -> None:
        if self.init not in ("scratch", "champion"):
            raise ValueError(f"fit.init must be scratch or champion, not {self.init!r}")
        if self.champion_epochs < 1:
            raise ValueError("fit.champion_epochs must be >= 1")
