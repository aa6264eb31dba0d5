"""Compiled (not interpreted) Triton: every launch configuration compiles for
sm_80 / sm_90 without register spills, and the module imports without a GPU.

Compiling needs TRITON_INTERPRET unset, so these run in subprocesses. The suite
compiles every configuration the launchers can pick (6-9 minutes cold on 2 cores,
seconds with a warm Triton cache); PRSL_AOT_QUICK=1 compiles a cross-section only,
for quick local iterations.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

from prsl_kernels import triton_kernels as tk

ROOT = Path(__file__).resolve().parents[1]


def _compiled_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def test_module_imports_without_interpreter_or_gpu():
    code = ("import prsl_kernels.triton_kernels as tk, prsl_kernels.ops as ops; "
            "assert tk.MAX_K >= 1024 and callable(tk.forward)")
    result = subprocess.run([sys.executable, "-c", code], env=_compiled_env(), capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_launch_configs_cover_every_launch(monkeypatch):
    """Whatever (dtype, V, k) a launcher sees, its configuration is one of launch_configs()."""
    monkeypatch.setattr(tk, "FORCE_BLOCK_V", None)
    listed = {(c.kernel, c.dtype, tuple(sorted(c.constexprs.items())), c.num_warps) for c in tk.launch_configs()}
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for vocab in (2, 37, 1000, 1024, 1025, 4096, 50257, 262144):
            for k in sorted({0, 1, 6, 7, 8, 20, 100, 127, 128, 511, 1024, tk.MAX_K, vocab - 1}):
                if k > min(vocab - 1, tk.MAX_K):
                    continue
                for c in (tk.forward_config(dtype, vocab, k), tk.backward_config(dtype, vocab)):
                    assert (c.kernel, c.dtype, tuple(sorted(c.constexprs.items())), c.num_warps) in listed
                kp = tk.forward_config(dtype, vocab, k).constexprs["KP"]
                assert k == 0 or kp > k  # the spare slot detects ties past tau


def test_aot_compile_without_spills():
    args = [sys.executable, str(ROOT / "benchmarks" / "aot_report.py"), "--check"]
    if os.environ.get("PRSL_AOT_QUICK") == "1":
        args.append("--quick")
    result = subprocess.run(args, env=_compiled_env(), capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "sm_80" in result.stdout and "sm_90" in result.stdout
