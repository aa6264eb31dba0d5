"""A static cost model of the Triton kernels, from their SASS: runs on a CPU.

    python3 benchmarks/static_cost.py                 # the table (H100, A100, H200), before and after
    python3 benchmarks/static_cost.py --json          # one JSON object per (gpu, dtype, N, V, k)
    python3 benchmarks/static_cost.py --check         # exit 1 when a kernel misses its target time
    python3 benchmarks/static_cost.py --write         # ... and save results/static_cost.{txt,json}

EVERY TIME IT PRINTS IS A MODEL PREDICTION, NOT A MEASUREMENT (except the
columns labelled "measured", which were timed on an H200).

How it works
------------
1. Compile each kernel a launch would run, as the runtime specialises it
   (``aot_report.compile_runtime``: Triton's own JIT binder decides the
   divisibility hints), for sm_90 (H100, H200) and sm_80 (A100).
2. Read the SASS (``cuobjdump -sass``), build the control-flow graph, find the
   loops (back edges), and count instructions per thread on each path: in each
   loop body per iteration, and in the straight-line code outside the loops.
   Instructions are classed as global/shared memory, MUFU (ex2, lg2, rcp, ...),
   BAR (CTA barriers), SHFL and other ALU. Every thread of a warp issues the
   same instruction stream, so a per-thread count is a count of warp-instructions
   per warp; times the warps of a CTA it is the CTA's issue cost.
3. Weight the paths by frequencies measured by running the kernel's own
   selection logic (in torch, on the CPU) on realistic rows:
   ``normal``: i.i.d. N(0, 1) * 2 logits and uniform targets, as
   ``bench_prsl.py`` uses; ``peaked``: a Zipf-like row (log-probabilities
   -1.1 ln rank + N(0, 0.3^2), ranks shuffled over the vocabulary, target drawn
   from the softmax); ``peaked-ordered``: the same with ranks following the
   token id (plus noise of V/20), as BPE vocabularies put frequent tokens first,
   so the large logits gather at the row's start. The frequencies depend on
   where the large values sit, hardly on how large they are, so ``peaked``
   with shuffled ranks behaves like ``normal``. The repository's tiny captioner was not used: its
   vocabulary has 512 entries (byte-level BPE of the synthetic captions), so its
   rows cannot stand in for 50257- or 128256-wide rows, whose selection
   statistics (tiles, groups, candidates) depend on V.
4. Per shape, per GPU: warp-instructions W, MUFU warp-instructions M, bytes B
   moved to or from HBM, and

       predicted = max(W / (SMs * 4 * clock),                  issue bound
                       32 M / (SMs * 16 * clock),              MUFU bound
                       B / bandwidth)                          memory bound

   per kernel launch, plus LAUNCH_US per launch. The forward and the backward
   are separate launches; the forward's total is the sum of its launches.
5. A second figure, ``latency_aware_ms_*``, replaces the issue bound by a
   latency bound: per work unit (a row of the forward, a CTA of the backward)
   each phase (a loop iteration, the straight-line code) takes the longer of
   one warp's in-order schedule of its SASS path (register dependencies, the
   assumed latencies of ``LATENCY``; a barrier waits for every result) and its
   share of the SM's issue slots with every resident warp issuing; units run in
   waves of CTAs-per-SM x SMs. It sees what the first figure cannot: few
   resident warps that each wait for DRAM and for CTA-wide reductions.

What the model cannot see: queueing in DRAM and L2 beyond the fixed latencies,
dual issue and pipe conflicts (every instruction is one issue slot), shared-
memory bank conflicts, atomics contention, cache misses beyond the L2-capacity
estimate of pass 2, clocks below boost, overlap of one CTA's phases with
another's in the latency figure (each phase is bounded on its own). See the
closing table of the output for its error against H200 measurements.

The "before" kernels are the forward and backward of commit f0cce8d (one
program per row, a register top-KP buffer merged block by block); their
source is read from git history at run time (``git show``) rather than copied
into the tree, so the package holds one copy of each kernel and the baseline
cannot drift. Without git history the "before" columns are left out
(``--no-before``) and a clear error says why.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
from collections import Counter
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import aot_report  # noqa: E402

RESULTS = HERE / "results"
BASELINE_COMMIT = "f0cce8d"
LAUNCH_US = 2.0  # fixed cost per kernel launch on a busy stream (model constant)

GPUS = {
    # SMs, boost clock (Hz), warp-instructions issued per clock per SM, MUFU lanes per clock per SM,
    # HBM bandwidth (B/s), L2 bytes, compute capability
    "H100": dict(sms=132, clock=1.755e9, issue=4, mufu_lanes=16, bandwidth=3.35e12, l2=50 << 20, arch=90),
    "A100": dict(sms=108, clock=1.41e9, issue=4, mufu_lanes=16, bandwidth=2.04e12, l2=40 << 20, arch=80),
    "H200": dict(sms=132, clock=1.98e9, issue=4, mufu_lanes=16, bandwidth=4.8e12, l2=50 << 20, arch=90),
}
DEFAULT_SHAPES = ((8192, 50257), (4096, 128256))
DEFAULT_DTYPES = ("bf16", "fp32")
DEFAULT_KS = (0, 6, 20, 100)
DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}

# Targets (--check): N=8192, V=50257, bf16, H100, forward + backward: k=20 under 1 ms, k=100 under
# 1.3 ms, and k=100 at most 1.5x k=0, so that the top-k selection stays cheap beside the softmax.
CHECK_SHAPE = dict(gpu="H100", dtype="bf16", N=8192, V=50257)
CHECK_LIMITS_MS = {20: 1.0, 100: 1.3}
CHECK_RATIO_TO_K0 = 1.5

# Measured on an NVIDIA H200 (bench_prsl.py, median ms): the OLD kernels (f0cce8d) and the
# kernels of the run that wrote the second file. Shown beside the model, labelled MEASURED.
MEASURED_BEFORE_CSV = RESULTS / "baseline-h200" / "bench-before.csv"
MEASURED_AFTER_CSV = RESULTS / "cuda-nvidia-h200.csv"


def read_measured(path):
    """``{(backend, dtype, N, V, k or None): (fwd_ms, bwd_ms)}`` from a bench_prsl.py CSV ({} if absent),
    and the copy bandwidth it measured (GB/s)."""
    import csv
    out, bandwidth = {}, None
    if not Path(path).exists():
        return out, bandwidth
    with open(path) as f:
        for r in csv.DictReader(f):
            if r.get("status") != "ok":
                continue
            k = int(r["k"]) if r.get("k") else None
            out[(r["backend"], r["dtype"], int(r["N"]), int(r["V"]), k)] = (float(r["fwd_ms"]), float(r["bwd_ms"]))
            bandwidth = float(r["bandwidth_GBps"]) if r.get("bandwidth_GBps") else bandwidth
    return out, bandwidth


# ----------------------------------------------------------------------------
# SASS: instructions, control-flow graph, loops, paths
# ----------------------------------------------------------------------------

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PRED = re.compile(r"^(@!?U?P(?:T|\d+))\s+(.*)$")
CLASSES = ("global", "shared", "local", "mufu", "bar", "shfl", "alu")
_GLOBAL = {"LDG", "STG", "LD", "ST", "ATOMG", "ATOM", "RED", "REDG", "LDGSTS"}
_SHARED = {"LDS", "STS", "ATOMS", "LDSM", "STSM"}
_LOCAL = {"LDL", "STL"}
_ATOMIC = {"ATOMG", "ATOM", "RED", "REDG"}


class Instr:
    __slots__ = ("addr", "pred", "op", "text")

    def __init__(self, addr, pred, op, text):
        self.addr, self.pred, self.op, self.text = addr, pred, op, text

    @property
    def base(self):
        return self.op.split(".")[0]

    @property
    def cls(self):
        base = self.base
        if base in _GLOBAL:
            return "global"
        if base in _SHARED:
            return "shared"
        if base in _LOCAL:
            return "local"
        if base == "MUFU":
            return "mufu"
        if base == "BAR":
            return "bar"
        if base == "SHFL":
            return "shfl"
        return "alu"

    def load_bytes(self):
        """Bytes per thread of a global load (0 for anything else)."""
        if self.base != "LDG":
            return 0
        return aot_report.load_bits(self.op.split(".")[1:]) // 8


def parse_sass(sass):
    """The instructions of the first function in a ``cuobjdump -sass`` listing."""
    instrs = []
    for line in sass.split("Function :", 2)[1].splitlines():
        m = _LINE.search(line)
        if not m:
            continue
        text = m.group(2).strip()
        pred = None
        p = _PRED.match(text)
        if p:
            pred, text = p.group(1), p.group(2)
        op = text.split()[0]
        instrs.append(Instr(int(m.group(1), 16), pred, op, text))
    return instrs


class Block:
    def __init__(self, start):
        self.start = start
        self.instrs = []
        self.succs = []

    def counts(self):
        c = Counter(i.cls for i in self.instrs)
        c["total"] = len(self.instrs)
        return c

    def has(self, names):
        return any(i.base in names for i in self.instrs)


def _branch_target(instr):
    m = re.findall(r"0x([0-9a-f]+)", instr.text)
    return int(m[-1], 16) if m else None


def _is_jump_call(instr):
    # sm_80 ptxas leaves loops with CALL.REL.NOINC (a jump that pushes no return address).
    return instr.op.startswith("CALL.REL.NOINC")


class Cfg:
    """Basic blocks reachable from the entry, their loops, and path costs."""

    def __init__(self, instrs):
        self.instrs = instrs
        leaders = {instrs[0].addr}
        for n, ins in enumerate(instrs):
            if ins.base in ("BRA", "EXIT", "RET", "BRX", "JMP", "JMX") or _is_jump_call(ins):
                if ins.base == "BRA" or _is_jump_call(ins):
                    leaders.add(_branch_target(ins))
                if n + 1 < len(instrs):
                    leaders.add(instrs[n + 1].addr)
        blocks, current = {}, None
        for ins in instrs:
            if ins.addr in leaders:
                current = blocks[ins.addr] = Block(ins.addr)
            current.instrs.append(ins)
        starts = sorted(blocks)
        for n, start in enumerate(starts):
            block = blocks[start]
            last = block.instrs[-1]
            fall = starts[n + 1] if n + 1 < len(starts) else None
            if last.op.startswith("BRA.DIV"):
                # The divergent fallback of warp-synchronous code (shuffles, votes): taken only
                # by a diverged warp, which these kernels never are there. Not followed.
                if fall is not None:
                    block.succs.append(fall)
            elif last.base == "BRA" or _is_jump_call(last):
                # BRA.CONV (taken when the warp is converged, as here) counts as a plain branch.
                block.succs.append(_branch_target(last))
                if last.pred is not None and last.pred != "@PT" and fall is not None:
                    block.succs.append(fall)
            elif last.base in ("EXIT", "RET"):
                if last.pred is not None and fall is not None:
                    block.succs.append(fall)
            elif fall is not None:
                block.succs.append(fall)
        # Keep what the entry reaches (drops the trailing self-branch and padding).
        seen, stack = set(), [instrs[0].addr]
        while stack:
            b = stack.pop()
            if b in seen or b not in blocks:
                continue
            seen.add(b)
            stack.extend(blocks[b].succs)
        self.blocks = {s: blocks[s] for s in sorted(seen)}
        for block in self.blocks.values():
            block.succs = [s for s in block.succs if s in self.blocks]
        self.preds = {s: [] for s in self.blocks}
        for s, block in self.blocks.items():
            for t in block.succs:
                self.preds[t].append(s)
        self.entry = instrs[0].addr
        self.loops = self._find_loops()

    def _find_loops(self):
        """Natural loops by header, outermost first in address order: ``{header: set of blocks}``."""
        loops = {}
        for s, block in self.blocks.items():
            for t in block.succs:
                if t <= s:  # back edge s -> t
                    body, stack = {t}, [s]
                    while stack:
                        b = stack.pop()
                        if b not in body:
                            body.add(b)
                            stack.extend(self.preds[b])
                    loops.setdefault(t, set()).update(body)
        return dict(sorted(loops.items()))

    def top_level_loops(self):
        out = []
        for header, body in self.loops.items():
            if not any(header != h and body < other for h, other in self.loops.items()):
                out.append((header, body))
        return out

    def latches(self, header):
        body = self.loops[header]
        return [s for s in body if header in self.blocks[s].succs]

    # Longest / shortest paths over a DAG (back edges dropped; address order is a
    # topological order in ptxas's layout). A weight function gives a Counter per
    # node; "total" orders the paths.
    @staticmethod
    def _dag_best(nodes, succ, weight, sources, sinks, longest):
        sign = 1 if longest else -1
        best = {s: (weight(s), (s,)) for s in sources if s in nodes}
        result = None
        for n in sorted(nodes):
            if n not in best:
                continue
            w_n, p_n = best[n]
            if n in sinks and (result is None or sign * w_n["total"] > sign * result[0]["total"]):
                result = (w_n, p_n)
            for t in succ(n):
                if t in nodes and t > n:
                    w_t = w_n + weight(t)
                    if t not in best or sign * w_t["total"] > sign * best[t][0]["total"]:
                        best[t] = (w_t, p_n + (t,))
        if result is None:
            return None
        counts = PathCounts(result[0])
        counts.path = list(result[1])
        return counts

    def _weight(self, weight):
        return weight or (lambda b: self.blocks[b].counts())

    def loop_path(self, header, weight=None, longest=True, through=None, avoid=()):
        """Counts of one iteration, header to a latch (inner loops crossed once); ``through``:
        the path must visit one of these blocks; ``avoid``: it must visit none. ``.path``:
        its blocks."""
        weight = self._weight(weight)
        nodes = {b for b in self.loops[header] if b not in avoid}
        latches = set(self.latches(header))

        def succ(b):
            return self.blocks[b].succs

        if through is None:
            return self._dag_best(nodes, succ, weight, {header}, latches, longest)
        best = None
        for x in through:
            if x not in nodes:
                continue
            head = self._dag_best(nodes, succ, weight, {header}, {x}, longest)
            tail = self._dag_best(nodes, succ, weight, {x}, latches, longest)
            if head is None or tail is None:
                continue
            total = PathCounts(head + tail)
            total.subtract(weight(x))
            total.path = head.path + tail.path[1:]
            if best is None or (total["total"] > best["total"]) == longest:
                best = total
        return best

    def outer_path(self, weight=None, longest=True, through_loops=(), avoid_loops=()):
        """Counts of the code outside the top-level loops on one path from the entry to an
        exit that crosses every loop of ``through_loops`` and none of ``avoid_loops``; the
        loops themselves weigh nothing here (their iterations are counted apart). ``.path``:
        its blocks outside the loops."""
        weight = self._weight(weight)
        node_of = {b: b for b in self.blocks}
        bodies = dict(self.top_level_loops())
        for header, body in bodies.items():
            for b in body:
                node_of[b] = header
        succs = {}
        for b, block in self.blocks.items():
            n = node_of[b]
            succs.setdefault(n, set()).update(node_of[t] for t in block.succs if node_of[t] != n)
        nodes = set(succs) - set(avoid_loops)
        # Exits: blocks without successors, and loops that leave the kernel from inside (EXIT).
        exits = {b for b in nodes if b not in bodies and not self.blocks[b].succs}
        exits |= {h for h in nodes if h in bodies
                  and any(i.base == "EXIT" for b in bodies[h] for i in self.blocks[b].instrs)}

        def w(n):
            return Counter() if n in bodies else weight(n)

        def succ(n):
            return succs[n]

        total, path, sources = PathCounts(), [], {self.entry}
        for header in sorted(through_loops):
            part = self._dag_best(nodes, succ, w, sources, {header}, longest)
            if part is None:
                return None
            total += part
            path += part.path
            sources = {header}
        part = self._dag_best(nodes, succ, w, sources, exits, longest)
        if part is None:
            return None
        total = PathCounts(total + part)
        total.path = [b for b in path + part.path if b not in bodies]
        return total


class PathCounts(Counter):
    """Instruction counts of a path, by class, with its blocks in ``.path``."""
    path = ()


# ----------------------------------------------------------------------------
# Latency: one warp's in-order schedule of a path
# ----------------------------------------------------------------------------

# Dependent-issue latencies in cycles (sm_80 / sm_90 microbenchmarks, rounded). They are
# model assumptions: DRAM is the loaded latency of a streaming kernel, not the idle one.
LATENCY = dict(alu=5, xu=14, mufu=18, shfl=24, shared=30, s2r=20, bar=20, l2=300, dram=900)
_XU = {"F2F", "I2F", "F2I", "FRND", "F2FP"}
_REG = re.compile(r"\b(U?R\d+|U?P\d|RZ|URZ|PT|UPT)(?:\.(64|128))?\b")


def _regs(operand):
    out = []
    for m in _REG.finditer(operand):
        name, width = m.group(1), m.group(2)
        if name in ("RZ", "URZ", "PT", "UPT"):
            continue
        if width and name.lstrip("U").startswith("R"):
            base = int(re.sub(r"\D", "", name))
            prefix = "UR" if name.startswith("U") else "R"
            out += [f"{prefix}{base + i}" for i in range(int(width) // 32)]
        else:
            out.append(name)
    return out


def _operands(instr):
    rest = instr.text[len(instr.op):].strip()
    return [o.strip() for o in rest.split(",")] if rest else []


def dsts_srcs(instr):
    """Registers (and predicates) an instruction writes and reads, approximately."""
    ops = _operands(instr)
    srcs = _regs(instr.pred or "")
    base = instr.base
    if base in ("STG", "ST", "STS", "STL", "RED", "REDG", "BRA", "EXIT", "BAR", "BSSY", "BSYNC", "WARPSYNC", "NOP",
                "CALL", "RET", "DEPBAR") or not ops:
        return [], srcs + [r for o in ops for r in _regs(o)]
    n_dst = 2 if base.endswith("SETP") or base in ("ATOMG", "ATOM", "ATOMS", "SHFL", "HSETP2") else 1
    dst = [r for o in ops[:n_dst] for r in _regs(o)]
    # carry-out predicates right after the destination (IADD3 R4, P1, P2, ...; LEA R5, P1, ...)
    i = n_dst
    while i < len(ops) - 1 and re.fullmatch(r"U?P\d", ops[i]):
        dst.append(ops[i])
        i += 1
    if base in ("LDG", "LD", "LDS", "LDL", "LDSM") and dst and "128" in instr.op.split("."):
        dst = _regs(ops[0] + ".128")
    elif base in ("LDG", "LD", "LDS", "LDL") and dst and "64" in instr.op.split("."):
        dst = _regs(ops[0] + ".64")
    return dst, srcs + [r for o in ops[i:] for r in _regs(o)]


def latency_of(instr, global_latency):
    base = instr.base
    if base in ("LDG", "LD"):
        return LATENCY["l2"] if ("STRONG" in instr.op or ".CG" in instr.op) else global_latency
    if base in ("ATOMG", "ATOM", "RED"):
        return LATENCY["l2"]
    if base in ("LDS", "LDSM", "ATOMS"):
        return LATENCY["shared"]
    if base == "MUFU":
        return LATENCY["mufu"]
    if base == "SHFL":
        return LATENCY["shfl"]
    if base in ("S2R", "S2UR", "CS2R") and "SR_" in instr.text:
        return LATENCY["s2r"]
    if base in _XU:
        return LATENCY["xu"]
    return LATENCY["alu"]


def schedule(instrs, global_latency):
    """Cycles one warp needs to issue ``instrs`` in order, each waiting for its operands
    (a barrier waits for every result: the CTA's warps are alike)."""
    ready, t = {}, 0
    for ins in instrs:
        dst, srcs = dsts_srcs(ins)
        start = max([t] + [ready.get(r, 0) for r in srcs])
        if ins.base == "BAR":
            start = max([start] + list(ready.values())) + LATENCY["bar"]
        for r in dst:
            ready[r] = start + latency_of(ins, global_latency)
        t = start + 1
    return t


def path_schedule(cfg, blocks, global_latency, skip=()):
    return schedule([i for b in blocks if b not in skip for i in cfg.blocks[b].instrs], global_latency)


def rare_diamond_blocks(cfg, ops=_ATOMIC):
    """Blocks that hold one of ``ops`` and are skipped by a forward predicated branch:
    the per-element ``if hit: atomic_add`` of the candidate append."""
    rare = set()
    starts = sorted(cfg.blocks)
    for n, s in enumerate(starts):
        block = cfg.blocks[s]
        last = block.instrs[-1]
        if last.base == "BRA" and last.pred is not None and n + 1 < len(starts):
            target = _branch_target(last)
            fall = starts[n + 1]
            if target > fall:
                for b in starts[n + 1:]:
                    if b >= target:
                        break
                    if cfg.blocks[b].has(ops):
                        rare.add(b)
    return rare


def loop_elems_per_thread(cfg, header, elem_bytes, weight=None):
    """Logits loaded per thread on the shortest iteration of a loop (from its LDG widths)."""
    path_blocks = _shortest_blocks(cfg, header)
    loaded = sum(i.load_bytes() for b in path_blocks for i in cfg.blocks[b].instrs)
    return loaded / elem_bytes


def _shortest_blocks(cfg, header):
    body = cfg.loops[header]
    latches = set(cfg.latches(header))
    best = {header: (len(cfg.blocks[header].instrs), [header])}
    for n in sorted(body):
        if n not in best:
            continue
        for t in cfg.blocks[n].succs:
            if t in body and t > n:
                cand = best[n][0] + len(cfg.blocks[t].instrs)
                if t not in best or cand < best[t][0]:
                    best[t] = (cand, best[n][1] + [t])
    ends = [best[l] for l in latches if l in best]
    return min(ends)[1] if ends else [header]


# ----------------------------------------------------------------------------
# The kernels: old (f0cce8d, from git) and current (the working tree)
# ----------------------------------------------------------------------------

BaselineUnavailable = aot_report.KernelsUnavailable
kernels_at = aot_report.kernels_at


def baseline_module():
    return kernels_at(BASELINE_COMMIT)


def commit_of(path):
    """The last commit that changed ``path`` (None without git history)."""
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h", "--", str(path)], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        return out or None
    except (OSError, subprocess.CalledProcessError):
        return None


def module_of(version):
    """``"tree"``: the working tree's kernels; ``"old"``: the baseline; else a commit."""
    if version == "tree":
        return current_module()
    return kernels_at(BASELINE_COMMIT if version == "old" else version)


def current_module():
    from prsl_kernels import triton_kernels
    return triton_kernels


def torch_dtype(name):
    import torch
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}[name]


