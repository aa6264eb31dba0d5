"""Ahead-of-time compile every Triton launch configuration of prsl_kernels for
sm_80 and sm_90 (no GPU needed), exactly as the runtime would build it, and
report registers, spills, shared memory and occupancy per kernel and per
specialisation variant.

    python3 benchmarks/aot_report.py            # print the table
    python3 benchmarks/aot_report.py --write    # ... and save benchmarks/results/aot_report.txt
    python3 benchmarks/aot_report.py --check    # exit 1 on a failed compile, > MAX_SPILL_INSTRUCTIONS spills,
                                                # or a WRITE_GRAD kernel whose target read is not ordered
    python3 benchmarks/aot_report.py --quick    # a cross-section only (the test suite's check)

Must run with TRITON_INTERPRET unset (the interpreter replaces triton.jit).

**Compiled as the runtime compiles.** At a launch, Triton's JIT specialises
every pointer whose address is a multiple of 16 bytes and every integer that
is a multiple of 16 with ``tt.divisibility=16``, turns integers equal to 1 into
constants, and types integers as i32 or i64 by value. Here the JIT's own
binder (``triton.runtime.jit.create_function_from_signature``, with the
target's backend) is run on stand-in arguments: pointers of the right dtype at
a 16-byte-aligned address (as every torch allocation is), and the integers a
launcher passes for a given row length. Its ``(signature, constexprs, attrs)``
go to ``triton.compile(ASTSource(...))``, so the binary is the one the runtime
would build for that launch. Two variants per configuration:

* ``V%16=0``: row stride a multiple of 16 elements (e.g. V = 50272, 128256):
  ``stride_row`` and ``V`` carry the divisibility hint, every row start is
  16-byte aligned, loads can be vectorised;
* ``V odd``: e.g. V = 50257 (GPT-2): no hint on the stride, row starts are not
  aligned, the compiler must assume element alignment only.

Configurations with ``ALIGNED=0`` (the two-pass forward on logits whose base is not
16-byte aligned, e.g. ``logits[1:]``) compile with the logits one element past a
16-byte boundary, so the pointer loses its hint as at such a launch; they compile in
the ``V odd`` variant only (a stride hint cannot realign a misaligned base).

Registers, stack and shared memory come from ``cuobjdump -res-usage`` on the
cubin; spills are the local-memory instructions (``STL``/``LDL``) in its SASS
(``cuobjdump -sass``); both tools ship with triton. Occupancy is computed from
registers, warps and shared memory with the limits of the architecture
(``OCCUPANCY_LIMITS``). "in place" (WRITE_GRAD kernels, which may write the gradient
over the logits): whether the Triton IR puts a barrier between the target logit's
read and the first gradient store (``target_read_ordered``). Compiled binaries are cached by Triton
(``~/.triton/cache``); the SASS summaries in ``$TMPDIR/prsl-aot-cache``.
"""

import argparse
import importlib.util
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path

ARCHS = (80, 90)
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "aot_report.txt"
CACHE_DIR = Path(os.environ.get("PRSL_AOT_CACHE", os.path.join(tempfile.gettempdir(), "prsl-aot-cache")))

# Row lengths that select each specialisation variant (stride_row == V, contiguous rows).
VARIANTS = {"V%16=0": 50272, "V odd": 50257}

# Per-SM limits (CUDA occupancy calculator): 64K 32-bit registers, allocated per
# warp in units of 256; shared memory per SM and the 1 KiB the driver reserves per CTA.
OCCUPANCY_LIMITS = {
    80: dict(regs=65536, reg_unit=256, max_warps=64, max_ctas=32, smem=167936, smem_per_cta_reserved=1024),
    90: dict(regs=65536, reg_unit=256, max_warps=64, max_ctas=32, smem=233472, smem_per_cta_reserved=1024),
}

_TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64", "i64": "int64",
                 "i32": "int32", "i8": "int8", "u8": "uint8", "i1": "bool", "u1": "bool"}


def tool(name):
    """Path of a CUDA binary tool shipped with triton (ptxas, cuobjdump, nvdisasm)."""
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def have_tools():
    return all(os.access(tool(name), os.X_OK) for name in ("ptxas", "cuobjdump"))


