#!/usr/bin/env python3
"""The one script to run on a lent GPU, in a single call: correctness, then the benchmark.

1. Correctness of prsl_loss(backend="triton") against the reference evaluated in
   float64 on the upcast inputs (fresh random data per case): the loss, the
   gradient (random upstream gradient), and the five row statistics, with
   relative errors printed per case. Cases cover odd V, k in {0, 6, 20, 100,
   1024, MAX_K + 1 (the torch fallback)}, fp16/bf16/fp32 (and fp64), ignored
   rows (default and custom ignore_index), the three reductions, ties, -inf
   masked vocabularies (fewer than k finite), targets at the top of the row,
   strided rows, a (B, T, V) shape, NaN/+inf rows, bit-identical reruns and,
   on CUDA, int64 row offsets (N * V > 2^31), backend="auto" and
   torch.compile(fullgraph=True). Before every kernel call the CUDA caching
   allocator is poisoned (freed blocks filled with 0xFF, a NaN in every float
   dtype), so an output element the kernel fails to write shows up as NaN.
   The unit tests of the compiled kernels at these shapes (the two-pass kernel's
   flagged rows and fast-path share, the exact kernel, the gradient made in the
   forward and in place, the options, fused linear, apply_prsl) are pytest's:
   ``python -m pytest -q tests/test_gpu_compiled.py`` (about 3 minutes); they are
   not repeated here.
2. The GPU benchmark (bench_prsl.py with its CUDA shapes, beside F.cross_entropy and
   Liger's cross-entropy where importable), within a time budget.
3. The fused linear + PRSL benchmark (bench_linear.py --check at its CUDA shapes: the fused
   op against F.linear + the float64 reference first); --skip-linear skips it.
4. The forward against k (forward_sweep.py, do_bench) and forward + backward against one
   read + write of the logits (bench_grad_in_forward.py: three-pass, the gradient made in
   the forward, inplace_backward) at 8192 x 50257 and 4096 x 128256.
5. A LLaVA-shaped training step through apply_prsl (bench_hf_step.py: V = 32064, 4096 tokens,
   hidden 4096, bf16): peak memory and time of HF's CE, unfused and fused PRSL;
   --skip-hf-step skips it (it needs transformers).

The CSV and a log go to $OUT (if set) and to benchmarks/results/. Needs only
torch and triton (no pip install, no network): run from the repo root,

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py

--dry-run runs the same logic on the CPU with TRITON_INTERPRET=1 on tiny shapes
(for tests; its times mean nothing). Exit status 1 if any check fails.
"""

import os
import sys

if "--dry-run" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede any import of triton

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_prsl  # noqa: E402

bench_prsl.import_package()

import torch  # noqa: E402

from prsl_kernels import prsl_loss  # noqa: E402
from reference import prsl_loss_reference, row_stats_reference  # noqa: E402

# Normwise relative error bounds, max|out - ref| / max|ref|, against float64.
# Loss and statistics accumulate in float32 whatever the input dtype; the
# gradient is additionally rounded once to the logits' dtype (bf16: 2^-9).
LOSS_TOL = {"fp64": 1e-10, "other": 2e-5}
STATS_TOL = {"fp64": 1e-10, "other": 1e-4}
GRAD_TOL = {"fp64": 1e-10, "fp32": 2e-5, "fp16": 2e-3, "bf16": 1e-2}
DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class Log:
    """print() to stdout and to every log file, line-buffered so a killed run keeps its log."""

    def __init__(self, paths):
        self.files = []
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
            self.files.append(open(p, "w", buffering=1))

    def __call__(self, line=""):
        print(line, flush=True)
        for f in self.files:
            f.write(line + "\n")


@dataclass
class Case:
    name: str
    shape: tuple  # (..., V)
    dtype: torch.dtype
    k: int
    b: float = 0.5
    reduction: str = "mean"
    ignore_index: int = -100
    variant: str = "randn"  # randn | ties | masked | top_target | strided | nonfinite
    tags: list = field(default_factory=list)

    def describe(self):
        return (f"{self.name:14s} {'x'.join(map(str, self.shape)):>12s} {DTYPE_NAMES[self.dtype]} "
                f"k={self.k:<5d} b={self.b:<6g} {self.reduction:4s} ii={self.ignore_index}")


