"""Fused Triton kernels for PRSL (spec: ``docs/spec.md``), registered as the
CUDA kernels of ``prsl::forward`` / ``prsl::backward``.

Per row ``z`` (length V, target ``s``), accumulating in float32 (float64 for
float64 logits):

    lse = log sum_j exp(z_j)                 loss = lse - z_s + b * D
    tau = k-th largest of {z_j : j != s}     A = {j != s : z_j > tau}, T = {j != s : z_j == tau}
    u_j = exp(z_j - lse) - exp(tau - lse)    S = sum_A u_j, D = sqrt(sum_A u_j^2)

Forward (one program per row, the row is read once): an online log-sum-exp and,
in the same pass, a top-k selection on the logits (softmax is monotone). A
register buffer ``top`` holds the KP >= k+1 largest non-target values seen so
far (a multiset, kept sorted ascending, padded with -inf); ``min(top)`` is a
lower bound of tau, so most blocks are dismissed by one compare and one
reduction. A block with n > 0 values above that bound is merged into ``top``:
the candidates are compacted through a per-row scratch row in global memory
(n <= KP) or reduced with a bitonic top-KP (n > KP), sorted descending, and the
elementwise max with the ascending buffer is a bitonic sequence holding the KP
largest of the union, which one bitonic merge sorts again. At the end
tau = top[KP - k]; A lies inside the buffer (|A| < k), so S and D come from the
buffer alone. |T| is counted in the buffer, exactly unless the buffer's smallest
entry also equals tau (more ties may lie outside it): only then does a second
pass over the row count them (rare for continuous logits; the row is L2-hot).

Backward (a 2-D grid, rows x V-blocks): from lse, tau, D, S, |T| and the target,

    dz_j = grad_row * (p_j (1 - b D) - [j == s] + b p_j g_j),
    g_j = u_j / D on A, -(S / D) / |T| on T, 0 elsewhere (g = 0 when D == 0),

read once, written once, in the logits' dtype.

For k > MAX_K the forward launcher computes the row statistics with torch ops
instead (``torch.topk`` on the upcast row, row-chunked so the temporaries stay
bounded; O(N * k) memory) and the backward kernel is unchanged.
"""

import contextlib
import math
import os
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from . import ops
from .spec import DIST, LSE, NUM_ROW_STATS, SPREAD_SUM, TAU, TIE_COUNT, stats_dtype

# The top-k buffer sizes the forward kernel is compiled for: k uses the
# smallest one holding k + 1 values (the extra slot detects ties past tau).
TOPK_BUFFER_SIZES = (8, 32, 128, 512, 2048)
MAX_K = TOPK_BUFFER_SIZES[-1] - 1

# The row-stats columns (spec.py), visible inside the kernels.
_NUM_STATS = tl.constexpr(NUM_ROW_STATS)
_LSE, _TAU, _DIST, _SPREAD, _TIES = (tl.constexpr(c) for c in (LSE, TAU, DIST, SPREAD_SUM, TIE_COUNT))

# Tests shrink the block so that a short row is streamed in several blocks.
FORCE_BLOCK_V = None


# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------

@triton.jit
def _compact_sorted(scratch_row, raw, cand, n, slots, KP: tl.constexpr, acc: tl.constexpr):
    # Stream compaction through this row's scratch (L1/L2-resident): n <= KP
    # candidates land in slots 0..n-1, then come back as one KP-vector.
    pos = tl.cumsum(cand.to(tl.int32), axis=0) - 1
    tl.debug_barrier()  # every thread has read the previous merge's slots
    tl.store(scratch_row + pos, raw, mask=cand)
    tl.debug_barrier()  # ... and sees every thread's stores
    new = tl.load(scratch_row + slots, mask=slots < n, other=float("-inf"), cache_modifier=".cg")
    return tl.sort(new.to(acc), descending=True)


@triton.jit
def _block_topk(xs, KP: tl.constexpr, BLOCK_V: tl.constexpr):
    # n > KP candidates (the first block, or rows in ascending order): a bitonic
    # top-KP of the whole block, sorted descending. Unreachable when BLOCK_V <= KP.
    if BLOCK_V > KP:
        return tl.topk(xs, KP)
    else:
        return tl.full([KP], float("-inf"), xs.dtype)