# ----------------------------------------------------------------------------
# Kernels of another revision (git history)
# ----------------------------------------------------------------------------

class KernelsUnavailable(RuntimeError):
    pass


@lru_cache(maxsize=None)
def kernels_at(commit):
    """The kernels and launch configurations of ``commit``'s triton_kernels.py, importable
    without registering anything (the launchers and registrations are cut off)."""
    try:
        source = subprocess.run(["git", "show", f"{commit}:prsl_kernels/triton_kernels.py"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise KernelsUnavailable(
            f"kernels of commit {commit} are read from git history, which this checkout lacks "
            f"({getattr(error, 'stderr', '') or error}); run from a full clone") from error
    cut = source.index("# Launchers (the kernel contract")
    source = source[:cut].replace("from . import ops\n", "").replace("from .", "from prsl_kernels.") \
        + _literal_constants(source[cut:])
    path = Path(tempfile.gettempdir()) / "prsl-aot-kernels" / f"kernels_{commit}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"# FROZEN COPY: prsl_kernels/triton_kernels.py at {commit}, kernels and configs only.\n" + source
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"prsl_kernels_at_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module



def _literal_constants(source):
    """The top-level ``NAME = <literal>`` lines of ``source``: constants that some commits define
    after the cut but use above it (413f114's ``_OPTION_ARGS``, read by ``aot_signature``)."""
    import ast

    lines = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
            try:
                ast.literal_eval(node.value)
            except ValueError:
                continue
            lines.append(ast.get_source_segment(source, node))
    return "\n# Literal constants from below the cut:\n" + "\n".join(lines) + "\n" if lines else ""


def kernels_module(rev=None):
    """``prsl_kernels.triton_kernels`` (rev None: the working tree) or its copy at ``rev``."""
    if rev is None:
        from prsl_kernels import triton_kernels
        return triton_kernels
    return kernels_at(rev)


# ----------------------------------------------------------------------------
# The runtime's specialisation
# ----------------------------------------------------------------------------

class _StandInTensor:
    """What the JIT binder reads from a tensor argument: its dtype and address."""

    def __init__(self, dtype, address):
        self.dtype = dtype
        self._address = address

    def data_ptr(self):
        return self._address


def representative_k(constexprs):
    """A k the launcher would pass for this configuration (k = 0 without top-k)."""
    if not constexprs.get("HAS_TOPK", True):
        return 0
    kp = constexprs.get("KP")
    if kp is None:
        return 20
    below = [k for k in (6, 20, 100, 500, 1000) if k < kp]
    return below[-1] if below else kp - 1


def int_argument(name, vocab, k, n_rows):
    """The value a launcher passes for an integer kernel argument (by name)."""
    if "stride" in name:
        return vocab  # contiguous rows
    known = {"V": vocab, "vocab": vocab, "k": k, "ignore_index": -100, "n_rows": n_rows, "N": n_rows}
    return known.get(name, 7)  # unknown: an ordinary value (not 1, not a multiple of 16)


def specialise(fn, args, constexprs, arch, options):
    """``(signature, constexprs, attrs)`` exactly as Triton's JIT derives them at a launch
    of ``fn`` with ``args`` (values or stand-ins, by parameter name) on sm_``arch``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    positional = [args[name] for name in fn.arg_names if name not in constexprs]
    bound, specialization, extra = binder(*positional, **constexprs, **options)
    _, sig, cexprs, attrs = fn._pack_args(backend, dict(constexprs, **options), bound, specialization, extra)
    return sig, cexprs, attrs


def stand_in_pointer(dtype_name, address=1 << 20):
    """A tensor argument as the binder sees it: ``dtype_name`` as in a signature ("bf16")."""
    import torch
    return _StandInTensor(getattr(torch, _TORCH_DTYPES[dtype_name]), address)


def runtime_specialisation(config, arch, vocab, k=None, n_rows=8192, base_offset=0, module=None):
    """``(fn, signature, constexprs, attrs, options)`` as Triton's JIT builds them at a launch.

    ``vocab``: row length and stride; ``base_offset``: bytes added to the logits'
    address (0: aligned, as every torch allocation); ``module``: where
    ``aot_signature`` comes from (default ``prsl_kernels.triton_kernels``).
    """
    if module is None:
        from prsl_kernels import triton_kernels as module

    fn, signature, constexprs = module.aot_signature(config)
    k = representative_k(constexprs) if k is None else k
    args = {}
    for name in fn.arg_names:
        ty = signature[name]
        if ty == "constexpr":
            continue
        if ty.startswith("*"):
            args[name] = stand_in_pointer(ty[1:], (1 << 20) + (base_offset if name.startswith("logits") else 0))
        elif ty.startswith(("fp", "bf")):
            args[name] = 0.5
        elif ty in ("i1", "u1"):
            args[name] = True
        else:
            args[name] = int_argument(name, vocab, k, n_rows)
    options = {"num_warps": config.num_warps}
    for option in ("num_stages", "num_ctas", "maxnreg"):
        if getattr(config, option, None) is not None:
            options[option] = getattr(config, option)
    sig, cexprs, attrs = specialise(fn, args, constexprs, arch, options)
    return fn, sig, cexprs, attrs, options


def compile_runtime(config, arch, vocab, k=None, base_offset=0, module=None):
    """The compiled kernel the runtime would build (``triton.compile`` result)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, sig, cexprs, attrs, options = runtime_specialisation(config, arch, vocab, k, base_offset=base_offset,
                                                             module=module)
    return triton.compile(ASTSource(fn, sig, cexprs, attrs), target=GPUTarget("cuda", arch, 32), options=options)


def hinted_args(config, arch, vocab, k=None):
    """Names of the arguments that carry a divisibility hint or became constants."""
    fn, sig, cexprs, attrs, _ = runtime_specialisation(config, arch, vocab, k)
    names = fn.arg_names
    hinted = [names[path[0]] for path, value in attrs.items() if value]
    declared = {p.name for p in fn.params if p.is_constexpr}  # constexpr parameters, set or defaulted
    ones = [names[path[0]] for path, value in cexprs.items() if sig[names[path[0]]] == "constexpr"
            and names[path[0]] not in declared]
    return hinted, ones


# ----------------------------------------------------------------------------
# SASS summaries
# ----------------------------------------------------------------------------

def sass_of(compiled):
    """``(sass text, cuobjdump -res-usage text)`` of a compiled kernel, cached by cubin hash."""
    cubin = compiled.asm["cubin"]
    key = hashlib.sha256(cubin).hexdigest()[:32]
    cached = CACHE_DIR / f"{key}.json"
    if cached.exists():
        data = json.loads(cached.read_text())
        return data["sass"], data["usage"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        Path(path).write_bytes(cubin)
        sass = subprocess.run([tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                               check=True).stdout
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp_path = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp_path.write_text(json.dumps({"sass": sass, "usage": usage}))
    os.replace(tmp_path, cached)
    return sass, usage


def load_bits(modifiers):
    """Bits per thread of an ``LDG`` with these opcode modifiers (``["E", "128", ...]``)."""
    bits = 32
    for mod in modifiers:
        if mod in ("64", "128"):
            bits = int(mod)
        elif mod in ("U16", "S16"):
            bits = 16
        elif mod in ("U8", "S8"):
            bits = 8
    return bits


def global_load_widths(sass):
    """``{bits: count}`` of the global loads (``LDG``) in a SASS listing."""
    widths = {}
    for line in sass.splitlines():
        m = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?LDG((?:\.[\w]+)*)\s", line)
        if m:
            bits = load_bits(m.group(1).split("."))
            widths[bits] = widths.get(bits, 0) + 1
    return widths


def loop_load_widths(sass):
    """``{bits: count}`` of the global loads inside loop bodies (address ranges closed by a
    backward branch; ``BRA.DIV`` fallbacks excluded); the whole kernel when it has no loop."""
    lines = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    ranges = []
    for addr, text in lines:
        m = re.search(r"\bBRA(?!\.DIV)\S*\s+(?:`\()?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:  # (the trailing self-branch is no loop)
            ranges.append((int(m.group(1), 16), addr))
    picked = "\n".join(f"/*{addr:04x}*/ {text};" for addr, text in lines
                       if not ranges or any(lo <= addr <= hi for lo, hi in ranges))
    return global_load_widths(picked)


TTIR_ELEM = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64"}


def target_read_ordered(ttir, elem, tile):
    """For a forward kernel with WRITE_GRAD (``ttir``: its Triton IR, ``elem``: the logits' IR
    type, e.g. "bf16", ``tile``: its gradient tile's width): whether a barrier separates the load
    of the target logit (the kernel's first scalar load of a logit) from the first store of a
    gradient tile, on every path (at the load's own nesting level). In place, another warp's
    gradient store could otherwise reach the target's column before warp 0 has read it. None
    when there is no such load."""
    lines = ttir.splitlines()
    scalar_load = re.compile(rf"= tt\.load %[\w.]+ : !tt\.ptr<{elem}>")
    tile_store = re.compile(rf"tt\.store .*: tensor<{tile}x!tt\.ptr<{elem}>>")
    first = next((i for i, line in enumerate(lines) if scalar_load.search(line)), None)
    if first is None:
        return None
    depth = len(lines[first]) - len(lines[first].lstrip())
    for line in lines[first + 1:]:
        if tile_store.search(line):
            return False
        if "gpu.barrier" in line and len(line) - len(line.lstrip()) <= depth:
            return True
    return False


def occupancy(regs, smem, num_warps, arch):
    """``(CTAs per SM, warps per SM, limiter)`` from registers and shared memory."""
    lim = OCCUPANCY_LIMITS[arch]
    regs_per_warp = math.ceil(max(regs, 1) * 32 / lim["reg_unit"]) * lim["reg_unit"]
    by_regs = (lim["regs"] // regs_per_warp) // num_warps
    by_warps = lim["max_warps"] // num_warps
    by_smem = lim["smem"] // (smem + lim["smem_per_cta_reserved"])
    ctas = min(by_regs, by_warps, by_smem, lim["max_ctas"])
    limiter = min((by_regs, "regs"), (by_warps, "warps"), (by_smem, "smem"), (lim["max_ctas"], "ctas"))[1]
    return ctas, ctas * num_warps, limiter


def resources(compiled, arch, num_warps):
    """Registers, spills, shared memory, occupancy and load widths of a compiled kernel."""
    sass, usage = sass_of(compiled)
    fields = dict(re.findall(r"(\w+):(\d+)", usage.split("Function", 1)[1]))
    regs = int(fields["REG"])
    smem = compiled.metadata.shared + int(fields["SHARED"])
    spill_st = len(re.findall(r"\bSTL(\.\w+)*\s", sass))
    spill_ld = len(re.findall(r"\bLDL(\.\w+)*\s", sass))
    ctas, warps, limiter = occupancy(regs, smem, num_warps, arch)
    return dict(regs=regs, stack=int(fields["STACK"]), local=int(fields["LOCAL"]), smem=smem,
                spill_stores=spill_st, spill_loads=spill_ld, ctas_per_sm=ctas, warps_per_sm=warps,
                occupancy_limiter=limiter, ldg_widths=global_load_widths(sass),
                loop_ldg_widths=loop_load_widths(sass))


# ----------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------

def unaligned_base(config):
    """Whether ``config`` is launched on a logits base that is not 16-byte aligned (ALIGNED off)."""
    return config.kernel == "forward" and config.constexprs.get("ALIGNED") is False


def base_offset(config):
    """Bytes past a 16-byte boundary of the logits at a launch of ``config``: one element when
    its base is unaligned, else 0."""
    if not unaligned_base(config):
        return 0
    import torch
    return torch.empty((), dtype=config.dtype).element_size()


def _compile_one(args):
    index, arch, variant, rev = args
    module = kernels_module(rev)
    config = module.launch_configs()[index]
    row = {"kernel": config.kernel, "dtype": str(config.dtype).replace("torch.", ""),
           "config": config_label(config),
           "warps": config.num_warps, "arch": f"sm_{arch}", "variant": variant}
    try:
        compiled = compile_runtime(config, arch, VARIANTS[variant], base_offset=base_offset(config), module=module)
        row.update(resources(compiled, arch, config.num_warps))
        if config.constexprs.get("WRITE_GRAD"):
            tile = config.constexprs.get("GRAD_TILE") or config.constexprs["BLOCK_V"]
            row["target_read_ordered"] = target_read_ordered(compiled.asm["ttir"], TTIR_ELEM[row["dtype"]], tile)
    except Exception as error:  # reported as a row, --check fails on it
        row.update(error=f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}")
    return row


# A cheap cross-section for the test suite: the largest register footprints of
# each kernel, and the exact kernel at the configuration the k=20 fallback uses
# (its loads show whether the stride hint reached the binary).
def _options_on(c):
    return any(c.constexprs.get(flag) for flag in ("SOFTCAP", "SMOOTH", "ZLOSS"))


# ... and the register caps' edge cases: the two-pass forward on an unaligned base (uncapped) and
# with the options on (capped higher), where a 64-register cap spilled.
QUICK = (("forward", "bfloat16", lambda c: c.constexprs.get("KP") == 128),
         ("forward", "float32", lambda c: c.constexprs.get("KP") == 128),
         ("forward", "bfloat16", lambda c: c.constexprs.get("KP") == 128 and c.constexprs.get("WRITE_GRAD")
          and unaligned_base(c)),
         ("forward", "float32", lambda c: c.constexprs.get("KP") == 128 and _options_on(c)
          and not c.constexprs.get("WRITE_GRAD")),
         ("forward", "bfloat16", lambda c: c.constexprs.get("KP") == 128 and _options_on(c)
          and c.constexprs.get("WRITE_GRAD")),
         ("forward_exact", "bfloat16", lambda c: c.constexprs.get("KP") == 32),
         ("forward_exact", "float64", lambda c: c.constexprs.get("KP") == 2048),
         ("backward", "bfloat16", lambda c: True))


def config_label(config):
    """The configuration as the table's ``config`` column writes it."""
    return (" ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in config.constexprs.items())
            + (f" maxnreg={config.maxnreg}" if getattr(config, "maxnreg", None) else ""))


def _selected(quick, rev=None, dtypes=None, grep=None):
    configs = kernels_module(rev).launch_configs()
    if not quick:
        return [i for i, c in enumerate(configs) if (not dtypes or str(c.dtype).replace("torch.", "") in dtypes)
                and (not grep or re.search(grep, f"{c.kernel} {c.dtype} {config_label(c)}"))]
    chosen = []
    for kernel, dtype, pick in QUICK:
        matches = [i for i, c in enumerate(configs)
                   if c.kernel == kernel and str(c.dtype).replace("torch.", "") == dtype and pick(c)]
        assert matches, f"QUICK: no {kernel} {dtype} configuration matches any more"
        chosen.append(matches[-1])  # the largest block of those
    return chosen


def collect(archs=ARCHS, jobs=None, quick=False, variants=tuple(VARIANTS), rev=None, dtypes=None, grep=None):
    configs = kernels_module(rev).launch_configs()
    work = [(i, arch, v, rev) for arch in archs for i in _selected(quick, rev, dtypes, grep) for v in variants
            if not (unaligned_base(configs[i]) and v != "V odd")]
    jobs = jobs or min(len(work), 2, os.cpu_count() or 1)
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_compile_one, work))


def _widths(widths):
    return " ".join(f"{bits}b x{n}" for bits, n in sorted(widths.items(), reverse=True)) or "-"


def format_table(rows):
    header = ("kernel", "dtype", "config", "warps", "variant", "arch", "regs", "spill st/ld", "stack",
              "smem (B)", "CTAs/SM", "warps/SM", "limit", "in place", "loads in loops", "all global loads")
    lines = []
    for r in rows:
        base = (r["kernel"], r["dtype"], r["config"], str(r["warps"]), r["variant"], r["arch"])
        if "error" in r:
            lines.append(base + ("FAILED", r["error"], "", "", "", "", "", "", "", ""))
            continue
        # WRITE_GRAD kernels: whether the target logit's read is ordered before the gradient stores.
        order = {None: "-", True: "ordered", False: "RACE"}[r.get("target_read_ordered")]
        lines.append(base + (str(r["regs"]), f"{r['spill_stores']}/{r['spill_loads']}", str(r["stack"] + r["local"]),
                             str(r["smem"]), str(r["ctas_per_sm"]), str(r["warps_per_sm"]), r["occupancy_limiter"],
                             order, _widths(r["loop_ldg_widths"]), _widths(r["ldg_widths"])))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line).rstrip() for line in lines]
    return "\n".join(out)


# A few spill instructions are tolerated: ptxas spills a handful of registers in the
# two-pass forward's per-row code after pass 1 (the candidate gather and the
# warp-collective top-k, a few iterations per row; 16-bit logits, sm_80 and sm_90),
# never in pass 1's streaming loop (its SASS has no local access): a few local
# accesses per row of thousands of logits. More than that is register pressure and
# fails --check.
MAX_SPILL_INSTRUCTIONS = 8


def problems(rows):
    bad = []
    for r in rows:
        name = f"{r['kernel']} {r['dtype']} {r['config']} {r['arch']} {r['variant']}"
        if "error" in r:
            bad.append(f"{name}: {r['error']}")
        elif max(r["spill_stores"], r["spill_loads"]) > MAX_SPILL_INSTRUCTIONS or r["local"]:
            bad.append(f"{name}: spills {r['spill_stores']} STL / {r['spill_loads']} LDL, local {r['local']} B")
        elif r.get("target_read_ordered") is False:
            bad.append(f"{name}: no barrier between the target logit's read and the gradient stores (in place, "
                       "another warp may overwrite the target before it is read)")
    return bad


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"save the table to {RESULTS}")
    parser.add_argument("--check", action="store_true", help="exit 1 on a failed compile, more than "
                        "MAX_SPILL_INSTRUCTIONS spill instructions or an unordered in-place target read")
    parser.add_argument("--arch", type=int, action="append", help="compute capability (default: 80 and 90)")
    parser.add_argument("--variant", action="append", choices=list(VARIANTS), help="default: both")
    parser.add_argument("--quick", action="store_true", help="only a cross-section of the configurations")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: 2)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    parser.add_argument("--dtype", action="append", help="only these logits dtypes (e.g. bfloat16; default: all)")
    parser.add_argument("--grep", default=None, help="only configurations whose 'kernel dtype config' matches "
                        "this regex (e.g. 'ALIGNED=0|SOFTCAP=1')")
    parser.add_argument("--rev", default=None, help="compile the kernels of this git revision (default: the working tree)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("aot_report.py: unset TRITON_INTERPRET (the interpreter cannot compile)")
    import triton

    rev = None
    if args.rev:
        rev = subprocess.run(["git", "rev-parse", "--short", args.rev], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
    rows = collect(tuple(args.arch or ARCHS), args.jobs, args.quick, tuple(args.variant or VARIANTS), rev, args.dtype,
                   args.grep)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        table = format_table(rows)
        source = f"commit {rev}" if rev else "the working tree"
        which = "every configuration" if not args.dtype else f"the {'/'.join(args.dtype)} configurations"
        if args.grep:
            which += f" matching /{args.grep}/"
        title = (f"# prsl_kernels Triton AOT report: triton {triton.__version__}, {len(rows)} compiles: "
                 f"{which} of triton_kernels.launch_configs() ({source}), as the runtime specialises it\n"
                 "# variants: V%16=0 = row stride a multiple of 16 (e.g. 50272: divisibility hints, aligned rows); "
                 "V odd = e.g. 50257 (no hint); ALIGNED=0 rows: logits base one element past 16 bytes, V odd only\n"
                 "# regs/stack from cuobjdump -res-usage; spills = STL/LDL instructions in the SASS; smem = dynamic "
                 "+ static bytes;\n# CTAs/SM and warps/SM from registers (256-register warp units), warps and smem "
                 "(sm_80: 164 KiB, sm_90: 228 KiB per SM, 1 KiB reserved per CTA)\n")
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
