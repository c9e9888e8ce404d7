"""The training loop, in the shape of Ray Train's own examples.

``train_loop_per_worker(config)`` runs in every Ray worker: it loads its shard of the training
cases from the model-input store (the driver never holds the data), builds the model, resumes
from ``ray.train.get_checkpoint()`` when there is one, and reports every epoch with a
checkpoint and the validation Dice (sliding window over whole validation cases, sharded over
workers and all-reduced). ``run_training(config, session)`` is the same loop with the Ray calls
behind the small ``Session`` interface of ``training.session``, so that a plain single-process run
(benchmarks, debugging, unit tests) executes exactly the same steps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mvl_pipeline.core import storage
from mvl_pipeline.core.parallel import torch_threads
from mvl_pipeline.evaluation.inference import predict_many
from mvl_pipeline.evaluation.metrics import dice_per_class
from mvl_pipeline.model import (
    MedVisionLlamaConfig,
    build_model,
    configure_optimizers,
    load_model,
    save_model,
)
from mvl_pipeline.training.augmentation import augment
from mvl_pipeline.training.config import LoopConfig
from mvl_pipeline.training.losses import make_loss, supervised_loss
from mvl_pipeline.training.metric_stream import MetricStream
from mvl_pipeline.training.sampling import TrainingVolume, sample_batch
from mvl_pipeline.training.session import RaySession, Session

logger = logging.getLogger(__name__)

MODEL_DIR = "model"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return schedule


def _gradients_finite(model: nn.Module, grad_clip: float) -> bool:
    """Clip the trainable gradients to ``grad_clip`` (0: no clipping); False when their norm is not
    finite. The step is then skipped, as AMP's GradScaler does: one inf/NaN gradient would
    otherwise turn every weight into NaN through the clip and AdamW. Under DDP every rank holds
    the same all-reduced gradients, so every rank decides the same."""
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    if not params:
        return True
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if not torch.isfinite(norm):
        return False
    if grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
    return True


def current_case(case: Any, case_id: str, plan_id: str | None) -> Any:
    """``case``, once its model input was made with the plan the run trains with. A preprocess
    killed after writing the new plan leaves cases of the old one beside it (an audit, 2026-12-05:
    a plain `kedro run --pipelines fit` then trained on the mix and recorded the new plan id)."""
    made_with = (getattr(case, "meta", None) or {}).get("plan_id")
    if plan_id is not None and made_with != plan_id:
        raise ValueError(
            f"the model input of case {case_id} was made with plan {made_with}, not with the current plan {plan_id} "
            f"(a preprocess that did not finish?): run `kedro run --pipelines preprocess` again, then fit"
        )
    return case


def _load_volumes(
    loaders: Mapping[str, Callable[[], Any]], ids: Sequence[str], seed: int, plan_id: str | None = None
) -> list[TrainingVolume]:
    volumes = []
    for index, case_id in enumerate(ids):
        case = current_case(loaders[case_id](), case_id, plan_id)
        if case.label is None:
            raise ValueError(f"training case {case_id} has no label")
        volumes.append(
            TrainingVolume.from_arrays(np.asarray(case.image.array), np.asarray(case.label.array), seed=seed + index)
        )
    return volumes


def validate(
    model: nn.Module,
    loaders: Mapping[str, Callable[[], Any]],
    ids: Sequence[str],
    *,
    roi_size: Sequence[int],
    num_classes: int,
    classes: Sequence[int],
    overlap: float,
    sw_batch_size: int,
    device: torch.device,
    case_batch: int = 4,
    plan_id: str | None = None,
) -> np.ndarray:
    """Per-class Dice sums over ``ids`` and the case count: ``[sum_c1, ..., sum_cK, n]``."""
    sums = np.zeros(len(classes) + 1, dtype=np.float64)
    cases = (current_case(loaders[case_id](), case_id, plan_id) for case_id in ids)
    for case, probs in predict_many(
        model, cases, lambda case: np.asarray(case.image.array), roi_size=roi_size, num_classes=num_classes,
        overlap=overlap, sw_batch_size=sw_batch_size, case_batch=case_batch, device=device,
    ):  # fmt: skip
        prediction = probs.argmax(axis=0)
        scores = dice_per_class(prediction, np.asarray(case.label.array), classes)
        sums[: len(classes)] += [scores[c] for c in classes]
        sums[-1] += 1
    return sums


def _save_checkpoint(
    directory: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
) -> None:
    save_model(_unwrap(model), Path(directory) / MODEL_DIR)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, Path(directory) / OPTIMIZER_FILE)
    (Path(directory) / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")


def denormals_flushed() -> float:
    """The share of torch's intra-op threads that flush denormal floats to zero now (0.0 to 1.0).

    An elementwise product over a tensor of denormals (written as bits: converting 5.9e-39 from a
    Python float would itself be flushed), large enough to be split over every thread: each
    thread's chunk comes out zero exactly when that thread flushes.
    """
    bits = torch.full((max(1, torch.get_num_threads()) * 65536,), 0x00400000, dtype=torch.int32)
    return float((bits.view(torch.float32) * 1.5 == 0).float().mean())


@contextlib.contextmanager
def flush_denormal(enabled: bool) -> Iterator[None]:
    """While the block runs, the CPU treats denormal floats as zero (x86's FTZ and DAZ).

    Arithmetic on denormals (|x| < 1.2e-38 in fp32 and bf16) takes a slow path on x86 CPUs.
    ``torch.set_flush_denormal`` sets the calling thread's control register; torch's intra-op
    threads copy it when they start, which is at the first parallel operation of the process. So
    it reaches every thread only when nothing ran in parallel before (a Ray Train worker is such a
    fresh process); otherwise it holds for part of them, which is logged. Afterwards the calling
    thread flushes no more; threads that started inside the block keep flushing (torch offers no
    way to reach them), which ends with the worker process. A CPU that cannot flush runs as
    before, with a warning.
    """
    if not enabled:
        yield
        return
    if not torch.set_flush_denormal(True):
        logger.warning("this CPU cannot flush denormal floats to zero: loop.flush_denormal has no effect")
        yield
        return
    share = denormals_flushed()
    if share < 1.0:
        logger.warning(
            "flush-to-zero reaches %.0f%% of torch's threads: its thread pool started before the loop "
            "(run the loop in a fresh process for all of them)", 100 * share,
        )  # fmt: skip
    else:
        logger.info("flush-to-zero on: denormal floats are read and written as zero")
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def eta_s(elapsed_s: float, epochs_run: int, epochs_left: int) -> float:
    """The time the epochs left take at the mean pace of the ``epochs_run`` this process has run,
    validations included: the last epoch's time alone made the ETA jump up and down by the
    validation's time (only every ``val_every``-th epoch validates)."""
    return epochs_left * elapsed_s / max(1, epochs_run)


def run_training(config: Mapping[str, Any], session: Session) -> dict[str, Any]:
    """Train as configured; returns the final trainer state (history included)."""
    loop = LoopConfig.from_params(config["loop"])
    stream = MetricStream(config.get("mlflow") if session.world_rank == 0 else None)
    try:
        with flush_denormal(loop.flush_denormal and session.device().type == "cpu"):
            return _run_training(config, session, loop, stream)
    finally:
        stream.close()
        session.close()


def _run_training(config: Mapping[str, Any], session: Session, loop: LoopConfig, stream: MetricStream) -> dict[str, Any]:
    model_cfg = MedVisionLlamaConfig.from_params(config["model"])
    plan = config["plan"]
    roi = [int(v) for v in plan["patch_size"]]
    classes = [int(c) for c in config["classes"]]
    loaders = config["loaders"]
    rank, world = session.world_rank, session.world_size
    device = session.device()
    torch.set_num_threads(torch_threads(loop.torch_threads, int(config.get("cpus_per_worker", 0))))
    torch.manual_seed(loop.seed + 1000 * rank)

    train_ids = sorted(config["train_ids"])[rank::world]
    val_ids = sorted(config["val_ids"])[rank::world]
    volumes = _load_volumes(loaders, train_ids, loop.seed, plan.get("plan_id"))
    if not volumes:
        raise ValueError(f"worker {rank} of {world} got no training case (train split has {len(config['train_ids'])})")

    restored = session.get_checkpoint_dir()
    if restored is not None:
        model = load_model(Path(restored) / MODEL_DIR, llm_cache_dir=config["llm_cache_dir"], device="cpu")
        state = json.loads((Path(restored) / STATE_FILE).read_text(encoding="utf-8"))
        state.setdefault("resumed_after_epochs", []).append(int(state["epoch"]))
    else:
        model = build_model(model_cfg, device="cpu", llm_cache_dir=config["llm_cache_dir"], seed=loop.seed)
        if config.get("init_weights"):  # fit.init: champion (shapes checked by the driver)
            model.load_state_dict(config["init_weights"], strict=False)  # the frozen LLM layer is not saved
        state = {"epoch": -1, "history": [], "best_val_dice": -1.0, "global_step": 0, "resumed_after_epochs": []}
    model = session.prepare_model(model.to(device))
    optimizer = configure_optimizers(_unwrap(model), lr=loop.lr, weight_decay=loop.weight_decay, betas=loop.betas)
    total_steps = loop.epochs * loop.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total_steps, int(loop.warmup_epochs * loop.steps_per_epoch), loop.min_lr_ratio)
    )
    if restored is not None:
        saved = torch.load(Path(restored) / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        # counted as the epoch lines count (from 1); history and MLflow steps count from 0
        logger.info("worker %d: resumed after epoch %d/%d", rank, int(state["epoch"]) + 1, loop.epochs)
    loss_fn = make_loss(model_cfg.num_classes)
    deep = getattr(_unwrap(model), "deep_supervision", 0)  # the CNN preset has its own head
    start_epoch = int(state["epoch"]) + 1
    if start_epoch >= loop.epochs and restored is not None:
        # A finished run re-run under the same name: nothing to train, report what it has.
        last = dict(state["history"][-1]) if state["history"] else {}
        if rank == 0:  # into the local copy of the restored checkpoint, which report() stores anew:
            # atomically, so that a kill mid-write cannot leave a truncated state for every later resume
            storage.write_bytes_atomic(None, "file", str(Path(restored) / STATE_FILE), json.dumps(state, indent=1).encode())
        session.report(last, restored if rank == 0 else None)
        return state

    state["loop_started_unix"] = time.time()  # start-up ends here (benchmarks/bench_fit.py)
    loop_started = time.perf_counter()
    for epoch in range(start_epoch, loop.epochs):
        started = time.perf_counter()
        rng = np.random.default_rng([loop.seed, rank, epoch])
        model.train()
        losses, skipped, rates = [], 0, []
        for _ in range(loop.steps_per_epoch):
            x, y = sample_batch(
                volumes, roi, loop.batch_size, rng,
                foreground_fraction=loop.foreground_fraction, rare_class_prob=loop.rare_class_prob,
            )  # fmt: skip
            x, y = augment(x, y, rng, loop.augment)
            x, y = x.to(device), y.to(device)
            # the model autocasts itself (model.precision); with deep supervision it also returns
            # the coarser levels' logits (through forward, so a DDP wrapper sees the call)
            logits, coarse = model(x, aux=True) if deep else (model(x), [])
            loss = supervised_loss(loss_fn, logits, coarse, y, model_cfg.num_classes)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            rates.append(float(optimizer.param_groups[0]["lr"]))  # the rate this step uses
            if _gradients_finite(model, loop.grad_clip):
                optimizer.step()
                losses.append(float(loss.detach()))
                scheduler.step()
            else:
                skipped += 1
                with warnings.catch_warnings():  # torch warns of a wrong call order if no step was taken yet
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                    scheduler.step()  # a skipped step keeps its place in the schedule (same for every arm)
            state["global_step"] = int(state["global_step"]) + 1
        if skipped:
            state["skipped_steps"] = int(state.get("skipped_steps", 0)) + skipped
            logger.warning(
                "worker %d, epoch %d: %d of %d steps skipped (non-finite gradient)",
                rank, epoch + 1, skipped, loop.steps_per_epoch,
            )  # fmt: skip
        if not losses:
            raise FloatingPointError(
                f"epoch {epoch + 1}: every one of its {loop.steps_per_epoch} steps had a non-finite gradient, "
                "so the model did not train (look for inf/NaN in the input patches, or try precision fp32)"
            )
        train_time = time.perf_counter() - started
        loss_sum = session.all_reduce_sum(np.array([sum(losses), len(losses)], dtype=np.float64))
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": float(loss_sum[0] / max(1.0, loss_sum[1])),
            # the mean rate the epoch's steps used (the schedule's rate after the epoch is the next
            # epoch's: it read 0.002 for a warm-up epoch whose steps averaged 0.001)
            "lr": float(np.mean(rates)),
            "samples_per_s": float(loop.steps_per_epoch * loop.batch_size * world / max(train_time, 1e-9)),
            "skipped_steps": skipped,
        }
        is_last = epoch == loop.epochs - 1
        validated = (epoch + 1) % loop.val_every == 0 or is_last
        if validated:
            sums = session.all_reduce_sum(
                validate(
                    _unwrap(model), loaders, val_ids, roi_size=roi, num_classes=model_cfg.num_classes,
                    classes=classes, overlap=loop.val_overlap, sw_batch_size=loop.val_sw_batch_size,
                    device=device, case_batch=loop.val_case_batch, plan_id=plan.get("plan_id"),
                )  # fmt: skip
            )
            count = max(1.0, sums[-1])
            per_class = {f"val_dice_{c}": float(sums[i] / count) for i, c in enumerate(classes)}
            metrics.update(per_class)
            metrics["val_dice"] = float(np.mean(list(per_class.values())))
        metrics["epoch_time_s"] = time.perf_counter() - started
        state["epoch"] = epoch
        state["history"].append(metrics)
        if validated:
            state["best_val_dice"] = max(float(state["best_val_dice"]), metrics["val_dice"])
        remaining = eta_s(time.perf_counter() - loop_started, epoch + 1 - start_epoch, loop.epochs - epoch - 1)
        if rank == 0:
            logger.info(
                "epoch %d/%d  loss %.4f  val Dice %s  %.1f samples/s  ETA %.0f s",
                epoch + 1, loop.epochs, metrics["train_loss"],
                f"{metrics['val_dice']:.3f}" if validated else "-", metrics["samples_per_s"], remaining,
            )  # fmt: skip
            stream.put(metrics, epoch)  # to MLflow in the background: never waits for the server
        # Checkpoints only after a validation: each carries the Dice it is ranked by, and a
        # resumed run restarts after the last validated epoch.
        if rank == 0 and validated:
            with tempfile.TemporaryDirectory(prefix="mvl-ckpt-") as directory:
                _save_checkpoint(directory, model, optimizer, scheduler, state)
                session.report(metrics, directory)
        else:
            session.report(metrics, None)
    return state


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (module level, as Ray's examples)."""
    configure_worker_logging()
    run_training(config, RaySession())


def configure_worker_logging() -> None:
    """The epoch lines at INFO in a Ray process that trains (a Ray Train worker, or a Tune trial
    that trains in its own process), Ray's own lines from WARNING."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    noisy = ["ray", "ray.train", "highdicom"]
    try:  # Ray Train's "Reporting training result N: TrainingReport(...)" at every report(), a longer copy of
        # our epoch line: its logger is named by its file's path, outside "ray" and LoggingConfig's reach
        from ray.train.v2._internal.execution import context as train_context

        noisy.append(train_context.logger.name)
    except (ImportError, AttributeError):  # another Ray layout: its lines stay
        pass
    for name in noisy:
        logging.getLogger(name).setLevel(logging.WARNING)