@lru_cache(maxsize=None)
def _analysed(version, config_key, arch, vocab, k):
    module = module_of(version)
    config = _configs[(version, config_key)]
    compiled = aot_report.compile_runtime(config, arch, vocab, k, module=module)
    res = aot_report.resources(compiled, arch, config.num_warps)
    sass, _ = aot_report.sass_of(compiled)
    return Cfg(parse_sass(sass)), res


_configs = {}


def analyse(version, config, arch, vocab, k):
    key = (config.kernel, str(config.dtype), tuple(sorted(config.constexprs.items())), config.num_warps)
    _configs[(version, key)] = config
    # k only matters through its specialisation (0 and multiples of 16: hinted; 1: a constant).
    k_class = 0 if k == 0 else (1 if k == 1 else (16 if k % 16 == 0 else 7))
    return _analysed(version, key, arch, 50272 if vocab % 16 == 0 else 50257, k_class)


# ----------------------------------------------------------------------------
# Path frequencies: the kernels' selection logic on realistic rows
# ----------------------------------------------------------------------------

SIM_ROWS = 128


@lru_cache(maxsize=None)
def sample_rows(dist, vocab, dtype, rows=SIM_ROWS, seed=0):
    """``(logits float32 [rows, V] holding dtype-representable values, targets [rows])``."""
    import torch
    g = torch.Generator().manual_seed(seed + vocab)
    if dist == "normal":
        z = torch.randn(rows, vocab, generator=g) * 2
        target = torch.randint(0, vocab, (rows,), generator=g)
    elif dist in ("peaked", "peaked-ordered"):
        if dist == "peaked":
            ranks = torch.argsort(torch.rand(rows, vocab, generator=g), dim=1).float() + 1
        else:
            # BPE-like: frequent tokens have small ids, so the large logits gather at the row's start.
            noisy = torch.arange(vocab).float() + torch.randn(rows, vocab, generator=g) * (vocab / 20)
            ranks = torch.argsort(torch.argsort(noisy, dim=1), dim=1).float() + 1
        z = -1.1 * torch.log(ranks) + 0.3 * torch.randn(rows, vocab, generator=g)
        target = torch.multinomial(torch.softmax(z, dim=1), 1, generator=g).squeeze(1)
    else:
        raise ValueError(dist)
    return z.to(torch_dtype(dtype)).float(), target


