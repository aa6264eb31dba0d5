#!/usr/bin/env python3
"""Benchmark of vocab-parallel PRSL: logits sharded over the vocabulary (tensor parallelism), against
gathering the full logits on every rank first.

Methods (one forward + backward, ``reduction="mean"``, the gradient of the sharded logits):
  vocab_parallel  prsl_loss(logits, target, k, b), logits a Shard(-1) DTensor: per row an all-gather
                  of k + 1 numbers and an all-reduce of 7 per rank (prsl_kernels/vocab_parallel.py)
  gather          prsl_loss(logits.full_tensor(), target, k, b): an all-gather of the N x V logits,
                  then the fused kernel (C++ on CPU, Triton on CUDA) on all of them, on every rank

Bytes: what one rank receives over the group per step, counted from the collectives each method
actually issues (ring algorithms: an all-gather of an ``X``-byte result receives ``X (W-1)/W``, an
all-reduce of ``X`` bytes ``2 X (W-1)/W``). Time: per rep, every rank's wall time of the step
(barriers around it), the slowest rank's; the median over ``--reps`` after ``--warmup``; the
methods of a case alternate within each rep, so a change of load hits both alike. On a CPU the
ranks share the machine's cores (``--threads`` each): the times are what that gives, not what
W GPUs would.

    python3 benchmarks/bench_vocab_parallel.py                  # 2 and 4 gloo ranks, CPU defaults
    python3 benchmarks/bench_vocab_parallel.py --worlds 2 --shapes 64x4096 --k 20 --reps 2

Results: a table on stdout, benchmarks/results/vocab-parallel-<device>.csv (+ .txt).
"""

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_prsl as bp  # noqa: E402  (package import, device names)

bp.import_package()
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