@triton.jit
def _merge_into_top(top, new):
    # top ascending, new descending: their elementwise max holds the KP largest
    # values of the union as a bitonic sequence; one merge sorts it again.
    return tl.bitonic_merge(tl.maximum(top, new), descending=False)


@triton.jit
def _prsl_forward_kernel(
    logits_ptr, target_ptr, loss_ptr, stats_ptr, scratch_ptr,
    stride_row, V, k, b_hi, b_lo, ignore_index,
    HAS_TOPK: tl.constexpr,  # False when k == 0 (or b == 0): plain cross-entropy, no selection
    KP: tl.constexpr,  # top-k buffer size, a power of two > k
    BLOCK_V: tl.constexpr,
):
    acc = loss_ptr.dtype.element_ty
    # int64: row * stride_row exceeds 2^31 for large N * V.
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(target_ptr + row)
    stat_cols = tl.arange(0, 8)
    stats_row = stats_ptr + row * _NUM_STATS
    if target == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        tl.store(stats_row + stat_cols, tl.zeros([8], acc), mask=stat_cols < _NUM_STATS)
        return

    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), acc)
    s = tl.full([], 0.0, acc)
    if HAS_TOPK:
        slots = tl.arange(0, KP)
        scratch_row = scratch_ptr + row * KP
        top = tl.full([KP], float("-inf"), acc)
        thr = tl.full([], float("-inf"), acc)

    for start in range(0, V, BLOCK_V):
        idx = start + cols
        raw = tl.load(row_ptr + idx, mask=idx < V, other=float("-inf"))
        x = raw.to(acc)
        # Online log-sum-exp. While every value so far is -inf, shift by 0 so
        # that exp(-inf - -inf) never makes a nan; +inf still gives nan (as torch).
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        m = m_new
        if HAS_TOPK:
            xs = tl.where(idx == target, float("-inf"), x)
            cand = xs > thr
            n = tl.sum(cand.to(tl.int32), axis=0)
            if n > 0:
                if n <= KP:
                    new = _compact_sorted(scratch_row, raw, cand, n, slots, KP, acc)
                else:
                    new = _block_topk(xs, KP, BLOCK_V)
                top = _merge_into_top(top, new)
                thr = tl.min(top, axis=0)

    lse = m + tl.log(s)
    # Loaded last: held across the loop it is the one value ptxas spills.
    z_target = tl.load(row_ptr + target).to(acc)
    if HAS_TOPK:
        b = tl.cast(b_hi, acc) + tl.cast(b_lo, acc)
        # top is ascending: the k-th largest sits at KP - k.
        tau = tl.max(tl.where(slots == KP - k, top, float("-inf")), axis=0)
        p_min = tl.exp(tau - lse)
        u = tl.where(top > tau, tl.exp(top - lse) - p_min, 0.0)
        spread = tl.sum(u, axis=0)
        dist = tl.sqrt(tl.sum(u * u, axis=0))
        ties = tl.sum((top == tau).to(tl.int32), axis=0)
        if thr == tau:
            # The buffer may not hold every tie: count them over the whole row.
            ties = 0
            for start in range(0, V, BLOCK_V):
                idx = start + cols
                x = tl.load(row_ptr + idx, mask=idx < V, other=float("-inf")).to(acc)
                ties += tl.sum(((x == tau) & (idx != target) & (idx < V)).to(tl.int32), axis=0)
        tie_count = ties.to(acc)
        loss = lse - z_target + b * dist
    else:
        tau = tl.full([], float("inf"), acc)
        spread = tl.full([], 0.0, acc)
        dist = spread
        tie_count = spread
        loss = lse - z_target
    tl.store(loss_ptr + row, loss)
    stats = tl.where(stat_cols == _LSE, lse,
                     tl.where(stat_cols == _TAU, tau,
                              tl.where(stat_cols == _DIST, dist,
                                       tl.where(stat_cols == _SPREAD, spread, tie_count))))
    tl.store(stats_row + stat_cols, stats, mask=stat_cols < _NUM_STATS)


