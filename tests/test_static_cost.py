"""benchmarks/static_cost.py: the SASS counter on a kernel whose loop we can count by
hand, and the model's JSON interface.

Compiling needs TRITON_INTERPRET unset, so the compiles run in a subprocess
(this file run as a script). They skip only where triton's ptxas / cuobjdump
are missing.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import aot_report  # noqa: E402

pytestmark = pytest.mark.skipif(not aot_report.have_tools(), reason="triton's ptxas / cuobjdump not found")

BLOCK, WARPS = 1024, 4  # 8 float32 per thread per iteration: two 16-byte loads when aligned


@triton.jit
def _exp2_rows(x_ptr, y_ptr, stride, n, BLOCK: tl.constexpr):
    # One program per row, the row in BLOCK-wide steps: load, exp2, store.
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    for start in range(0, n, BLOCK):
        x = tl.load(x_ptr + row * stride + start + offs)
        tl.store(y_ptr + row * stride + start + offs, tl.exp2(x))


def _count(stride):
    """Per-iteration counts of _exp2_rows's loop, compiled as a launch with this row stride."""
    import static_cost

    args = {"x_ptr": aot_report.stand_in_pointer("fp32"), "y_ptr": aot_report.stand_in_pointer("fp32"),
            "stride": stride, "n": 4096}
    sig, constexprs, attrs = aot_report.specialise(_exp2_rows, args, {"BLOCK": BLOCK}, 90, {"num_warps": WARPS})
    compiled = triton.compile(triton.compiler.ASTSource(_exp2_rows, sig, constexprs, attrs),
                              target=triton.backends.compiler.GPUTarget("cuda", 90, 32),
                              options={"num_warps": WARPS})
    sass, _ = aot_report.sass_of(compiled)
    cfg = static_cost.Cfg(static_cost.parse_sass(sass))
    loops = [h for h, _ in cfg.top_level_loops()]
    header = loops[0]
    body = cfg.loop_path(header)
    ops = [i for b in cfg.loops[header] for i in cfg.blocks[b].instrs]
    return {"loops": len(loops), "counts": dict(body), "same_both_ways": body == cfg.loop_path(header, longest=False),
            "elems": static_cost.loop_elems_per_thread(cfg, header, 4),
            "ldg": sorted(i.load_bytes() for i in ops if i.base == "LDG"),
            "stg": sum(i.base == "STG" for i in ops), "ex2": sum(i.op == "MUFU.EX2" for i in ops),
            "hinted": sorted(_exp2_rows.arg_names[p[0]] for p, v in attrs.items() if v),
            "sched": static_cost.path_schedule(cfg, body.path, static_cost.LATENCY["dram"]),
            "dram": static_cost.LATENCY["dram"], "mufu": static_cost.LATENCY["mufu"]}


def _run_script(*args, timeout=900):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_counter_on_a_loop_counted_by_hand():
    out = json.loads(_run_script(__file__, "count"))
    aligned, odd = out["aligned"], out["odd"]
    # stride 4096: the hint reaches the row offset, every access is 16-byte aligned.
    assert "stride" in aligned["hinted"] and "stride" not in odd["hinted"]
    assert aligned["loops"] == odd["loops"] == 1
    per_thread = BLOCK // (32 * WARPS)  # 8 logits per thread per source iteration
    # ptxas may unroll the loop u times (it does, 4x, in triton 3.6): the counter sees u
    # source iterations per trip, and the loads say how many.
    u = aligned["elems"] / per_thread
    assert u == int(u) >= 1
    u = int(u)
    # By hand, per thread and source iteration: 8 logits = two LDG.128 and two STG.128,
    # eight MUFU.EX2; the rest is exp2's range fix-up (at most 3 per element) and the loop's
    # address / counter / compare / branch (at most 12 per trip). No branch inside: one path.
    assert aligned["ldg"] == [16] * (2 * u) and aligned["stg"] == 2 * u and aligned["ex2"] == 8 * u
    c = aligned["counts"]
    assert c["global"] == 4 * u and c["mufu"] == 8 * u
    assert c.get("bar", 0) == 0 and c.get("shfl", 0) == 0 and c.get("shared", 0) == 0
    assert (4 + 8) * u + 2 <= c["total"] <= (4 + 8 + 8 * 3) * u + 12
    assert aligned["same_both_ways"]
    # One warp's in-order schedule of a trip: per source iteration the two loads go out
    # together, the first exp2 waits for DRAM, the exp2s and stores follow; the next loads may
    # alias those stores, so they wait their turn: u round trips, each a short chain.
    dram, mufu = aligned["dram"], aligned["mufu"]
    assert u * dram < aligned["sched"] < u * (dram + 2 * mufu + 50) + c["total"]
    # An odd stride: scalar 4-byte accesses, eight loads and eight stores per source iteration.
    u_odd = int(odd["elems"] / per_thread)
    assert odd["ldg"] == [4] * (8 * u_odd) and odd["stg"] == 8 * u_odd and odd["ex2"] == 8 * u_odd
    assert odd["counts"]["global"] == 16 * u_odd
    assert odd["counts"]["total"] / odd["elems"] > c["total"] / aligned["elems"]


def test_model_json_has_the_required_keys():
    have_history = subprocess.run(["git", "cat-file", "-e", "f0cce8d^{commit}"], cwd=ROOT,
                                  capture_output=True).returncode == 0
    args = [str(ROOT / "benchmarks" / "static_cost.py"), "--json", "--gpus", "H100,A100", "--dtypes", "bf16",
            "--shapes", "8192x50257", "--k", "0,20", "--logits", "normal"]
    if not have_history:
        args.append("--no-before")
    rows = json.loads(_run_script(*args))
    assert len(rows) == 2 * 2
    for r in rows:
        for key in ("gpu", "dtype", "N", "V", "k", "predicted_ms_fwd", "predicted_ms_bwd", "predicted_ms_total",
                    "warp_instr_per_elem"):
            assert key in r, key
        assert r["gpu"] in ("H100", "A100") and r["dtype"] == "bf16" and (r["N"], r["V"]) == (8192, 50257)
        assert r["predicted_ms_fwd"] > 0 and r["predicted_ms_bwd"] > 0
        assert r["predicted_ms_total"] == pytest.approx(r["predicted_ms_fwd"] + r["predicted_ms_bwd"])
        # Never faster than moving the bytes: forward reads the logits, backward reads and writes.
        bandwidth = {"H100": 3.35e12, "A100": 2.04e12}[r["gpu"]]
        assert r["predicted_ms_total"] >= 3 * 8192 * 50257 * 2 / bandwidth * 1e3
        assert r["kind"] == "model prediction"
        if have_history:
            assert r["before"]["predicted_ms_total"] > 0
    by = {(r["gpu"], r["k"]): r for r in rows}
    assert by[("A100", 20)]["predicted_ms_total"] > by[("H100", 20)]["predicted_ms_total"]


if __name__ == "__main__":
    if sys.argv[1:] == ["count"]:
        print(json.dumps({"aligned": _count(4096), "odd": _count(4097)}))


def test_history_kernels_keep_constants_defined_below_the_cut():
    """A commit's kernels are imported without its launchers; 413f114 defines _OPTION_ARGS among
    the launchers but reads it in aot_signature above them (the default --json run crashed)."""
    try:
        module = aot_report.kernels_at("413f114")
    except aot_report.KernelsUnavailable as error:
        pytest.skip(str(error))
    assert module._OPTION_ARGS == ("eps_hi", "eps_lo", "lam_hi", "lam_lo", "cap_hi", "cap_lo")
