"""Ahead-of-time compile every Triton launch configuration of prsl_kernels for
sm_80 and sm_90 (no GPU needed) and report registers, spills, shared memory and
stack per kernel.

    python3 benchmarks/aot_report.py            # print the table
    python3 benchmarks/aot_report.py --write    # ... and save benchmarks/results/aot_report.txt
    python3 benchmarks/aot_report.py --check    # exit 1 on a failed compile or any spill
    python3 benchmarks/aot_report.py --quick    # a cross-section only (the test suite's check)

Must run with TRITON_INTERPRET unset (the interpreter replaces triton.jit).
Registers / stack / local memory come from ``cuobjdump -res-usage`` on the cubin,
spill bytes from ``ptxas -v`` on the same PTX (both ship with triton).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ARCHS = (80, 90)
RESULTS = Path(__file__).resolve().parent / "results" / "aot_report.txt"


def _tool(name):
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _compile_one(args):
    index, arch = args
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from prsl_kernels import triton_kernels

    config = triton_kernels.launch_configs()[index]
    fn, signature, constexprs = triton_kernels.aot_signature(config)
    row = {"kernel": config.kernel, "dtype": str(config.dtype).replace("torch.", ""),
           "config": " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in constexprs.items()),
           "warps": config.num_warps, "arch": f"sm_{arch}"}
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": config.num_warps})
    except Exception as error:  # reported as a row, --check fails on it
        row.update(error=f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
        return row
    row["smem"] = compiled.metadata.shared
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        ptx = os.path.join(tmp, "kernel.ptx")
        Path(cubin).write_bytes(compiled.asm["cubin"])
        Path(ptx).write_text(compiled.asm["ptx"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
        ptx_arch = re.search(r"^\.target\s+(\S+)", compiled.asm["ptx"], re.M).group(1)
        verbose = subprocess.run([_tool("ptxas"), f"-arch={ptx_arch}", "-v", ptx, "-o", os.path.join(tmp, "v.o")],
                                 capture_output=True, text=True, check=True).stderr
    fields = dict(re.findall(r"(\w+):(\d+)", usage.split("Function", 1)[1]))
    row.update(regs=int(fields["REG"]), stack=int(fields["STACK"]), local=int(fields["LOCAL"]),
               static_smem=int(fields["SHARED"]))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", verbose)
    row.update(spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)))
    return row


# A cheap cross-section for the test suite: the largest register footprints per
# dtype family and both kernels (the full set takes minutes per arch).
QUICK = (("forward", "float16", {"HAS_TOPK": True, "KP": 512, "BLOCK_V": 2048}),
         ("forward", "bfloat16", {"HAS_TOPK": True, "KP": 2048, "BLOCK_V": 1024}),
         ("forward", "float32", {"HAS_TOPK": True, "KP": 8, "BLOCK_V": 2048}),
         ("backward", "float32", {"BLOCK_V": 2048}))


def _selected(quick):
    from prsl_kernels import triton_kernels

    configs = triton_kernels.launch_configs()
    if not quick:
        return list(range(len(configs)))
    chosen = [i for i, c in enumerate(configs)
              if (c.kernel, str(c.dtype).replace("torch.", ""), c.constexprs) in QUICK]
    assert len(chosen) == len(QUICK), "QUICK lists a configuration launch_configs() no longer has"
    return chosen


def collect(archs=ARCHS, jobs=None, quick=False):
    work = [(i, arch) for arch in archs for i in _selected(quick)]
    jobs = jobs or min(len(work), os.cpu_count() or 1)
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_compile_one, work))


def format_table(rows):
    header = ("kernel", "dtype", "config", "warps", "arch", "regs", "spill st/ld (B)", "smem (B)", "stack (B)")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append((r["kernel"], r["dtype"], r["config"], str(r["warps"]), r["arch"], "FAILED", r["error"],
                          "", ""))
            continue
        lines.append((r["kernel"], r["dtype"], r["config"], str(r["warps"]), r["arch"], str(r["regs"]),
                      f"{r['spill_stores']}/{r['spill_loads']}", str(r["smem"] + r["static_smem"]),
                      str(r["stack"] + r["local"])))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def problems(rows):
    bad = []
    for r in rows:
        name = f"{r['kernel']} {r['dtype']} {r['config']} {r['arch']}"
        if "error" in r:
            bad.append(f"{name}: {r['error']}")
        elif r["spill_stores"] or r["spill_loads"] or r["local"]:
            bad.append(f"{name}: spills {r['spill_stores']}/{r['spill_loads']} B, local {r['local']} B")
    return bad


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"save the table to {RESULTS}")
    parser.add_argument("--check", action="store_true", help="exit 1 on a failed compile or any spill")
    parser.add_argument("--arch", type=int, action="append", help="compute capability (default: 80 and 90)")
    parser.add_argument("--quick", action="store_true", help="only a cross-section of the configurations")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("aot_report.py: unset TRITON_INTERPRET (the interpreter cannot compile)")
    import triton

    rows = collect(tuple(args.arch or ARCHS), args.jobs, args.quick)
    table = format_table(rows)
    title = (f"# prsl_kernels Triton AOT report: triton {triton.__version__}, {len(rows)} compiles, "
             "every configuration of triton_kernels.launch_configs()\n"
             "# regs / spill bytes / stack from cuobjdump -res-usage and ptxas -v; smem = dynamic + static bytes\n")
    print(title + table)
    if args.write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(title + table + "\n")
    bad = problems(rows)
    if bad:
        print("\nPROBLEMS:\n" + "\n".join(bad), file=sys.stderr)
        if args.check:
            sys.exit(1)


if __name__ == "__main__":
    main()
