"""The C++ CPU kernels (``csrc/prsl_cpu.cpp``), built on first use and registered
as the CPU kernels of ``prsl::forward`` / ``prsl::backward``.

The extension is compiled just in time with ``torch.utils.cpp_extension.load``
and cached under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``).
JIT rather than an install-time build: the package stays a pure-Python wheel that
works with whatever torch build (CPU or CUDA) the user already has, and the
kernel can be compiled for the CPU it runs on. It is built with ``-march=native``
(AVX2/AVX-512 exp and loads); the cache directory name carries a hash of the CPU
flags, the compiler-relevant platform and the torch version, so a shared home
directory never hands one machine's binary to another CPU.

Set ``PRSL_DISABLE_CPP=1`` to treat the extension as unavailable (the package then
falls back to the PyTorch reference with one warning).
"""

import hashlib
import os
import platform
import threading
from pathlib import Path

import torch

from . import ops

# A source checkout has csrc/ beside the package; a wheel carries it as prsl_kernels/csrc/.
_CSRC = next((d for d in (Path(__file__).resolve().parent.parent / "csrc", Path(__file__).resolve().parent / "csrc")
              if d.is_dir()), Path(__file__).resolve().parent.parent / "csrc")
_SOURCES = [_CSRC / "prsl_cpu.cpp"]

_lock = threading.Lock()
_state = {"loaded": None, "error": ""}  # loaded: None = not tried yet, else bool


def _cpu_flags() -> str:
    """The CPU's instruction-set flags (Linux), or '' where /proc/cpuinfo is absent."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return ""


def _build_flags(native: bool):
    flags = ["-O3", "-fno-math-errno"]
    cpu = _cpu_flags()
    if native and cpu and platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")
    key = "|".join([cpu, platform.machine(), platform.system(), torch.__version__, " ".join(flags)])
    return flags, hashlib.sha1(key.encode()).hexdigest()[:12]


def _compile(native: bool) -> None:
    from torch.utils import cpp_extension

    flags, tag = _build_flags(native)
    cpp_extension.load(name=f"prsl_cpu_{tag}", sources=[str(s) for s in _SOURCES], extra_cflags=flags,
                       is_python_module=False, verbose=os.environ.get("PRSL_VERBOSE_BUILD", "0") == "1")


def _load() -> None:
    if os.environ.get("PRSL_DISABLE_CPP", "0") == "1":
        raise RuntimeError("disabled by PRSL_DISABLE_CPP=1")
    missing = [str(s) for s in _SOURCES if not s.is_file()]
    if missing:
        raise RuntimeError(f"C++ sources not found: {missing} (csrc/ must sit next to prsl_kernels/)")
    try:
        _compile(native=True)
    except Exception:  # e.g. a compiler that does not know this CPU: build for the baseline ISA
        _compile(native=False)
    ops.forward.register_kernel("cpu")(forward)
    ops.backward.register_kernel("cpu")(backward)


def available() -> bool:
    """Build (once per process, cached on disk) and register the CPU kernels; False on failure."""
    if _state["loaded"] is None:
        with _lock:
            if _state["loaded"] is None:
                try:
                    _load()
                    _state["loaded"] = True
                except Exception as exc:  # any build or load failure means "fall back"
                    _state["error"] = f"{type(exc).__name__}: {exc}".strip()
                    _state["loaded"] = False
    return _state["loaded"]


def build_error() -> str:
    """Why the extension is unavailable ('' if it loaded or was not tried)."""
    return _state["error"]


def forward(logits, target, k, b, ignore_index):
    """prsl::forward on CPU: ``(loss_rows[N], row_stats[N, 5])`` in the stats dtype."""
    return torch.ops.prsl_cpu.forward(logits, target, k, b, ignore_index)


def backward(grad_rows, logits, target, row_stats, b, ignore_index):
    """prsl::backward on CPU: ``grad_logits[N, V]``, contiguous, in the logits' dtype."""
    return torch.ops.prsl_cpu.backward(grad_rows, logits, target, row_stats, b, ignore_index)
