"""The test run itself: several test processes share the machine's cores without
oversubscribing them (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from mvl_pipeline.core.parallel import omp_threads


def test_each_test_process_and_what_it_starts_gets_its_share_of_the_cores():
    import torch

    here = torch.get_num_threads()
    child = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    assert int(child.stdout) == here  # what a test starts inherits its share
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:  # `make test`: -n 2. The share is cores // workers unless OMP_NUM_THREADS was set before
        assert omp_threads() is not None and here == omp_threads() <= (os.cpu_count() or 1)
        if os.environ["MVL_TESTS_OMP_GIVEN"] == "0":
            assert here == max(1, (os.cpu_count() or 1) // workers)
