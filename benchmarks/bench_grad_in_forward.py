#!/usr/bin/env python3
"""Forward + backward of PRSL against the memory floor: the three-pass path, the gradient
made in the forward, and ``inplace_backward``, on CPU (C++) or CUDA (Triton).

Per case (dtype, N x V, k), interleaved round by round so that the load of a shared
machine drifts over all of them alike (medians over --reps rounds):

  copy         ``buf.copy_(logits)`` into an existing buffer: one read + one write of the
               logits, the floor of any loss that must read the logits and write a gradient
  three-pass   the forward, then the backward kernel (``reduction="none"`` summed: what
               ``prsl_loss`` ran for every reduction before the gradient moved into the
               forward); the gradient is a fresh N x V tensor
  default      ``prsl_loss(reduction="mean")``: the gradient written by the forward kernels
               into a fresh N x V tensor, handed over by the backward
  inplace      ``prsl_loss(reduction="mean", inplace_backward=True)``: the gradient
               overwrites the logits (restored, untimed, before each round)

Each timed region is ``loss = prsl_loss(...); loss.backward()`` (copy: the copy), after a
cache flush (bench_prsl.CacheFlush). A fresh N x V gradient pays the OS's first-touch
page faults on CPU, which is what the default path costs beside the in-place one.

    python3 benchmarks/bench_grad_in_forward.py                       # CPU, 2 threads
    python3 benchmarks/bench_grad_in_forward.py --device cuda --shapes 8192x50257
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_prsl as bp  # noqa: E402

RESULTS_DIR = bp.RESULTS_DIR
VARIANTS = ("copy", "three-pass", "default", "inplace")


def run_case(torch, prsl_loss, device, dtype, n, vocab, k, b, reps, warmup, flush):
    gen = torch.Generator(device="cpu").manual_seed(n + vocab + k + 1)
    master = bp.make_inputs(n, vocab, dtype, device, n + vocab + k)[0].detach()
    target = torch.randint(0, vocab, (n,), generator=gen).to(device)
    work = master.clone()
    buf = torch.empty_like(master)
    backend = "cpp" if device.type == "cpu" else "triton"
    clock = bp.Clock(device)

    def three_pass():
        x = master.detach().requires_grad_(True)
        loss = prsl_loss(x, target, k, b, reduction="none", backend=backend).sum()
        loss.backward()
        return x

    def default():
        x = master.detach().requires_grad_(True)
        prsl_loss(x, target, k, b, backend=backend).backward()
        return x

    def inplace():
        work.requires_grad_(True)
        prsl_loss(work, target, k, b, backend=backend, inplace_backward=True).backward()
        work.grad = None
        return work

    fns = {"copy": lambda: buf.copy_(master), "three-pass": three_pass, "default": default, "inplace": inplace}
    times = {v: [] for v in VARIANTS}
    for i in range(warmup + reps):
        for name in VARIANTS:
            if name == "inplace":
                with torch.no_grad():
                    work.requires_grad_(False)
                    work.copy_(master)
            flush()
            start = clock.mark()
            out = fns[name]()
            end = clock.mark()
            clock.sync()
            del out
            if i >= warmup:
                times[name].append(clock.ms(start, end))
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None, log=print):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", default=None, help="comma list of NxV (default: CPU 2048x50257, CUDA 8192x50257)")
    p.add_argument("--k", default="6,20,100")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--b", type=float, default=0.5)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = p.parse_args(argv)

    bp.import_package()
    import torch

    from prsl_kernels import prsl_loss

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    shapes = bp.parse_shapes(args.shapes or ("2048x50257" if device.type == "cpu" else "8192x50257"))
    flush = bp.CacheFlush(device)
    rows = []
    header = (f"device: {bp.device_name(device)}, threads: {torch.get_num_threads() if device.type == 'cpu' else '-'}"
              f", b = {args.b}, medians of {args.reps} interleaved rounds, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    log(header)
    lines = ["| dtype | N x V | k | copy ms | three-pass ms (x copy) | default ms (x copy) | inplace ms (x copy) |",
             "|---|---|---|---|---|---|---|"]
    log("\n".join(lines))
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, bp.DTYPES[dtype_name])
        for n, vocab in shapes:
            for k in bp.parse_ints(args.k):
                t = run_case(torch, prsl_loss, device, dtype, n, vocab, k, args.b, args.reps, args.warmup, flush)
                c = t["copy"]
                line = (f"| {dtype_name} | {n} x {vocab} | {k} | {c:.1f} | {t['three-pass']:.1f} "
                        f"({t['three-pass'] / c:.2f}) | {t['default']:.1f} ({t['default'] / c:.2f}) | "
                        f"{t['inplace']:.1f} ({t['inplace'] / c:.2f}) |")
                lines.append(line)
                rows.append(dict(dtype=dtype_name, n=n, vocab=vocab, k=k, **t))
                log(line)
    if args.out:
        Path(args.out).write_text(header + "\n\n" + "\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
