"""Fused Triton kernels for PRSL (spec: ``docs/spec.md``), registered as the
CUDA kernels of ``prsl::forward`` / ``prsl::backward``.

Per row ``z`` (length V, target ``s``), accumulating in float32 (float64 for
float64 logits):

    lse = log sum_j exp(z_j)                 loss = lse - z_s + b * D
    tau = k-th largest of {z_j : j != s}     A = {j != s : z_j > tau}, T = {j != s : z_j == tau}
    u_j = exp(z_j - lse) - exp(tau - lse)    S = sum_A u_j, D = sqrt(sum_A u_j^2)

Forward, k < 128 (``_prsl_forward_kernel``, one program per row). The row is
walked in TILE-wide tiles that start 16-byte aligned (the first and last tiles
are masked, the others are plain vector loads), each viewed as
``[GROUPS, VEC]`` with VEC elements per 16 bytes. A *group* is one row of that
view, i.e. the same VEC lanes of every tile: GROUPS disjoint subsets of the row.

* Pass 1 reads the row from memory once: a per-group online log-sum-exp. Its
  running maxima are also the group maxima, so the selection costs nothing in
  the streaming loop: no compare, no reduction across threads, no barrier.
* The k-th largest group maximum (the target's group left out) is a lower
  bound ``thr`` of tau: those k maxima are k distinct non-target logits.
* Only groups whose maximum reaches ``thr`` can hold a candidate (a logit
  ``>= thr``); there are about k of them. They are listed (a prefix sum over
  the groups), and pass 2 reads just their VEC lanes of every tile again (from
  L2: the row was just streamed), ROWS chunks of VEC lanes per step. Chunks
  holding candidates go to a per-row chunk list, their candidates to a
  candidate list of CAP slots, both placed by prefix sums: a fixed order, no
  atomics (measured on an H200: per-candidate atomics on a row counter cost
  more than the whole streaming pass). For continuous logits there are about
  ``k + k^2 / (2 GROUPS)`` candidates; every logit of A and of T is one.
* A top-KP of the candidate values gives tau, A, S, D and |T| exactly.

A row whose listed groups or candidates do not fit (heavy ties), with fewer than
k finite groups, or whose lse is NaN is *flagged*; a second launch of the exact kernel
(``_prsl_forward_exact_kernel``, below) recomputes only flagged rows and
returns at once for the others: no host sync. For 128 <= k <= MAX_K the exact
kernel runs every row: a register buffer of the KP >= k+1 largest non-target
values seen so far, merged block by block (compaction through a per-row scratch
row, or a bitonic top-KP, then one bitonic merge); |T| is counted in the buffer,
with a second pass over the row only when the buffer may not hold every tie.
For k > MAX_K the launcher computes the row statistics with torch ops
(``torch.topk``, row-chunked, O(N * k) memory); the backward is unchanged.

Backward (a 2-D grid, rows x about 8 tiles a program, a row's tiles split
evenly over its programs, aligned like the forward's; interior tiles as unmasked
vector loads and stores, each next tile's load issued before this tile's store;
a tile is never narrower than VEC, which keeps every unmasked tile inside the row):
from lse, tau, D, S, |T| and the target,

    dz_j = grad_row * (p_j (1 - b D) - [j == s] + b p_j g_j),
    g_j = u_j / D on A, -(S / D) / |T| on T, 0 elsewhere (g = 0 when D == 0),

read once, written once, in the logits' dtype.

Gradient in the forward (``forward_grad``; ``prsl_loss`` for mean / sum, and
``linear_prsl_loss``): the forward kernels with WRITE_GRAD run that same tile loop
over each row right after its statistics, while the row is in L2, into a fresh
buffer or over the logits themselves (every tile is read before it is written, and a
barrier per row orders the row's other reads, the target logit's above all, before any
warp's first store). The two-pass kernel skips the rows it flags; the exact kernel
writes theirs. Rows that overlap in memory, or a grad_out that partly overlaps the
logits, are refused.

Options (spec, "Options"), each a constexpr flag, so that with all of them off
every kernel is the code above: SOFTCAP replaces each loaded logit by
``c tanh(z / c)`` wherever one is read (both forward passes, the exact kernel,
the backward, which also multiplies by the slope ``1 - tanh^2``; the padding of
masked tiles stays -inf); SMOOTH adds one per-group (per-block) sum of z to the
first pass and ``-eps/V`` to every gradient column; ZLOSS adds ``lam lse^2`` to
the loss and ``2 lam lse p_j`` to the gradient. The sixth stat, ``correct``,
compares z_s with the row maximum the first pass already has. The seventh,
``entropy`` H = -sum_j p_j log p_j, comes from the first pass too: beside each
online max m and sum s = sum_j e_j (e_j = exp(z_j - m)) a third sum
t = sum_j e_j (z_j - m), rescaled as t <- a (t + (m_old - m_new) s) with
a = exp(m_old - m_new) when m grows; then H = log S - T / S for the row's S, T.

A target that is neither ``ignore_index`` nor in ``[0, V)`` (possible with
``check_target=False``) is never dereferenced: that row's loss and lse are NaN,
so its gradient is NaN too.
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
from .spec import CORRECT, DIST, ENTROPY, LSE, NUM_ROW_STATS, SPREAD_SUM, TAU, TIE_COUNT, stats_dtype

# The top-k buffer sizes: k uses the smallest one holding k + 1 values (the
# extra slot detects ties past tau in the exact kernel). Buffers up to
# FAST_MAX_KP take the two-pass kernel.
TOPK_BUFFER_SIZES = (8, 32, 128, 512, 2048)
FAST_MAX_KP = 128
MAX_K = TOPK_BUFFER_SIZES[-1] - 1

# The row-stats columns (spec.py), visible inside the kernels.
_NUM_STATS = tl.constexpr(NUM_ROW_STATS)
_LSE, _TAU, _DIST, _SPREAD, _TIES, _CORRECT, _ENTROPY = (tl.constexpr(c) for c in (LSE, TAU, DIST, SPREAD_SUM,
                                                                                  TIE_COUNT, CORRECT, ENTROPY))
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------

@triton.jit
def _store_filler_row(loss_row, stats_row, value: tl.constexpr, acc: tl.constexpr):
    # An ignored row (0) or one with an out-of-range target (NaN, which the backward turns
    # into a NaN gradient): its loss and every row statistic.
    stat_cols = tl.arange(0, 8)
    tl.store(loss_row, value)
    tl.store(stats_row + stat_cols, tl.full([8], value, acc), mask=stat_cols < _NUM_STATS)


@triton.jit
def _load_tile(tile_ptr, pos, offs, V, MASKED: tl.constexpr):
    # Interior tiles are unmasked so that they compile to 16-byte vector loads.
    if MASKED:
        return tl.load(tile_ptr + offs, mask=(pos >= 0) & (pos < V), other=float("-inf"))
    else:
        return tl.load(tile_ptr + offs)


@triton.jit
def _tanh(x):
    # Portable tanh (no libdevice: the same code compiles for CUDA and runs in the
    # interpreter). |x| >= 0.625: (1 - e) / (1 + e), e = exp(-2|x|) <= 0.29, exactly
    # +-1 once e is below half an ulp; below: Cephes' odd polynomial (float32, ~2 ulp)
    # or rational function (float64). NaN stays NaN.
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    large = (1.0 - e) / (1.0 + e)
    large = tl.where(x < 0, -large, large)
    z = x * x
    if x.dtype == tl.float64:
        p = ((-9.64399179425052238628e-1 * z - 9.92877231001918586564e1) * z - 1.61468768441708447952e3)
        q = (((z + 1.12811678491632931402e2) * z + 2.23548839060100448583e3) * z + 4.84406305325125486048e3)
        small = x + x * z * (p / q)
    else:
        q = -5.70498872745e-3 * z + 2.06390887954e-2
        q = q * z - 5.37397155531e-2
        q = q * z + 1.33314422036e-1
        q = q * z - 3.33332819422e-1
        small = q * z * x + x
    return tl.where(ax >= 0.625, large, small)


@triton.jit
def _softcap(x, cap):
    # c * tanh(z / c), written as the spec and the reference write it.
    return cap * _tanh(x / cap)


@triton.jit
def _pass1_tile(tile_ptr, pos, offs, V, m, s, h, zs, cap, MASKED: tl.constexpr, SOFTCAP: tl.constexpr,
                SMOOTH: tl.constexpr, acc: tl.constexpr, USE_EXP2: tl.constexpr):
    # One tile of the first pass: loads (capped when SOFTCAP, padding kept at -inf),
    # the group log-sum-exp with its entropy sum and, for SMOOTH, the group sums of z.
    raw = _load_tile(tile_ptr, pos, offs, V, MASKED)
    if SOFTCAP:
        x = _softcap(raw.to(acc), cap)
        if MASKED:
            x = tl.where((pos >= 0) & (pos < V), x, float("-inf"))
        raw = x
    if SMOOTH:
        x = raw.to(acc)
        if MASKED:
            x = tl.where((pos >= 0) & (pos < V), x, 0.0)
        zs += tl.sum(x, axis=1)
    m, s, h = _group_lse_step(raw, m, s, h, acc, USE_EXP2)
    return m, s, h, zs


@triton.jit
def _row_loss(lse, z_target, z_sum, V, eps, lam, SMOOTH: tl.constexpr, ZLOSS: tl.constexpr):
    # The cross-entropy part of the loss: lse - z_s, label-smoothed and with z-loss when asked.
    ce = lse - z_target
    if SMOOTH:
        ce = (1.0 - eps) * ce + eps * (lse - z_sum / V)
    if ZLOSS:
        ce += lam * lse * lse
    return ce


@triton.jit
def _stats_vector(stat_cols, lse, tau, dist, spread, tie_count):
    # The five statistics the backward reads, in their columns (correct is stored apart).
    return tl.where(stat_cols == _LSE, lse,
                    tl.where(stat_cols == _TAU, tau,
                             tl.where(stat_cols == _DIST, dist,
                                      tl.where(stat_cols == _SPREAD, spread, tie_count))))


@triton.jit
def _group_lse_step(raw, m, s, h, acc: tl.constexpr, USE_EXP2: tl.constexpr):
    # Per-group online log-sum-exp; the reductions run along VEC, inside one
    # thread. While a group holds only -inf, shift by 0 so exp(-inf - -inf)
    # never makes a nan; +inf still gives nan (as torch).
    # h = sum_j e_j y_j, y_j the exp's argument (z_j - m, in base-2 units with USE_EXP2), for the
    # entropy: when m moves, h <- a (h + d s) with d the old shift minus the new in those units
    # (0 while the group held only -inf: then s = h = 0). A term whose e is 0 (a -inf logit, y
    # = -inf) adds 0, not 0 * -inf.
    x = raw.to(acc)
    m_new = tl.maximum(m, tl.max(x, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    moved = tl.where(m == float("-inf"), 0.0, m - shift)
    if USE_EXP2:
        # exp(x - shift) = 2^(x log2e - shift log2e): one FMA and one ex2 per logit.
        shift2 = shift * _LOG2E
        a = tl.exp2((m - shift) * _LOG2E)
        y = x * _LOG2E - shift2[:, None]
        moved = moved * _LOG2E
    else:
        a = tl.exp(m - shift)
        y = x - shift[:, None]
    e = tl.exp2(y) if USE_EXP2 else tl.exp(y)
    h = a * (h + moved * s) + tl.sum(e * tl.where(e == 0.0, 0.0, y), axis=1)
    s = s * a + tl.sum(e, axis=1)
    return m_new, s, h


@triton.jit
def _row_entropy(m, s, h, shift, USE_EXP2: tl.constexpr):
    # H = log S - T / S of the row from its groups' (m, s, h), everything rescaled to the row's
    # shift (a group of -inf only has s = h = 0 and adds 0).
    a = tl.exp(m - shift)
    moved = tl.where(m == float("-inf"), 0.0, m - shift)
    if USE_EXP2:
        h = h * _LN2
    total = tl.sum(s * a, axis=0)
    return tl.log(total) - tl.sum(a * (h + moved * s), axis=0) / total


@triton.jit
def _gather_chunks(tile0, group_row, gl0, tb0, n_groups, n_tiles, thr, target, lead, V, cap,
                   TILE: tl.constexpr, VEC: tl.constexpr, T_BLK: tl.constexpr, ROWS: tl.constexpr,
                   acc: tl.constexpr, SOFTCAP: tl.constexpr):
    # ROWS chunks at once, one per thread: the VEC lanes of listed group gl0 + r // T_BLK
    # in tile tb0 + r % T_BLK. Only chunks wholly inside the row are read here (the
    # mask is constant along VEC: 16-byte loads); the row's partial head and tail
    # chunks are _edge_chunks'. Returns the chunks (-inf off the candidates) and
    # which of them hold a candidate (>= thr, not the target).
    rows = tl.arange(0, ROWS)
    gl = gl0 + rows // T_BLK
    tb = tb0 + rows % T_BLK
    row_ok = (gl < n_groups) & (tb < n_tiles)
    gid = tl.load(group_row + gl, mask=row_ok, other=0)
    first = tb * TILE + gid * VEC  # the chunk's offset from the aligned tile start
    full = row_ok & (first - lead >= 0) & (first - lead + VEC <= V)
    offs = first[:, None] + tl.arange(0, VEC)[None, :]
    x = tl.load(tile0 + offs, mask=full[:, None], other=float("-inf")).to(acc)
    if SOFTCAP:
        x = tl.where(full[:, None], _softcap(x, cap), float("-inf"))
    hit = (x >= thr) & (offs - lead != target)
    return tl.where(hit, x, float("-inf")), tl.max(hit.to(tl.int32), axis=1)


@triton.jit
def _edge_chunks(tile0, thr, target, lead, V, cap, VEC: tl.constexpr, acc: tl.constexpr,
                 SOFTCAP: tl.constexpr):
    # The row's first and last chunks when they straddle its ends (skipped by
    # _gather_chunks), each once: as _gather_chunks, with masked 2-byte loads.
    # Row 0 of the result is the head chunk, row 1 the tail chunk.
    tail_first = ((V - 1 + lead) // VEC) * VEC
    head_partial = (lead > 0) | (V < VEC)
    tail_partial = (tail_first > 0) & (tail_first - lead + VEC > V)
    edge = tl.arange(0, 2)[:, None]
    offs = edge * tail_first + tl.arange(0, VEC)[None, :]
    take = tl.where(edge == 0, head_partial.to(tl.int32), tail_partial.to(tl.int32))
    inside = (take > 0) & (offs - lead >= 0) & (offs - lead < V)
    x = tl.load(tile0 + offs, mask=inside, other=float("-inf")).to(acc)
    if SOFTCAP:
        x = tl.where(inside, _softcap(x, cap), float("-inf"))
    hit = (x >= thr) & (offs - lead != target)
    return tl.where(hit, x, float("-inf")), tl.max(hit.to(tl.int32), axis=1)


@triton.jit
def _prsl_forward_kernel(
    logits_ptr, target_ptr, loss_ptr, stats_ptr, group_ptr, chunk_ptr, cand_ptr, flag_ptr, grad_rows_ptr, grad_ptr,
    stride_row, grad_stride, V, k, b_hi, b_lo, ignore_index, eps_hi, eps_lo, lam_hi, lam_lo, cap_hi, cap_lo,
    HAS_TOPK: tl.constexpr,  # False when k == 0 (or b == 0): plain cross-entropy, one pass
    KP: tl.constexpr,  # top-k size of the selections, a power of two > k
    CAP: tl.constexpr,  # candidate slots per row
    GCAP: tl.constexpr,  # listed groups per row
    ROWS: tl.constexpr,  # chunks gathered per step: one per thread
    T_BLK: tl.constexpr,  # tiles per step (ROWS // T_BLK listed groups)
    TILE: tl.constexpr,
    VEC: tl.constexpr,  # elements per 16 bytes
    ALIGNED: tl.constexpr,  # logits_ptr is 16-byte aligned: tiles can start aligned
    USE_EXP2: tl.constexpr,  # float32 accumulation (float64 keeps exp)
    SOFTCAP: tl.constexpr = False,  # the options (module docstring), all off by default
    SMOOTH: tl.constexpr = False,
    ZLOSS: tl.constexpr = False,
    WRITE_GRAD: tl.constexpr = False,  # also the gradient (grad_rows-weighted) of unflagged rows, into grad_ptr
    GRAD_TILE: tl.constexpr = 2048,
    GRAD_ALIGNED: tl.constexpr = False,  # logits and gradient rows share their offset mod VEC
):
    acc: tl.constexpr = loss_ptr.dtype.element_ty
    GROUPS: tl.constexpr = TILE // VEC
    # int64: row * stride_row exceeds 2^31 for large N * V.
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(target_ptr + row)
    stat_cols = tl.arange(0, 8)
    stats_row = stats_ptr + row * _NUM_STATS
    if target == ignore_index:
        _store_filler_row(loss_ptr + row, stats_row, 0.0, acc)
        if HAS_TOPK:
            tl.store(flag_ptr + row, 0)
        if WRITE_GRAD:
            _fill_row_grad(grad_ptr, row, grad_stride, V, 0.0, GRAD_TILE)
        return
    if (target < 0) | (target >= V):
        # Never dereferenced: a NaN loss and lse mark the row (the backward turns it into NaN).
        _store_filler_row(loss_ptr + row, stats_row, float("nan"), acc)
        if HAS_TOPK:
            tl.store(flag_ptr + row, 0)
        if WRITE_GRAD:
            _fill_row_grad(grad_ptr, row, grad_stride, V, float("nan"), GRAD_TILE)
        return

    row_off = row * stride_row
    if ALIGNED:
        lead = (row_off % VEC).to(tl.int32)  # logits between the aligned tile start and the row start
        tile0 = logits_ptr + tl.multiple_of(row_off - lead, VEC)
    else:
        lead = 0
        tile0 = logits_ptr + row_off
    offs = tl.arange(0, GROUPS)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    n_tiles = tl.cdiv(V + lead, TILE)

    cap = tl.cast(cap_hi, acc) + tl.cast(cap_lo, acc)
    m = tl.full([GROUPS], float("-inf"), acc)
    s = tl.zeros([GROUPS], acc)
    h = tl.zeros([GROUPS], acc)  # entropy: group sums of e_j y_j (_group_lse_step)
    zs = tl.zeros([GROUPS], acc)  # SMOOTH: group sums of z
    m, s, h, zs = _pass1_tile(tile0, offs - lead, offs, V, m, s, h, zs, cap, True, SOFTCAP, SMOOTH, acc, USE_EXP2)
    for t in range(1, n_tiles - 1):
        m, s, h, zs = _pass1_tile(tile0 + t * TILE, offs, offs, V, m, s, h, zs, cap, False, SOFTCAP, SMOOTH, acc,
                                  USE_EXP2)
    if n_tiles > 1:
        last = (n_tiles - 1) * TILE
        m, s, h, zs = _pass1_tile(tile0 + last, last + offs - lead, offs, V, m, s, h, zs, cap, True, SOFTCAP,
                                  SMOOTH, acc, USE_EXP2)
    m_row = tl.max(m, axis=0)
    shift = tl.where(m_row == float("-inf"), 0.0, m_row)
    lse = shift + tl.log(tl.sum(s * tl.exp(m - shift), axis=0))
    # Stored now, like correct below: nothing of h stays live across the selection.
    tl.store(stats_row + _ENTROPY, _row_entropy(m, s, h, shift, USE_EXP2))
    z_target = tl.load(logits_ptr + row_off + target).to(acc)
    if SOFTCAP:
        z_target = _softcap(z_target, cap)
    # Stored now: nothing of it stays live across the selection below (register pressure).
    tl.store(stats_row + _CORRECT, ((z_target >= m_row) & (lse == lse)).to(acc))
    z_sum = tl.sum(zs, axis=0)  # SMOOTH only (dead code otherwise)

    if HAS_TOPK:
        b = tl.cast(b_hi, acc) + tl.cast(b_lo, acc)
        # thr: the k-th largest group maximum outside the target's group.
        groups = tl.arange(0, GROUPS)
        target_group = ((target + lead) % TILE) // VEC
        best_groups = tl.topk(tl.where(groups == target_group, float("-inf"), m), KP)
        ranks = tl.arange(0, KP)
        thr = tl.max(tl.where(ranks == k - 1, best_groups, float("-inf")), axis=0)
        cand_row = cand_ptr + row * CAP
        group_row = group_ptr + row * GCAP
        chunk_row = chunk_ptr + row * (CAP * VEC)
        n_cand = CAP + 1  # flagged unless the candidates are listed below
        n_listed = 0
        if (thr > float("-inf")) & (lse == lse):
            # Only groups whose maximum reaches thr hold candidates (about k of them):
            # list them, then read just their lanes of every tile again.
            hit_groups = (m >= thr).to(tl.int32)
            rank = tl.cumsum(hit_groups, axis=0) - 1
            n_groups = tl.sum(hit_groups, axis=0)
            tl.store(group_row + rank, groups, mask=(hit_groups > 0) & (rank < GCAP))
            tl.debug_barrier()  # every thread sees the list
            if n_groups <= GCAP:
                # Read just the listed groups' lanes of every tile again (from L2):
                # ROWS chunks of VEC lanes per step, and append the chunks that hold
                # candidates to the row's chunk list (prefix sums: a fixed order, no atomics).
                n_chunks = 0
                chunk_lanes = tl.arange(0, VEC)[None, :]
                for gl0 in range(0, n_groups, ROWS // T_BLK):
                    for tb0 in range(0, n_tiles, T_BLK):
                        x, has = _gather_chunks(tile0, group_row, gl0, tb0, n_groups, n_tiles, thr, target, lead,
                                                V, cap, TILE, VEC, T_BLK, ROWS, acc, SOFTCAP)
                        slot = n_chunks + tl.cumsum(has, axis=0) - has
                        tl.store(chunk_row + slot[:, None] * VEC + chunk_lanes, x,
                                 mask=(has[:, None] > 0) & (slot[:, None] < CAP))
                        n_chunks += tl.sum(has, axis=0)
                edge_x, edge_has = _edge_chunks(tile0, thr, target, lead, V, cap, VEC, acc, SOFTCAP)
                edge_slot = n_chunks + tl.cumsum(edge_has, axis=0) - edge_has
                tl.store(chunk_row + edge_slot[:, None] * VEC + chunk_lanes, edge_x,
                         mask=(edge_has[:, None] > 0) & (edge_slot[:, None] < CAP))
                n_chunks += tl.sum(edge_has, axis=0)
                if n_chunks <= CAP:
                    # Compact the candidates of the listed chunks into the row's list.
                    tl.debug_barrier()  # every thread sees every chunk
                    chunk_slots = tl.arange(0, CAP * VEC)
                    x = tl.load(chunk_row + chunk_slots, mask=chunk_slots < n_chunks * VEC, other=float("-inf"),
                                cache_modifier=".cg")
                    hit = (x > float("-inf")).to(tl.int32)
                    n_cand = tl.sum(hit, axis=0)
                    # Fewer than k candidates cannot happen when both passes see the same values (k
                    # groups reach thr); if pass 2 ever computed a value differently from pass 1 (a
                    # recomputed softcap, say) tau would silently be -inf: count the row as unlisted,
                    # which flags it for the exact kernel. (Here, not in the flag's store: a compare
                    # there took the sm_90 bf16 k=20 config from 80 to 109 registers, 3 to 2 CTAs/SM.)
                    n_cand = tl.where(n_cand < k, CAP + 1, n_cand)
                    tl.store(cand_row + tl.cumsum(hit, axis=0) - 1, x, mask=(hit > 0) & (n_cand <= CAP))
                    tl.debug_barrier()  # ... and every candidate
                    n_listed = tl.where(n_cand <= CAP, n_cand, 0)
        slots = tl.arange(0, CAP)
        values = tl.load(cand_row + slots, mask=slots < n_listed, other=float("-inf"), cache_modifier=".cg")
        best = tl.topk(values, KP)
        tau = tl.max(tl.where(ranks == k - 1, best, float("-inf")), axis=0)
        p_min = tl.exp(tau - lse)
        u = tl.where(best > tau, tl.exp(best - lse) - p_min, 0.0)
        spread = tl.sum(u, axis=0)
        dist = tl.sqrt(tl.sum(u * u, axis=0))
        # Every logit equal to tau is >= thr, hence listed: the count is exact.
        tie_count = tl.sum((values == tau).to(tl.int32), axis=0).to(acc)
        loss = _row_loss(lse, z_target, z_sum, V, tl.cast(eps_hi, acc) + tl.cast(eps_lo, acc),
                         tl.cast(lam_hi, acc) + tl.cast(lam_lo, acc), SMOOTH, ZLOSS) + b * dist
        # Flagged rows are rewritten by the exact kernel.
        unflagged = n_cand <= CAP
        tl.store(flag_ptr + row, (n_cand > CAP).to(tl.int8))
    else:
        b = tl.cast(b_hi, acc) + tl.cast(b_lo, acc)
        unflagged = True
        tau = tl.full([], float("inf"), acc)
        spread = tl.full([], 0.0, acc)
        dist = spread
        tie_count = spread
        loss = _row_loss(lse, z_target, z_sum, V, tl.cast(eps_hi, acc) + tl.cast(eps_lo, acc),
                         tl.cast(lam_hi, acc) + tl.cast(lam_lo, acc), SMOOTH, ZLOSS)
    tl.store(loss_ptr + row, loss)
    stats = _stats_vector(stat_cols, lse, tau, dist, spread, tie_count)
    tl.store(stats_row + stat_cols, stats, mask=stat_cols < _CORRECT)  # correct, entropy: stored above
    if WRITE_GRAD:
        # In place (grad_ptr == logits_ptr) the gradient overwrites the row it is made from, and
        # the warps run unsynchronised: only thread 0's z_target reaches the loss, and warp 0 may
        # still be loading it (or any warp its pass-1 / pass-2 lanes) while another warp already
        # stores its gradient tiles, the target's column included. A cross-warp reduction after
        # the load would order them too, but none is certain to come (k = 0 has none at all), so
        # one barrier per row, against the row's thousands of loads and stores.
        tl.debug_barrier()
        if unflagged:  # a flagged row's gradient comes with its exact statistics
            _write_row_grad(logits_ptr, grad_ptr, grad_rows_ptr, row, stride_row, grad_stride, V, target, lse, tau,
                            dist, spread, tie_count, b, eps_hi, eps_lo, lam_hi, lam_lo, cap_hi, cap_lo, GRAD_TILE,
                            GRAD_ALIGNED, VEC, acc, USE_EXP2, SOFTCAP, SMOOTH, ZLOSS)


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
def _prsl_forward_exact_kernel(
    logits_ptr, target_ptr, loss_ptr, stats_ptr, scratch_ptr, flag_ptr, grad_rows_ptr, grad_ptr,
    stride_row, grad_stride, V, k, b_hi, b_lo, ignore_index, eps_hi, eps_lo, lam_hi, lam_lo, cap_hi, cap_lo,
    ONLY_FLAGGED: tl.constexpr,  # the two-pass kernel's second launch: skip unflagged rows
    KP: tl.constexpr,  # top-k buffer size, a power of two > k
    BLOCK_V: tl.constexpr,
    SOFTCAP: tl.constexpr = False,  # the options (module docstring); SOFTCAP: scratch_ptr holds acc values
    SMOOTH: tl.constexpr = False,
    ZLOSS: tl.constexpr = False,
    WRITE_GRAD: tl.constexpr = False,  # as the two-pass kernel's (rows start anywhere: unaligned tiles)
    USE_EXP2: tl.constexpr = True,  # WRITE_GRAD only: as the backward's (float64 keeps exp)
):
    acc: tl.constexpr = loss_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    if ONLY_FLAGGED:
        if tl.load(flag_ptr + row) == 0:
            return
    target = tl.load(target_ptr + row)
    stat_cols = tl.arange(0, 8)
    stats_row = stats_ptr + row * _NUM_STATS
    if target == ignore_index:
        _store_filler_row(loss_ptr + row, stats_row, 0.0, acc)
        if WRITE_GRAD:
            _fill_row_grad(grad_ptr, row, grad_stride, V, 0.0, BLOCK_V)
        return
    if (target < 0) | (target >= V):
        _store_filler_row(loss_ptr + row, stats_row, float("nan"), acc)
        if WRITE_GRAD:
            _fill_row_grad(grad_ptr, row, grad_stride, V, float("nan"), BLOCK_V)
        return

    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), acc)
    s = tl.full([], 0.0, acc)
    h = tl.full([], 0.0, acc)  # entropy: sum_j e_j (z_j - m), as in _group_lse_step
    slots = tl.arange(0, KP)
    scratch_row = scratch_ptr + row * KP
    top = tl.full([KP], float("-inf"), acc)
    thr = tl.full([], float("-inf"), acc)
    cap = tl.cast(cap_hi, acc) + tl.cast(cap_lo, acc)
    z_sum = tl.full([], 0.0, acc)  # SMOOTH: sum of z

    for start in range(0, V, BLOCK_V):
        idx = start + cols
        raw = tl.load(row_ptr + idx, mask=idx < V, other=float("-inf"))
        x = raw.to(acc)
        if SOFTCAP:
            x = tl.where(idx < V, _softcap(x, cap), float("-inf"))
            raw = x  # the scratch holds capped (acc) values
        if SMOOTH:
            z_sum += tl.sum(tl.where(idx < V, x, 0.0), axis=0)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp(m - shift)
        y = x - shift
        e = tl.exp(y)
        moved = tl.where(m == float("-inf"), 0.0, m - shift)
        h = a * (h + moved * s) + tl.sum(e * tl.where(e == 0.0, 0.0, y), axis=0)
        s = s * a + tl.sum(e, axis=0)
        m = m_new
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
    tl.store(stats_row + _ENTROPY, tl.log(s) - h / s)
    # Loaded last: held across the loop it is the one value ptxas spills.
    z_target = tl.load(row_ptr + target).to(acc)
    if SOFTCAP:
        z_target = _softcap(z_target, cap)
    tl.store(stats_row + _CORRECT, ((z_target >= m) & (lse == lse)).to(acc))
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
            if SOFTCAP:
                x = _softcap(x, cap)
            ties += tl.sum(((x == tau) & (idx != target) & (idx < V)).to(tl.int32), axis=0)
    tie_count = ties.to(acc)
    loss = _row_loss(lse, z_target, z_sum, V, tl.cast(eps_hi, acc) + tl.cast(eps_lo, acc),
                     tl.cast(lam_hi, acc) + tl.cast(lam_lo, acc), SMOOTH, ZLOSS) + b * dist
    tl.store(loss_ptr + row, loss)
    stats = _stats_vector(stat_cols, lse, tau, dist, spread, tie_count)
    tl.store(stats_row + stat_cols, stats, mask=stat_cols < _CORRECT)  # correct, entropy: stored above
    if WRITE_GRAD:
        # Every read of the row (z_target, the tie recount) before any warp's in-place store:
        # as in the two-pass kernel.
        tl.debug_barrier()
        _write_row_grad(logits_ptr, grad_ptr, grad_rows_ptr, row, stride_row, grad_stride, V, target, lse, tau, dist,
                        spread, tie_count, b, eps_hi, eps_lo, lam_hi, lam_lo, cap_hi, cap_lo, BLOCK_V, False, 1,
                        acc, USE_EXP2, SOFTCAP, SMOOTH, ZLOSS)


@triton.jit
def _grad_tile(raw, pos, target, lse, tau, p_min, c1, c3, c4, grad_row, cap, one_minus_eps, smooth,
               acc: tl.constexpr, USE_EXP2: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr):
    # dz_j = p_j (1 - b D + b g_j) - [j == s], with b g_j = c3 (p_j - p_min) on A,
    # c4 on T and 0 elsewhere, never at the target: about 15 instructions a logit.
    # Options: c1 holds 2 lam lse; SMOOTH: - (1 - eps) [j == s] - eps/V; SOFTCAP: on the
    # capped z, times the cap's slope 1 - tanh^2.
    x = raw.to(acc)
    if SOFTCAP:
        t = _tanh(x / cap)
        x = cap * t
    if USE_EXP2:
        p = tl.exp2(x * _LOG2E - lse * _LOG2E)
    else:
        p = tl.exp(x - lse)
    is_target = pos == target
    bg = tl.where(x > tau, (p - p_min) * c3, tl.where(x == tau, c4, 0.0))
    if SMOOTH:
        dz = p * (c1 + tl.where(is_target, 0.0, bg)) - tl.where(is_target, one_minus_eps, 0.0) - smooth
    else:
        dz = p * (c1 + tl.where(is_target, 0.0, bg)) - tl.where(is_target, 1.0, 0.0)
    dz = dz * grad_row
    if SOFTCAP:
        dz = dz * (1.0 - t * t)
    return dz


@triton.jit
def _fill_grad_tiles(out_row, lead, t_first, t_end, V, value: tl.constexpr, TILE: tl.constexpr):
    # An ignored row (0) or one with an out-of-range target (NaN): every gradient column.
    out_dtype: tl.constexpr = out_row.dtype.element_ty
    cols = tl.arange(0, TILE)
    for t in range(t_first, t_end):
        pos = t * TILE - lead + cols
        # Made in float32 and cast: the interpreter cannot make a bfloat16 constant.
        tl.store(out_row + t * TILE + cols, tl.full([TILE], value, tl.float32).to(out_dtype),
                 mask=(pos >= 0) & (pos < V))


@triton.jit
def _grad_tiles(in_row, out_row, lead, t_first, t_end, V, target32, lse, tau, dist, spread, tie_count, grad_row,
                b, eps_hi, eps_lo, lam_hi, lam_lo, cap_hi, cap_lo, TILE: tl.constexpr, acc: tl.constexpr,
                USE_EXP2: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, ZLOSS: tl.constexpr):
    # Tiles [t_first, t_end) of one row's gradient from its statistics: tile t covers row
    # positions [t * TILE - lead, (t + 1) * TILE - lead), in_row / out_row point at tile 0.
    # The first and last tiles of the row are masked, interior ones are unmasked vector
    # loads and stores: they lie inside the row only because TILE > lead (the launchers
    # keep TILE >= VEC > lead), so that tile 1 starts at TILE - lead > 0 and tile n - 2 ends
    # at (n - 1) TILE - lead < V. in_row == out_row is allowed (the in-place gradient): a
    # tile is read before it is written, and nothing else of the row is read afterwards.
    out_dtype: tl.constexpr = out_row.dtype.element_ty
    n_tiles = tl.cdiv(V + lead, TILE)
    cols = tl.arange(0, TILE)
    has_dist = dist > 0
    inv_dist = tl.where(has_dist, 1.0 / tl.where(has_dist, dist, 1.0), 0.0)
    g_tie = tl.where(tie_count > 0, -(spread * inv_dist) / tl.maximum(tie_count, 1.0), 0.0)
    # tau <= max z <= lse; the clamp only matters for k == 0 (tau = +inf), where
    # nothing lies above tau and exp(+inf) would turn the unused branch into nan.
    p_min = tl.exp(tl.minimum(tau, lse) - lse)
    c1 = 1.0 - b * dist
    if ZLOSS:
        c1 += 2.0 * (tl.cast(lam_hi, acc) + tl.cast(lam_lo, acc)) * lse
    c3 = b * inv_dist
    c4 = b * g_tie
    cap = tl.cast(cap_hi, acc) + tl.cast(cap_lo, acc)
    eps = tl.cast(eps_hi, acc) + tl.cast(eps_lo, acc)
    one_minus_eps = 1.0 - eps
    smooth = eps / V

    # The row's first and last tiles (masked), where they fall in [t_first, t_end).
    if (t_first == 0) & (t_end > 0):
        _grad_edge_tile(in_row, out_row, 0, lead, V, cols, target32, lse, tau, p_min, c1, c3, c4, grad_row, cap,
                        one_minus_eps, smooth, TILE, acc, USE_EXP2, SOFTCAP, SMOOTH)
    if (t_end == n_tiles) & (t_end > t_first) & (n_tiles > 1):
        _grad_edge_tile(in_row, out_row, n_tiles - 1, lead, V, cols, target32, lse, tau, p_min, c1, c3, c4,
                        grad_row, cap, one_minus_eps, smooth, TILE, acc, USE_EXP2, SOFTCAP, SMOOTH)
    # Interior tiles: unmasked 16-byte vector loads and stores, the next tile's load issued before
    # this tile's store (the compiler must otherwise assume that the store may alias it and wait).
    # In place (in_row == out_row) this is still exact: the prefetched tile is not the stored one.
    lo = tl.maximum(t_first, 1)
    hi = tl.minimum(t_end, n_tiles - 1)
    if lo < hi:
        raw = tl.load(in_row + lo * TILE + cols)
        for t in range(lo, hi):
            nxt = tl.load(in_row + tl.minimum(t + 1, hi - 1) * TILE + cols)
            dz = _grad_tile(raw, t * TILE - lead + cols, target32, lse, tau, p_min, c1, c3, c4, grad_row, cap,
                            one_minus_eps, smooth, acc, USE_EXP2, SOFTCAP, SMOOTH)
            tl.store(out_row + t * TILE + cols, dz.to(out_dtype))
            raw = nxt


@triton.jit
def _grad_edge_tile(in_row, out_row, t, lead, V, cols, target32, lse, tau, p_min, c1, c3, c4, grad_row, cap,
                    one_minus_eps, smooth, TILE: tl.constexpr, acc: tl.constexpr, USE_EXP2: tl.constexpr,
                    SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr):
    pos = t * TILE - lead + cols
    in_bounds = (pos >= 0) & (pos < V)
    raw = tl.load(in_row + t * TILE + cols, mask=in_bounds, other=float("-inf"))
    dz = _grad_tile(raw, pos, target32, lse, tau, p_min, c1, c3, c4, grad_row, cap, one_minus_eps, smooth,
                    acc, USE_EXP2, SOFTCAP, SMOOTH)
    tl.store(out_row + t * TILE + cols, dz.to(out_row.dtype.element_ty), mask=in_bounds)


@triton.jit
def _row_grad_ptrs(logits_ptr, grad_ptr, row, stride_row, grad_stride, ALIGNED: tl.constexpr, VEC: tl.constexpr):
    # (tile-0 pointers of the logits row and the gradient row, lead). ALIGNED: both rows
    # share their offset mod VEC (the launcher checks), so tiles start 16-byte aligned.
    if ALIGNED:
        lead = ((row * stride_row) % VEC).to(tl.int32)
        in_row = logits_ptr + tl.multiple_of(row * stride_row - lead, VEC)
        out_row = grad_ptr + tl.multiple_of(row * grad_stride - lead, VEC)
    else:
        lead = 0
        in_row = logits_ptr + row * stride_row
        out_row = grad_ptr + row * grad_stride
    return in_row, out_row, lead


@triton.jit
def _write_row_grad(logits_ptr, grad_ptr, grad_rows_ptr, row, stride_row, grad_stride, V, target, lse, tau, dist,
                    spread, tie_count, b, eps_hi, eps_lo, lam_hi, lam_lo, cap_hi, cap_lo, GRAD_TILE: tl.constexpr,
                    GRAD_ALIGNED: tl.constexpr, VEC: tl.constexpr, acc: tl.constexpr, USE_EXP2: tl.constexpr,
                    SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, ZLOSS: tl.constexpr):
    # The forward kernels' WRITE_GRAD: the whole row's gradient, right after its statistics,
    # while the row is still in L2 (the backward's read of it no longer goes to memory).
    tl.static_assert(GRAD_TILE >= VEC, "a gradient tile narrower than VEC starts tile 1 before the row")
    in_row, out_row, lead = _row_grad_ptrs(logits_ptr, grad_ptr, row, stride_row, grad_stride, GRAD_ALIGNED, VEC)
    n_tiles = tl.cdiv(V + lead, GRAD_TILE)
    _grad_tiles(in_row, out_row, lead, 0, n_tiles, V, target.to(tl.int32), lse, tau, dist, spread, tie_count,
                tl.load(grad_rows_ptr + row), b, eps_hi, eps_lo, lam_hi, lam_lo, cap_hi, cap_lo, GRAD_TILE, acc,
                USE_EXP2, SOFTCAP, SMOOTH, ZLOSS)


@triton.jit
def _fill_row_grad(grad_ptr, row, grad_stride, V, value: tl.constexpr, GRAD_TILE: tl.constexpr):
    out_row = grad_ptr + row * grad_stride
    _fill_grad_tiles(out_row, 0, 0, tl.cdiv(V, GRAD_TILE), V, value, GRAD_TILE)


@triton.jit
def _prsl_backward_kernel(
    grad_rows_ptr, logits_ptr, target_ptr, stats_ptr, grad_ptr,
    stride_row, grad_stride, V, b_hi, b_lo, ignore_index, eps_hi, eps_lo, lam_hi, lam_lo, cap_hi, cap_lo,
    TILE: tl.constexpr,
    TILES_PER_PROGRAM: tl.constexpr,  # the per-row setup (five stats, two divisions) is paid once per program
    ALIGNED: tl.constexpr,  # logits and gradient rows share their alignment: tiles start aligned
    VEC: tl.constexpr,
    USE_EXP2: tl.constexpr,  # float32 accumulation (float64 keeps exp)
    SOFTCAP: tl.constexpr = False,  # the options (module docstring), all off by default
    SMOOTH: tl.constexpr = False,
    ZLOSS: tl.constexpr = False,
):
    acc: tl.constexpr = stats_ptr.dtype.element_ty
    tl.static_assert(TILE >= VEC, "a tile narrower than VEC starts tile 1 before the row")
    row = tl.program_id(0).to(tl.int64)
    in_row, out_row, lead = _row_grad_ptrs(logits_ptr, grad_ptr, row, stride_row, grad_stride, ALIGNED, VEC)
    n_tiles = tl.cdiv(V + lead, TILE)
    # The row's tiles split evenly over the row's programs (the grid holds about TILES_PER_PROGRAM
    # tiles a program): 25 tiles over 4 programs run 6 / 6 / 6 / 7, not 8 / 8 / 8 / 1.
    n_prog = tl.num_programs(1)
    t_first = (tl.program_id(1) * n_tiles) // n_prog
    t_end = ((tl.program_id(1) + 1) * n_tiles) // n_prog
    target = tl.load(target_ptr + row)
    if target == ignore_index:
        _fill_grad_tiles(out_row, lead, t_first, t_end, V, 0.0, TILE)
        return
    # int32 compares in the loop; a valid target is < V < 2^31 (an invalid one has a NaN lse).
    target32 = target.to(tl.int32)
    stats_row = stats_ptr + row * _NUM_STATS
    _grad_tiles(in_row, out_row, lead, t_first, t_end, V, target32, tl.load(stats_row + _LSE),
                tl.load(stats_row + _TAU), tl.load(stats_row + _DIST), tl.load(stats_row + _SPREAD),
                tl.load(stats_row + _TIES), tl.load(grad_rows_ptr + row), tl.cast(b_hi, acc) + tl.cast(b_lo, acc),
                eps_hi, eps_lo, lam_hi, lam_lo, cap_hi, cap_lo, TILE, acc, USE_EXP2, SOFTCAP, SMOOTH, ZLOSS)


@triton.jit
def _scale_unless_one_kernel(x_ptr, scale_ptr, n, BLOCK: tl.constexpr):
    # x *= scale in place, unless scale == 1: the gradient computed in the forward meets the
    # upstream scalar of the backward. Read on the device, so no host synchronisation;
    # with scale == 1 (loss.backward() on the loss itself) nothing of x is touched.
    scale = tl.load(scale_ptr).to(tl.float32)
    if scale != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n)
        tl.store(x_ptr + offs, (x.to(tl.float32) * scale).to(x_ptr.dtype.element_ty), mask=offs < n)


# ----------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
# Elements per 16 bytes: one vector load per thread and group.
_VEC = {torch.float16: 8, torch.bfloat16: 8, torch.float32: 4, torch.float64: 2}
# The two-pass forward: 512 groups (a thr of good quality for k < 128 costs one
# top-KP of 512 values per row), 8 warps, so 16 / 8 / 4 logits per thread and tile.
_GROUPS = 512
_FAST_WARPS = 8
# The exact forward: large blocks amortise its per-block reductions. 4096-wide
# 16-bit blocks and 2048-wide blocks with the 2048-slot buffer spill registers
# on sm_80 / sm_90, so those use 1024 (with KP >= BLOCK_V every merge takes the
# compaction path, which is what a large k needs anyway).
_BLOCK_V = {torch.float16: 2048, torch.bfloat16: 2048, torch.float32: 2048, torch.float64: 1024}
_SMALL_BLOCK_V = 1024
# The backward: 2048-wide tiles (8 logits per thread), 8 tiles per program.
_BACKWARD_TILE = 2048
_BACKWARD_TILES_PER_PROGRAM = 8


class LaunchConfig(NamedTuple):
    kernel: str  # "forward" (two-pass) | "forward_exact" | "backward"
    dtype: torch.dtype
    constexprs: dict
    num_warps: int
    maxnreg: int | None = None  # ptxas's register cap per thread (None: its own choice)

    def launch_options(self):
        return {"num_warps": self.num_warps, **({} if self.maxnreg is None else {"maxnreg": self.maxnreg})}


# The two-pass forward with a selection: ptxas sizes it by the peak of the row's tail (the top-k
# selections), e.g. 80 / 99 registers for 16-bit rows at k = 20 / 100 on sm_90 (3 / 2 CTAs of 8
# warps per SM), while the streaming loop that dominates its time needs far fewer. Capped at 64,
# four CTAs fit an SM (twice the rows in flight at k = 100); the AOT report shows no spills or a
# few in the per-row tail (benchmarks/results/aot_report.txt). float32 rows at k < 64 fit in
# 40-48 registers on sm_90 (5-6 CTAs) and a cap there only raised the count: they are capped
# only at KP = 128 (93 registers, 2 CTAs) and with WRITE_GRAD (79-80 registers, 3 CTAs).
#
# The cap pays only where the code fits under it:
# * Rows whose base is not 16-byte aligned (``logits[1:]`` at V = 50257) are walked from the row
#   start in 2-byte scalar loads, each with its own address and mask: 166-174 registers on
#   sm_90 for bf16 k = 20 / 100, and 62-73 spill stores / loads under the cap, many in pass 1's
#   streaming loop. They take no cap (one CTA of 8 warps, no local memory traffic).
# * The options (softcap, smoothing, z-loss) add live values to every pass: under 64, on sm_90,
#   float32 KP = 128 spilled 9 / 9 (4 / 4 with WRITE_GRAD) and 16-bit WRITE_GRAD kernels 2-7 per
#   KP. Those take 80, which still fits three CTAs (for 8 warps occupancy steps at 64 / 80 / 128
#   registers) and spills nothing; the option kernels that fit under 64 keep it.
_FAST_MAXNREG = 64
_FAST_MAXNREG_OPTIONS = 80


def _fast_maxnreg(config):
    """ptxas's register cap for a two-pass forward configuration (None: none)."""
    c = config.constexprs
    kp = c["KP"] if c["HAS_TOPK"] else 1
    if kp <= 1 or config.num_warps != _FAST_WARPS or not c["ALIGNED"]:
        return None
    sixteen_bit, write_grad = config.dtype in (torch.float16, torch.bfloat16), c.get("WRITE_GRAD", False)
    if not (sixteen_bit or (config.dtype == torch.float32 and (kp >= 128 or write_grad))):
        return None
    if (c["SOFTCAP"] or c["SMOOTH"] or c["ZLOSS"]) and (write_grad if sixteen_bit else kp >= 128):
        return _FAST_MAXNREG_OPTIONS
    return _FAST_MAXNREG


