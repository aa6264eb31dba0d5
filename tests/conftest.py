"""Shared test setup.

Triton kernels run compiled where a CUDA device is present, and in Triton's CPU
interpreter where none is (or where asked: PRSL_TRITON_INTERPRET=1, or
TRITON_INTERPRET=1 already set). TRITON_INTERPRET must be decided before triton
is first imported: ``@triton.jit`` reads it when it decorates a kernel.

Tests of the Triton backend put their tensors on ``TRITON_DEVICE`` ("cpu" in the
interpreter, "cuda" compiled; ``backend_device`` / the ``triton_device`` fixture),
or are marked ``needs_interpreter`` where they rely on the interpreter itself.
"""

import contextlib
import os
import sys

import pytest
import torch


def _interpreter_wanted():
    asked = os.environ.get("PRSL_TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET"))
    if asked is not None:
        return asked == "1"
    return not torch.cuda.is_available()


if _interpreter_wanted():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("tests/conftest.py: triton was imported before TRITON_INTERPRET could be set; "
                           "run with TRITON_INTERPRET=1 in the environment")
    os.environ["TRITON_INTERPRET"] = "1"
    TRITON_DEVICE = "cpu"
else:
    os.environ["TRITON_INTERPRET"] = "0"  # "1" from a parent shell would make every kernel interpreted
    TRITON_DEVICE = "cuda" if torch.cuda.is_available() else None
INTERPRETER = TRITON_DEVICE == "cpu"
COMPILED = TRITON_DEVICE == "cuda"

needs_interpreter = pytest.mark.skipif(
    not INTERPRETER, reason="written for Triton's CPU interpreter (CPU tensors, interpreter-only hooks); "
                            "PRSL_TRITON_INTERPRET=1 runs it; tests/test_gpu_compiled.py covers the compiled kernels")


def backend_device(backend):
    """Where a test puts its tensors for ``backend``: ``TRITON_DEVICE`` for "triton" (skips where
    Triton runs neither compiled nor interpreted), the CPU for the others."""
    if backend != "triton":
        return torch.device("cpu")
    if TRITON_DEVICE is None:
        pytest.skip("Triton runs neither compiled (no CUDA device) nor interpreted (interpreter off)")
    return torch.device(TRITON_DEVICE)


@pytest.fixture
def triton_device():
    """The device the Triton backend runs on here (see ``backend_device``)."""
    return backend_device("triton")


@pytest.fixture
def block_width():
    """``block_width(v)``: Triton launches use tiles / blocks of ``v`` columns (``None``: the tuned
    ones) for the rest of the test, on every path down to the launchers
    (``prsl_kernels.triton_kernels.block_width``); the tuned widths come back after it."""
    from prsl_kernels import triton_kernels  # only when asked: conftest decides how triton is imported

    with contextlib.ExitStack() as stack:
        yield lambda block_v: stack.enter_context(triton_kernels.block_width(block_v))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny driver models: splitting each op over threads costs more than it saves (several
    times slower on a shared 2-core machine). Restored for the other test modules."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
