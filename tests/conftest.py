import os

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """One torch thread for a test module: the 2-core machine is shared, and torch's default
    pool slows down badly under contention (docs/benchmarks.md)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


if os.environ.get("PYTEST_XDIST_WORKER"):
    # tests run two at a time, one per core (`-n 2` in the README's test command): each test
    # process computes on one thread, as torch's pool of every core slows badly when another
    # process is busy
    torch.set_num_threads(1)
