#!/usr/bin/env python3
"""Benchmark of the fused linear + PRSL loss: time and peak memory of one
forward+backward from hidden states, against the unfused paths.

Methods (per shape, dtype and k; each skipped with a note where it cannot run):
  fused        prsl_kernels.linear_prsl_loss(hidden, weight, target, k, b)
  unfused      prsl_loss(F.linear(hidden, weight), target, k, b)    (the logits and their gradient: N x V each)
  linear_ce    F.cross_entropy(F.linear(hidden, weight), target)    (k = 0 rows only: no penalty)
  liger_flce   Liger-Kernel's LigerFusedLinearCrossEntropyLoss      (CUDA, k = 0 rows, where importable)

Timing: median (and min) of --reps forward+backward runs after --warmup runs, the
gradients of hidden and weight computed every time. Within a rep the methods of one case
run back to back on the same inputs, and "x unfused" is the median of the per-rep ratios,
so a change of load on a shared machine hits both sides of a ratio alike. CPU: wall time
(time.perf_counter) and the process's CPU time (time.process_time, all threads), with
torch.set_num_threads(--threads); the CPU ratio uses CPU time, which other tenants' time
slices do not inflate. CUDA: CUDA events (device time).

Memory: the peak beyond what was allocated before one forward+backward, the inputs
excluded and the gradients of hidden (N x H) and weight (V x H) included (every method
produces them). "loss extra" subtracts those gradients: what the loss itself adds to the
peak, given also as a multiple of the unfused logits' bytes (N x V).
  CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats().
  CPU:  the peak of live bytes in torch's allocation records (torch.profiler with
        profile_memory: every allocation and free, in order), exact to the byte; or, with
        --memory-method rss, the growth of the peak resident set (VmHWM, reset through
        /proc/self/clear_refs) with glibc told to mmap every block >= 64 KiB (bench_prsl.py's
        method: page-granular, and it also counts non-torch memory). That glibc setting would
        change the fused path's timing (its per-chunk gradient buffer is otherwise recycled
        from the heap), so all timings run first and all memory runs after them.

Results: a table on stdout and benchmarks/results/linear-<device>.csv (+ .txt), rewritten
after every case.

    python3 benchmarks/bench_linear.py                       # CPU defaults (see DEFAULTS)
    python3 benchmarks/bench_linear.py --device cuda         # the GPU shapes
    python3 benchmarks/bench_linear.py --shapes 64x32x1000 --k 0,20 --dtypes fp32 --reps 1
"""

import argparse
import csv
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_prsl as bp  # noqa: E402  (shared helpers: package import, device names, CPU peak RSS)

bp.import_package()
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from prsl_kernels import linear_prsl_loss, prsl_loss  # noqa: E402

METHODS = ("fused", "unfused", "linear_ce", "liger_flce")
DEFAULTS = {
    # N x H x V. CPU: the matmuls dominate (~16 GFLOPS fp32, ~3.4 GFLOPS bf16 on the project's
    # 2-core VM: one f+b at 2048 x 768 x 50257 fp32 takes ~25 s), so fp32 and modest N by default.
    "cpu": dict(shapes="1024x768x50257,2048x768x50257", k="0,20", dtypes="fp32", reps=2, warmup=1),
    "cuda": dict(shapes="4096x768x50257,8192x768x50257,4096x1024x128256", k="0,20", dtypes="fp32,bf16",
                 reps=10, warmup=2),
}
CSV_FIELDS = ("device", "device_name", "threads", "method", "status", "N", "H", "V", "dtype", "k", "b", "chunk",
              "reps", "fwd_bwd_ms", "fwd_bwd_min_ms", "cpu_ms", "x_unfused_time", "peak_extra_MiB", "grads_MiB",
              "loss_extra_MiB", "loss_extra_x_logits", "x_unfused_peak", "memory_method", "loss", "torch", "note")


def parse_shapes(text):
    shapes = []
    for item in text.split(","):
        n, h, v = (int(x) for x in item.lower().split("x"))
        shapes.append((n, h, v))
    return shapes