def make_cases(max_k, dry):
    """The check matrix. The dry run (Triton interpreter, ~1 s per block and call) keeps one
    case per code path of this script on tiny shapes; k = 1024 is GPU-only there."""
    f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
    if dry:
        return [
            Case("main", (3, 131), f32, 6),
            Case("main", (3, 131), bf16, 20, reduction="sum"),
            Case("main", (3, 131), f16, 0, reduction="none"),
            Case("fallback", (2, max_k + 3), f32, max_k + 1, reduction="none"),
            Case("b=0", (3, 64), f32, 6, b=0.0, reduction="none"),
            Case("ties", (4, 64), f32, 6, reduction="none", variant="ties"),
            Case("masked", (4, 64), f32, 20, reduction="none", variant="masked"),
            Case("top-target", (4, 64), f32, 6, reduction="none", variant="top_target"),
            Case("ignore=5", (4, 64), f32, 6, ignore_index=5),
            Case("strided", (3, 64), bf16, 6, reduction="none", variant="strided"),
            Case("B,T,V", (2, 2, 64), f32, 6),
            Case("nan/inf rows", (4, 64), f32, 6, reduction="none", variant="nonfinite"),
        ]
    cases = []
    for dtype in (bf16, f16, f32):
        for i, k in enumerate((0, 6, 20, 100, 1024, max_k + 1)):
            # V odd and > MAX_K + 1, so the fallback applies; reductions rotate.
            cases.append(Case("main", (64, 50257), dtype, k, reduction=("mean", "sum", "none")[i % 3]))
    return cases + [
        Case("odd-v", (37, 131), f32, 6, reduction="none"),
        Case("odd-v", (37, 1001), f32, 100, b=-0.3, reduction="none"),
        Case("k=V-1", (16, 131), f32, 130, reduction="none"),
        Case("tiny-b", (33, 1000), bf16, 20, b=1e-4),
        Case("b=0", (33, 1000), f32, 20, b=0.0, reduction="none"),
        Case("fp64", (16, 1003), f64, 20, reduction="none"),
        Case("fp64", (8, 50257), f64, 100, b=-0.3, reduction="sum"),
        Case("ties", (64, 5000), bf16, 20, reduction="none", variant="ties"),
        Case("ties", (64, 5000), f32, 6, reduction="none", variant="ties"),
        Case("masked", (32, 2000), f32, 100, reduction="none", variant="masked"),
        Case("masked", (32, 50257), bf16, 20, reduction="none", variant="masked"),
        Case("top-target", (32, 1000), f16, 20, reduction="none", variant="top_target"),
        Case("ignore=5", (32, 1000), f32, 20, ignore_index=5, reduction="sum"),
        Case("strided", (48, 32003), bf16, 20, reduction="none", variant="strided"),
        Case("B,T,V", (4, 16, 50272), bf16, 20),
        Case("nan/inf rows", (16, 1000), f32, 20, reduction="none", variant="nonfinite"),
        Case("large-V", (8, 128256), bf16, 100, reduction="none"),
        Case("large-V", (4, 262144), f32, 20, reduction="none"),
    ]