@lru_cache(maxsize=None)
def old_path_frequencies(dist, vocab, dtype, kp, block_v, k):
    """Per block: fractions dismissed / merged by compaction / merged by top-KP (old design),
    and the fraction of rows that take the tie-counting second pass."""
    import torch
    z, target = sample_rows(dist, vocab, dtype)
    rows = z.shape[0]
    xs = z.clone()
    xs[torch.arange(rows), target] = float("-inf")
    top = torch.full((rows, kp), float("-inf"))
    n_blocks = math.ceil(vocab / block_v)
    dismiss = compact = topk = 0
    for b in range(n_blocks):
        block = xs[:, b * block_v:(b + 1) * block_v]
        thr = top.min(dim=1).values
        n = (block > thr[:, None]).sum(dim=1)
        dismiss += int((n == 0).sum())
        compact += int(((n > 0) & (n <= kp)).sum())
        topk += int((n > kp).sum())
        top = torch.cat([top, block], dim=1).topk(kp, dim=1).values
    total = rows * n_blocks
    tau = top[:, k - 1]  # descending here: the k-th largest; the buffer's minimum is top[:, kp - 1]
    ties_pass = float((top[:, kp - 1] == tau).float().mean())
    return dict(dismiss=dismiss / total, compact=compact / total, topk=topk / total, ties_pass=ties_pass,
                blocks=n_blocks)