def for_alignment(config, aligned):
    """The two-pass forward ``config`` for logits whose base is (``aligned``) or is not 16-byte
    aligned: unaligned tiles start at each row (ALIGNED off), uncapped (see _FAST_MAXNREG)."""
    if config.kernel != "forward" or aligned == config.constexprs["ALIGNED"]:
        return config
    config = config._replace(constexprs=dict(config.constexprs, ALIGNED=aligned))
    return config._replace(maxnreg=_fast_maxnreg(config))


def _kp(k):
    return next(size for size in TOPK_BUFFER_SIZES if size > k) if k > 0 else 1


def _pow2_at_least(n):
    return 1 << max(0, int(n) - 1).bit_length()


def _fast_tile(dtype, vocab, kp, block_v=None):
    vec = _VEC[dtype]
    tile = _GROUPS * vec if block_v is None else block_v
    # Short rows: no wider than the row; never fewer groups than top-k slots
    # (tl.topk of the group maxima), nor fewer than 32 (one warp's worth).
    tile = min(tile, _pow2_at_least(vocab + vec))
    return max(tile, vec * max(2 * kp, 32))


def _option_flags(options):
    """The kernels' option constexprs for ``(label_smoothing, z_loss, softcap)`` (0 = off)."""
    eps, lam, cap = options
    return {"SOFTCAP": cap > 0, "SMOOTH": eps > 0, "ZLOSS": lam > 0}


