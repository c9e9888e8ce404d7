"""Per-case work in a thread pool, with progress logging and bounded memory.

numpy and scipy release the GIL in their array loops, so threads give real parallelism for the
preprocessing maths without pickling volumes between processes.

- :func:`parallel_map`: eager, for small per-case results (fingerprint records).
- :class:`LazyResults`: for large results that a partitioned dataset saves one by one. It hands
  out ``{key: callable}``; calling them in key order (as ``CaseStoreDataset.save`` does) keeps at
  most ``window`` results computed ahead, so memory stays bounded however many cases there are.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

K = TypeVar("K")
R = TypeVar("R")


def resolve_workers(workers: int | None, *, cap: int | None = None) -> int:
    """The one worker-count rule: ``workers > 0`` as given, ``0``/``None`` = one per CPU core
    of this machine (at most ``cap``)."""
    if workers is not None and int(workers) > 0:
        return int(workers)
    cores = max(1, os.cpu_count() or 1)
    return min(cores, cap) if cap else cores


def omp_threads() -> int | None:
    """``OMP_NUM_THREADS`` when it is set to a positive number (its first, for a nested list such
    as ``4,2``), else None."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def torch_threads(explicit: int, share: int) -> int:
    """The threads torch may use in this process: ``explicit`` when > 0; otherwise ``share`` (the
    CPUs this worker was given, 0 = every core of the machine), at most ``OMP_NUM_THREADS`` when
    that is set. Ray sets ``OMP_NUM_THREADS`` to the CPUs it gave a worker unless it was set
    before, so inside Ray it is the share; set by whoever shares the machine between several
    runs (a job script, a CI running two test processes), it keeps them from oversubscribing the
    cores. That costs more than it seems: OpenMP's threads spin while they wait for each other,
    and two processes of 2 threads each on 2 cores ran the same model's training steps 5x slower
    than two of 1 thread each (54 s against 10.5 s, AMD, 2026-12-04)."""
    if explicit > 0:
        return int(explicit)
    threads = resolve_workers(share)
    cap = omp_threads()
    return min(threads, cap) if cap else threads


class _Progress:
    def __init__(self, what: str, total: int, every: int) -> None:
        self.what, self.total, self.every = what, total, max(1, every)
        self.done = 0
        self.start = time.perf_counter()
        self._lock = threading.Lock()

    def step(self) -> None:
        with self._lock:
            self.done += 1
            if self.done % self.every == 0 or self.done == self.total:
                logger.info(
                    "%s: %d/%d cases (%.1f s)",
                    self.what, self.done, self.total, time.perf_counter() - self.start,
                )  # fmt: skip


def parallel_map(
    fn: Callable[[K], R],
    keys: Sequence[K],
    *,
    workers: int = 1,
    what: str = "processing",
    progress_every: int = 10,
) -> list[R]:
    """``[fn(k) for k in keys]`` computed by ``workers`` threads, in order, with progress logs."""
    progress = _Progress(what, len(keys), progress_every)

    def run(key: K) -> R:
        result = fn(key)
        progress.step()
        return result

    n = resolve_workers(workers, cap=8)
    if n == 1 or len(keys) <= 1:
        return [run(k) for k in keys]
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="preprocess") as pool:
        return list(pool.map(run, keys))


class LazyResults:
    """``fn`` over ``keys`` as ``{key: callable}``, computed ahead in a bounded thread pool."""

    def __init__(
        self,
        fn: Callable[[Any], Any],
        keys: Iterable[Any],
        *,
        workers: int = 1,
        window: int = 0,
        what: str = "processing",
        progress_every: int = 10,
    ) -> None:
        self._fn = fn
        self._keys = sorted(keys)
        self._position = {k: i for i, k in enumerate(self._keys)}
        self._workers = resolve_workers(workers, cap=8)
        self._window = window if window > 0 else 2 * self._workers
        self._progress = _Progress(what, len(self._keys), progress_every)
        self._futures: dict[Any, Future] = {}
        self._submitted = 0
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def callables(self) -> dict[Any, Callable[[], Any]]:
        return {key: (lambda key=key: self.result(key)) for key in self._keys}

    def _run(self, key: Any) -> Any:
        result = self._fn(key)
        self._progress.step()
        return result

    def result(self, key: Any) -> Any:
        if self._workers == 1:
            return self._run(key)
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self._workers, thread_name_prefix="preprocess"
                )
            # Submit in key order up to `window` ahead of the key asked for.
            limit = min(len(self._keys), self._position[key] + self._window + 1)
            while self._submitted < limit:
                k = self._keys[self._submitted]
                if k not in self._futures:
                    self._futures[k] = self._pool.submit(self._run, k)
                self._submitted += 1
            future = self._futures.pop(key, None)
            if future is None:  # asked twice, or out of order beyond the window
                future = self._pool.submit(self._run, key)
        try:
            return future.result()
        finally:
            with self._lock:
                if (
                    not self._futures
                    and self._submitted >= len(self._keys)
                    and self._pool is not None
                ):
                    self._pool.shutdown(wait=False)
                    self._pool = None
