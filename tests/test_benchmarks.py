"""Smoke tests of benchmarks/bench_prsl.py and benchmarks/gpu_check.py at tiny shapes.

Both run in subprocesses, as they are run by hand: the benchmark sets the thread
count and glibc's malloc options for its process, and the GPU check's dry run
must set TRITON_INTERPRET before triton is imported. No timing is asserted.
"""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "bench_prsl.py"
GPU_CHECK = REPO / "benchmarks" / "gpu_check.py"


def _run(args, env_drop=(), timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    env.pop("OUT", None)  # gpu_check writes to $OUT when set
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_bench_writes_csv_and_backends_agree(tmp_path):
    # TRITON_INTERPRET unset: triton on CPU must be skipped with a note, not crash.
    proc = _run([BENCH, "--device", "cpu", "--shapes", "4x301,2x600", "--k", "6,400", "--dtypes", "fp32,bf16",
                 "--backends", "cross_entropy,reference,cpp,triton", "--reps", "1", "--warmup", "1",
                 "--threads", "1", "--bandwidth-mib", "16", "--flush-mib", "8", "--out-dir", tmp_path],
                env_drop=("TRITON_INTERPRET",))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = list(tmp_path.glob("cpu-*-1t.csv"))
    assert len(files) == 1, proc.stdout
    rows = _rows(files[0])

    skipped = [r for r in rows if r["backend"] == "triton"]
    assert len(skipped) == 1 and skipped[0]["status"] == "skipped" and "CUDA" in skipped[0]["note"]
    assert "skipped triton" in proc.stdout  # the printed table carries the note too

    ok = [r for r in rows if r["status"] == "ok"]
    # k = 400 > V - 1 = 300 is left out for the 301-wide shape, kept for V = 1000.
    ref_cases = {(r["N"], r["V"], r["dtype"], r["k"]) for r in ok if r["backend"] == "reference"}
    assert ref_cases == {(n, v, d, k) for n, v in (("4", "301"), ("2", "600")) for d in ("fp32", "bf16")
                         for k in ("6", "400") if int(k) <= int(v) - 1}
    assert {(r["N"], r["V"], r["dtype"]) for r in ok if r["backend"] == "cross_entropy"} == \
        {(n, v, d) for n, v in (("4", "301"), ("2", "600")) for d in ("fp32", "bf16")}
    for r in ok:
        for col in ("fwd_ms", "bwd_ms", "fwd_bwd_ms", "floor_fwd_bwd_ms", "x_floor_fwd_bwd", "bandwidth_GBps"):
            assert math.isfinite(float(r[col])) and float(r[col]) > 0, (col, r)
        # The floor is exactly 3 passes (fwd read, bwd read + write) over the logits.
        assert float(r["floor_fwd_bwd_ms"]) == pytest.approx(3 * float(r["floor_fwd_ms"]), rel=1e-3)
        assert float(r["peak_extra_MiB"]) >= 0

    # Same seed, same case: every backend computed the same loss (k only changes the penalty).
    by_case = {}
    for r in ok:
        by_case.setdefault((r["N"], r["V"], r["dtype"]), []).append(r)
    for case, group in by_case.items():
        n, v = int(case[0]), int(case[1])
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[case[2]]
        gen = torch.Generator().manual_seed(0)  # bench_prsl.make_inputs, default --seed 0
        logits = torch.randn(n, v, generator=gen, dtype=dtype).mul_(2.0)
        target = torch.randint(0, v, (n,), generator=gen)
        ce = float(torch.nn.functional.cross_entropy(logits, target))
        for r in group:
            if r["backend"] == "cross_entropy":
                assert float(r["loss"]) == pytest.approx(ce, rel=1e-5)
            else:  # CE + b * mean D >= CE for b = 0.5
                from reference import prsl_loss_reference
                expect = float(prsl_loss_reference(logits.double(), target, int(r["k"]), 0.5))
                assert float(r["loss"]) == pytest.approx(expect, rel=1e-5), r
                assert float(r["loss"]) > ce


def test_bench_options_rows(tmp_path, monkeypatch):
    """--options measures each PRSL backend once per option set (CSV column "options"); the CE
    backends once; the losses are the reference's with those options."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_prsl
    from reference import prsl_loss_reference

    proc = _run([BENCH, "--device", "cpu", "--shapes", "3x97", "--k", "5", "--dtypes", "fp32",
                 "--backends", "cross_entropy,cpp", "--options", "none,softcap,all", "--reps", "1",
                 "--warmup", "0", "--threads", "1", "--bandwidth-mib", "16", "--flush-mib", "8", "--no-memory",
                 "--out-dir", tmp_path, "--csv-name", "opts.csv"], env_drop=("TRITON_INTERPRET",))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [r for r in _rows(tmp_path / "opts.csv") if r["status"] == "ok"]
    assert sorted((r["backend"], r["options"]) for r in rows) == [
        ("cpp", "all"), ("cpp", "none"), ("cpp", "softcap"), ("cross_entropy", "")]
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 97, generator=gen).mul_(2.0)
    target = torch.randint(0, 97, (3,), generator=gen)
    for r in rows:
        if r["backend"] == "cpp":
            expect = float(prsl_loss_reference(logits.double(), target, 5, 0.5, **bench_prsl.OPTION_SETS[r["options"]]))
            assert float(r["loss"]) == pytest.approx(expect, rel=1e-5), r
    assert "softcap" in proc.stdout  # the printed table names the option set


def test_gpu_check_dry_run(tmp_path):
    proc = _run([GPU_CHECK, "--dry-run", "--out-dir", tmp_path])
    out = proc.stdout + proc.stderr
    logs = list(tmp_path.glob("gpu_check-cpu-*.log"))
    csvs = list(tmp_path.glob("cpu-*.csv"))
    assert len(logs) == 1 and len(csvs) == 1, out
    log = logs[0].read_text()
    assert "DRY RUN" in log and "# checks:" in log and "gpu_check done" in log
    fails = [line for line in log.splitlines() if line.startswith("FAIL")]
    assert not fails, "\n".join(fails)
    assert proc.returncode == 0, out
    assert sum(line.startswith("PASS") for line in log.splitlines()) >= 10
    rows = _rows(csvs[0])
    assert {r["backend"] for r in rows if r["status"] == "ok"} == {"triton", "reference", "cross_entropy"}
    # Nothing of a dry run lands in the checkout's results.
    assert not list((REPO / "benchmarks" / "results").glob("gpu_check-cpu-*.log"))