@lru_cache(maxsize=None)
def new_path_frequencies(dist, vocab, dtype, k, tile, vec, cap, gcap=None, stride=None):
    """Two-pass design: the fraction of rows flagged (candidates > CAP, or no finite threshold)
    and the mean candidates per row, with the kernel's lane and group mapping."""
    import torch
    z, target = sample_rows(dist, vocab, dtype)
    rows = z.shape[0]
    stride = stride or vocab
    groups = tile // vec
    # Row r starts lead = (r * stride) % vec elements after a 16-byte boundary; the tiles start
    # at that boundary, so element i sits in lane (i + lead) % tile, group lane // vec.
    lead = (torch.arange(rows) * 7919 * stride) % vec  # rows spread over the possible leads
    idx = torch.arange(vocab)
    group = (((idx[None, :] + lead[:, None]) % tile) // vec)
    gmax = torch.full((rows, groups), float("-inf")).scatter_reduce(1, group, z, reduce="amax")
    tgroup = group[torch.arange(rows), target]
    gmax[torch.arange(rows), tgroup] = float("-inf")
    gmax_all = torch.full((rows, groups), float("-inf")).scatter_reduce(1, group, z, reduce="amax")
    thr = gmax.topk(k, dim=1).values[:, k - 1]
    hit = z >= thr[:, None]
    count = hit.sum(dim=1)  # the target included (the append design lists it too)
    not_target = torch.ones_like(hit)
    not_target[torch.arange(rows), target] = False
    hit_nt = hit & not_target
    n_cand = hit_nt.sum(dim=1)
    n_groups = (gmax_all >= thr[:, None]).sum(dim=1)
    # 16-byte chunks (one group's VEC lanes in one tile) holding a non-target candidate.
    chunk = (idx[None, :] + lead[:, None]) // vec
    n_chunks = torch.tensor([int(torch.unique(chunk[r][hit_nt[r]]).numel()) for r in range(rows)])
    if gcap is None:
        flagged = (count > cap) | torch.isinf(thr)
    else:
        flagged = (n_groups > gcap) | (n_chunks > cap) | (n_cand > cap) | torch.isinf(thr)
    return dict(flagged=float(flagged.float().mean()), candidates=float(count.float().mean()),
                candidates_max=int(count.max()), groups_listed=float(n_groups.float().mean()),
                chunks=float(n_chunks.float().mean()))


# ----------------------------------------------------------------------------
# The model per kernel launch
# ----------------------------------------------------------------------------

def _scaled(counter, factor):
    return Counter({key: value * factor for key, value in counter.items()})


class LaunchCost:
    """One launch: warp-instructions by class (thread-instructions summed over warps), bytes
    moved, the binary's occupancy, and the phases of one work unit (a row, or a CTA) as
    ``(repetitions, instructions per thread, cycles of one warp's in-order schedule)``."""

    def __init__(self, name, warp_instr, bytes_hbm, res, num_warps, detail, phases=(), units=0):
        self.name, self.warp_instr, self.bytes_hbm = name, warp_instr, bytes_hbm
        self.res, self.num_warps, self.detail = res, num_warps, detail
        self.phases, self.units = list(phases), units

    def times(self, gpu):
        spec = GPUS[gpu]
        issue = self.warp_instr["total"] / (spec["sms"] * spec["issue"] * spec["clock"])
        mufu = 32 * self.warp_instr["mufu"] / (spec["sms"] * spec["mufu_lanes"] * spec["clock"])
        memory = self.bytes_hbm / spec["bandwidth"]
        out = dict(issue_ms=issue * 1e3, mufu_ms=mufu * 1e3, memory_ms=memory * 1e3,
                   ms=max(issue, mufu, memory) * 1e3 + LAUNCH_US * 1e-3)
        # Latency-aware: every phase of a unit takes the longer of one warp's schedule and
        # its share of the SM's issue slots (all resident warps issuing); units run in waves
        # of CTAs-per-SM x SMs.
        ctas = max(1, self.res["ctas_per_sm"])
        warps_sm = ctas * self.num_warps
        unit_cycles = sum(reps * max(cycles, instr * warps_sm / spec["issue"]) for reps, instr, cycles in self.phases)
        waves = math.ceil(self.units / (spec["sms"] * ctas)) if self.units else 0
        latency = waves * unit_cycles / spec["clock"]
        out.update(latency_ms=latency * 1e3, ms_latency=max(latency, mufu, memory) * 1e3 + LAUNCH_US * 1e-3)
        return out


def _elements_check(cfg, header, constexpr_elems, elem_bytes, name):
    seen = loop_elems_per_thread(cfg, header, elem_bytes)
    if seen <= 0:
        raise RuntimeError(f"{name}: no global loads in the loop at {header:#x}; the SASS changed shape")
    unroll = seen / constexpr_elems
    if abs(unroll - round(unroll)) > 1e-6 or round(unroll) < 1:
        raise RuntimeError(f"{name}: the loop at {header:#x} loads {seen} elements per thread per iteration, "
                           f"expected a multiple of {constexpr_elems}")
    return int(round(unroll))


def block_merge_forward(version, config, arch, dist, dtype, n_rows, vocab, k, only_flagged_fraction=None):
    """The old design (and the exact kernel of the new one): one program per row, BLOCK_V blocks,
    a top-KP buffer merged when a block has values above its minimum."""
    cfg, res = analyse(version, config, arch, vocab, k)
    c = config.constexprs
    es = DTYPE_BYTES[dtype]
    warps = config.num_warps
    loops = [h for h, _ in cfg.top_level_loops()]
    has_topk = c.get("HAS_TOPK", True) and k > 0
    expected_loops = 2 if has_topk else 1
    if len(loops) != expected_loops:
        raise RuntimeError(f"{version} {config.kernel}: expected {expected_loops} top-level loops (blocks, ties), "
                           f"found {len(loops)}; update static_cost.block_merge_forward")
    main = loops[0]
    block_v = c["BLOCK_V"]
    unroll = _elements_check(cfg, main, block_v // (32 * warps), es, f"{version} {config.kernel}")
    iters = math.ceil(vocab / block_v) / unroll
    dismiss = cfg.loop_path(main, longest=False)
    detail = {"loop_dismiss": dismiss["total"]}
    if has_topk:
        stg = {b for b in cfg.loops[main] if cfg.blocks[b].has({"STG"})}
        compact = cfg.loop_path(main, through=stg) if stg else dismiss
        topk = cfg.loop_path(main, avoid=stg)
        f = old_path_frequencies(dist, vocab, dtype, c["KP"], block_v, k)
        per_iter = _scaled(dismiss, f["dismiss"]) + _scaled(compact, f["compact"]) + _scaled(topk, f["topk"])
        straight = cfg.outer_path(through_loops=[main], avoid_loops=[loops[1]])
        with_ties = cfg.outer_path(through_loops=loops)
        ties_iter = cfg.loop_path(loops[1])
        ties = (with_ties - straight) if with_ties is not None else Counter()
        ties += _scaled(ties_iter, iters)
        row = straight + _scaled(per_iter, iters) + _scaled(ties, f["ties_pass"])
        sched = {name: path_schedule(cfg, path.path, LATENCY["dram"])
                 for name, path in (("dismiss", dismiss), ("compact", compact), ("topk", topk))}
        phases = [(iters, per_iter["total"], sum(f[name] * sched[name] for name in sched)),
                  (1, straight["total"], path_schedule(cfg, straight.path, LATENCY["dram"])),
                  (iters * f["ties_pass"], ties_iter["total"], path_schedule(cfg, ties_iter.path, LATENCY["l2"]))]
        detail.update(loop_compact=compact["total"], loop_topk=topk["total"], freq=f,
                      loop_mean=per_iter["total"], sched_cycles=sched)
    else:
        straight = cfg.outer_path(through_loops=[main])
        row = straight + _scaled(dismiss, iters)
        phases = [(iters, dismiss["total"], path_schedule(cfg, dismiss.path, LATENCY["dram"])),
                  (1, straight["total"], path_schedule(cfg, straight.path, LATENCY["dram"]))]
        detail.update(loop_mean=dismiss["total"], sched_cycles={"loop": phases[0][2]})
    detail.update(straight=straight["total"], iters=iters)
    rows_run = n_rows
    bytes_row = vocab * es + 8 + 6 * (8 if dtype == "fp64" else 4)
    total = _scaled(row, warps * n_rows)
    bytes_total = bytes_row * n_rows
    if only_flagged_fraction is not None:
        # The second launch of the two-pass forward: unflagged rows return at once.
        skip = cfg.outer_path(longest=False)
        rows_run = n_rows * only_flagged_fraction
        total = _scaled(row, warps * rows_run) + _scaled(skip, warps * (n_rows - rows_run))
        bytes_total = bytes_row * rows_run + n_rows * 1
        fraction = only_flagged_fraction
        phases = [(reps * fraction, instr, cycles) for reps, instr, cycles in phases]
        phases.append((1 - fraction, skip["total"], path_schedule(cfg, skip.path, LATENCY["dram"])))
        detail.update(flagged=only_flagged_fraction, skip=skip["total"])
    return LaunchCost(f"{version}:{config.kernel}", total, bytes_total, res, warps, detail, phases, n_rows)


def two_pass_forward(version, config, arch, dist, dtype, n_rows, vocab, k, gpu):
    """The new design's fast path: pass 1 (online lse + group maxima) streams the row in
    aligned tiles; then the selection (a top-k of the group maxima), the later loops over the
    same tiles (the L2-warm re-reads that collect the candidates), a top-KP of CAP values.
    The first and last tiles are peeled (straight-line code); every loop runs over the middle
    tiles."""
    cfg, res = analyse(version, config, arch, vocab, k)
    c = config.constexprs
    es = DTYPE_BYTES[dtype]
    warps = config.num_warps
    tile, vec = c["TILE"], c["VEC"]
    per_thread = tile // (32 * warps)
    has_topk = c.get("HAS_TOPK", True) and k > 0
    loops = [h for h, _ in cfg.top_level_loops()]
    if not loops or (has_topk and len(loops) < 2) or (not has_topk and len(loops) != 1):
        raise RuntimeError(f"new forward: found {len(loops)} top-level loops (expected pass 1, and re-read loops "
                           "with top-k); update static_cost.two_pass_forward")
    if _elements_check(cfg, loops[0], per_thread, es, "new forward") != 1:
        raise RuntimeError("new forward: ptxas unrolled the streaming loop; update static_cost.two_pass_forward")
    # Middle tiles: n_tiles - 2 per row, averaged over the row leads.
    leads = [(r * vocab) % vec for r in range(vec)]
    iters = sum(max(0, math.ceil((vocab + lead) / tile) - 2) for lead in leads) / len(leads)
    detail = {"iters": iters}
    row_bytes = vocab * es
    bytes_total = n_rows * (row_bytes + 8 + 6 * 4)
    if has_topk:
        f = new_path_frequencies(dist, vocab, dtype, k, tile, vec, c["CAP"], c.get("GCAP"))
        # A per-element "if hit" (a diamond around an atomic append) runs when any of the
        # warp's 32 lanes hits that slot.
        p_slot = min(1.0, 32 * f["candidates"] / vocab)
        rare = rare_diamond_blocks(cfg)

        def weight(b):
            counts = cfg.blocks[b].counts()
            return _scaled(counts, p_slot) if b in rare else counts

        straight = cfg.outer_path(weight, through_loops=loops)
        # Trips per row of each loop, and its phases: (trips, path); scheduled without the rare
        # diamonds; the first loop streams from HBM, the later ones re-read from L2.
        loop_trips = [(iters, cfg.loop_path(loops[0], weight))]
        n_tiles = iters + 2
        if "T_BLK" in c and "ROWS" in c:
            # Gather design: for each block of ROWS // T_BLK listed groups (outer loop), the
            # tiles in blocks of T_BLK (inner loop); ~groups_listed groups per row.
            if len(loops) != 2:
                raise RuntimeError(f"new forward (gather design): expected 2 top-level loops, found {len(loops)}; "
                                   "update static_cost.two_pass_forward")
            inner = [h for h in cfg.loops if h != loops[1] and cfg.loops[h] < cfg.loops[loops[1]]]
            outer_trips = math.ceil(f["groups_listed"] / (c["ROWS"] // c["T_BLK"]))
            inner_trips = math.ceil(n_tiles / c["T_BLK"])
            if len(inner) != 1:
                raise RuntimeError("new forward (gather design): expected one loop nested in the gather loop; "
                                   "update static_cost.two_pass_forward")
            loop_trips.append((outer_trips, cfg.loop_path(loops[1], weight)))  # one inner trip included
            loop_trips.append((outer_trips * (inner_trips - 1), cfg.loop_path(inner[0], weight)))
            reread = f["groups_listed"] * vec / tile
        else:
            loop_trips += [(iters, cfg.loop_path(h, weight)) for h in loops[1:]]
            reread = sum(min(1.0, loop_elems_per_thread(cfg, h, es) / per_thread) for h in loops[1:])
        per_loop = [p for _, p in loop_trips]
        row = straight + sum((_scaled(p, trips) for trips, p in loop_trips), Counter())
        phases = [(trips, p["total"], path_schedule(cfg, p.path, LATENCY["dram" if n == 0 else "l2"], rare))
                  for n, (trips, p) in enumerate(loop_trips)]
        phases.append((1, straight["total"], path_schedule(cfg, straight.path, LATENCY["dram"], rare)))
        # The later loops re-read (part of) each tile, from L2 while the rows in flight fit.
        spec = GPUS[gpu]
        in_flight = res["ctas_per_sm"] * spec["sms"] * row_bytes
        l2_hit = min(1.0, spec["l2"] / in_flight) if in_flight else 1.0
        bytes_total += n_rows * (row_bytes * reread * (1 - l2_hit) + 2 * 4 * c["CAP"] + 1)
        detail.update(freq=f, p_slot=p_slot, loops=[p["total"] for p in per_loop],
                      trips=[round(t, 2) for t, _ in loop_trips],
                      loop_mean=sum(p["total"] for p in per_loop), reread_fraction=reread, pass2_l2_hit=l2_hit)
    else:
        per_loop = [cfg.loop_path(loops[0])]
        straight = cfg.outer_path(through_loops=loops)
        row = straight + _scaled(per_loop[0], iters)
        phases = [(iters, per_loop[0]["total"], path_schedule(cfg, per_loop[0].path, LATENCY["dram"])),
                  (1, straight["total"], path_schedule(cfg, straight.path, LATENCY["dram"]))]
        detail.update(loops=[per_loop[0]["total"]], loop_mean=per_loop[0]["total"])
    detail["straight"] = straight["total"]
    detail["sched_cycles"] = [round(c) for _, _, c in phases]
    return LaunchCost(f"{version}:forward", _scaled(row, warps * n_rows), bytes_total, res, warps, detail,
                      phases, n_rows), \
        (f["flagged"] if has_topk else None)


def entry_exit_paths(cfg, cap=4096):
    """Every path from the entry to an exit of a loop-free kernel (``PathCounts``, capped)."""
    paths, stack = [], [(cfg.entry, cfg.blocks[cfg.entry].counts(), (cfg.entry,))]
    while stack and len(paths) < cap:
        node, counts, path = stack.pop()
        succs = [t for t in cfg.blocks[node].succs if t > node]
        if not succs:
            p = PathCounts(counts)
            p.path = list(path)
            paths.append(p)
        for t in succs:
            stack.append((t, counts + cfg.blocks[t].counts(), path + (t,)))
    return paths


def backward_launch(version, config, arch, dtype, n_rows, vocab):
    """A rows x tiles grid without loops: per CTA, the path of an interior tile (vector
    loads) or of an edge tile (masked, scalar), the latter twice per row."""
    cfg, res = analyse(version, config, arch, vocab, 0)
    c = config.constexprs
    es = DTYPE_BYTES[dtype]
    warps = config.num_warps
    if cfg.top_level_loops():
        return _backward_with_tile_loop(version, config, cfg, res, dtype, n_rows, vocab)
    block = c.get("TILE", c.get("BLOCK_V"))
    # Paths that compute a gradient (they exponentiate); the others zero or poison a row.
    paths = [p for p in entry_exit_paths(cfg) if p["mufu"] > 0]
    blocks_with_vector = {b for b, blk in cfg.blocks.items()
                          if any(i.load_bytes() == 16 for i in blk.instrs)}
    if "TILE" in c and c.get("ALIGNED"):
        vec = c["VEC"]
        ctas = sum(math.ceil((vocab + (r * vocab) % vec) / block) for r in range(vec)) / vec
        vector_paths = _paths_through(cfg, blocks_with_vector)
        interior = max(vector_paths, key=lambda p: p["total"]) if vector_paths else max(paths, key=lambda p: p["total"])
        edge = max(paths, key=lambda p: p["total"])
        edges = min(2.0, ctas)
        per_row = _scaled(interior, ctas - edges) + _scaled(edge, edges)
        phases = [((ctas - edges) / ctas, interior["total"], path_schedule(cfg, interior.path, LATENCY["dram"])),
                  (edges / ctas, edge["total"], path_schedule(cfg, edge.path, LATENCY["dram"]))]
        detail = {"interior": interior["total"], "edge": edge["total"], "ctas_per_row": ctas,
                  "sched_cycles": [round(c) for _, _, c in phases]}
    else:
        ctas = math.ceil(vocab / block)
        per_cta = max(paths, key=lambda p: p["total"])
        per_row = _scaled(per_cta, ctas)
        phases = [(1, per_cta["total"], path_schedule(cfg, per_cta.path, LATENCY["dram"]))]
        detail = {"per_cta": per_cta["total"], "ctas_per_row": ctas, "sched_cycles": [round(phases[0][2])]}
    total = _scaled(per_row, warps * n_rows)
    bytes_total = n_rows * (2 * vocab * es + 8 + 6 * 4)
    return LaunchCost(f"{version}:backward", total, bytes_total, res, warps, detail, phases,
                      round(ctas * n_rows))


def _backward_with_tile_loop(version, config, cfg, res, dtype, n_rows, vocab):
    """A rows x runs grid: each program pays the row's setup once, then loops over a run of
    TILES_PER_PROGRAM tiles (interior tiles: vector path; the row's first and last: masked)."""
    c = config.constexprs
    es = DTYPE_BYTES[dtype]
    warps = config.num_warps
    tile, per_program = c["TILE"], c.get("TILES_PER_PROGRAM", 1)
    loops = [h for h, _ in cfg.top_level_loops()]
    # The gradient loop exponentiates; a loop without MUFU zeroes ignored rows.
    compute = [h for h in loops if any(i.base == "MUFU" for b in cfg.loops[h] for i in cfg.blocks[b].instrs)]
    if len(compute) != 1:
        raise RuntimeError(f"{version} backward: expected one gradient loop, found {len(compute)}; "
                           "update static_cost._backward_with_tile_loop")
    loop = compute[0]
    vector = {b for b in cfg.loops[loop] if any(i.load_bytes() == 16 for i in cfg.blocks[b].instrs)}
    interior = cfg.loop_path(loop, through=vector) if vector else cfg.loop_path(loop)
    edge = cfg.loop_path(loop, avoid=vector) if vector else interior
    if edge is None:
        edge = interior
    setup = cfg.outer_path(through_loops=[loop], avoid_loops=[h for h in loops if h != loop])
    vec = c.get("VEC", 1)
    leads = [(r * vocab) % vec for r in range(vec)] if c.get("ALIGNED") else [0]
    n_tiles = sum(math.ceil((vocab + lead) / tile) for lead in leads) / len(leads)
    programs = sum(math.ceil(math.ceil((vocab + lead) / tile) / per_program) for lead in leads) / len(leads)
    edges = min(2.0, n_tiles)
    per_row = _scaled(setup, programs) + _scaled(interior, n_tiles - edges) + _scaled(edge, edges)
    dram = LATENCY["dram"]
    # Per program (the latency unit): its setup and its share of the row's tiles.
    phases = [(1, setup["total"], path_schedule(cfg, setup.path, dram)),
              ((n_tiles - edges) / programs, interior["total"], path_schedule(cfg, interior.path, dram)),
              (edges / programs, edge["total"], path_schedule(cfg, edge.path, dram))]
    detail = {"setup": setup["total"], "interior": interior["total"], "edge": edge["total"],
              "tiles_per_row": n_tiles, "programs_per_row": programs,
              "sched_cycles": [round(c) for _, _, c in phases]}
    total = _scaled(per_row, warps * n_rows)
    bytes_total = n_rows * (2 * vocab * es + 8 + 6 * 4)
    return LaunchCost(f"{version}:backward", total, bytes_total, res, warps, detail, phases,
                      round(programs * n_rows))


def _paths_through(cfg, blocks):
    """Entry-to-exit paths (loop-free kernel) that visit one of ``blocks`` and compute (MUFU)."""
    return [p for p in entry_exit_paths(cfg) if p["mufu"] > 0 and any(b in blocks for b in p.path)]


# ----------------------------------------------------------------------------
# Per shape
# ----------------------------------------------------------------------------

def model_case(version, gpu, dtype, n_rows, vocab, k, dist):
    """Model one shape with the kernels of ``version`` ("tree", "old" or a commit)."""
    arch = GPUS[gpu]["arch"]
    tdtype = torch_dtype(dtype)
    mod = module_of(version)
    config = mod.forward_config(tdtype, vocab, k)
    if config.kernel == "forward" and "TILE" in config.constexprs:
        fast, flagged = two_pass_forward(version, config, arch, dist, dtype, n_rows, vocab, k, gpu)
        fwd = [fast]
        if flagged is not None:
            exact = mod.exact_config(tdtype, vocab, k, only_flagged=True)
            fwd.append(block_merge_forward(version, exact, arch, dist, dtype, n_rows, vocab, k,
                                           only_flagged_fraction=flagged))
    else:
        fwd = [block_merge_forward(version, config, arch, dist, dtype, n_rows, vocab, k)]
    bwd = backward_launch(version, mod.backward_config(tdtype, vocab), arch, dtype, n_rows, vocab)
    elems = n_rows * vocab
    fwd_t = [launch.times(gpu) for launch in fwd]
    bwd_t = bwd.times(gpu)
    main = fwd[0]
    out = dict(
        predicted_ms_fwd=sum(t["ms"] for t in fwd_t), predicted_ms_bwd=bwd_t["ms"],
        latency_aware_ms_fwd=sum(t["ms_latency"] for t in fwd_t), latency_aware_ms_bwd=bwd_t["ms_latency"],
        warp_instr_per_elem_fwd=sum(l.warp_instr["total"] for l in fwd) / elems,
        warp_instr_per_elem_bwd=bwd.warp_instr["total"] / elems,
        mufu_per_elem_fwd=sum(l.warp_instr["mufu"] for l in fwd) / elems,
        bar_per_elem_fwd=sum(l.warp_instr["bar"] for l in fwd) / elems,
        shfl_per_elem_fwd=sum(l.warp_instr["shfl"] for l in fwd) / elems,
        bytes_fwd=sum(l.bytes_hbm for l in fwd), bytes_bwd=bwd.bytes_hbm,
        bound_fwd=max(("issue", "mufu", "memory"), key=lambda b: fwd_t[0][f"{b}_ms"]),
        bound_bwd=max(("issue", "mufu", "memory"), key=lambda b: bwd_t[f"{b}_ms"]),
        fwd_launches=[dict(name=l.name, **t, regs=l.res["regs"], warps=l.num_warps,
                           ctas_per_sm=l.res["ctas_per_sm"], warps_per_sm=l.res["warps_per_sm"],
                           spills=l.res["spill_stores"] + l.res["spill_loads"],
                           detail=_jsonable(l.detail)) for l, t in zip(fwd, fwd_t)],
        bwd_launch=dict(name=bwd.name, **bwd_t, regs=bwd.res["regs"], warps=bwd.num_warps,
                        ctas_per_sm=bwd.res["ctas_per_sm"], warps_per_sm=bwd.res["warps_per_sm"],
                        detail=_jsonable(bwd.detail)),
        regs_fwd=main.res["regs"], warps_fwd=main.num_warps, ctas_per_sm_fwd=main.res["ctas_per_sm"],
        warps_per_sm_fwd=main.res["warps_per_sm"],
    )
    out["predicted_ms_total"] = out["predicted_ms_fwd"] + out["predicted_ms_bwd"]
    out["latency_aware_ms_total"] = out["latency_aware_ms_fwd"] + out["latency_aware_ms_bwd"]
    out["warp_instr_per_elem"] = out["warp_instr_per_elem_fwd"] + out["warp_instr_per_elem_bwd"]
    return out


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, float):
        return round(value, 6)
    return value


MEASURED_BEFORE, MEASURED_BEFORE_GBPS = read_measured(MEASURED_BEFORE_CSV)
MEASURED_AFTER, MEASURED_AFTER_GBPS = read_measured(MEASURED_AFTER_CSV)


def after_label(after):
    if after != "tree":
        return f"the kernels of commit {after}"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "prsl_kernels/triton_kernels.py"],
                               cwd=ROOT).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "the working tree's kernels"
    return f"the working tree's kernels (HEAD {head}{', triton_kernels.py modified' if dirty else ''})"


def run_model(shapes, dtypes, ks, gpus, dists, before=True, after="tree"):
    results = []
    for gpu in gpus:
        for dtype in dtypes:
            for n_rows, vocab in shapes:
                for k in ks:
                    row = dict(gpu=gpu, dtype=dtype, N=n_rows, V=vocab, k=k, kind="model prediction")
                    for dist in dists:
                        tag = "" if dist == dists[0] else f"_{dist}"
                        modelled = model_case(after, gpu, dtype, n_rows, vocab, k, dist)
                        if not tag:
                            row.update(modelled)
                            row["after_kernels"] = after_label(after)
                            row["logits"] = dist
                            measured = MEASURED_AFTER.get(("triton", dtype, n_rows, vocab, k))
                            if gpu == "H200" and measured and before:
                                # Modelled with the kernels of the commit that wrote the measurements.
                                commit = commit_of(MEASURED_AFTER_CSV)
                                m = model_case(commit, gpu, dtype, n_rows, vocab, k, dist)
                                row["measured_run"] = dict(
                                    commit=commit, measured_ms_fwd=measured[0], measured_ms_bwd=measured[1],
                                    predicted_ms_fwd=m["predicted_ms_fwd"], predicted_ms_bwd=m["predicted_ms_bwd"],
                                    latency_aware_ms_fwd=m["latency_aware_ms_fwd"],
                                    latency_aware_ms_bwd=m["latency_aware_ms_bwd"])
                        else:
                            row[f"predicted_ms_total{tag}"] = modelled["predicted_ms_total"]
                            row[f"latency_aware_ms_total{tag}"] = modelled["latency_aware_ms_total"]
                            row[f"warp_instr_per_elem{tag}"] = modelled["warp_instr_per_elem"]
                        if before:
                            old = model_case("old", gpu, dtype, n_rows, vocab, k, dist)
                            if not tag:
                                row["before"] = {key: old[key] for key in (
                                    "predicted_ms_fwd", "predicted_ms_bwd", "predicted_ms_total",
                                    "latency_aware_ms_fwd", "latency_aware_ms_bwd", "latency_aware_ms_total",
                                    "warp_instr_per_elem", "warp_instr_per_elem_fwd", "warp_instr_per_elem_bwd",
                                    "regs_fwd", "warps_fwd", "ctas_per_sm_fwd", "warps_per_sm_fwd", "bound_fwd",
                                    "fwd_launches", "bytes_fwd")}
                                measured = MEASURED_BEFORE.get(("triton", dtype, n_rows, vocab, k))
                                if gpu == "H200" and measured:
                                    row["before"]["measured_ms_fwd"], row["before"]["measured_ms_bwd"] = measured
                            else:
                                row["before"][f"predicted_ms_total{tag}"] = old["predicted_ms_total"]
                                row["before"][f"latency_aware_ms_total{tag}"] = old["latency_aware_ms_total"]
                    results.append(row)
    return results


# ----------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------

def _table(header, lines):
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] +
                     [fmt.format(*line) for line in lines])