def forward_config(dtype, vocab, k, options=(0.0, 0.0, 0.0), block_v=None):
    """The launch configuration of the forward for (dtype, V, k <= MAX_K) and the options;
    ``block_v``: the tile (block) width instead of the tuned one (see :func:`block_width`)."""
    kp = _kp(k)
    if kp <= FAST_MAX_KP:
        tile = _fast_tile(dtype, vocab, kp, block_v)
        vec = _VEC[dtype]
        num_warps = max(1, min(_FAST_WARPS, tile // (32 * 16 * vec // 8)))
        config = LaunchConfig("forward", dtype, {
            "HAS_TOPK": k > 0, "KP": kp, "CAP": max(32, 2 * kp), "GCAP": 2 * max(32, 2 * kp),
            "ROWS": 32 * num_warps, "T_BLK": max(1, 32 * num_warps // max(16, kp)),
            "TILE": tile, "VEC": vec,
            "ALIGNED": True, "USE_EXP2": dtype != torch.float64, **_option_flags(options)}, num_warps)
        return config._replace(maxnreg=_fast_maxnreg(config))
    return exact_config(dtype, vocab, k, only_flagged=False, options=options, block_v=block_v)


def exact_config(dtype, vocab, k, only_flagged, options=(0.0, 0.0, 0.0), block_v=None):
    kp = _kp(k)
    if block_v is None:
        block_v = _SMALL_BLOCK_V if vocab <= _SMALL_BLOCK_V or kp >= TOPK_BUFFER_SIZES[-1] else _BLOCK_V[dtype]
    num_warps = _NUM_WARPS_OVERRIDE.get((dtype, kp, block_v), max(4, min(16, block_v // 256)))
    return LaunchConfig("forward_exact", dtype, {"ONLY_FLAGGED": only_flagged, "KP": kp, "BLOCK_V": block_v,
                                                 **_option_flags(options)}, num_warps)


# Where ptxas spills at the default warp count (benchmarks/aot_report.py):
# (dtype, KP, BLOCK_V) -> num_warps.
_NUM_WARPS_OVERRIDE = {(torch.float32, 32, 1024): 2}


def backward_config(dtype, vocab, options=(0.0, 0.0, 0.0), block_v=None):
    tile = block_v if block_v is not None else min(_BACKWARD_TILE, _pow2_at_least(vocab))
    # Never narrower than one 16-byte vector: aligned tiles start up to VEC - 1 elements
    # before the row, and only a tile at least that wide keeps tile 1 (the first unmasked
    # one) inside the row. A narrower tile (V = 1..4 in 16-bit, say) read the rows before
    # this one and wrote this row's gradient over them.
    tile = max(tile, _VEC[dtype])
    return LaunchConfig("backward", dtype, {"TILE": tile, "TILES_PER_PROGRAM": _BACKWARD_TILES_PER_PROGRAM,
                                            "ALIGNED": True, "VEC": _VEC[dtype],
                                            "USE_EXP2": dtype != torch.float64, **_option_flags(options)},
                        max(1, min(8, tile // 256)))


def with_grad(config, vocab, grad_aligned=True, block_v=None):
    """The forward ``config`` as ``forward_grad`` launches it: WRITE_GRAD on, the gradient
    written in the backward's tiles (of ``block_v`` columns if given; the exact kernel: its
    own blocks, unaligned, with the backward's exp flavour)."""
    if config.kernel == "forward_exact":
        extra = {"WRITE_GRAD": True, "USE_EXP2": config.dtype != torch.float64}
        return config._replace(constexprs=dict(config.constexprs, **extra))
    grad_tile = backward_config(config.dtype, vocab, block_v=block_v).constexprs["TILE"]
    extra = {"WRITE_GRAD": True, "GRAD_TILE": grad_tile, "GRAD_ALIGNED": grad_aligned}
    config = config._replace(constexprs=dict(config.constexprs, **extra))
    return config._replace(maxnreg=_fast_maxnreg(config))


# The options as the AOT report compiles them: all three on (the most live values).
AOT_OPTIONS = (0.1, 1e-4, 30.0)


def launch_configs():
    """Every configuration the launchers can pick (tuned tiles: no ``block_v``), for AOT checks.

    ALIGNED is shown True (the usual case: torch allocations are 16-byte aligned);
    the launchers pass False for a misaligned base pointer or, in the backward,
    strided rows. For the GPT-2 row length (50257) only, also: the forwards' WRITE_GRAD
    variants (``forward_grad``; their tails are the backward's loop), the two-pass forward
    on a misaligned base (ALIGNED off, which changes its register cap: :func:`for_alignment`),
    and every kernel with the options on (``AOT_OPTIONS``: softcap, smoothing and z-loss,
    each a constexpr flag that adds code to every pass)."""
    configs = []
    # Tiles follow the next power of two of V (short rows), so one V per power of two.
    vocabs = {1 << i for i in range(1, 19)} | {_SMALL_BLOCK_V + 1, 50257}
    for dtype in _TRITON_DTYPE:
        for vocab in sorted(vocabs):
            candidates = []
            for options in ((0.0, 0.0, 0.0),) + ((AOT_OPTIONS,) if vocab == 50257 else ()):
                plain = [forward_config(dtype, vocab, 0, options), backward_config(dtype, vocab, options)]
                for size in TOPK_BUFFER_SIZES:
                    if size - 1 > vocab - 1:
                        break
                    plain.append(forward_config(dtype, vocab, size - 1, options))
                    if size <= FAST_MAX_KP:
                        plain.append(exact_config(dtype, vocab, size - 1, only_flagged=True, options=options))
                if vocab == 50257:
                    plain += [with_grad(c, vocab) for c in plain if c.kernel != "backward"]
                    if options == (0.0, 0.0, 0.0):
                        plain += [for_alignment(with_grad(c, vocab, grad_aligned=False) if grad else c, False)
                                  for c in plain if c.kernel == "forward" and not c.constexprs.get("WRITE_GRAD")
                                  for grad in (False, True)]
                candidates += plain
            for config in candidates:
                if config not in configs:
                    configs.append(config)
    return configs


def aot_signature(config):
    """``(kernel fn, signature, constexprs)`` for ``triton.compiler.ASTSource``."""
    elem, acc = _TRITON_DTYPE[config.dtype], _TRITON_DTYPE[stats_dtype(config.dtype)]
    if config.kernel == "forward":
        fn = _prsl_forward_kernel
        sig = {"logits_ptr": f"*{elem}", "target_ptr": "*i64", "loss_ptr": f"*{acc}", "stats_ptr": f"*{acc}",
               "group_ptr": "*i32", "chunk_ptr": f"*{acc}", "cand_ptr": f"*{acc}", "flag_ptr": "*i8",
               "grad_rows_ptr": f"*{acc}", "grad_ptr": f"*{elem}", "stride_row": "i64", "grad_stride": "i64",
               "V": "i32", "k": "i32", "b_hi": "fp32", "b_lo": "fp32", "ignore_index": "i64"}
    elif config.kernel == "forward_exact":
        fn = _prsl_forward_exact_kernel
        sig = {"logits_ptr": f"*{elem}", "target_ptr": "*i64", "loss_ptr": f"*{acc}", "stats_ptr": f"*{acc}",
               "scratch_ptr": f"*{elem}", "flag_ptr": "*i8", "grad_rows_ptr": f"*{acc}", "grad_ptr": f"*{elem}",
               "stride_row": "i64", "grad_stride": "i64", "V": "i32", "k": "i32", "b_hi": "fp32", "b_lo": "fp32",
               "ignore_index": "i64"}
    else:
        fn = _prsl_backward_kernel
        sig = {"grad_rows_ptr": f"*{acc}", "logits_ptr": f"*{elem}", "target_ptr": "*i64",
               "stats_ptr": f"*{acc}", "grad_ptr": f"*{elem}", "stride_row": "i64", "grad_stride": "i64",
               "V": "i32", "b_hi": "fp32", "b_lo": "fp32", "ignore_index": "i64"}
    sig.update({name: "fp32" for name in _OPTION_ARGS})
    # Constexpr parameters a configuration leaves at their defaults (WRITE_GRAD off, ...).
    constexprs = {p.name: p.default for p in fn.params if p.is_constexpr and p.name not in config.constexprs}
    constexprs.update(config.constexprs)
    sig.update({name: "constexpr" for name in constexprs})
    return fn, sig, constexprs


# ----------------------------------------------------------------------------
# Launchers (the kernel contract of prsl_kernels.ops)
# ----------------------------------------------------------------------------

_OPTION_ARGS = ("eps_hi", "eps_lo", "lam_hi", "lam_lo", "cap_hi", "cap_lo")

# The tile / block width of launches given no ``block_v``, while a block_width() context is open.
_block_v_default = None


@contextlib.contextmanager
def block_width(block_v):
    """Launch with tiles (two-pass forward, backward) and blocks (exact forward) of ``block_v``
    columns inside the ``with`` block, wherever a launcher is not given ``block_v`` itself
    (``None``: the tuned widths). For tests: a narrow tile makes a short row stream through
    several tiles (masked edges, prefetch, multi-tile top-k) on the public path, ``prsl_loss``
    down through the ops, whose schemas carry no tile width. Widths are clamped as the tuned
    ones are (at least one 16-byte vector; the two-pass forward's at least its top-k groups)."""
    global _block_v_default
    saved, _block_v_default = _block_v_default, block_v
    try:
        yield
    finally:
        _block_v_default = saved


def _block_v(block_v):
    return _block_v_default if block_v is None else block_v


def _split_b(b):
    # Triton passes Python floats as float32; hi + lo carries b to ~48 bits for float64 rows.
    b_hi = float(np.float32(b))
    return b_hi, (b - b_hi) if math.isfinite(b_hi) else 0.0


def _device_guard(tensor):
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _aligned(*tensors):
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def _rows_overlap(x):
    """Whether two rows of the 2-D ``x`` (unit stride along V) share memory."""
    return x.shape[0] > 1 and x.shape[1] > 0 and x.stride(0) < x.shape[1]


def _memory_overlaps(a, b):
    """Whether the address ranges of ``a`` and ``b`` intersect (conservative: two interleaved
    views that share no element count as overlapping)."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t):
        last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    (a_lo, a_hi), (b_lo, b_hi) = span(a), span(b)
    return a_lo < b_hi and b_lo < a_hi


def _option_args(options):
    # (eps, lam, c) as hi/lo float32 pairs, as b (float64 rows keep ~48 bits).
    return tuple(x for value in options for x in _split_b(float(value)))


def forward(logits, target, k, b, ignore_index, label_smoothing=0.0, z_loss=0.0, softcap=0.0, *, block_v=None):
    """``(loss_rows[N], row_stats[N, NUM_ROW_STATS])`` in the stats dtype (see ``prsl_kernels.ops``).
    ``block_v`` (every launcher): the tile / block width instead of the tuned one (:func:`block_width`)."""
    loss_rows, row_stats, _ = forward_with_flags(logits, target, k, b, ignore_index, label_smoothing, z_loss,
                                                 softcap, block_v=block_v)
    return loss_rows, row_stats


def forward_with_flags(logits, target, k, b, ignore_index, label_smoothing=0.0, z_loss=0.0, softcap=0.0,
                       grad=None, *, block_v=None):
    """:func:`forward`, plus the per-row int8 flags of the two-pass kernel (1: the row
    was recomputed by the exact kernel; None where the two-pass kernel did not run).
    ``grad=(grad_rows, grad_out)``: also write the gradient of ``sum_i grad_rows[i] loss_i``
    into ``grad_out`` from the forward kernels (:func:`forward_grad`)."""
    block_v = _block_v(block_v)
    n_rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    target = target.contiguous()
    acc = stats_dtype(logits.dtype)
    loss_rows = torch.empty(n_rows, dtype=acc, device=logits.device)
    row_stats = torch.empty(n_rows, NUM_ROW_STATS, dtype=acc, device=logits.device)
    if n_rows == 0:
        return loss_rows, row_stats, None
    options = (label_smoothing, z_loss, softcap)
    if k > MAX_K:
        loss_rows, row_stats = _forward_torch(logits, target, k, b, ignore_index, options)
        if grad is not None:
            backward(grad[0], logits, target, row_stats, b, ignore_index, *options, out=grad[1], block_v=block_v)
        return loss_rows, row_stats, None
    config = forward_config(logits.dtype, vocab, k, options, block_v)
    b_hi, b_lo = _split_b(b)
    grad_rows, grad_out = grad if grad is not None else (loss_rows, loss_rows)  # unread without WRITE_GRAD
    grad_stride = grad_out.stride(0) if grad is not None else 0
    args = (logits.stride(0), grad_stride, vocab, k, b_hi, b_lo, ignore_index, *_option_args(options))
    # The exact kernel's scratch holds the loaded values: capped ones are in the stats dtype.
    scratch_dtype = acc if softcap > 0 else logits.dtype
    with _device_guard(logits):
        if grad is not None:
            config = with_grad(config, vocab, _aligned(logits, grad_out) and logits.stride(0) == grad_stride, block_v)
        if config.kernel == "forward_exact":
            scratch = torch.empty(n_rows, config.constexprs["KP"], dtype=scratch_dtype, device=logits.device)
            _prsl_forward_exact_kernel[(n_rows,)](
                logits, target, loss_rows, row_stats, scratch, loss_rows, grad_rows, grad_out, *args,
                **config.constexprs, **config.launch_options())
            return loss_rows, row_stats, None
        config = for_alignment(config, _aligned(logits))
        constexprs = config.constexprs
        has_topk = constexprs["HAS_TOPK"]
        cap = constexprs["CAP"] if has_topk else 1
        # Per-row scratch, CAP entries each (L2-resident): listed groups and candidate values.
        groups = torch.empty(n_rows if has_topk else 1, constexprs["GCAP"], dtype=torch.int32, device=logits.device)
        chunks = torch.empty(n_rows if has_topk else 1, cap * constexprs["VEC"], dtype=acc, device=logits.device)
        cand = torch.empty(n_rows if has_topk else 1, cap, dtype=acc, device=logits.device)
        flags = torch.empty(n_rows if has_topk else 1, dtype=torch.int8, device=logits.device)
        _prsl_forward_kernel[(n_rows,)](
            logits, target, loss_rows, row_stats, groups, chunks, cand, flags, grad_rows, grad_out, *args,
            **constexprs, **config.launch_options())
        if not has_topk:
            return loss_rows, row_stats, None
        exact = exact_config(logits.dtype, vocab, k, only_flagged=True, options=options, block_v=block_v)
        if grad is not None:
            exact = with_grad(exact, vocab, block_v=block_v)
        scratch = torch.empty(n_rows, exact.constexprs["KP"], dtype=scratch_dtype, device=logits.device)
        _prsl_forward_exact_kernel[(n_rows,)](
            logits, target, loss_rows, row_stats, scratch, flags, grad_rows, grad_out, *args,
            **exact.constexprs, **exact.launch_options())
    return loss_rows, row_stats, flags


def forward_grad(logits, target, grad_rows, grad_out, k, b, ignore_index, label_smoothing=0.0, z_loss=0.0,
                 softcap=0.0, *, block_v=None):
    """prsl::forward_grad: the forward's ``(loss_rows, row_stats)``, and the gradient of
    ``sum_i grad_rows[i] * loss_i`` written into ``grad_out`` (``[N, V]``, the logits' dtype,
    unit stride along V; it may be ``logits`` itself) by the forward kernels, each row
    right after its statistics, while it is still in L2."""
    if logits.stride(1) != 1 and logits.shape[1] > 1:
        raise ValueError("forward_grad: logits must have unit stride along V")
    if grad_out.shape != logits.shape or grad_out.dtype != logits.dtype or (
            grad_out.stride(1) != 1 and logits.shape[1] > 1):
        raise ValueError("forward_grad: grad_out must be [N, V] in the logits' dtype with unit stride along V")
    # One program per row stores its gradient while the others still read their rows: two rows
    # that share memory (a stride-0 expanded grad_out), or a grad_out that overlaps the logits
    # without being them, would race (a row read after another row's gradient was stored).
    if _rows_overlap(grad_out):
        raise ValueError(f"forward_grad: grad_out's rows overlap in memory (row stride {grad_out.stride(0)} < "
                         f"V = {grad_out.shape[1]}, e.g. an expanded tensor): the row gradients would race")
    in_place = grad_out.data_ptr() == logits.data_ptr() and grad_out.stride(0) == logits.stride(0)
    if not in_place and _memory_overlaps(logits, grad_out):
        raise ValueError("forward_grad: grad_out partly overlaps logits: pass logits itself (the in-place "
                         "gradient) or memory apart from it")
    loss_rows, row_stats, _ = forward_with_flags(logits, target, k, b, ignore_index, label_smoothing, z_loss,
                                                 softcap, grad=(grad_rows.contiguous(), grad_out), block_v=block_v)
    return loss_rows, row_stats


def backward(grad_rows, logits, target, row_stats, b, ignore_index, label_smoothing=0.0, z_loss=0.0, softcap=0.0,
             out=None, *, block_v=None):
    """``grad_logits[N, V]``, contiguous, in the logits' dtype (see ``prsl_kernels.ops``);
    ``out``: write it there instead (``[N, V]``, unit stride along V; may be ``logits``)."""
    n_rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    grad_logits = torch.empty((n_rows, vocab), dtype=logits.dtype, device=logits.device) if out is None else out
    if n_rows == 0 or vocab == 0:
        return grad_logits
    options = (label_smoothing, z_loss, softcap)
    config = backward_config(logits.dtype, vocab, options, _block_v(block_v))
    # Aligned tiles need the logits rows and the gradient rows to share their offset mod VEC.
    aligned = _aligned(logits, grad_logits) and logits.stride(0) == grad_logits.stride(0)
    tile = config.constexprs["TILE"]
    b_hi, b_lo = _split_b(b)
    with _device_guard(logits):
        max_tiles = triton.cdiv(vocab + config.constexprs["VEC"] - 1, tile)
        grid = (n_rows, triton.cdiv(max_tiles, config.constexprs["TILES_PER_PROGRAM"]))
        _prsl_backward_kernel[grid](
            grad_rows.contiguous(), logits, target.contiguous(), row_stats.contiguous(), grad_logits,
            logits.stride(0), grad_logits.stride(0), vocab, b_hi, b_lo, ignore_index, *_option_args(options),
            **dict(config.constexprs, ALIGNED=aligned), num_warps=config.num_warps)
    return grad_logits


def scale_unless_one(x, scale):
    """``x *= scale`` in place (float32 product, one rounding; float64 for float64 ``x``),
    skipped on the device when the 0-d ``scale`` is exactly 1."""
    if x.dtype == torch.float64 or not x.is_contiguous():
        x.mul_(scale)  # not the hot path
        return
    n = x.numel()
    if n == 0:
        return
    block = 4096
    with _device_guard(x):
        _scale_unless_one_kernel[(triton.cdiv(n, block),)](x, scale.reshape(()).contiguous(), n, BLOCK=block,
                                                           num_warps=8)


def _forward_torch(logits, target, k, b, ignore_index, options=(0.0, 0.0, 0.0), chunk_elems=1 << 24):
    """Row statistics for k > MAX_K with torch ops, row-chunked (no host syncs)."""
    eps, lam, cap = options
    n_rows, vocab = logits.shape
    acc = stats_dtype(logits.dtype)
    loss_rows = torch.empty(n_rows, dtype=acc, device=logits.device)
    row_stats = torch.empty(n_rows, NUM_ROW_STATS, dtype=acc, device=logits.device)
    rows_per_chunk = max(1, chunk_elems // vocab)
    for first in range(0, n_rows, rows_per_chunk):
        z = logits[first:first + rows_per_chunk].to(acc)
        if cap > 0:
            z = cap * torch.tanh(z / cap)
        t = target[first:first + rows_per_chunk]
        counted = t != ignore_index
        # A target outside [0, V) is never gathered: its row becomes NaN.
        in_range = (t >= 0) & (t < vocab)
        t_safe = torch.where(counted & in_range, t, torch.zeros_like(t))
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
        correct = ((z_target >= z.max(-1).values) & (lse == lse)).to(acc)
        log_p = z - lse[:, None]  # entropy: a -inf logit (p = 0) adds 0, not 0 * -inf
        p = torch.exp(log_p)
        entropy = torch.where(p == 0, torch.zeros_like(p), -p * log_p).sum(-1)
        stats = torch.stack([lse, tau, dist, spread, ties.to(acc), correct, entropy], dim=1)
        ce = lse - z_target
        if eps > 0:
            ce = (1 - eps) * ce + eps * (lse - z.mean(-1))
        if lam > 0:
            ce = ce + lam * lse * lse
        loss = torch.where(in_range, ce + b * dist, torch.full_like(lse, float("nan")))
        stats = torch.where(in_range[:, None], stats, torch.full_like(stats, float("nan")))
        loss_rows[first:first + rows_per_chunk] = torch.where(counted, loss, torch.zeros_like(loss))
        row_stats[first:first + rows_per_chunk] = torch.where(counted[:, None], stats,
                                                              torch.zeros_like(stats))
    return loss_rows, row_stats


if os.environ.get("TRITON_INTERPRET", "0") == "1":
    from . import triton_interpreter

    triton_interpreter.patch()

ops.forward.register_kernel("cuda")(forward)
ops.backward.register_kernel("cuda")(backward)
ops.forward_grad.register_kernel("cuda")(forward_grad)

__all__ = ["forward", "backward", "forward_grad", "forward_with_flags", "MAX_K", "FAST_MAX_KP", "TOPK_BUFFER_SIZES",
           "launch_configs", "forward_config", "exact_config", "backward_config", "with_grad", "aot_signature",
           "LaunchConfig", "block_width"]