@triton.jit
def _prsl_backward_kernel(
    grad_rows_ptr, logits_ptr, target_ptr, stats_ptr, grad_ptr,
    stride_row, V, b_hi, b_lo, ignore_index,
    BLOCK_V: tl.constexpr,
):
    acc = stats_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    idx = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_row = idx < V
    out_ptr = grad_ptr + row * V + idx
    target = tl.load(target_ptr + row)
    if target == ignore_index:
        tl.store(out_ptr, tl.zeros([BLOCK_V], grad_ptr.dtype.element_ty), mask=in_row)
        return

    stats_row = stats_ptr + row * _NUM_STATS
    lse = tl.load(stats_row + _LSE)
    tau = tl.load(stats_row + _TAU)
    dist = tl.load(stats_row + _DIST)
    spread = tl.load(stats_row + _SPREAD)
    tie_count = tl.load(stats_row + _TIES)
    grad_row = tl.load(grad_rows_ptr + row)
    b = tl.cast(b_hi, acc) + tl.cast(b_lo, acc)

    has_dist = dist > 0
    inv_dist = tl.where(has_dist, 1.0 / tl.where(has_dist, dist, 1.0), 0.0)
    g_tie = tl.where(tie_count > 0, -(spread * inv_dist) / tl.maximum(tie_count, 1.0), 0.0)
    # tau <= max z <= lse; the clamp only matters for k == 0 (tau = +inf), where
    # nothing lies above tau and exp(+inf) would turn the unused branch into nan.
    p_min = tl.exp(tl.minimum(tau, lse) - lse)

    x = tl.load(logits_ptr + row * stride_row + idx, mask=in_row, other=float("-inf")).to(acc)
    p = tl.exp(x - lse)
    is_target = idx == target
    g = tl.where(~is_target & (x > tau), (p - p_min) * inv_dist,
                 tl.where(~is_target & (x == tau), g_tie, 0.0))
    dz = p * (1.0 - b * dist) - tl.where(is_target, 1.0, 0.0) + b * p * g
    tl.store(out_ptr, (dz * grad_row).to(grad_ptr.dtype.element_ty), mask=in_row)


# ----------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
# Large blocks amortise the per-block reductions. The AOT report chose these:
# 4096-wide 16-bit blocks and 2048-wide blocks with the 2048-slot buffer spill
# registers on sm_80 / sm_90, so those use 1024 (with KP >= BLOCK_V every merge
# takes the compaction path, which is what a large k needs anyway).
_BLOCK_V = {torch.float16: 2048, torch.bfloat16: 2048, torch.float32: 2048, torch.float64: 1024}
_SMALL_BLOCK_V = 1024


class LaunchConfig(NamedTuple):
    kernel: str  # "forward" | "backward"
    dtype: torch.dtype
    constexprs: dict
    num_warps: int


def _block_v(dtype, vocab, kp=1):
    if FORCE_BLOCK_V is not None:
        return FORCE_BLOCK_V
    if vocab <= _SMALL_BLOCK_V or kp >= TOPK_BUFFER_SIZES[-1]:
        return _SMALL_BLOCK_V
    return _BLOCK_V[dtype]


# Where ptxas spills at the default warp count (benchmarks/aot_report.py):
# (dtype, KP, BLOCK_V) -> num_warps.
_NUM_WARPS_OVERRIDE = {(torch.float32, 32, 1024): 2}