def format_report(results, dists):
    out = []
    out.append("# STATIC COST MODEL: every time below is a MODEL PREDICTION from the SASS, not a measurement,")
    out.append("# except the columns labelled 'measured' (an NVIDIA H200, old kernels).")
    out.append(f"# predicted = max(issue bound, MUFU bound, HBM bound) per launch + {LAUNCH_US} us per launch; "
               f"path frequencies from '{dists[0]}' logits")
    out.append("# (i.i.d. N(0,1)*2, uniform targets) unless marked; 'before' = the kernels of commit "
               f"{BASELINE_COMMIT}, 'after' = {results[0]['after_kernels']}.")
    out.append("# wi/el = dynamic warp-instructions per logit; regs/occ = registers per thread, CTAs x warps per "
               "SM (forward's first launch)")
    out.append("# lat-aware (total ms) = max(latency bound, MUFU, HBM): per row (forward) or CTA (backward), each phase "
               "takes the longer of one warp's")
    out.append("#   in-order schedule of its SASS path (register dependencies; latencies "
               + ", ".join(f"{k} {v}" for k, v in LATENCY.items()) + " cycles)")
    out.append("#   and its share of the SM's issue slots; units run in waves of CTAs/SM x SMs. Also a MODEL PREDICTION.")
    for gpu in dict.fromkeys(r["gpu"] for r in results):
        spec = GPUS[gpu]
        out.append("")
        out.append(f"## {gpu}: {spec['sms']} SMs, {spec['clock'] / 1e9:.3f} GHz, {spec['issue']} warp-instr/clk/SM, "
                   f"{spec['mufu_lanes']} MUFU lanes/clk/SM, {spec['bandwidth'] / 1e12:.2f} TB/s, sm_{spec['arch']}")
        header = ["dtype", "N x V", "k", "wi/el fwd", "wi/el bwd", "regs/occ fwd", "MB fwd", "MB bwd", "bound",
                  "fwd ms", "bwd ms", "total ms", "lat-aware"]
        has_before = any("before" in r for r in results)
        if has_before:
            header += ["| before: wi/el fwd", "regs/occ", "fwd ms", "bwd ms", "total ms", "lat-aware"]
        for dist in dists[1:]:
            header += [f"| {dist}: total", "lat-aware"] + (["before total", "lat-aware"] if has_before else [])
        lines = []
        for r in (r for r in results if r["gpu"] == gpu):
            line = [r["dtype"], f"{r['N']}x{r['V']}", str(r["k"]), f"{r['warp_instr_per_elem_fwd']:.3f}",
                    f"{r['warp_instr_per_elem_bwd']:.3f}",
                    f"{r['regs_fwd']}/{r['ctas_per_sm_fwd']}x{r['warps_fwd']}", f"{r['bytes_fwd'] / 1e6:.0f}",
                    f"{r['bytes_bwd'] / 1e6:.0f}", r["bound_fwd"], f"{r['predicted_ms_fwd']:.3f}",
                    f"{r['predicted_ms_bwd']:.3f}", f"{r['predicted_ms_total']:.3f}", f"{r['latency_aware_ms_total']:.3f}"]
            if has_before:
                b = r["before"]
                line += [f"| {b['warp_instr_per_elem_fwd']:.3f}", f"{b['regs_fwd']}/{b['ctas_per_sm_fwd']}x{b['warps_fwd']}",
                         f"{b['predicted_ms_fwd']:.3f}", f"{b['predicted_ms_bwd']:.3f}", f"{b['predicted_ms_total']:.3f}",
                         f"{b['latency_aware_ms_total']:.3f}"]
            for dist in dists[1:]:
                line += [f"| {r[f'predicted_ms_total_{dist}']:.3f}", f"{r[f'latency_aware_ms_total_{dist}']:.3f}"]
                if has_before:
                    line += [f"{r['before'][f'predicted_ms_total_{dist}']:.3f}",
                             f"{r['before'][f'latency_aware_ms_total_{dist}']:.3f}"]
            lines.append(line)
        out.append(_table(header, lines))
    comparisons = []
    for r in results:
        if r["gpu"] != "H200":
            continue
        if "measured_ms_fwd" in r.get("before", {}):
            comparisons.append(("before", r, r["before"]))
        if "measured_run" in r:
            comparisons.append((f"{r['measured_run']['commit']}", r, r["measured_run"]))
    if comparisons:
        out.append("")
        out.append("## Model error: H200 prediction vs H200 MEASURED (median ms). 'before': the kernels of "
                   f"{BASELINE_COMMIT} vs {MEASURED_BEFORE_CSV.relative_to(ROOT)};")
        out.append(f"## a commit: the kernels of that commit (git history) vs {MEASURED_AFTER_CSV.relative_to(ROOT)}, "
                   "which it wrote")
        lines = []
        for which, r, m in sorted(comparisons, key=lambda c: (c[0] != "before", c[1]["dtype"], -c[1]["N"], c[1]["k"])):
            line = [which, r["dtype"], f"{r['N']}x{r['V']}", str(r["k"])]
            for d in ("fwd", "bwd"):
                pred, lat, meas = m[f"predicted_ms_{d}"], m[f"latency_aware_ms_{d}"], m[f"measured_ms_{d}"]
                line += [f"{pred:.3f}", f"{lat:.3f}", f"{meas:.3f}", f"{meas / pred:.2f}", f"{meas / lat:.2f}"]
            lines.append(line)
        out.append(_table(["kernels", "dtype", "N x V", "k", "fwd pred", "fwd lat-aware", "fwd MEASURED", "meas/pred",
                           "meas/lat", "bwd pred", "bwd lat-aware", "bwd MEASURED", "meas/pred", "meas/lat"], lines))
        ce = [(key, value) for key, value in MEASURED_BEFORE.items() if key[0] == "cross_entropy"]
        out.append(f"# copy bandwidth measured on those H200 runs: {MEASURED_BEFORE_GBPS or 0:.0f} / "
                   f"{MEASURED_AFTER_GBPS or 0:.0f} GB/s (the model uses {GPUS['H200']['bandwidth'] / 1e9:.0f}); "
                   "torch F.cross_entropy MEASURED fwd/bwd ms: "
                   + ", ".join(f"{d} {n}x{v} {f:.3f}/{b:.3f}" for (_, d, n, v, _), (f, b) in ce))
    out.append("")
    out.append("# Paths (per thread, per iteration) and frequencies, H100 / first dtype and shape:")
    for r in results:
        if r["gpu"] != results[0]["gpu"]:
            continue
        for launch in r["fwd_launches"] + ([] if "before" not in r else
                                           [dict(l, name="before " + l["name"]) for l in r["before"]["fwd_launches"]]):
            out.append(f"#   {r['dtype']} {r['N']}x{r['V']} k={r['k']} {launch['name']}: "
                       + json.dumps(launch["detail"], separators=(",", ":")))
    return "\n".join(out)