def make_inputs(n, hidden, vocab, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(n, hidden, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    # Logits of scale ~2: LM-like softmax peakedness.
    w = (torch.randn(vocab, hidden, generator=g) * (2 / hidden ** 0.5)).to(device=device, dtype=dtype)
    w.requires_grad_(True)
    t = torch.randint(0, vocab, (n,), generator=g).to(device)
    return h, w, t


def make_loss_fn(method, k, b, device, chunk):
    if method == "fused":
        return lambda h, w, t: linear_prsl_loss(h, w, t, k, b, check_target=False, chunk_size=chunk)
    if method == "unfused":
        return lambda h, w, t: prsl_loss(F.linear(h, w), t, k, b, check_target=False)
    if method == "linear_ce":
        return lambda h, w, t: F.cross_entropy(F.linear(h, w), t)
    if method == "liger_flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        flce = LigerFusedLinearCrossEntropyLoss()
        return lambda h, w, t: flce(w, h, t)
    raise ValueError(method)


def unavailable(method, k, device):
    if method in ("linear_ce", "liger_flce") and k != 0:
        return "k = 0 only (no penalty)"
    if method == "liger_flce":
        if device.type != "cuda":
            return "CUDA only"
        try:
            import liger_kernel.transformers  # noqa: F401
        except ImportError:
            return "liger-kernel not installed"
    return None


def time_group(fns, h, w, t, device, reps, warmup):
    """Forward+backward times (ms) per method. The methods alternate within each rep, so that on a
    shared machine a change of load hits all of them alike (ratios are taken per rep)."""
    clock, times, cpu_times = bp.Clock(device), {m: [] for m in fns}, {m: [] for m in fns}
    for i in range(warmup + reps):
        for m, fn in fns.items():
            h.grad = w.grad = None
            cpu_start = time.process_time()
            start = clock.mark()
            fn(h, w, t).backward()
            end = clock.mark()
            clock.sync()
            if i >= warmup:
                times[m].append(clock.ms(start, end))
                cpu_times[m].append((time.process_time() - cpu_start) * 1e3)
    h.grad = w.grad = None
    return times, cpu_times


def peak_extra_bytes(fn, h, w, t, device, method):
    h.grad = w.grad = None
    peak = step_peak_bytes(lambda: fn(h, w, t).backward(), device, method)
    h.grad = w.grad = None
    return peak


def step_peak_bytes(step, device, method="torch_profiler_allocations"):
    """Peak bytes allocated while ``step()`` runs, beyond what was live before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - base
    if method == "torch_profiler_allocations":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        # Every allocation and free of torch's CPU allocator, in order.
        records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                         if e.name() == "[memory]")
        live = peak = 0
        for _, nbytes in records:
            live += nbytes
            peak = max(peak, live)
        return peak
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = bp._proc_status_kib("VmRSS")
    step()
    return (bp._proc_status_kib("VmHWM") - base) * 1024


def format_table(rows):
    head = ("N x H x V", "dtype", "k", "method", "f+b ms (min)", "CPU-time ms", "x unfused", "peak MiB",
            "loss extra MiB", "extra x logits", "x unfused peak")
    lines = [head]
    for r in rows:
        if r["status"] != "ok":
            lines.append((f"{r['N']}x{r['H']}x{r['V']}", r["dtype"], r["k"], r["method"], r["status"], "", "", "",
                          "", "", r["note"]))
            continue
        lines.append((f"{r['N']}x{r['H']}x{r['V']}", r["dtype"], r["k"], r["method"],
                      f"{r['fwd_bwd_ms']} ({r['fwd_bwd_min_ms']})" if "fwd_bwd_ms" in r else "",
                      r.get("cpu_ms", ""), r.get("x_unfused_time", ""),
                      r.get("peak_extra_MiB", ""), r.get("loss_extra_MiB", ""), r.get("loss_extra_x_logits", ""),
                      r.get("x_unfused_peak", "")))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = ["| " + " | ".join(str(c).ljust(wd) for c, wd in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (wd + 2) for wd in widths) + "|")
    return "\n".join(out)


def write_results(rows, out_dir, slug, header):
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"linear-{slug}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / f"linear-{slug}.txt").write_text(header + "\n\n" + format_table(rows) + "\n")


def check_against_reference(device, log=print):
    """Loss and gradients of the fused op on ``device`` against the float64 reference (CPU)."""
    from reference import prsl_loss_reference

    worst = 0.0
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        for reduction in ("mean", "none"):
            h, w, t = make_inputs(300, 64, 5003, dtype, device, seed=7)
            bias = (torch.randn(5003, generator=torch.Generator().manual_seed(8)) * 0.5).to(device, dtype)
            bias.requires_grad_(True)
            t[::17] = -100
            up = torch.randn(300, generator=torch.Generator().manual_seed(9)).to(device)
            loss = linear_prsl_loss(h, w, t, 20, 0.5, bias=bias, reduction=reduction, chunk_size=128)
            got = torch.autograd.grad(loss if reduction == "mean" else (loss * up).sum(), (h, w, bias))
            ref_in = [x.detach().cpu().double().requires_grad_(True) for x in (h, w, bias)]
            ref = prsl_loss_reference(F.linear(*ref_in), t.cpu(), 20, 0.5, reduction=reduction)
            want = torch.autograd.grad(ref if reduction == "mean" else (ref * up.cpu().double()).sum(), ref_in)
            errs = [((a.cpu().double() - b).norm() / b.norm()).item()
                    for a, b in zip((loss.detach(),) + got, (ref.detach(),) + want)]
            worst = max(worst, max(errs) / tol)
            log(f"  check {str(dtype)[6:]} {reduction}: relative errors loss/hidden/weight/bias "
                + " ".join(f"{e:.2e}" for e in errs) + ("  OK" if max(errs) <= tol else f"  FAIL (tol {tol})"))
    return worst <= 1


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", help="NxHxV,... (default per device)")
    p.add_argument("--k", help="comma-separated k values (default 0,20)")
    p.add_argument("--b", type=float, default=0.5)
    p.add_argument("--dtypes", help="fp32,bf16,fp16,fp64")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--chunk", type=int, default=None, help="chunk_size of the fused op (default: automatic)")
    p.add_argument("--reps", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-time", action="store_true", help="measure peak memory only")
    p.add_argument("--memory-method", choices=("profiler", "rss"), default="profiler",
                   help="CPU: torch profiler's allocation records (exact, the default) or peak RSS")
    p.add_argument("--check", action="store_true",
                   help="first check the fused op against F.linear + the float64 reference on this device")
    p.add_argument("--out-dir", type=Path, default=bp.RESULTS_DIR)
    p.add_argument("--name", default="", help="suffix of the result files: linear-<device>[-name].csv")
    return p


def run(argv=None, log=print):
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    defaults = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    shapes = parse_shapes(args.shapes or defaults["shapes"])
    ks = [int(x) for x in (args.k or defaults["k"]).split(",")]
    dtypes = (args.dtypes or defaults["dtypes"]).split(",")
    reps, warmup = args.reps or defaults["reps"], args.warmup if args.warmup is not None else defaults["warmup"]
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    slug = bp.device_slug(device, args.threads) + (f"-{args.name}" if args.name else "")
    header = (f"bench_linear: {bp.device_name(device)}"
              f"{f', {args.threads} threads' if device.type == 'cpu' else ''}; torch {torch.__version__}, "
              f"{platform.python_version()}; b = {args.b}; median of {reps} after {warmup} warm-up")
    log(header)
    if args.check and not check_against_reference(device, log):
        raise SystemExit("bench_linear: the fused op disagrees with the reference on this device")

    rows = []
    for (n, hd, v), dt, k in [(shape, dt, k) for shape in shapes for dt in dtypes for k in ks]:
        dtype = getattr(torch, bp.DTYPES[dt])
        h, w, t = make_inputs(n, hd, v, dtype, device, seed=n + hd + v + k)
        group, fns = [], {}
        for m in methods:
            row = dict(device=device.type, device_name=bp.device_name(device),
                       threads=args.threads if device.type == "cpu" else "", method=m, N=n, H=hd, V=v, dtype=dt,
                       k=k, b=args.b, reps=reps, torch=torch.__version__, status="ok", note="")
            reason = unavailable(m, k, device)
            if reason:
                if not reason.startswith("k = 0"):
                    row.update(status="skipped", note=reason)
                    rows.append(row)
                continue
            chunk = args.chunk
            if m == "fused":
                from prsl_kernels.linear import default_chunk_size
                chunk = chunk or default_chunk_size(n, v, dtype, device)
                row["chunk"] = chunk
            fns[m] = make_loss_fn(m, k, args.b, device, chunk)
            try:
                with torch.no_grad():
                    row["loss"] = f"{fns[m](h, w, t).item():.6g}"
            except (RuntimeError, MemoryError) as err:  # e.g. out of memory for the unfused path
                row.update(status="failed", note=str(err).splitlines()[0][:120])
                fns.pop(m)
            group.append(row)
        times, cpu_times = time_group(fns, h, w, t, device, 0 if args.no_time else reps,
                                      0 if args.no_time else warmup)
        # CPU: process CPU time (all threads) is what the ratio uses; on a shared machine wall time
        # also counts the other tenants' time slices. CUDA: device time from events.
        basis = cpu_times if device.type == "cpu" else times
        for row in group:
            if row["status"] != "ok":
                continue
            ts, cs = times[row["method"]], cpu_times[row["method"]]
            if not ts:  # --no-time
                continue
            row.update(fwd_bwd_ms=f"{statistics.median(ts):.1f}", fwd_bwd_min_ms=f"{min(ts):.1f}",
                       cpu_ms=f"{statistics.median(cs):.1f}")
            if "unfused" in basis:  # paired: each rep ran every method back to back
                ratio = statistics.median(a / u for a, u in zip(basis[row["method"]], basis["unfused"]))
                row["x_unfused_time"] = f"{ratio:.2f}"
            log(f"  {n}x{hd}x{v} {dt} k={k} {row['method']}: f+b {row['fwd_bwd_ms']} ms "
                f"(min {row['fwd_bwd_min_ms']}), CPU time {row['cpu_ms']} ms")
        rows += group
        write_results(rows, args.out_dir, slug, header)
        del h, w, t, fns
        gc.collect()

    memory_method = "none"
    if not args.no_memory:
        if device.type == "cuda":
            memory_method = "cuda_max_memory_allocated"
        elif args.memory_method == "profiler":
            memory_method = "torch_profiler_allocations"
        elif bp.serve_large_blocks_by_mmap() and bp.cpu_peak_supported():
            memory_method = "rss_peak_vmhwm"
    for row in rows:
        row["memory_method"] = memory_method
        if row["status"] != "ok" or memory_method == "none":
            continue
        n, hd, v, dt = row["N"], row["H"], row["V"], row["dtype"]
        dtype = getattr(torch, bp.DTYPES[dt])
        h, w, t = make_inputs(n, hd, v, dtype, device, seed=n + hd + v + row["k"])
        fn = make_loss_fn(row["method"], row["k"], args.b, device, row.get("chunk") or None)
        peak = peak_extra_bytes(fn, h, w, t, device, memory_method)
        elem = h.element_size()
        grads = (n * hd + v * hd) * elem
        logits = n * v * elem
        row.update(peak_extra_MiB=f"{peak / 2**20:.1f}", grads_MiB=f"{grads / 2**20:.1f}",
                   loss_extra_MiB=f"{(peak - grads) / 2**20:.1f}", loss_extra_x_logits=f"{(peak - grads) / logits:.3f}")
        log(f"  {n}x{hd}x{v} {dt} k={row['k']} {row['method']}: peak +{peak / 2**20:.1f} MiB")
        del h, w, t, fn
        gc.collect()

    for row in rows:  # peak relative to the unfused path of the same case
        base = next((r for r in rows if r["method"] == "unfused" and r.get("peak_extra_MiB") and
                     (r["N"], r["H"], r["V"], r["dtype"], r["k"]) == (row["N"], row["H"], row["V"], row["dtype"],
                                                                     row["k"])), None)
        if row.get("peak_extra_MiB") and base is not None:
            row["x_unfused_peak"] = f"{float(row['peak_extra_MiB']) / max(float(base['peak_extra_MiB']), 1e-9):.2f}"
    write_results(rows, args.out_dir, slug, header)
    log("")
    log(format_table(rows))
    return rows


def main(argv=None):
    start = time.time()
    run(argv)
    print(f"\n({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