def _num_warps(block_v, dtype=None, kp=None):
    # 8 elements per thread: a 16-byte load for 16-bit rows, two for float32.
    return _NUM_WARPS_OVERRIDE.get((dtype, kp, block_v), max(4, min(16, block_v // 256)))


def forward_config(dtype, vocab, k):
    kp = next(size for size in TOPK_BUFFER_SIZES if size > k) if k > 0 else 1
    block_v = _block_v(dtype, vocab, kp)
    return LaunchConfig("forward", dtype, {"HAS_TOPK": k > 0, "KP": kp, "BLOCK_V": block_v},
                        _num_warps(block_v, dtype, kp))


def backward_config(dtype, vocab):
    block_v = _block_v(dtype, vocab)
    return LaunchConfig("backward", dtype, {"BLOCK_V": block_v}, _num_warps(block_v))


def launch_configs():
    """Every configuration the launchers can pick (FORCE_BLOCK_V unset), for AOT checks."""
    configs = []
    for dtype in _TRITON_DTYPE:
        for vocab in sorted({_SMALL_BLOCK_V, _BLOCK_V[dtype]}):
            for config in [forward_config(dtype, vocab, 0), backward_config(dtype, vocab)] + \
                    [forward_config(dtype, vocab, size - 1) for size in TOPK_BUFFER_SIZES]:
                if config not in configs:
                    configs.append(config)
    return configs


def aot_signature(config):
    """``(kernel fn, signature, constexprs)`` for ``triton.compiler.ASTSource``."""
    elem, acc = _TRITON_DTYPE[config.dtype], _TRITON_DTYPE[stats_dtype(config.dtype)]
    if config.kernel == "forward":
        fn = _prsl_forward_kernel
        sig = {"logits_ptr": f"*{elem}", "target_ptr": "*i64", "loss_ptr": f"*{acc}", "stats_ptr": f"*{acc}",
               "scratch_ptr": f"*{elem}", "stride_row": "i64", "V": "i32", "k": "i32", "b_hi": "fp32",
               "b_lo": "fp32", "ignore_index": "i64"}
    else:
        fn = _prsl_backward_kernel
        sig = {"grad_rows_ptr": f"*{acc}", "logits_ptr": f"*{elem}", "target_ptr": "*i64",
               "stats_ptr": f"*{acc}", "grad_ptr": f"*{elem}", "stride_row": "i64", "V": "i32",
               "b_hi": "fp32", "b_lo": "fp32", "ignore_index": "i64"}
    sig.update({name: "constexpr" for name in config.constexprs})
    return fn, sig, dict(config.constexprs)


# ----------------------------------------------------------------------------
# Launchers (the kernel contract of prsl_kernels.ops)
# ----------------------------------------------------------------------------

def _split_b(b):
    # Triton passes Python floats as float32; hi + lo carries b to ~48 bits for float64 rows.
    b_hi = float(np.float32(b))
    return b_hi, (b - b_hi) if math.isfinite(b_hi) else 0.0


def _device_guard(tensor):
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def forward(logits, target, k, b, ignore_index):
    """``(loss_rows[N], row_stats[N, 5])`` in the stats dtype (see ``prsl_kernels.ops``)."""
    n_rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    target = target.contiguous()
    acc = stats_dtype(logits.dtype)
    loss_rows = torch.empty(n_rows, dtype=acc, device=logits.device)
    row_stats = torch.empty(n_rows, NUM_ROW_STATS, dtype=acc, device=logits.device)
    if n_rows == 0:
        return loss_rows, row_stats
    if k > MAX_K:
        return _forward_torch(logits, target, k, b, ignore_index)
    config = forward_config(logits.dtype, vocab, k)
    # The scratch rows only see compacted candidates; without top-k any pointer will do.
    scratch = torch.empty(n_rows, config.constexprs["KP"], dtype=logits.dtype, device=logits.device) \
        if k > 0 else logits
    b_hi, b_lo = _split_b(b)
    with _device_guard(logits):
        _prsl_forward_kernel[(n_rows,)](
            logits, target, loss_rows, row_stats, scratch,
            logits.stride(0), vocab, k, b_hi, b_lo, ignore_index,
            **config.constexprs, num_warps=config.num_warps)
    return loss_rows, row_stats


def backward(grad_rows, logits, target, row_stats, b, ignore_index):
    """``grad_logits[N, V]``, contiguous, in the logits' dtype (see ``prsl_kernels.ops``)."""
    n_rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    grad_logits = torch.empty((n_rows, vocab), dtype=logits.dtype, device=logits.device)
    if n_rows == 0 or vocab == 0:
        return grad_logits
    config = backward_config(logits.dtype, vocab)
    block_v = config.constexprs["BLOCK_V"]
    b_hi, b_lo = _split_b(b)
    with _device_guard(logits):
        _prsl_backward_kernel[(n_rows, triton.cdiv(vocab, block_v))](
            grad_rows.contiguous(), logits, target.contiguous(), row_stats.contiguous(), grad_logits,
            logits.stride(0), vocab, b_hi, b_lo, ignore_index,
            **config.constexprs, num_warps=config.num_warps)
    return grad_logits


def _forward_torch(logits, target, k, b, ignore_index, chunk_elems=1 << 24):
    """Row statistics for k > MAX_K with torch ops, row-chunked (no host syncs)."""
    n_rows, vocab = logits.shape
    acc = stats_dtype(logits.dtype)
    loss_rows = torch.empty(n_rows, dtype=acc, device=logits.device)
    row_stats = torch.empty(n_rows, NUM_ROW_STATS, dtype=acc, device=logits.device)
    rows_per_chunk = max(1, chunk_elems // vocab)
    for first in range(0, n_rows, rows_per_chunk):
        z = logits[first:first + rows_per_chunk].to(acc)
        t = target[first:first + rows_per_chunk]
        counted = t != ignore_index
        t_safe = torch.where(counted, t, torch.zeros_like(t))
        lse = torch.logsumexp(z, dim=-1)
        z_target = z.gather(1, t_safe[:, None]).squeeze(1)
        # The k+1 largest with their indices: dropping the target (when present)
        # leaves exactly the k largest non-target values.
        values, indices = z.topk(k + 1, dim=-1)
        is_target = indices == t_safe[:, None]
        drop = torch.where(is_target.any(-1), is_target.int().argmax(-1), torch.full_like(t, k))
        ranks = torch.arange(k, device=z.device)
        values = values.gather(1, ranks + (ranks[None, :] >= drop[:, None]).long())
        tau = values[:, -1]
        p_min = torch.exp(tau - lse)
        u = torch.where(values > tau[:, None], torch.exp(values - lse[:, None]) - p_min[:, None],
                        torch.zeros_like(values))
        spread = u.sum(-1)
        dist = (u * u).sum(-1).sqrt()
        ties = (z == tau[:, None]).sum(-1) - (z_target == tau).long()
        stats = torch.stack([lse, tau, dist, spread, ties.to(acc)], dim=1)
        loss = lse - z_target + b * dist
        loss_rows[first:first + rows_per_chunk] = torch.where(counted, loss, torch.zeros_like(loss))
        row_stats[first:first + rows_per_chunk] = torch.where(counted[:, None], stats,
                                                              torch.zeros_like(stats))
    return loss_rows, row_stats


def _patch_interpreter():
    """Four fixes to triton 3.6's CPU interpreter (TRITON_INTERPRET=1: tests, debugging).

    * It holds scalar arguments as 1-element numpy arrays and converts them with
      ``int()`` for ``range(0, V, BLOCK_V)``, which numpy >= 2.4 refuses.
    * It reduces ``xor_sum`` (the swap step of ``tl.sort`` / ``tl.topk`` /
      ``tl.bitonic_merge``) one element at a time in Python; numpy does it at once.
    * It re-patches triton.language on every nested ``@triton.jit`` call.
    * It truncates float32 -> bfloat16 where the GPU rounds to nearest even.
    Compiled kernels are unaffected.
    """
    import inspect

    from triton.runtime import interpreter

    original_patch = interpreter._patch_lang_tensor
    if getattr(original_patch, "prsl_patched", False):
        return

    def patch_lang_tensor(tensor, scope):
        original_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor.prsl_patched = True
    interpreter._patch_lang_tensor = patch_lang_tensor

    # Every nested @triton.jit call (each step of a bitonic sort) re-patches all
    # of triton.language; skip it while this launch's patches are still in place.
    # The marker goes through the scope, so the launch's restore clears it with
    # the patches it belongs to.
    original_patch_lang = interpreter._patch_lang

    def patch_lang(fn):
        langs = [v for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)]
        if langs and all(getattr(lang, "_prsl_interpreter_patched", False) for lang in langs):
            return interpreter._LangPatchScope()
        scope = original_patch_lang(fn)
        for lang in langs:
            scope.set_attr(lang, "_prsl_interpreter_patched", True)
        return scope

    interpreter._patch_lang = patch_lang

    reduce_ops = interpreter.ReduceOps
    original_apply = reduce_ops.apply_impl

    def apply_impl(self, input):
        if self.combine_fn == tl.standard._xor_combine and self.axis is not None:
            data = np.bitwise_xor.reduce(input[0].handle.data, axis=self.axis, keepdims=self.keep_dims)
            return self.to_tensor(data, input[0].dtype)
        return original_apply(self, input)

    reduce_ops.apply_impl = apply_impl

    builder = interpreter.InterpreterBuilder
    original_cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return original_cast(self, src, dst_type)

    builder.cast_impl = cast_impl


if os.environ.get("TRITON_INTERPRET", "0") == "1":
    _patch_interpreter()

ops.forward.register_kernel("cuda")(forward)
ops.backward.register_kernel("cuda")(backward)

__all__ = ["forward", "backward", "MAX_K", "TOPK_BUFFER_SIZES", "launch_configs", "forward_config",
           "backward_config", "aot_signature", "LaunchConfig"]
