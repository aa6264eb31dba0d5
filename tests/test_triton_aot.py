"""Compiled (not interpreted) Triton: the launch configurations compile for
sm_80 / sm_90 as the runtime specialises them, without register spills; the
runtime's alignment hints really reach the binaries; in place, the forward kernels
read the target logit before any warp stores a gradient; the module imports without
a GPU.

Compiling needs TRITON_INTERPRET unset, so these run in subprocesses. The suite
compiles a cross-section (aot_report.QUICK: the largest register footprints of
each kernel, both row-stride variants, both architectures, the register caps' edge
cases: an unaligned base and the options; 3-5 minutes cold on 2
cores, seconds with a warm Triton cache); PRSL_AOT_FULL=1 compiles every
configuration (two variants each: about an hour cold), as
``benchmarks/aot_report.py --write`` does for results/aot_report.txt.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prsl_kernels import triton_kernels as tk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import aot_report  # noqa: E402
from launch_recorder import record_launches  # noqa: E402

# Not conftest's marker: this file also runs as a script (compiled, in subprocesses), where importing
# conftest after triton would refuse. In pytest, conftest has set TRITON_INTERPRET before this import.
needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="launches on CPU tensors: Triton's interpreter")

needs_tools = pytest.mark.skipif(not aot_report.have_tools(), reason="triton's ptxas / cuobjdump not found")


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


def test_launch_configs_cover_every_launch():
    """Whatever (dtype, V, k) a launcher sees, its configuration is one of launch_configs()."""
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


@needs_tools
def test_aot_compile_without_spills():
    args = [sys.executable, str(ROOT / "benchmarks" / "aot_report.py"), "--check"]
    if os.environ.get("PRSL_AOT_FULL") != "1":
        args.append("--quick")
    result = subprocess.run(args, env=_compiled_env(), capture_output=True, text=True, cwd=ROOT, timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "sm_80" in result.stdout and "sm_90" in result.stdout
    assert "V%16=0" in result.stdout and "V odd" in result.stdout


@needs_tools
def test_runtime_hints_reach_the_binaries():
    """The report compiles what a launch builds: the row-stride hint follows V, and the loads
    in the loops are 16-byte vectors wherever the rows allow it."""
    result = subprocess.run([sys.executable, __file__, "hints"], env=_compiled_env(), capture_output=True,
                            text=True, cwd=ROOT, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = json.loads(result.stdout)
    # Pointers from torch are 16-byte aligned: hinted. V = 50272 (a multiple of 16): the stride
    # and V are hinted; V = 50257: neither. k = 1 becomes a constant, as at a launch.
    assert {"logits_ptr", "stride_row", "V"} <= set(out["exact"]["aligned"]["hinted"])
    assert "stride_row" not in out["exact"]["odd"]["hinted"] and "V" not in out["exact"]["odd"]["hinted"]
    assert "logits_ptr" in out["exact"]["odd"]["hinted"]
    assert out["k1_constants"] == ["k"]
    # The exact kernel (one program per row, BLOCK_V blocks at row * stride): vector loads of
    # the row only when the stride is hinted; bf16 scalar loads otherwise.
    assert out["exact"]["aligned"]["row_loads"] == [128]
    assert out["exact"]["odd"]["row_loads"] == [16]
    # The two-pass forward aligns its tiles itself: its streaming loop loads 16-byte vectors
    # either way, and no loop of it falls back to 2-byte loads.
    for variant in ("aligned", "odd"):
        assert out["forward"][variant]["row_loads"] == [128], out["forward"][variant]
        assert "16" not in out["forward"][variant]["loop_loads"], out["forward"][variant]
        # The backward (a loop over its run of tiles): interior tiles load 16-byte vectors.
        assert "128" in out["backward"][variant]["loop_loads"], out["backward"][variant]


@needs_tools
def test_inplace_target_read_is_ordered_before_the_gradient_stores():
    """forward_grad in place: only warp 0's load of the target logit reaches the loss, so a barrier
    must separate it from every warp's gradient stores, on every path: the two-pass kernel at
    k = 0 (no reduction after the load at all) and k = 20, and the exact kernel."""
    result = subprocess.run([sys.executable, __file__, "order"], env=_compiled_env(), capture_output=True,
                            text=True, cwd=ROOT, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads(result.stdout) == {"k0": True, "k20": True, "exact": True}


def test_register_cap_follows_alignment_and_options():
    """The two-pass forward's register cap: off for a misaligned base (its scalar loads need
    ~170 registers; capped, they spilled in the streaming loop), 80 where the options spilled
    under 64, and every launched variant is listed for the AOT report."""
    vocab = 50257
    listed = tk.launch_configs()
    for dtype in (torch.bfloat16, torch.float32):
        aligned = tk.with_grad(tk.forward_config(dtype, vocab, 100), vocab)
        unaligned = tk.for_alignment(tk.with_grad(tk.forward_config(dtype, vocab, 100), vocab, False), False)
        assert aligned.maxnreg == 64 and unaligned.maxnreg is None
        assert unaligned.constexprs["ALIGNED"] is False and unaligned in listed
        assert tk.for_alignment(tk.forward_config(dtype, vocab, 100), False) in listed
    options = tk.forward_config(torch.float32, vocab, 100, tk.AOT_OPTIONS)
    assert options.maxnreg == 80 and options in listed
    assert tk.with_grad(tk.forward_config(torch.bfloat16, vocab, 100, tk.AOT_OPTIONS), vocab).maxnreg == 80
    assert tk.forward_config(torch.bfloat16, vocab, 100, tk.AOT_OPTIONS).maxnreg == 64


@needs_interpreter  # launches on CPU tensors
def test_unaligned_launch_takes_no_register_cap(monkeypatch):
    """What the launcher really passes (interpreter): maxnreg for aligned rows, none for ``logits[1:]``."""
    seen = record_launches(monkeypatch, tk, "_prsl_forward_kernel", lambda kw: (kw["ALIGNED"], kw.get("maxnreg")))
    vocab = 3001  # 8 warps, as at V = 50257
    flat = torch.randn(4 * vocab + 16).to(torch.bfloat16)
    start = next(i for i in range(8) if (flat.data_ptr() + 2 * i) % 16 == 0)
    aligned = flat[start:start + 2 * vocab].view(2, vocab)
    unaligned = flat[start + 1:start + 1 + 2 * vocab].view(2, vocab)
    target = torch.tensor([5, vocab - 1])
    tk.forward(aligned, target, 20, 0.5, -100)
    got = tk.forward(unaligned, target, 20, 0.5, -100)[0]
    assert seen == [(True, 64), (False, None)]
    torch.testing.assert_close(got, tk.forward(unaligned.clone(), target, 20, 0.5, -100)[0])


def _order():
    """Run as a script (TRITON_INTERPRET unset): target_read_ordered of the WRITE_GRAD kernels."""
    vocab = 50257
    configs = {"k0": tk.forward_config(torch.bfloat16, vocab, 0), "k20": tk.forward_config(torch.bfloat16, vocab, 20),
               "exact": tk.exact_config(torch.bfloat16, vocab, 20, only_flagged=True)}
    out = {}
    for name, config in configs.items():
        config = tk.with_grad(config, vocab)
        tile = config.constexprs.get("GRAD_TILE") or config.constexprs["BLOCK_V"]
        ttir = aot_report.compile_runtime(config, 90, vocab).asm["ttir"]
        out[name] = aot_report.target_read_ordered(ttir, "bf16", tile)
    return out


def _hints():
    """Run as a script (TRITON_INTERPRET unset): hints and loop loads of three kernels."""
    import static_cost

    out = {}
    configs = {"forward": tk.forward_config(torch.bfloat16, 50257, 20),
               "exact": tk.exact_config(torch.bfloat16, 50257, 20, only_flagged=True),
               "backward": tk.backward_config(torch.bfloat16, 50257)}
    for name, config in configs.items():
        out[name] = {}
        for variant, vocab in (("aligned", 50272), ("odd", 50257)):
            hinted, _ = aot_report.hinted_args(config, 90, vocab, k=20)
            compiled = aot_report.compile_runtime(config, 90, vocab, k=20)
            sass, _ = aot_report.sass_of(compiled)
            widths = aot_report.loop_load_widths(sass)
            # The loads of the row: on the shortest trip through the first loop (the block
            # loop; the exact kernel's merge path also reloads its scratch row), or anywhere in
            # a kernel without loops.
            cfg = static_cost.Cfg(static_cost.parse_sass(sass))
            loops = cfg.top_level_loops()
            blocks = static_cost._shortest_blocks(cfg, loops[0][0]) if loops else list(cfg.blocks)
            row_loads = sorted({i.load_bytes() * 8 for b in blocks for i in cfg.blocks[b].instrs if i.base == "LDG"})
            out[name][variant] = {"hinted": sorted(hinted), "loop_loads": {str(b): n for b, n in widths.items()},
                                  "row_loads": row_loads}
    _, ones = aot_report.hinted_args(configs["forward"], 90, 50257, k=1)
    out["k1_constants"] = sorted(ones)
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["hints"]:
        print(json.dumps(_hints()))
    elif sys.argv[1:] == ["order"]:
        print(json.dumps(_order()))
