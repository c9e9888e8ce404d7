"""Thread-pool helpers: same results as sequential, in order, bounded look-ahead."""

from __future__ import annotations

import threading
import time

import pytest

from mvl_pipeline.core.parallel import LazyResults, parallel_map


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
