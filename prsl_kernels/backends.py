"""Which kernels run a call: backend name + device -> a kernel path.

Paths:
  "ops"                 the torch.library ops (C++ on CPU, Triton on CUDA)
  "triton_interpreter"  the Triton launchers called directly on CPU tensors,
                        only with TRITON_INTERPRET=1 (tests, debugging)
  "reference"           the pure-PyTorch reference, with autograd
"""

import importlib.util
import os
import warnings

import torch

from . import ops

_warned = set()


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


@torch.compiler.assume_constant_result
def triton_available() -> bool:
    """True when triton imports; registers the CUDA kernels of the ops on first success."""
    if importlib.util.find_spec("triton") is None:
        return False
    from . import triton_kernels  # noqa: F401  (registers prsl::* for CUDA on import)
    return True


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.compiler.assume_constant_result
def cpp_available() -> bool:
    """True when the C++ extension is built (JIT, cached); registers its CPU kernels."""
    from . import cpp_kernels
    return cpp_kernels.available()


def resolve(backend: str, device: torch.device) -> str:
    if backend == "reference":
        return "reference"
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' needs CPU tensors, got device {device}")
        if not cpp_available():
            from . import cpp_kernels
            raise RuntimeError(f"backend='cpp': the C++ extension is unavailable: {cpp_kernels.build_error()}")
        return "ops"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if device.type == "cuda":
            return "ops"
        if device.type == "cpu" and triton_interpreter_on():
            return "triton_interpreter"
        raise ValueError(f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 "
                         f"set before triton is imported), got device {device}")
    # auto
    if device.type == "cuda":
        if triton_available():
            return "ops"
        _warn_once("auto-cuda", "prsl_kernels: triton is not installed; using the slow PyTorch reference")
        return "reference"
    if device.type == "cpu":
        if cpp_available():
            return "ops"
        from . import cpp_kernels
        _warn_once("auto-cpu", "prsl_kernels: the C++ CPU kernel could not be built "
                   f"({cpp_kernels.build_error()}); using the slow PyTorch reference")
        return "reference"
    return "reference"


def kernels(path: str):
    """(forward, backward) callables of a fused path, with the ops' signatures."""
    if path == "ops":
        return ops.forward, ops.backward
    if path == "triton_interpreter":
        from . import triton_kernels
        return triton_kernels.forward, triton_kernels.backward
    raise ValueError(f"no fused kernels for path {path!r}")


def forward_grad_kernel(path: str):
    """The ``prsl::forward_grad`` callable of a fused path (the gradient written by the forward)."""
    if path == "ops":
        return ops.forward_grad
    if path == "triton_interpreter":
        from . import triton_kernels
        return triton_kernels.forward_grad
    raise ValueError(f"no fused kernels for path {path!r}")