FIELDS = ["device", "world", "threads_per_rank", "method", "N", "V", "dtype", "k", "b", "reps", "ms_median",
          "ms_min", "x_gather_time", "bytes_received_per_rank", "x_gather_bytes", "collectives", "loss", "torch"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


class CollectiveBytes:
    """Counts what this rank receives: ``dist`` calls (the vocab-parallel path) by wrapping them, and
    DTensor's functional collectives (``full_tensor``) through a dispatch mode."""

    def __init__(self, world):
        self.world, self.bytes, self.calls = world, 0, 0

    def _count(self, kind, nbytes):
        share = (self.world - 1) / self.world
        self.bytes += int(nbytes * share * (2 if kind == "all_reduce" else 1))
        self.calls += 1

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        self._saved = dist.all_gather_into_tensor, dist.all_reduce

        def all_gather(out, inp, *args, **kwargs):
            counter._count("all_gather", out.numel() * out.element_size())
            return counter._saved[0](out, inp, *args, **kwargs)

        def all_reduce(t, *args, **kwargs):
            counter._count("all_reduce", t.numel() * t.element_size())
            return counter._saved[1](t, *args, **kwargs)

        class Functional(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                name = func.name()
                if name.startswith("_c10d_functional::all_gather"):
                    counter._count("all_gather", out.numel() * out.element_size())
                elif name.startswith("_c10d_functional::all_reduce"):
                    counter._count("all_reduce", out.numel() * out.element_size())
                elif any(verb in name for verb in ("reduce_scatter", "all_to_all", "broadcast")):
                    raise NotImplementedError(f"count the bytes of {name}")
                return out

        dist.all_gather_into_tensor, dist.all_reduce = all_gather, all_reduce
        self._mode = Functional()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        dist.all_gather_into_tensor, dist.all_reduce = self._saved


def run_method(method, logits, target, k, b):
    from prsl_kernels import prsl_loss

    logits.grad = None
    if method == "vocab_parallel":
        loss = prsl_loss(logits, target, k, b)
    else:
        loss = prsl_loss(logits.full_tensor(), target, k, b)
    loss.backward()
    return loss


def worker(args):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo")
    torch.set_num_threads(args.threads)
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    for shape in args.shapes.split(","):
        n, vocab = map(int, shape.split("x"))
        for dtype_name in args.dtypes.split(","):
            for k in map(int, args.k.split(",")):
                g = torch.Generator().manual_seed(0)
                z = (torch.randn(n, vocab, generator=g) * 2).to(DTYPES[dtype_name])
                target = torch.randint(0, vocab, (n,), generator=g)
                logits = distribute_tensor(z, mesh, [Shard(-1)]).requires_grad_()
                times = {m: [] for m in ("vocab_parallel", "gather")}
                counted, losses = {}, {}
                for m in times:  # one counted step each (also a warm-up)
                    with CollectiveBytes(world) as c:
                        loss = run_method(m, logits, target, k, args.b)
                    counted[m], losses[m] = (c.bytes, c.calls), float(loss.to_local() if hasattr(loss, "to_local")
                                                                      else loss)
                for rep in range(args.warmup + args.reps):
                    for m in times:
                        dist.barrier()
                        start = time.perf_counter()
                        run_method(m, logits, target, k, args.b)
                        dist.barrier()
                        elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
                        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                        if rep >= args.warmup:
                            times[m].append(elapsed.item() * 1e3)
                if rank == 0:
                    for m in times:
                        print("ROW " + json.dumps({
                            "world": world, "threads_per_rank": args.threads, "method": m, "N": n, "V": vocab,
                            "dtype": dtype_name, "k": k, "b": args.b, "reps": args.reps,
                            "ms_median": statistics.median(times[m]), "ms_min": min(times[m]),
                            "bytes_received_per_rank": counted[m][0], "collectives": counted[m][1],
                            "loss": losses[m]}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def launch(args):
    rows = []
    for world in map(int, args.worlds.split(",")):
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--standalone",
               __file__, "--worker", "--shapes", args.shapes, "--k", args.k, "--dtypes", args.dtypes,
               "--b", str(args.b), "--reps", str(args.reps), "--warmup", str(args.warmup),
               "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(proc.stdout[-2000:] + proc.stderr[-4000:])
        rows += [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    device = bp.device_name(torch.device("cpu"))
    by_case = {}
    for row in rows:
        by_case.setdefault((row["world"], row["N"], row["V"], row["dtype"], row["k"]), {})[row["method"]] = row
    for row in rows:
        base = by_case[(row["world"], row["N"], row["V"], row["dtype"], row["k"])]["gather"]
        row.update(device=device, torch=torch.__version__,
                   x_gather_time=round(row["ms_median"] / base["ms_median"], 3),
                   x_gather_bytes=round(row["bytes_received_per_rank"] / max(1, base["bytes_received_per_rank"]), 5))
        row["ms_median"], row["ms_min"] = round(row["ms_median"], 2), round(row["ms_min"], 2)
    header = f"{'W':>2} {'N':>6} {'V':>7} {'dtype':>5} {'k':>3} {'method':>15} {'ms':>9} {'x time':>7} " \
             f"{'KiB recv/rank':>14} {'x bytes':>8} {'colls':>5}"
    lines = [f"vocab-parallel PRSL vs gathering the logits, {device}, gloo, {args.threads} thread(s) per rank, "
             f"torch {torch.__version__}", header]
    for r in rows:
        lines.append(f"{r['world']:>2} {r['N']:>6} {r['V']:>7} {r['dtype']:>5} {r['k']:>3} {r['method']:>15} "
                     f"{r['ms_median']:>9.2f} {r['x_gather_time']:>7.3f} "
                     f"{r['bytes_received_per_rank'] / 1024:>14.1f} {r['x_gather_bytes']:>8.4f} {r['collectives']:>5}")
    print("\n".join(lines))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"vocab-parallel-cpu-{bp.slug(device)}"
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({key: r.get(key) for key in FIELDS} for r in rows)
    Path(f"{stem}.txt").write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--shapes", default="512x32768", help="NxV, comma-separated")
    parser.add_argument("--k", default="20")
    parser.add_argument("--b", type=float, default=0.5)
    parser.add_argument("--dtypes", default="fp32")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--out-dir", default=str(HERE / "results"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    worker(args) if args.worker else launch(args)


if __name__ == "__main__":
    main()
