"""Shared test setup.

The Triton kernels run in Triton's CPU interpreter on this (GPU-less) test
machine: TRITON_INTERPRET must be set before triton is first imported.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
