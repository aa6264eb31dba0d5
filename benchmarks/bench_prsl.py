#!/usr/bin/env python3
"""Benchmark of the PRSL backends: forward, backward, forward+backward time and peak memory.

Backends (each skipped with a note where it cannot run):
  cross_entropy       torch.nn.functional.cross_entropy, the floor any loss pays
  liger_ce            Liger-Kernel's fused Triton cross-entropy (CUDA, when liger_kernel imports)
  reference           reference.prsl_loss_reference, eager PyTorch
  reference_compiled  the same under torch.compile(fullgraph=True), compiled per case
  cpp                 prsl_loss(backend="cpp"), the fused C++ kernel (CPU)
  triton              prsl_loss(backend="triton"), the fused Triton kernels (CUDA)

Timing: the median of --reps runs after --warmup runs. "forward" is a training
forward (logits require grad, so it includes what autograd saves); "backward" is
loss.backward() after an untimed forward; "fwd+bwd" is both in one timed region.
Before every timed region a buffer of twice the last-level cache (CUDA: 256 MiB,
as triton.testing.do_bench does) is rewritten, so neither the logits nor the
forward's leftovers sit in cache and small shapes are not flattered. CUDA times
come from CUDA events; CPU times from time.perf_counter with
torch.set_num_threads(--threads, default os.cpu_count()).

Memory: the peak beyond what was allocated before one forward+backward, the
inputs excluded and the gradient (N x V, logits dtype) included.
  CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats().
  CPU:  the process's peak resident set (VmHWM, reset through
        /proc/self/clear_refs) minus its resident set before the call; glibc is
        told (mallopt) to serve every block >= 64 KiB by mmap and to return it on
        free, so heap pages kept from earlier runs cannot hide an allocation.

Floor: the bytes that must move (forward reads the logits once; backward reads
them once and writes the gradient once) over a copy bandwidth measured here
with one large tensor copy (bytes read + bytes written). "x floor" = measured / floor.

Options (--options, a comma list of the named sets in OPTION_SETS, default
"none"): each PRSL backend (reference, cpp, triton) is measured once per set,
with prsl_loss's label_smoothing / z_loss / softcap (spec, "Options"), so the
cost of each option is the difference to the "none" row of the same case.
The cross-entropy backends run once, without options. --interleave times the
option sets of one case round-robin (one forward, backward and forward+backward
of each set per round, medians over --reps rounds), so that the load of a shared
machine drifts over all of them alike.

The CSV goes to benchmarks/results/<device slug>.csv (or --out-dir), rewritten
after every case so an interrupted run keeps what it measured.

    python3 benchmarks/bench_prsl.py                              # CPU defaults
    python3 benchmarks/bench_prsl.py --shapes 256x50257 --k 20 --dtypes fp32
    python3 benchmarks/bench_prsl.py --backends cpp --k 20 --options none,smooth,zloss,softcap,all \
        --csv-name options-cpu-amd-epyc-2t.csv                    # what each option costs
"""

import argparse
import csv
import ctypes
import gc
import importlib
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