def make_inputs(case, device, gen):
    """(logits, target, leaf): logits may be a strided view of ``leaf``; leaf gets the gradient."""
    *lead, vocab = case.shape
    n = math.prod(lead)
    if case.variant == "ties":
        # Integer logits: exact in every dtype, many ties at tau.
        base = torch.randint(-4, 5, (n, vocab), generator=gen, device=device).to(case.dtype)
    else:
        base = (torch.randn(n, vocab, generator=gen, device=device) * 2).to(case.dtype)
    target = torch.randint(0, vocab, (n,), generator=gen, device=device)
    if case.variant == "masked":
        # Masked vocabulary; rows keep few finite logits, some fewer than k non-targets.
        keep = torch.rand(n, vocab, generator=gen, device=device) < torch.linspace(
            0.01, 0.2, n, device=device)[:, None]
        base = base.masked_fill(~keep, float("-inf"))
        base[torch.arange(n, device=device), target] = 1.0
    if case.variant == "top_target":
        half = torch.arange(n, device=device) % 2 == 0
        target = torch.where(half, base.float().argmax(-1), target)
    if case.variant == "nonfinite":
        base[0, 3] = float("nan")
        base[1, 5] = float("inf")
    ignored = torch.rand(n, generator=gen, device=device) < 0.15
    ignored[2 % n] = True  # at least one ignored row
    target = torch.where(ignored, torch.full_like(target, case.ignore_index), target)
    if case.variant == "strided":
        wide = torch.empty(n, vocab + 29, dtype=case.dtype, device=device).normal_(generator=gen)
        wide[:, :vocab] = base
        leaf = wide[:, :vocab]
    else:
        leaf = base
    leaf = leaf.detach().requires_grad_()
    return leaf.reshape(case.shape), target.reshape(tuple(lead)), leaf


def poison(device, nbytes):
    """Fill freed blocks of the CUDA caching allocator with 0xFF (NaN in every float dtype)."""
    if device.type != "cuda":
        return
    big = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8, device=device).fill_(0xFF)
    small = [torch.empty(256 << 10, dtype=torch.uint8, device=device).fill_(0xFF) for _ in range(16)]
    del big, small


def rel_err(out, ref):
    """max|out - ref| / max|ref| over the entries where ref is finite; inf if out is not finite there."""
    out, ref = out.double(), ref.double()
    mask = torch.isfinite(ref)
    if not bool(mask.any()):
        return 0.0
    o, r = out[mask], ref[mask]
    if not bool(torch.isfinite(o).all()):
        return math.inf
    scale = float(r.abs().max())
    diff = float((o - r).abs().max())
    return diff / scale if scale > 0 else diff