def check(results, key="predicted_ms_total"):
    bad = []
    case = [r for r in results if all(r[k] == value for k, value in CHECK_SHAPE.items())]
    if not case:
        return ["--check: the model did not run the check shape " + json.dumps(CHECK_SHAPE)]
    by_k = {r["k"]: r[key] for r in case}
    for k, limit in CHECK_LIMITS_MS.items():
        if k not in by_k:
            bad.append(f"k={k} not modelled")
        elif by_k[k] > limit:
            bad.append(f"k={k}: predicted fwd+bwd {by_k[k]:.3f} ms > {limit} ms")
    if 0 in by_k:
        for k, total in by_k.items():
            if k > 0 and total > CHECK_RATIO_TO_K0 * by_k[0]:
                bad.append(f"k={k}: predicted fwd+bwd {total:.3f} ms > {CHECK_RATIO_TO_K0} x k=0 ({by_k[0]:.3f} ms)")
    else:
        bad.append("k=0 not modelled")
    return bad


def main(argv=None):
    parser = argparse.ArgumentParser(description="Static cost model of the Triton kernels (model predictions, "
                                                 "not measurements)")
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per (gpu, dtype, N, V, k)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a kernel misses its target time (CHECK_LIMITS_MS)")
    parser.add_argument("--write", action="store_true", help="save results/static_cost.txt and .json")
    parser.add_argument("--shapes", default=",".join(f"{n}x{v}" for n, v in DEFAULT_SHAPES))
    parser.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES))
    parser.add_argument("--k", default=",".join(map(str, DEFAULT_KS)))
    parser.add_argument("--gpus", default=",".join(GPUS))
    parser.add_argument("--logits", default="normal,peaked,peaked-ordered",
                        help="row distributions for the path frequencies; the first one fills the main columns")
    parser.add_argument("--no-before", action="store_true", help="skip the old kernels (no git history needed)")
    parser.add_argument("--after", default=None, metavar="REV",
                        help="model the kernels of this git revision instead of the working tree")
    parser.add_argument("--latency-aware", action="store_true",
                        help="--check the latency-aware figures instead of max(issue, MUFU, memory)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("static_cost.py: unset TRITON_INTERPRET (the interpreter cannot compile)")
    if not aot_report.have_tools():
        sys.exit("static_cost.py: ptxas / cuobjdump not found in triton's backends/nvidia/bin")
    import torch
    torch.set_num_threads(1)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    dtypes = args.dtypes.split(",")
    ks = [int(k) for k in args.k.split(",")]
    gpus = args.gpus.split(",")
    if args.check:
        gpus = list(dict.fromkeys(gpus + [CHECK_SHAPE["gpu"]]))
        shapes = list(dict.fromkeys(shapes + [(CHECK_SHAPE["N"], CHECK_SHAPE["V"])]))
        dtypes = list(dict.fromkeys(dtypes + [CHECK_SHAPE["dtype"]]))
        ks = sorted(set(ks) | {0} | set(CHECK_LIMITS_MS))
    dists = args.logits.split(",")
    before = not args.no_before
    after = "tree"
    if args.after:
        after = subprocess.run(["git", "rev-parse", "--short", args.after], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.strip()
    if before:
        try:
            baseline_module()
        except BaselineUnavailable as error:
            sys.exit(f"static_cost.py: {error}")
    results = run_model(shapes, dtypes, ks, gpus, dists, before, after)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(format_report(results, dists))
    if args.write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "static_cost.txt").write_text(format_report(results, dists) + "\n")
        (RESULTS / "static_cost.json").write_text(json.dumps(results, indent=1) + "\n")
    if args.check:
        key = "latency_aware_ms_total" if args.latency_aware else "predicted_ms_total"
        other = "predicted_ms_total" if args.latency_aware else "latency_aware_ms_total"
        for name, problems in (("other figure, for information", check(results, other)),):
            print(f"\n({other}: {'; '.join(problems) if problems else 'targets met'}) [{name}]", file=sys.stderr)
        bad = check(results, key)
        if bad:
            print(f"\nCHECK FAILED ({key}, model predictions):\n" + "\n".join(bad), file=sys.stderr)
            sys.exit(1)
        print(f"\nCHECK passed ({key}, model predictions)", file=sys.stderr)


if __name__ == "__main__":
    main()
