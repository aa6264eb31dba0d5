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

``-fopenmp`` is not optional where torch's own thread pool is OpenMP:
``at::parallel_for`` is a header template that only forks when the *extension*
is compiled with OpenMP, and silently runs every row on one thread otherwise.
The extension then links the ``libgomp`` torch has already loaded, so
``torch.set_num_threads`` governs it. ``build_info()`` reports what was built.

Set ``PRSL_DISABLE_CPP=1`` to treat the extension as unavailable (the package then
falls back to the PyTorch reference with one warning).
"""

import hashlib
import os
import platform
import threading
import warnings
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


def _torch_uses_openmp() -> bool:
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def _build_flags(native: bool, openmp: bool):
    flags = ["-O3", "-fno-math-errno"]
    cpu = _cpu_flags()
    if native and cpu and platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")
    if openmp:
        flags.append("-fopenmp")
    key = "|".join([cpu, platform.machine(), platform.system(), torch.__version__, " ".join(flags)])
    return flags, hashlib.sha1(key.encode()).hexdigest()[:12]


def _compile(native: bool, openmp: bool) -> None:
    from torch.utils import cpp_extension

    flags, tag = _build_flags(native, openmp)
    cpp_extension.load(name=f"prsl_cpu_{tag}", sources=[str(s) for s in _SOURCES], extra_cflags=flags,
                       extra_ldflags=["-fopenmp"] if openmp else [], is_python_module=False,
                       verbose=os.environ.get("PRSL_VERBOSE_BUILD", "0") == "1")


def _load() -> None:
    if os.environ.get("PRSL_DISABLE_CPP", "0") == "1":
        raise RuntimeError("disabled by PRSL_DISABLE_CPP=1")
    missing = [str(s) for s in _SOURCES if not s.is_file()]
    if missing:
        raise RuntimeError(f"C++ sources not found: {missing} (csrc/ must sit next to prsl_kernels/)")
    openmp = _torch_uses_openmp()
    # Most capable first; a compiler without OpenMP (Apple clang) or that does not
    # know this CPU gets the next variant. Only the last failure is raised.
    variants = [(True, openmp), (False, openmp)] + ([(False, False)] if openmp else [])
    for i, (native, omp) in enumerate(variants):
        try:
            _compile(native, omp)
            break
        except Exception:
            if i == len(variants) - 1:
                raise
    if openmp and not omp:
        warnings.warn("prsl_kernels: the C++ kernel was built without OpenMP (the compiler refused "
                      "-fopenmp), so each call runs on one thread; set PRSL_VERBOSE_BUILD=1 to see why",
                      RuntimeWarning, stacklevel=2)
    ops.forward.register_kernel("cpu")(forward)
    ops.backward.register_kernel("cpu")(backward)
    ops.forward_grad.register_kernel("cpu")(forward_grad)


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


def build_info() -> dict:
    """How the loaded extension was compiled: ``{"openmp", "avx2", "f16c", "avx512bf16"}`` to bool.

    ``openmp`` False means the rows of a call run on one thread whatever
    ``torch.set_num_threads`` says (the build fell back, with a warning).
    """
    if not available():
        raise RuntimeError(f"the C++ extension is unavailable: {build_error()}")
    return {key: value == "1" for key, value in
            (item.split("=") for item in torch.ops.prsl_cpu.build_info().split(","))}


def forward(logits, target, k, b, ignore_index, label_smoothing=0.0, z_loss=0.0, softcap=0.0):
    """prsl::forward on CPU: ``(loss_rows[N], row_stats[N, NUM_ROW_STATS])`` in the stats dtype."""
    return torch.ops.prsl_cpu.forward(logits, target, k, b, ignore_index, label_smoothing, z_loss, softcap)


def backward(grad_rows, logits, target, row_stats, b, ignore_index, label_smoothing=0.0, z_loss=0.0, softcap=0.0):
    """prsl::backward on CPU: ``grad_logits[N, V]``, contiguous, in the logits' dtype."""
    return torch.ops.prsl_cpu.backward(grad_rows, logits, target, row_stats, b, ignore_index, label_smoothing,
                                       z_loss, softcap)


def forward_grad(logits, target, grad_rows, grad_out, k, b, ignore_index, label_smoothing=0.0, z_loss=0.0,
                 softcap=0.0):
    """prsl::forward_grad on CPU: the forward's ``(loss_rows, row_stats)``; the gradient of
    ``sum_i grad_rows[i] * loss_i`` is written into ``grad_out`` (which may be ``logits``)."""
    return torch.ops.prsl_cpu.forward_grad(logits, target, grad_rows, grad_out, k, b, ignore_index,
                                           label_smoothing, z_loss, softcap)
