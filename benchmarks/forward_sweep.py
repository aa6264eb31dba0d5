#!/usr/bin/env python3
"""The Triton forward's time against k on a CUDA GPU, under ``triton.testing.do_bench``.

A second opinion beside ``bench_prsl.py``: forward only, L2 cleared between runs by
do_bench, every k on the same tensors in one process, so the ratios to k=0 (how flat the
forward is in k) are not disturbed by run-to-run drift. Prints one line per shape and dtype.
GPU only (the numbers mean nothing in the interpreter):

    python3 benchmarks/forward_sweep.py [--k 0 6 20 100]

Results on an H200: ``benchmarks/results/forward-do-bench-h200.txt``.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None, log=print):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, nargs="+", default=[0, 6, 20, 100])
    p.add_argument("--b", type=float, default=0.5)
    args = p.parse_args(argv)
    import torch
    from triton.testing import do_bench

    from prsl_kernels import triton_kernels

    if not torch.cuda.is_available():
        raise SystemExit("forward_sweep: needs a CUDA GPU")
    log(f"# {torch.cuda.get_device_name()}; forward ms (do_bench, warmup 10, rep 100); b = {args.b}")
    log("shape        dtype  " + "  ".join(f"k={k:<5d}" for k in args.k) + "  ratios to k=0")
    for n, v in ((8192, 50257), (4096, 128256)):
        for dtype in (torch.bfloat16, torch.float32):
            z = torch.randn(n, v, device="cuda", dtype=dtype)
            t = torch.randint(0, v, (n,), device="cuda")
            times = []
            for k in args.k:
                def run():
                    return triton_kernels.forward(z, t, k, args.b, -100)
                run()
                torch.cuda.synchronize()
                times.append(do_bench(run, warmup=10, rep=100))
            ratios = " ".join(f"{x / times[0]:.2f}" for x in times[1:])
            log(f"{n}x{v:<7d} {str(dtype)[6:]:5s}  " + "  ".join(f"{x:.4f} " for x in times) + f"  {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
