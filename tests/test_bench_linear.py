"""Smoke test of benchmarks/bench_linear.py at tiny shapes: it runs, writes its CSV and table,
and the methods agree on the loss. No timing is asserted."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prsl_kernels import cpp_kernels

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not cpp_kernels.available(), reason="C++ extension unavailable")
def test_bench_linear_writes_csv_and_methods_agree(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_linear.py"), "--device", "cpu",
                           "--shapes", "48x16x500", "--k", "0,6", "--dtypes", "fp32", "--reps", "1", "--warmup", "0",
                           "--threads", "1", "--chunk", "16", "--out-dir", str(tmp_path), "--name", "smoke"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (csv_path,) = tmp_path.glob("linear-cpu-*-smoke.csv")
    assert (tmp_path / csv_path.name.replace(".csv", ".txt")).is_file()
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    ok = {(r["method"], r["k"]): r for r in rows if r["status"] == "ok"}
    assert set(ok) == {("fused", "0"), ("unfused", "0"), ("linear_ce", "0"), ("fused", "6"), ("unfused", "6")}
    assert any(r["method"] == "liger_flce" and r["status"] == "skipped" for r in rows)  # CUDA only
    for k in ("0", "6"):
        assert float(ok[("fused", k)]["loss"]) == pytest.approx(float(ok[("unfused", k)]["loss"]), rel=1e-5)
    assert float(ok[("linear_ce", "0")]["loss"]) == pytest.approx(float(ok[("fused", "0")]["loss"]), rel=1e-5)
    assert ok[("fused", "6")]["chunk"] == "16" and float(ok[("fused", "6")]["fwd_bwd_ms"]) > 0
    assert "| N x H x V" in proc.stdout


def test_bench_hf_step_smoke(tmp_path):
    """benchmarks/bench_hf_step.py at a tiny LLaVA shape: three methods, CSV and table written,
    and the fused step's peak below HF CE's (the logits, 256 x 4000 x 4 B = 4 MiB, dominate)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_hf_step.py"), "--vocab", "4000",
                           "--tokens", "256", "--hidden", "32", "--reps", "1", "--threads", "1",
                           "--out-dir", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (csv_path,) = tmp_path.glob("hf-step-cpu-*.csv")
    assert (tmp_path / csv_path.name.replace(".csv", ".txt")).read_text().startswith("# ")
    with open(csv_path, newline="") as f:
        peak = {r["method"]: float(r["peak_mib"]) for r in csv.DictReader(f)}
    assert set(peak) == {"hf_ce", "prsl_unfused", "prsl_fused"}
    assert peak["prsl_fused"] < peak["hf_ce"]
