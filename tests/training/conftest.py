"""Fixtures shared by the training tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """run_training sets the process-wide torch thread count: give it back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