def bitwise_equal(a, b):
    """Equal bit patterns (NaN payloads and signed zeros included)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(ints), b.contiguous().view(ints))


def run_backend(case, logits, target, leaf, upstream, backend):
    poison(logits.device, 2 * leaf.numel() * leaf.element_size())
    loss, stats = prsl_loss(logits, target, case.k, case.b, ignore_index=case.ignore_index,
                            reduction=case.reduction, backend=backend, return_stats=True)
    (grad,) = torch.autograd.grad(loss, leaf, upstream.to(loss.dtype))
    return loss.detach(), grad, [s.detach() for s in stats]


def check_case(case, device, gen, backend):
    """Returns (ok, message)."""
    logits, target, leaf = make_inputs(case, device, gen)
    ref_leaf = leaf.detach().double().requires_grad_()
    ref_logits = ref_leaf.reshape(case.shape)
    ref = prsl_loss_reference(ref_logits, target, case.k, case.b, ignore_index=case.ignore_index,
                              reduction=case.reduction)
    if case.reduction == "none":
        upstream = torch.randn(ref.shape, generator=gen, device=device, dtype=torch.float64)
    else:
        upstream = torch.rand((), generator=gen, device=device, dtype=torch.float64) + 0.5
    (ref_grad,) = torch.autograd.grad(ref, ref_leaf, upstream)
    # The API passes k = 0 to the kernels when b == 0: the statistics are then CE-only.
    k_eff = case.k if case.b != 0 else 0
    ref_stats = row_stats_reference(ref_logits.detach(), target, k_eff, case.ignore_index)[:5]

    loss, grad, stats = run_backend(case, logits, target, leaf, upstream, backend)
    loss2, grad2, stats2 = run_backend(case, logits, target, leaf, upstream, backend)

    flat_t = target.reshape(-1)
    counted = flat_t != case.ignore_index
    row_ok = counted & torch.isfinite(ref_leaf.detach()).all(-1) if case.variant != "masked" else counted
    if case.variant == "nonfinite":
        row_ok = counted & ~(torch.isnan(ref_leaf.detach()) | (ref_leaf.detach() == math.inf)).any(-1)
    problems = []
    dname = DTYPE_NAMES[case.dtype]
    loss_tol = LOSS_TOL["fp64" if dname == "fp64" else "other"]
    stats_tol = STATS_TOL["fp64" if dname == "fp64" else "other"]

    if case.reduction == "none":
        loss_e = rel_err(loss.reshape(-1)[row_ok], ref.detach().reshape(-1)[row_ok])
        if not bool((loss.reshape(-1)[~counted] == 0).all()):
            problems.append("ignored rows' loss not 0")
        bad_rows = counted & ~row_ok
        if bool(bad_rows.any()) and not bool(torch.isnan(loss.reshape(-1)[bad_rows]).all()):
            problems.append("NaN/+inf rows' loss not NaN")
    else:
        loss_e = rel_err(loss, ref.detach())
    grad_rows, ref_grad_rows = grad.reshape(-1, case.shape[-1]), ref_grad.reshape(-1, case.shape[-1])
    grad_e = rel_err(grad_rows[row_ok], ref_grad_rows[row_ok])
    if grad.dtype != case.dtype:
        problems.append(f"gradient dtype {grad.dtype}")
    if not bool((grad_rows[~counted] == 0).all()):
        problems.append("ignored rows' gradient not all 0")

    lse_e = rel_err(stats[0][row_ok], ref_stats[0][row_ok])
    dist_e = rel_err(stats[2][row_ok], ref_stats[2][row_ok])
    spread_e = rel_err(stats[3][row_ok], ref_stats[3][row_ok])
    tau_bad = ties_bad = 0
    if k_eff > 0:
        tau_bad = int((stats[1][row_ok].double() != ref_stats[1][row_ok]).sum())
        ties_bad = int((stats[4][row_ok].double() != ref_stats[4][row_ok]).sum())

    deterministic = bitwise_equal(loss, loss2) and bitwise_equal(grad, grad2) \
        and all(bitwise_equal(a[counted], b[counted]) for a, b in zip(stats, stats2))
    if not deterministic:
        problems.append("reruns differ")
    if not loss_e <= loss_tol:
        problems.append(f"loss err {loss_e:.2e} > {loss_tol:.0e}")
    if not grad_e <= GRAD_TOL[dname]:
        problems.append(f"grad err {grad_e:.2e} > {GRAD_TOL[dname]:.0e}")
    for label, e in (("lse", lse_e), ("dist", dist_e), ("spread", spread_e)):
        if not e <= stats_tol:
            problems.append(f"{label} err {e:.2e} > {stats_tol:.0e}")
    if tau_bad:
        problems.append(f"tau differs in {tau_bad} rows")
    if ties_bad:
        problems.append(f"tie_count differs in {ties_bad} rows")
    msg = (f"loss {loss_e:.1e} grad {grad_e:.1e} lse {lse_e:.1e} dist {dist_e:.1e} "
           f"spread {spread_e:.1e} tau!={tau_bad} ties!={ties_bad}")
    return not problems, msg + ("" if not problems else "  <- " + "; ".join(problems))


def check_grad_in_forward(device, gen, backend):
    """The gradient made in the forward (mean / sum): bit for bit what the forward + backward
    kernels write (reduction="none" summed), upstream 1; flagged rows included. (inplace_backward
    against it: tests/test_gpu_compiled.py.)"""
    problems = []
    for dtype in (torch.bfloat16, torch.float32):
        for k in (0, 20, 100, 200):
            logits = (torch.randn(512, 50257, generator=gen, device=device) * 2).to(dtype)
            logits[3] = torch.randint(-3, 3, (50257,), generator=gen, device=device).to(dtype)  # flagged: ties
            target = torch.randint(0, 50257, (512,), generator=gen, device=device)
            target[5] = -100
            x = logits.clone().requires_grad_(True)
            prsl_loss(x, target, k, 0.5, reduction="none", backend=backend).sum().backward()
            want = x.grad
            y = logits.clone().requires_grad_(True)
            prsl_loss(y, target, k, 0.5, reduction="sum", backend=backend).backward()
            if not bitwise_equal(y.grad, want):
                problems.append(f"{DTYPE_NAMES[dtype]} k={k}: max diff "
                                f"{(y.grad.float() - want.float()).abs().max().item():.2e}")
    return not problems, "bit-identical to forward + backward" if not problems else "; ".join(problems)


def check_int64_offsets(device, gen, backend):
    """N * V > 2^31 elements (bf16, ~4.3 GB): rows at the far end must still be right."""
    vocab, k, b = 50257, 20, 0.5
    n = (1 << 31) // vocab + 3
    logits = torch.empty(n, vocab, dtype=torch.bfloat16, device=device).normal_(generator=gen).requires_grad_()
    target = torch.randint(0, vocab, (n,), generator=gen, device=device)
    loss = prsl_loss(logits, target, k, b, reduction="none", backend=backend)
    upstream = torch.rand(n, generator=gen, device=device) + 0.5
    (grad,) = torch.autograd.grad(loss, logits, upstream)
    rows = torch.tensor([0, 1, n - 2, n - 1], device=device)
    ref_leaf = logits.detach()[rows].double().requires_grad_()
    ref = prsl_loss_reference(ref_leaf, target[rows], k, b, reduction="none")
    (ref_grad,) = torch.autograd.grad(ref, ref_leaf, upstream[rows].double())
    loss_e, grad_e = rel_err(loss.detach()[rows], ref.detach()), rel_err(grad[rows], ref_grad)
    ok = loss_e <= LOSS_TOL["other"] and grad_e <= GRAD_TOL["bf16"]
    return ok, f"N={n} V={vocab} ({n * vocab / 2**31:.5f} x 2^31 elements): loss {loss_e:.1e} grad {grad_e:.1e}"


def check_auto_and_compile(device, gen, backend="triton"):
    """backend='auto' picks ``backend`` (Triton on CUDA: bit-identical); a compiled model matches
    eager under fullgraph=True."""
    logits = torch.randn(64, 50257, generator=gen, device=device).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, 50257, (64,), generator=gen, device=device)
    a = prsl_loss(logits, target, 20, 0.5, backend=backend)
    b = prsl_loss(logits, target, 20, 0.5, backend="auto")
    (ga,), (gb,) = torch.autograd.grad(a, logits), torch.autograd.grad(b, logits)
    same = torch.equal(a, b) and torch.equal(ga, gb)

    model = torch.nn.Linear(64, 5003, device=device)
    x = torch.randn(128, 64, generator=gen, device=device)
    t = torch.randint(0, 5003, (128,), generator=gen, device=device)

    def step(inp, tgt):
        return prsl_loss(model(inp), tgt, 20, 0.5, backend=backend, check_target=False)

    eager = step(x, t)
    (g_eager,) = torch.autograd.grad(eager, model.weight)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)(x, t)
    (g_comp,) = torch.autograd.grad(compiled, model.weight)
    loss_e, grad_e = rel_err(compiled.detach(), eager.detach()), rel_err(g_comp, g_eager)
    ok = same and loss_e <= 1e-5 and grad_e <= 1e-4
    return ok, f"auto=={backend} bitwise: {same}; compiled(fullgraph) vs eager: loss {loss_e:.1e} grad {grad_e:.1e}"


def check_out_of_range_targets(device, gen, backend):
    """check_target=False: a target outside [0, V) is never read; its row is NaN (loss and
    gradient), the other rows stay right, and the CUDA context survives (k = 0, 20, MAX_K + 1)."""
    vocab, msgs, ok = 1000, [], True
    for k in (0, 20, 2100):
        if k >= vocab:
            vocab = 3000
        logits = torch.randn(6, vocab, generator=gen, device=device).requires_grad_()
        target = torch.tensor([vocab, vocab + 1, 1 << 40, -1, -7, 3], device=device)
        loss = prsl_loss(logits, target, k, 0.5, reduction="none", backend=backend, check_target=False)
        (grad,) = torch.autograd.grad(loss.sum(), logits)
        want = prsl_loss_reference(logits.detach()[5:].double(), target[5:], k, 0.5, reduction="none")
        good = bool(torch.isnan(loss[:5]).all() and torch.isnan(grad[:5]).all()
                    and torch.isfinite(grad[5]).all() and rel_err(loss.detach()[5:], want) <= LOSS_TOL["other"])
        if device.type == "cuda":
            torch.cuda.synchronize()  # an illegal address would surface here
        ok &= good
        msgs.append(f"k={k}: {'NaN rows' if good else 'WRONG'}")
    return ok, "; ".join(msgs)


def check_misaligned_rows(device, gen, backend):
    """Misaligned views (odd base offset) give the same values as aligned copies. (The two-pass
    kernel's fast and flagged rows: tests/test_gpu_compiled.py.)"""
    msgs, ok = [], True
    for dtype in (torch.bfloat16, torch.float32):
        storage = torch.randn(64, 50257 + 3, generator=gen, device=device).to(dtype)
        view = storage[:, 1:50258]  # base pointer off 16-byte alignment, odd stride
        tt = torch.randint(0, 50257, (64,), generator=gen, device=device)
        a = prsl_loss(view, tt, 20, 0.5, reduction="none", backend=backend)
        bcopy = prsl_loss(view.contiguous(), tt, 20, 0.5, reduction="none", backend=backend)
        good = torch.equal(a, bcopy) or rel_err(a, bcopy) <= 1e-6
        ok &= good
        msgs.append(f"{DTYPE_NAMES[dtype]} misaligned view == copy: {good}")
    return ok, "; ".join(msgs)


def measured_beside_predicted(rows, device_name, log):
    """The Triton rows of the benchmark beside the static model's figures for this GPU
    (benchmarks/results/static_cost.json: model predictions for the kernels it was made for)."""
    import json

    path = bench_prsl.RESULTS_DIR / "static_cost.json"
    gpu = next((g for g in ("H200", "H100", "A100") if g in device_name), None)
    if gpu is None or not path.exists():
        log(f"# no static-model figures for {device_name!r} (static_cost.json covers H100, A100, H200)")
        return
    model = {(m["gpu"], m["dtype"], m["N"], m["V"], m["k"]): m for m in json.loads(path.read_text())}
    log(f"\n# measured beside the static model ({gpu}; model figures are predictions, plain / latency-aware)")
    log(f"{'N x V':>12} {'dtype':>5} {'k':>4} {'fwd meas':>9} {'fwd model':>15} {'bwd meas':>9} {'bwd model':>15}")
    for r in rows:
        if r.get("backend") != "triton" or r.get("status") != "ok":
            continue
        m = model.get((gpu, r["dtype"], int(r["N"]), int(r["V"]), int(r["k"])))
        if m is None:
            continue
        log(f"{str(r['N']) + 'x' + str(r['V']):>12} {r['dtype']:>5} {r['k']:>4} {float(r['fwd_ms']):9.3f} "
            f"{m['predicted_ms_fwd']:7.3f}/{m['latency_aware_ms_fwd']:<7.3f} {float(r['bwd_ms']):9.3f} "
            f"{m['predicted_ms_bwd']:7.3f}/{m['latency_aware_ms_bwd']:<7.3f}")


def run_checks(checks, log, device, failures):
    """Run (label, fn) checks; fn returns (ok, message). Returns (passed, failed); FAIL lines
    are appended to ``failures`` (repeated at the end, where the device tool's output tail is)."""
    passed = failed = 0
    for label, fn in checks:
        t0 = time.perf_counter()
        try:
            ok, msg = fn()
        except Exception as exc:
            ok, msg = False, f"{type(exc).__name__}: {exc}"
            log(traceback.format_exc().rstrip())
        passed, failed = passed + ok, failed + (not ok)
        line = f"{'PASS' if ok else 'FAIL'}  {label}  {msg}  ({time.perf_counter() - t0:.1f} s)"
        log(line)
        if not ok:
            failures.append(line)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return passed, failed


def correctness_checks(device, log, dry, seed, backend):
    """(checks run before the benchmark, checks run after it). The int64-offset check goes
    last: a kernel that overflows there may fault and leave the CUDA context unusable."""
    try:
        from prsl_kernels import triton_kernels
        max_k = int(getattr(triton_kernels, "MAX_K", 1023))
    except Exception as exc:
        if backend == "triton":
            def unavailable(exc=exc):
                return False, f"Triton kernels do not import: {type(exc).__name__}: {exc}"
            return [("import", unavailable)], []
        max_k = 2047
    log(f"# backend={backend}; triton MAX_K={max_k}; poisoning: "
        f"{'CUDA caching allocator' if device.type == 'cuda' else 'off (CPU)'}")
    gen = torch.Generator(device=device).manual_seed(seed)
    first = [(c.describe(), lambda c=c: check_case(c, device, gen, backend)) for c in make_cases(max_k, dry)]
    last = []
    if device.type == "cuda":
        first.append(("auto + compile", lambda: check_auto_and_compile(device, gen)))
        first.append(("out-of-range targets", lambda: check_out_of_range_targets(device, gen, "triton")))
        first.append(("misaligned rows", lambda: check_misaligned_rows(device, gen, "triton")))
        first.append(("gradient in the forward", lambda: check_grad_in_forward(device, gen, "triton")))
        last.append(("int64 offsets", lambda: check_int64_offsets(device, gen, "triton")))
    return first, last


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, TRITON_INTERPRET=1, tiny shapes: tests the script, not the GPU")
    p.add_argument("--out-dir", default=os.environ.get("OUT"), help="also write CSV + log here (default $OUT)")
    p.add_argument("--results-dir", default=None,
                   help="default benchmarks/results (GPU) or none (dry run)")
    p.add_argument("--time-budget", type=float, default=540.0,
                   help="seconds for the whole script; the benchmark stops starting cases after it")
    p.add_argument("--backend", choices=("triton", "cpp"), default="triton",
                   help="cpp: the same checks (GPU case list) for the C++ kernel on the CPU; no benchmark")
    p.add_argument("--skip-checks", action="store_true")
    p.add_argument("--bench-args", default="",
                   help="extra bench_prsl.py arguments, e.g. \"--shapes 8192x50257 --dtypes bf16\"")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--skip-linear", action="store_true", help="skip the fused linear + PRSL benchmark")
    p.add_argument("--skip-hf-step", action="store_true", help="skip the LLaVA-shaped apply_prsl step")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    start = time.perf_counter()

    device = torch.device("cpu" if args.dry_run or args.backend == "cpp" else "cuda")
    if args.backend == "cpp":
        args.skip_bench = True  # the CPU benchmark is bench_prsl.py's (minutes at its shapes)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU, or pass --dry-run", file=sys.stderr)
        return 2
    results_dir = Path(args.results_dir) if args.results_dir else (None if args.dry_run else bench_prsl.RESULTS_DIR)
    out_dirs = [Path(d) for d in (args.out_dir, results_dir) if d]
    dev_slug = bench_prsl.device_slug(device, 1 if args.dry_run else torch.get_num_threads())
    if args.backend == "cpp":
        out_dirs = [Path(args.out_dir)] if args.out_dir else []
    log = Log([d / f"gpu_check-{args.backend}-{dev_slug}.log" if args.backend == "cpp"
               else d / f"gpu_check-{dev_slug}.log" for d in out_dirs])

    import triton
    log(f"# gpu_check on {bench_prsl.device_name(device)}: torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"triton {triton.__version__}, python {sys.version.split()[0]}"
        + (", DRY RUN (TRITON_INTERPRET=1, CPU)" if args.dry_run else ""))

    first, last = ([], []) if args.skip_checks else correctness_checks(device, log, args.dry_run, args.seed,
                                                                                   args.backend)
    failures = []
    passed, failed = run_checks(first, log, device, failures)
    if first:
        log(f"# checks: {passed} passed, {failed} failed ({time.perf_counter() - start:.0f} s)")

    bench_errors = 0
    if not args.skip_bench:
        if args.dry_run:
            bench_argv = ["--device", "cpu", "--shapes", "2x64", "--k", "6", "--dtypes", "fp32",
                          "--backends", "triton,reference,cross_entropy", "--reps", "1", "--warmup", "0",
                          "--threads", "1", "--bandwidth-mib", "16", "--flush-mib", "8"]
        else:
            # Compiling the reference costs tens of seconds per case: k = 20 only, and last.
            bench_argv = ["--device", "cuda", "--k", "0,6,20,100", "--compiled-k", "20", "--reference-reps", "5"]
        bench_argv += args.bench_args.split()
        remaining = args.time_budget - (time.perf_counter() - start) - 60  # the table, the int64 check
        bench_argv += ["--time-budget", f"{max(remaining, 0):.0f}"]
        dirs = [str(d) for d in out_dirs]
        if dirs:
            bench_argv += ["--out-dir", dirs[0]] + [a for d in dirs[1:] for a in ("--extra-out-dir", d)]
        else:  # nowhere asked for: keep the CSV out of the checkout
            import tempfile
            bench_argv += ["--out-dir", tempfile.mkdtemp(prefix="prsl-bench-")]
        try:
            rows, _ = bench_prsl.run(bench_argv, log=log)
            bench_errors = sum(r.get("status") == "error" for r in rows)
            if not args.dry_run:
                measured_beside_predicted(rows, bench_prsl.device_name(device), log)
        except Exception:
            log(traceback.format_exc().rstrip())
            bench_errors = 1

    if not args.skip_bench and not args.skip_linear and not args.dry_run:
        # Fused linear + PRSL against F.linear + prsl_loss / F.cross_entropy and,
        # where importable, Liger's fused linear cross-entropy, at bench_linear's CUDA shapes.
        try:
            import bench_linear
            linear_argv = ["--device", "cuda", "--check"]
            if out_dirs:
                linear_argv += ["--out-dir", str(out_dirs[0])]
            bench_linear.run(linear_argv, log=log)
        except SystemExit as exit_:
            bench_errors += bool(exit_.code)
        except Exception:
            log(traceback.format_exc().rstrip())
            bench_errors += 1

    if not args.skip_bench and not args.dry_run:
        # The gradient made in the forward: the forward against k (do_bench), and forward + backward against the copy floor:
        # three-pass, the gradient in the forward, inplace_backward.
        try:
            import bench_grad_in_forward
            import forward_sweep
            forward_sweep.main(["--k", "0", "6", "20", "100"], log=log)
            bench_grad_in_forward.main(["--device", "cuda", "--shapes", "8192x50257,4096x128256", "--k", "0,20,100",
                                        "--reps", "10"] + (["--out", str(out_dirs[0] / "grad-in-forward.md")]
                                                           if out_dirs else []), log=log)
        except Exception:
            log(traceback.format_exc().rstrip())
            bench_errors += 1

    if not args.skip_bench and not args.skip_hf_step and not args.dry_run:
        try:
            import bench_hf_step
            hf_argv = ["--device", "cuda"] + (["--out-dir", str(out_dirs[0])] if out_dirs else [])
            bench_hf_step.run(hf_argv, log=log)
        except Exception:
            log(traceback.format_exc().rstrip())
            bench_errors += 1

    if last:
        p2, f2 = run_checks(last, log, device, failures)
        passed, failed = passed + p2, failed + f2
    for line in failures:
        log(line)
    log(f"# gpu_check done in {time.perf_counter() - start:.0f} s: checks {passed} passed, {failed} failed; "
        f"benchmark errors: {bench_errors}")
    return 1 if failed or bench_errors else 0


if __name__ == "__main__":
    sys.exit(main())