BACKENDS = ("cross_entropy", "liger_ce", "reference", "reference_compiled", "cpp", "triton")
# Cheap, decisive cases first so that a time budget cuts the slow reference last.
CE_BACKENDS = ("cross_entropy", "liger_ce")  # plain cross-entropy: no k, no b
RUN_ORDER = ("triton", "cpp", "cross_entropy", "liger_ce", "reference", "reference_compiled")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
DEFAULTS = {
    "cpu": dict(shapes="2048x50257", k="6,20,100", dtypes="fp32,bf16", reps=5, warmup=1),
    "cuda": dict(shapes="8192x50257,8192x50272,4096x128256", k="6,20,100", dtypes="fp32,bf16",
                 reps=20, warmup=3),
}
# Named option sets for --options (prsl_loss keywords): Gemma 2's cap, BLIP's smoothing, PaLM's z-loss.
OPTION_SETS = {
    "none": {},
    "smooth": {"label_smoothing": 0.1},
    "zloss": {"z_loss": 1e-4},
    "softcap": {"softcap": 30.0},
    "all": {"label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0},
}
CSV_FIELDS = ("device", "device_name", "threads", "backend", "status", "N", "V", "dtype", "k", "b",
              "options", "reps", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "fwd_bwd_min_ms", "floor_fwd_ms",
              "floor_bwd_ms", "floor_fwd_bwd_ms", "x_floor_fwd", "x_floor_bwd", "x_floor_fwd_bwd",
              "bandwidth_GBps", "peak_extra_MiB", "peak_extra_x_logits", "memory_method", "loss",
              "torch", "triton", "note")


def import_package():
    """Make ``prsl_kernels`` and ``reference`` importable when run as a script from a checkout.

    On a lent GPU machine the package is not pip-installed and ``python benchmarks/x.py``
    puts only ``benchmarks/`` on sys.path: the repo root goes there too, and both import
    under the same names as from an install.
    """
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module("prsl_kernels")


import torch  # noqa: E402  (after the docstring; TRITON_INTERPRET is the caller's business)


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def device_slug(device, threads):
    if device.type == "cuda":
        return f"cuda-{slug(device_name(device))}"
    return f"cpu-{slug(device_name(device))}-{threads}t"


def last_level_cache_bytes():
    try:
        caches = Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size")
        sizes = []
        for p in caches:
            text = p.read_text().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
            sizes.append(int(text.rstrip("KMG")) * mult)
        return max(sizes)
    except (OSError, ValueError):
        return 32 << 20


# ----------------------------------------------------------------------------- timing

class Clock:
    """Marks on the host clock (CPU) or CUDA events (device time, no syncs in between)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end):
        if self.cuda:
            return start.elapsed_time(end)
        return (end - start) * 1e3

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


class CacheFlush:
    """Read-modify-write of a buffer larger than the last-level cache.

    A plain fill may use non-temporal stores (glibc memset) that bypass the cache;
    add_ reads and writes every line, so whatever was cached is evicted.
    """

    def __init__(self, device, nbytes=None):
        if nbytes is None:
            nbytes = 256 << 20 if device.type == "cuda" else max(2 * last_level_cache_bytes(), 64 << 20)
        self.buffer = torch.zeros(nbytes // 4, dtype=torch.int32, device=device)

    def __call__(self):
        self.buffer.add_(1)


def copy_bandwidth(device, nbytes, reps=10):
    """Bytes read + written per second by one large tensor copy (median of reps)."""
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    clock, times = Clock(device), []
    for i in range(reps + 2):
        start = clock.mark()
        dst.copy_(src)
        end = clock.mark()
        clock.sync()
        if i >= 2:
            times.append(clock.ms(start, end))
    del src, dst
    return 2 * nbytes / (statistics.median(times) * 1e-3)


def time_case(fn, x, target, device, reps, warmup, flush):
    """Medians (ms) of forward, backward (after an untimed forward) and forward+backward."""
    clock = Clock(device)
    marks = []
    for i in range(warmup + reps):
        x.grad = None
        flush()
        a = clock.mark()
        loss = fn(x, target)
        b = clock.mark()
        flush()
        c = clock.mark()
        loss.backward()
        d = clock.mark()
        del loss
        x.grad = None
        flush()
        e = clock.mark()
        fn(x, target).backward()
        f = clock.mark()
        x.grad = None
        if i >= warmup:
            marks.append((a, b, c, d, e, f))
        if device.type == "cuda" and len(marks) >= 8:  # bound the events in flight
            clock.sync()
    clock.sync()
    fwd = [clock.ms(a, b) for a, b, _, _, _, _ in marks]
    bwd = [clock.ms(c, d) for _, _, c, d, _, _ in marks]
    both = [clock.ms(e, f) for *_, e, f in marks]
    return statistics.median(fwd), statistics.median(bwd), statistics.median(both), min(both)


# ----------------------------------------------------------------------------- memory

def _proc_status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def cpu_peak_supported():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_kib("VmHWM")
        return True
    except (OSError, KeyError):
        return False


def serve_large_blocks_by_mmap():
    """glibc: fixed 64 KiB mmap threshold (no dynamic raise) and prompt trim, so RSS tracks live memory."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 64 << 10)) and bool(libc.mallopt(m_trim_threshold, 64 << 10))
    except OSError:
        return False


def peak_extra_bytes(fn, x, target, device):
    """Peak memory of one forward+backward beyond what was allocated before it (see module doc)."""
    x.grad = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn(x, target).backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_status_kib("VmRSS")
        fn(x, target).backward()
        peak = (_proc_status_kib("VmHWM") - base) * 1024
    x.grad = None
    return peak


# ----------------------------------------------------------------------------- backends

def backend_unavailable(name, device, explicit):
    """None if the backend can run on the device, else the reason (printed, and kept in the CSV)."""
    if name == "cpp":
        if device.type != "cpu":
            return "the C++ kernel is the CPU path"
        try:
            from prsl_kernels import backends
            if not backends.cpp_available():
                from prsl_kernels import cpp_kernels
                return f"C++ extension unavailable: {cpp_kernels.build_error()}"
        except Exception as exc:  # module not written yet, build tool missing, ...
            return f"C++ extension unavailable: {type(exc).__name__}: {exc}"
    if name == "triton":
        if device.type == "cpu":
            interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
            if not (interp and explicit):
                return ("triton needs CUDA (on CPU only through TRITON_INTERPRET=1 and an explicit "
                        "--backends triton, for dry runs: its times mean nothing)")
        try:
            from prsl_kernels import backends
            if not backends.triton_available():
                return "triton is not installed"
        except Exception as exc:
            return f"Triton kernels unavailable: {type(exc).__name__}: {exc}"
    if name == "liger_ce":
        if device.type != "cuda":
            return "Liger-Kernel's cross-entropy needs CUDA"
        try:
            import liger_kernel.transformers.functional  # noqa: F401
        except Exception as exc:
            return f"liger_kernel unavailable: {type(exc).__name__}: {exc}"
    if name == "reference_compiled" and device.type == "cuda":
        try:
            import triton  # noqa: F401  (inductor's CUDA code generator)
        except ImportError:
            return "torch.compile on CUDA needs triton"
    return None


def make_loss_fn(name, k, b, check_target, options=None):
    """A callable (logits, target) -> scalar mean loss for one backend, one k and one option set."""
    options = options or {}
    import torch.nn.functional as F
    from prsl_kernels import prsl_loss
    from reference import prsl_loss_reference

    if name == "cross_entropy":
        return lambda x, t: F.cross_entropy(x, t)
    if name == "liger_ce":
        from liger_kernel.transformers.functional import liger_cross_entropy
        return lambda x, t: liger_cross_entropy(x, t)
    if name == "reference":
        return lambda x, t: prsl_loss_reference(x, t, k, b, **options)
    if name == "reference_compiled":
        # A fresh dynamo cache per case: each case is compiled for its static
        # shape, dtype and k, and the recompile limit never sends a case to eager.
        torch._dynamo.reset()
        compiled = torch.compile(prsl_loss_reference, fullgraph=True, dynamic=False)
        return lambda x, t: compiled(x, t, k, b, **options)
    if name in ("cpp", "triton"):
        return lambda x, t: prsl_loss(x, t, k, b, backend=name, check_target=check_target, **options)
    raise ValueError(f"unknown backend {name!r}")


# ----------------------------------------------------------------------------- cases

def parse_shapes(text):
    shapes = []
    for item in text.split(","):
        n, v = item.lower().split("x")
        shapes.append((int(n), int(v)))
    return shapes


def parse_ints(text):
    return [int(s) for s in text.split(",") if s.strip()]


def make_inputs(n, vocab, dtype, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    # Logit scale ~2 gives LM-like softmax peakedness; randn in the target dtype
    # avoids an fp32 N x V temporary.
    logits = torch.randn(n, vocab, generator=gen, device=device, dtype=dtype).mul_(2.0)
    target = torch.randint(0, vocab, (n,), generator=gen, device=device)
    return logits.requires_grad_(), target


def measure_interleaved(name, n, vocab, dtype_name, k, args, ctx, option_sets):
    """One CSV row per option set for one backend and case, the sets timed round-robin."""
    device = ctx["device"]
    rows = {o: measure(name, n, vocab, dtype_name, k, args, ctx, o, timed=False) for o in option_sets}
    x = target = None
    try:
        x, target = make_inputs(n, vocab, getattr(torch, DTYPES[dtype_name]), device, seed=args.seed)
        fns = {o: make_loss_fn(name, k, args.b, args.check_target, OPTION_SETS[o]) for o in option_sets}
        times = {o: [] for o in option_sets}
        for o in option_sets:  # warm-up (compiles, caches), untimed
            time_case(fns[o], x, target, device, 1, args.warmup, ctx["flush"])
        for _ in range(args.reps):
            for o in option_sets:
                times[o].append(time_case(fns[o], x, target, device, 1, 0, ctx["flush"]))
        for o in option_sets:
            fwd, bwd, both = (statistics.median(t[i] for t in times[o]) for i in range(3))
            floors = [float(rows[o][f"floor_{p}_ms"]) for p in ("fwd", "bwd", "fwd_bwd")]
            rows[o].update(status="ok", fwd_ms=f"{fwd:.4g}", bwd_ms=f"{bwd:.4g}", fwd_bwd_ms=f"{both:.4g}",
                           fwd_bwd_min_ms=f"{min(t[2] for t in times[o]):.4g}",
                           x_floor_fwd=f"{fwd / floors[0]:.3g}", x_floor_bwd=f"{bwd / floors[1]:.3g}",
                           x_floor_fwd_bwd=f"{both / floors[2]:.3g}", peak_extra_MiB="nan",
                           peak_extra_x_logits="nan", memory_method="none",
                           loss=f"{float(fns[o](x, target).detach()):.6f}", note="interleaved")
    except Exception as exc:
        for o in option_sets:
            rows[o].update(status="error", note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    finally:
        del x, target
        gc.collect()
    return [rows[o] for o in option_sets]


def measure(name, n, vocab, dtype_name, k, args, ctx, option_set="none", timed=True):
    """One CSV row for one backend, case and option set; never raises."""
    device = ctx["device"]
    dtype = getattr(torch, DTYPES[dtype_name])
    elt = torch.empty((), dtype=dtype).element_size()
    logits_bytes = n * vocab * elt
    bw = ctx["bandwidth"]
    floors = [m * logits_bytes / bw * 1e3 for m in (1, 2, 3)]  # ms: read; read + write; both
    row = dict(ctx["common"], backend=name, N=n, V=vocab, dtype=dtype_name,
               k=k if name not in CE_BACKENDS else "", b=args.b if name not in CE_BACKENDS else "",
               options=option_set if name not in CE_BACKENDS else "", reps=args.reps, bandwidth_GBps=f"{bw / 1e9:.1f}", memory_method=ctx["memory_method"],
               floor_fwd_ms=f"{floors[0]:.4g}", floor_bwd_ms=f"{floors[1]:.4g}",
               floor_fwd_bwd_ms=f"{floors[2]:.4g}")
    x = target = None
    reps = args.reference_reps if name.startswith("reference") and args.reference_reps else args.reps
    row["reps"] = reps
    if not timed:  # the frame of a row that measure_interleaved fills in
        return row
    try:
        x, target = make_inputs(n, vocab, dtype, device, seed=args.seed)
        fn = make_loss_fn(name, k, args.b, args.check_target, OPTION_SETS[option_set])
        fwd, bwd, both, both_min = time_case(fn, x, target, device, reps, args.warmup, ctx["flush"])
        # With grad enabled: a no_grad call would recompile the compiled reference.
        loss = float(fn(x, target).detach())
        peak = peak_extra_bytes(fn, x, target, device) if ctx["memory_method"] != "none" else math.nan
        row.update(status="ok", fwd_ms=f"{fwd:.4g}", bwd_ms=f"{bwd:.4g}", fwd_bwd_ms=f"{both:.4g}",
                   fwd_bwd_min_ms=f"{both_min:.4g}",
                   x_floor_fwd=f"{fwd / floors[0]:.3g}", x_floor_bwd=f"{bwd / floors[1]:.3g}",
                   x_floor_fwd_bwd=f"{both / floors[2]:.3g}",
                   peak_extra_MiB=f"{peak / 2**20:.1f}", peak_extra_x_logits=f"{peak / logits_bytes:.2f}",
                   loss=f"{loss:.6f}")
    except Exception as exc:  # an OOM or a broken backend must not end the run
        row.update(status="error", note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    finally:
        del x, target
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


# ----------------------------------------------------------------------------- output

def write_csv(rows, paths):
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)


def format_table(rows):
    """Rows grouped by case, backends in a fixed order; skipped backends as one note each."""
    order = {name: i for i, name in enumerate(BACKENDS)}
    head = ("backend", "N x V", "dtype", "k", "options", "fwd ms", "bwd ms", "f+b ms", "floor f+b",
            "x floor f/b/f+b", "peak MiB (x logits)", "loss")
    option_order = {name: i for i, name in enumerate(OPTION_SETS)}
    lines = []
    measured = [r for r in rows if r.get("status") in ("ok", "error")]

    def key(r):
        k = r["k"] if r["k"] != "" else -1
        return (r["N"] * r["V"], r["N"], list(DTYPES).index(r["dtype"]), k, order[r["backend"]],
                option_order.get(r.get("options") or "none", 0))

    table = [head]
    for r in sorted(measured, key=key):
        if r["status"] == "ok":
            table.append((r["backend"], f"{r['N']}x{r['V']}", r["dtype"], str(r["k"]) or "-",
                          r.get("options") or "-", r["fwd_ms"], r["bwd_ms"], r["fwd_bwd_ms"], r["floor_fwd_bwd_ms"],
                          f"{r['x_floor_fwd']}/{r['x_floor_bwd']}/{r['x_floor_fwd_bwd']}",
                          f"{r['peak_extra_MiB']} ({r['peak_extra_x_logits']})", r["loss"]))
        else:
            table.append((r["backend"], f"{r['N']}x{r['V']}", r["dtype"], str(r["k"]) or "-",
                          r.get("options") or "-", "ERROR", r["note"][:60], "", "", "", "", ""))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    for j, row in enumerate(table):
        lines.append("  ".join(str(c).rjust(w) if i >= 5 else str(c).ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = sorted({(r["backend"], r["note"]) for r in rows if r.get("status") == "skipped"})
    for backend, note in notes:
        lines.append(f"skipped {backend}: {note}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- driver

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--shapes", default=None, help="comma list of NxV (device default)")
    p.add_argument("--k", default=None, help="comma list of k (default 6,20,100)")
    p.add_argument("--compiled-k", default=None,
                   help="k values for reference_compiled only (each costs a compile; default: --k)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16,fp64")
    p.add_argument("--backends", default="all", help=f"comma list of {','.join(BACKENDS)} or 'all'")
    p.add_argument("--b", type=float, default=0.5, help="penalty weight (nonzero, so selection runs)")
    p.add_argument("--options", default="none",
                   help=f"comma list of option sets for the PRSL backends: {', '.join(OPTION_SETS)} "
                        f"({'; '.join(f'{k}: {v}' for k, v in OPTION_SETS.items() if v)})")
    p.add_argument("--interleave", action="store_true",
                   help="time the --options sets of each case round-robin (no memory run)")
    p.add_argument("--reps", type=int, default=None, help="timed runs per case (median reported)")
    p.add_argument("--reference-reps", type=int, default=None,
                   help="timed runs for the (slow, steady) reference backends (default: --reps)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (compiles, caches)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default os.cpu_count())")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-target", action="store_true",
                   help="let prsl_loss check target range (a host sync on CUDA; off: as F.cross_entropy)")
    p.add_argument("--bandwidth-mib", type=int, default=None,
                   help="size of the copy that measures bandwidth (default CPU 256, CUDA 1024)")
    p.add_argument("--flush-mib", type=int, default=None,
                   help="cache-flush buffer (default CPU max(2 x last-level cache, 64), CUDA 256)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory run")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; cases not started within it are written as skipped")
    p.add_argument("--out-dir", default=str(RESULTS_DIR), help="where the CSV goes")
    p.add_argument("--extra-out-dir", action="append", default=[], help="also write the CSV here")
    p.add_argument("--csv-name", default=None, help="file name (default: <device slug>.csv)")
    return p


def run(argv=None, log=print):
    """Run the benchmark; returns (rows, csv paths). ``log`` receives every printed line."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    import_package()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    defaults = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    for key in ("reps", "warmup"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    shapes = parse_shapes(args.shapes or defaults["shapes"])
    ks = parse_ints(args.k or defaults["k"])
    compiled_ks = parse_ints(args.compiled_k) if args.compiled_k else ks
    dtypes = (args.dtypes or defaults["dtypes"]).split(",")
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    option_sets = args.options.split(",")
    for o in option_sets:
        if o not in OPTION_SETS:
            raise SystemExit(f"unknown option set {o!r}; choose from {', '.join(OPTION_SETS)}")
    explicit = args.backends != "all"
    names = list(BACKENDS) if not explicit else args.backends.split(",")
    for name in names:
        if name not in BACKENDS:
            raise SystemExit(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")

    threads = args.threads or os.cpu_count()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    else:
        threads = torch.get_num_threads()
    memory_method = "none"
    if not args.no_memory:
        if device.type == "cuda":
            memory_method = "cuda_max_memory_allocated"
        elif serve_large_blocks_by_mmap() and cpu_peak_supported():
            memory_method = "rss_peak_vmhwm"

    name_of_device = device_name(device)
    log(f"# PRSL benchmark on {device.type}: {name_of_device}, threads={threads}, torch {torch.__version__}")
    bw_bytes = (args.bandwidth_mib or (1024 if device.type == "cuda" else 256)) << 20
    bandwidth = copy_bandwidth(device, bw_bytes)
    log(f"# copy bandwidth (read+write, {bw_bytes >> 20} MiB copy): {bandwidth / 1e9:.1f} GB/s; "
        f"memory: {memory_method}; b={args.b}; reps={args.reps} warmup={args.warmup}")
    try:
        triton_version = importlib.import_module("triton").__version__
    except ImportError:
        triton_version = ""
    flush = CacheFlush(device, args.flush_mib << 20 if args.flush_mib else None)
    ctx = dict(device=device, bandwidth=bandwidth, flush=flush, memory_method=memory_method,
               common=dict(device=device.type, device_name=name_of_device, threads=threads,
                           torch=torch.__version__, triton=triton_version, note=""))

    out_dirs = [Path(args.out_dir)] + [Path(d) for d in args.extra_out_dir]
    csv_name = args.csv_name or f"{device_slug(device, threads)}.csv"
    paths = [d / csv_name for d in out_dirs]

    rows, plan = [], []
    for name in sorted(names, key=RUN_ORDER.index):
        reason = backend_unavailable(name, device, explicit)
        if reason:
            log(f"# skip {name}: {reason}")
            rows.append(dict(ctx["common"], backend=name, status="skipped", note=reason, N="", V="",
                             dtype="", k=""))
            continue
        backend_ks = [None] if name in CE_BACKENDS else (compiled_ks if name == "reference_compiled" else ks)
        sets = ["none"] if name in CE_BACKENDS else option_sets
        plan += [(name, n, v, d, k, o) for (n, v) in shapes for d in dtypes for k in backend_ks for o in sets
                 if k is None or k <= v - 1]
    if args.interleave:  # one entry per case, holding all its option sets
        grouped = {}
        for name, n, v, d, k, o in plan:
            grouped.setdefault((name, n, v, d, k), []).append(o)
        plan = [(*case, tuple(sets)) for case, sets in grouped.items()]
    for name, n, v, d, k, o in plan:
        elapsed = time.perf_counter() - start
        if args.time_budget is not None and elapsed > args.time_budget:
            rows.append(dict(ctx["common"], backend=name, status="skipped", N=n, V=v, dtype=d,
                             k="" if k is None else k, options=o if isinstance(o, str) else ",".join(o),
                             note=f"time budget {args.time_budget:.0f} s spent"))
            log(f"# skip {name} {n}x{v} {d} k={'-' if k is None else k}: time budget spent")
            continue
        if isinstance(o, tuple):
            new_rows = measure_interleaved(name, n, v, d, 0 if k is None else k, args, ctx, o)
        else:
            new_rows = [measure(name, n, v, d, 0 if k is None else k, args, ctx, o)]
        for row in new_rows:
            rows.append(row)
            o = row.get("options") or "none"
            log(f"{name:18s} {n}x{v} {d} k={k if k is not None else '-'}{'' if o == 'none' else ' ' + o}: "
                + (f"fwd {row['fwd_ms']} ms, bwd {row['bwd_ms']} ms, fwd+bwd {row['fwd_bwd_ms']} ms "
                   f"({row['x_floor_fwd_bwd']} x floor), peak +{row['peak_extra_MiB']} MiB"
                   if row["status"] == "ok" else f"ERROR {row['note']}"))
        write_csv(rows, paths)
    write_csv(rows, paths)
    log("")
    log(format_table(rows))
    log(f"# CSV: {', '.join(str(p) for p in paths)}  ({time.perf_counter() - start:.0f} s)")
    return rows, paths


def main(argv=None):
    rows, _ = run(argv)
    return 1 if any(r.get("status") == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
