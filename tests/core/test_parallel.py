"""Thread-pool helpers: same results as sequential, in order, bounded look-ahead."""

from __future__ import annotations

import os
import threading
import time

import pytest

from mvl_pipeline.core.parallel import LazyResults, parallel_map, torch_threads


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_parallel_map_keeps_order(workers):
    assert parallel_map(lambda k: k * k, list(range(25)), workers=workers) == [
        k * k for k in range(25)
    ]


def test_lazy_results_compute_ahead_by_at_most_the_window():
    started: list[int] = []
    lock = threading.Lock()

    def work(key: int) -> int:
        with lock:
            started.append(key)
        time.sleep(0.002)
        return -key

    lazy = LazyResults(work, range(30), workers=2, window=3)
    callables = lazy.callables()
    assert started == []  # nothing runs before the first call
    for key in sorted(callables):
        assert callables[key]() == -key
        assert max(started) <= key + 3
    assert sorted(started) == list(range(30))


def test_lazy_results_propagate_errors_to_the_caller():
    def work(key: int) -> int:
        if key == 2:
            raise RuntimeError("boom")
        return key

    callables = LazyResults(work, range(4), workers=2).callables()
    assert callables[0]() == 0 and callables[1]() == 1
    with pytest.raises(RuntimeError, match="boom"):
        callables[2]()
    assert callables[3]() == 3


@pytest.mark.parametrize(
    ("explicit", "share", "omp", "expected"),
    [
        (0, 4, None, 4),  # the worker's CPU share
        (0, 4, "1", 1),  # at most OMP_NUM_THREADS
        (0, 2, "8", 2),  # which never raises the share
        (3, 4, "1", 3),  # an explicit loop.torch_threads wins
        (0, 4, "2,1", 2),  # a nested list: its first level
        (0, 4, "0", 4),  # not a positive number: ignored
        (0, 4, "many", 4),
    ],
)
def test_torch_threads_is_the_share_capped_by_omp_num_threads(monkeypatch, explicit, share, omp, expected):
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    assert torch_threads(explicit, share) == expected


def test_share_zero_is_every_core_capped_by_omp_num_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert torch_threads(0, 0) == (os.cpu_count() or 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert torch_threads(0, 0) == 1
