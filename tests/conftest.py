"""Shared test setup.

The Triton kernels run in Triton's CPU interpreter on this (GPU-less) test
machine: TRITON_INTERPRET must be set before triton is first imported.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny driver models: splitting each op over threads costs more than it saves (several
    times slower on a shared 2-core machine). Restored for the other test modules."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
