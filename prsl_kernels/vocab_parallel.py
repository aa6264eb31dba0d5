"""Vocab-parallel PRSL: logits, or an LM head, sharded over the vocabulary across a process group.

Under tensor parallelism the LM head is split by rows of its weight (``ColwiseParallel``, Megatron's
``ColumnParallelLinear``): rank ``r`` holds the logits of the columns ``[start_r, start_r + V_r)``.
Every per-row quantity of the spec is a reduction of per-shard ones, so no rank ever needs the others'
logits (spec, "Per token"; ``e_j = exp(z_j - M)``, ``e_tau = exp(tau - M)``):

    M      = max over ranks of the shard's maximum                            } one all-gather of
    tau    = k-th largest of the union of every shard's k largest non-target  } k + 1 numbers per row
             (a shard with fewer pads -inf: an element of the global top k is  } and rank
             always within its own shard's top k, so the union holds them all)
    sumexp = sum_j e_j                  lse = M + log(sumexp)                  } one all-reduce of
    S'     = sum_{j in A} (e_j - e_tau)        S = S' / sumexp                 } 7 numbers per row
    Q'     = sum_{j in A} (e_j - e_tau)^2      D = sqrt(Q') / sumexp           }
    T'     = sum_j e_j (z_j - M)               H = log(sumexp) - T' / sumexp   }
    |T|, z_s (from the shard holding s), sum_j z_j (label smoothing)           }

because ``u_j = p_j - p_min = (e_j - e_tau) / sumexp``: once M and tau are known, every sum the penalty
(and the entropy H, whose shard sums T' are taken against the global M: no rescaling) needs is local, and A (fewer than k logits, each above everything else) lies within the shard's own k
candidates, so only the sum of ``e_j`` and the count of T take a pass over the shard. Per block of rows
that is an all-gather of ``(k + 1) * world`` and an all-reduce of 7 numbers per row, never ``V``. A
NaN or +inf logit reaches M, so its row's lse and loss are NaN (as torch). Each shard's gradient then
follows from the spec's closed form on its own columns (``_block_grad``) and the replicated row
statistics: with ``reduction="mean"``/``"sum"`` it is written in the forward (the backward only scales
it), with ``"none"`` the backward recomputes it from the saved statistics; neither backward
communicates (except the fused head's ``N x H`` input gradient, a sum over ranks, as in Megatron's
column-parallel linear).

Each shard is computed with torch ops in the stats dtype (float32, float64 for float64 logits), in row
blocks whose size depends only on the global ``V`` and the world size (every rank must run the same
collectives), so at most one block of ``N x V_r`` intermediates is alive. Ties at ``tau`` are decided
exactly as in the reference: candidates cross the group in the stats dtype, unrounded.

Two entry points:

* DTensors (what ``parallelize_module`` makes): :func:`prsl_loss` and :func:`linear_prsl_loss` dispatch
  here when given logits sharded ``Shard(-1)`` (``ColwiseParallel(..., use_local_output=False)``) or a
  head weight sharded ``Shard(0)``; the loss comes back as a ``Replicate`` DTensor.
* Local shards, Megatron style: :func:`vocab_parallel_prsl_loss` and
  :func:`vocab_parallel_linear_prsl_loss` take a ``process_group`` and the shard's ``vocab_start``.

In both the target is the whole target on every rank and the row statistics (:class:`RowStats`) are
plain tensors, identical on every rank (0 on ignored rows, as the fused kernels give them).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .function import scale_unless_one
from .spec import IGNORE_INDEX, NUM_ROW_STATS, RowStats, stats_dtype
from .validation import check_b, check_inputs, check_linear_inputs, check_options, check_target_range

if dist.is_available():
    from torch.distributed.tensor import DTensor, Replicate
else:  # a torch built without distributed: nothing can be a DTensor
    DTensor = None

# Bytes of one block's N_block x ceil(V / world) tensor in the stats dtype; about six such temporaries
# are alive at once (the capped logits, the target-masked copy, exponentials, masks, the gradient).
BLOCK_BYTES = 8 << 20
_MIN_BLOCK_ROWS = 8
# Columns of the all-reduced block: everything a row needs once M and tau are known.
_NUM_SUMS = 7
_SUMEXP, _SPREAD, _SQUARES, _TIES, _Z_TARGET, _Z_SUM, _ENTROPY_SUM = range(_NUM_SUMS)


def is_dtensor(x) -> bool:
    return DTensor is not None and isinstance(x, DTensor)


@dataclass(frozen=True)
class VocabShard:
    """Where one rank's columns lie: ``[start, start + width)`` of a vocabulary of ``vocab``, over
    ``group`` of ``world`` ranks. ``block_rows``: rows per block, the same on every rank."""
    group: object
    world: int
    start: int
    width: int
    vocab: int
    block_rows: int


def block_rows(n_rows: int, vocab: int, world: int, dtype: torch.dtype) -> int:
    """Rows per block: the budget over the widest shard (``ceil(V / world)`` columns), so every rank
    computes the same blocks whatever its own width."""
    widest = max(1, -(-vocab // world))
    rows = max(_MIN_BLOCK_ROWS, BLOCK_BYTES // (widest * torch.empty((), dtype=dtype).element_size()))
    return max(1, min(rows, n_rows))


# --------------------------------------------------------------------------- the maths of one block


def _capped(block, acc, softcap):
    z = block.to(acc)
    return softcap * torch.tanh(z / softcap) if softcap else z


def _targets_here(target, shard, counted):
    """Per row: this shard's column of the target (0 where the shard does not hold it) and whether it does."""
    local = target - shard.start
    here = counted & (local >= 0) & (local < shard.width)
    return torch.where(here, local, 0)[:, None], here


def _block_stats(block, target, shard, k, b, ignore_index, options, keep_parts=False):
    """Loss rows and ``(C, NUM_ROW_STATS)`` statistics of one row block (two collectives); with
    ``keep_parts`` also what its gradient is made of (see ``_block_grad``)."""
    eps, lam, cap = options.label_smoothing, options.z_loss, options.softcap
    acc = stats_dtype(block.dtype)
    z = _capped(block, acc, cap)
    rows, width = z.shape
    counted = target != ignore_index
    column, here = _targets_here(target, shard, counted)
    neg_inf = torch.tensor(float("-inf"), dtype=acc, device=z.device)
    z_here = torch.where(here, z.gather(1, column).squeeze(1), neg_inf) if width else neg_inf.expand(rows)

    # 1. The global maximum and the k-th largest non-target logit: one all-gather. The shard's
    #    candidates are its k largest non-target logits (tau is not known yet: ties come later).
    if k and width:
        z_nt = _without_target(z, column, here)
        candidates, columns = z_nt.topk(min(k, width), dim=-1)
        row_max = torch.maximum(candidates[:, 0], z_here)  # NaN and +inf propagate (topk ranks NaN first)
    else:
        candidates = z.new_empty((rows, 0))
        row_max = z.amax(-1) if width else neg_inf.expand(rows)
    send = torch.cat([candidates, neg_inf.expand(rows, k - candidates.shape[1]), row_max[:, None]], 1)
    gathered = _all_gather(send, shard).view(shard.world, rows, k + 1)
    top = gathered[..., k].amax(0)  # NaN or +inf in any shard: the row's loss is NaN (as torch)
    if k:
        tau = gathered[..., :k].permute(1, 0, 2).reshape(rows, shard.world * k).topk(k, dim=-1).values[:, -1]
    else:
        tau = torch.full((rows,), float("inf"), dtype=acc, device=z.device)

    # 2. Every sum, local once M and tau are known: one all-reduce. A lies within the candidates.
    shift = torch.where(top == float("-inf"), 0.0, top)  # all -inf: lse = -inf, as torch
    y = torch.sub(z, shift[:, None])
    e = torch.exp(y)
    sums = torch.zeros((rows, _NUM_SUMS), dtype=acc, device=z.device)
    sums[:, _SUMEXP] = e.sum(-1)
    # Entropy: T = sum_j e_j (z_j - M) against the global maximum M already, so the shards' T add up
    # in the same all-reduce (no rescaling). A -inf logit (e = 0) adds 0, not 0 * -inf; y is not
    # needed after this, so its buffer takes the products.
    sums[:, _ENTROPY_SUM] = y.masked_fill_(e == 0, 0.0).mul_(e).sum(-1)
    del y
    d = None
    if k and width:
        above, ties = _select(z_nt, candidates, tau, column, here)
        d = torch.where(above, torch.exp(candidates - shift[:, None]) - torch.exp(tau - shift)[:, None], 0.0)
        sums[:, _SPREAD] = d.sum(-1)
        sums[:, _SQUARES] = (d * d).sum(-1)
        sums[:, _TIES] = ties.view(torch.uint8).sum(-1, dtype=torch.int32)  # count_nonzero is 6x slower on CPU
    sums[:, _Z_TARGET] = torch.where(here, z_here, 0.0)
    if eps:
        sums[:, _Z_SUM] = z.sum(-1)
    dist.all_reduce(sums, group=shard.group)

    # 3. The row: spec, "Per token" and "Options".
    sumexp = sums[:, _SUMEXP]
    lse = shift + torch.log(sumexp)
    squares = sums[:, _SQUARES]
    distance = torch.where(squares > 0, torch.sqrt(torch.where(squares > 0, squares, 1.0)), 0.0) / sumexp
    spread = sums[:, _SPREAD] / sumexp
    z_target = sums[:, _Z_TARGET]
    if eps or lam:
        ce = (1 - eps) * (lse - z_target) + eps * (lse - sums[:, _Z_SUM] / shard.vocab) + lam * lse * lse
    else:
        ce = lse - z_target
    loss = torch.where(counted, ce + b * distance, 0.0)
    correct = ((z_target >= top) & (lse == lse)).to(acc)
    entropy = torch.log(sumexp) - sums[:, _ENTROPY_SUM] / sumexp
    stats = torch.stack([lse, tau, distance, spread, sums[:, _TIES], correct, entropy], 1)
    stats = torch.where(counted[:, None], stats, 0.0)  # as the fused kernels
    if not keep_parts:
        return loss, stats, None
    # p_j = e_j / sumexp, and on A u_j = p_j - p_min = d_j / sumexp (e is ours: scaled in place).
    inv = (1 / sumexp)[:, None]
    selection = (columns, d * inv, ties) if d is not None else None
    return loss, stats, (z, e.mul_(inv), selection, column, here)


def _without_target(z, column, here):
    """``z`` with each held target at -inf: never a candidate, never in A (-inf > tau is false)."""
    z_nt = z.clone()
    z_nt.scatter_(1, column, torch.where(here[:, None], float("-inf"), z_nt.gather(1, column)))
    return z_nt


def _select(z_nt, candidates, tau, column, here):
    """This shard's part of A and T, given tau. Its ``min(k, V_r)`` largest non-target logits (the
    candidates) hold all of its A (fewer than k logits, each above everything outside A), so A is
    which of them exceed tau; T is a mask (the target, at -inf in ``z_nt``, is in neither)."""
    ties = z_nt == tau[:, None]
    ties.scatter_(1, column, ties.gather(1, column) & ~here[:, None])  # a target at -inf == a tau of -inf
    return candidates > tau[:, None], ties


def _parts_from_stats(block, stats, target, shard, k, ignore_index, cap):
    """The gradient's parts again, from the saved row statistics alone (no communication)."""
    lse, tau = stats[:, 0], stats[:, 1]
    z = _capped(block, stats.dtype, cap)
    column, here = _targets_here(target, shard, target != ignore_index)
    p = torch.sub(z, lse[:, None]).exp_()
    selection = None
    if k and shard.width:
        z_nt = _without_target(z, column, here)
        candidates, columns = z_nt.topk(min(k, shard.width), dim=-1)
        above, ties = _select(z_nt, candidates, tau, column, here)
        u = torch.where(above, torch.exp(candidates - lse[:, None]) - torch.exp(tau - lse)[:, None], 0.0)
        selection = (columns, u, ties)
    return z, p, selection, column, here


def _block_grad(parts, stats, target, row_grad, b, ignore_index, options, vocab, out):
    """``dloss/dlogits`` of one block of this shard (spec, "Gradient", "Options") times ``row_grad``:

        p_j (1 - b D + 2 lam lse)  + b p_j u_j / D  [j in A]  - b p_j (S / D) / |T|  [j in T]
        - (1 - eps) [j == s] - eps / V,                          u_j = p_j - p_min,

    times the cap's slope ``1 - (z / c)^2`` (z the capped logit); ignored rows 0. ``parts``:
    ``(z, p, (A's columns, u on them, T's mask) or None, target column, target here)``. Written
    into ``out`` (in the logits' dtype) when given, else returned in the stats dtype."""
    eps, lam, cap = options.label_smoothing, options.z_loss, options.softcap
    z, p, selection, column, here = parts
    lse, distance, spread, tie_count = stats[:, 0], stats[:, 2], stats[:, 3], stats[:, 4]
    counted = target != ignore_index
    scale = torch.where(counted, row_grad.to(p.dtype), 0.0)
    keep = (1 - b * distance + 2 * lam * lse if lam else 1 - b * distance) * scale
    direct = out is not None and out.dtype == p.dtype
    if selection is not None and b:
        columns, u, ties = selection
        has_d = distance > 0
        safe_d = torch.where(has_d, distance, 1.0)
        on_above = torch.where(has_d, b / safe_d, 0.0) * scale
        on_ties = torch.where(has_d, -b * (spread / safe_d) / tie_count.clamp_min(1), 0.0) * scale
        p_above = p.gather(1, columns)  # before p is overwritten
        inner = torch.where(ties, (keep + on_ties)[:, None], keep[:, None])
        grad = torch.mul(p, inner, out=out if direct else None)
        grad.scatter_add_(1, columns, p_above * u * on_above[:, None])
    else:
        grad = torch.mul(p, keep[:, None], out=out if direct else None)
    if grad.shape[1]:
        grad.scatter_add_(1, column, torch.where(here, -(1 - eps) * scale, 0.0)[:, None])
    if eps:
        grad.sub_((eps / vocab) * scale[:, None])
    if cap:
        grad.mul_(1 - (z / cap) ** 2)  # d(c tanh(x / c))/dx = 1 - tanh^2 = 1 - (z / c)^2
    grad.masked_fill_(~counted[:, None], 0.0)  # also where an ignored row holds NaN
    if out is not None and not direct:
        out.copy_(grad)
    return grad


def _all_gather(send, shard):
    # Gloo's all_gather_into_tensor wants flat buffers.
    out = send.new_empty(shard.world * send.numel())
    dist.all_gather_into_tensor(out, send.contiguous().reshape(-1), group=shard.group)
    return out


def _blocks(n_rows, shard):
    for start in range(0, n_rows, shard.block_rows):
        yield start, min(start + shard.block_rows, n_rows)


def _forward_blocks(n_rows, logits_of, target, shard, k, b, ignore_index, options, row_grads=None, out_of=None,
                    take=None):
    """Loss rows and row statistics of all rows; with ``row_grads`` each block's gradient too, while
    its logits are at hand: written into ``out_of(start, stop)`` (if given), handed to
    ``take(start, stop, grad)`` (if given)."""
    losses, stats = [], []
    for start, stop in _blocks(n_rows, shard):
        block, t = logits_of(start, stop), target[start:stop]
        loss_c, stats_c, parts = _block_stats(block, t, shard, k, b, ignore_index, options, row_grads is not None)
        if row_grads is not None:
            grad = _block_grad(parts, stats_c, t, row_grads[start:stop], b, ignore_index, options, shard.vocab,
                               out_of(start, stop) if out_of else None)
            if take:
                take(start, stop, grad)
        losses.append(loss_c)
        stats.append(stats_c)
    if not losses:  # no rows
        acc = stats_dtype(logits_of(0, 0).dtype)
        return target.new_zeros((0,), dtype=acc), target.new_zeros((0, NUM_ROW_STATS), dtype=acc)
    return torch.cat(losses), torch.cat(stats)


def _backward_blocks(n_rows, logits_of, target, stats, row_grads, shard, k, b, ignore_index, options, out_of=None,
                     take=None):
    """The gradient again, block by block, from the saved row statistics: no communication."""
    for start, stop in _blocks(n_rows, shard):
        block, t, s = logits_of(start, stop), target[start:stop], stats[start:stop]
        parts = _parts_from_stats(block, s, t, shard, k if b else 0, ignore_index, options.softcap)
        grad = _block_grad(parts, s, t, row_grads[start:stop], b, ignore_index, options, shard.vocab,
                           out_of(start, stop) if out_of else None)
        if take:
            take(start, stop, grad)


def _row_scale(target, ignore_index, reduction, divisor, dtype, device):
    """The gradient of the reduced loss with respect to each row's loss (1, 1 / count, 1 / divisor)."""
    count = (target != ignore_index).sum()
    scale = torch.ones((), dtype=dtype, device=device)
    if reduction == "mean":
        scale = scale / count.clamp_min(1)
    elif divisor is not None:
        scale = scale / divisor
    return scale, count


def _reduce(loss_rows, count, reduction, divisor):
    if reduction == "none":
        return loss_rows
    loss = loss_rows.sum() if reduction == "sum" else loss_rows.sum() / count
    return loss / divisor if divisor is not None else loss


# --------------------------------------------------------------------------- autograd


class VocabParallelPRSLFunction(torch.autograd.Function):
    """``(logits shard[N, V_r], target[N]) -> (loss, row_stats[N, NUM_ROW_STATS])``."""

    @staticmethod
    def forward(ctx, logits, target, shard, k, b, ignore_index, options, reduction, divisor, grad_now):
        ctx.shard, ctx.k, ctx.b, ctx.ignore_index, ctx.options = shard, k, b, ignore_index, options
        ctx.reduction, ctx.grad = reduction, None
        scale, count = _row_scale(target, ignore_index, reduction, divisor, stats_dtype(logits.dtype), logits.device)
        in_forward = reduction != "none" and grad_now  # (grad mode is off in here: the caller decides)
        if in_forward:
            ctx.grad = grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
            row_grads, out_of = scale.expand(logits.shape[0]), lambda s, e: grad[s:e]
        else:
            row_grads = out_of = None
        loss_rows, row_stats = _forward_blocks(logits.shape[0], lambda s, e: logits[s:e], target, shard, k, b,
                                               ignore_index, options, row_grads, out_of)
        ctx.save_for_backward(logits, target, row_stats, scale, count)
        ctx.mark_non_differentiable(row_stats)
        return _reduce(loss_rows, count, reduction, divisor), row_stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_stats):
        logits, target, row_stats, scale, count = ctx.saved_tensors
        nones = (None,) * 9
        if ctx.reduction != "none":
            # All rows ignored: the gradient is exactly zero, whatever the caller did with the NaN loss.
            grad_loss = torch.where(count > 0, grad_loss, torch.zeros_like(grad_loss))
        if ctx.grad is not None:  # mean / sum, first backward: hand the forward's gradient over
            grad, ctx.grad = ctx.grad, None
            scale_unless_one(grad, grad_loss)
            return (grad,) + nones
        row_grads = grad_loss if ctx.reduction == "none" else (grad_loss * scale).expand(logits.shape[0])
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        _backward_blocks(logits.shape[0], lambda s, e: logits[s:e], target, row_stats, row_grads.contiguous(),
                         ctx.shard, ctx.k, ctx.b, ctx.ignore_index, ctx.options, out_of=lambda s, e: grad[s:e])
        return (grad,) + nones


class VocabParallelLinearPRSLFunction(torch.autograd.Function):
    """``(hidden[N, H], weight shard[V_r, H], bias shard | None, target[N]) -> (loss, row_stats)``.

    Each block's logits are made once (``hidden_c @ weight_r.T``) and their gradient goes straight
    into the three matmuls. ``grad_hidden`` is a sum over the shards: all-reduced over
    the group (in the forward for mean / sum, where it is computed), so that ``hidden``, the same
    on every rank, gets its whole gradient on every rank."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, shard, k, b, ignore_index, options, reduction, divisor, grad_now):
        ctx.shard, ctx.k, ctx.b, ctx.ignore_index, ctx.options = shard, k, b, ignore_index, options
        ctx.reduction, ctx.grads = reduction, None
        needs = tuple(need and grad_now for need in ctx.needs_input_grad[:3])
        scale, count = _row_scale(target, ignore_index, reduction, divisor, stats_dtype(hidden.dtype), hidden.device)
        logits_of = _linear_blocks(hidden, weight, bias)
        if reduction != "none" and any(needs):
            grads, take = _linear_grads(hidden, weight, needs)
            loss_rows, row_stats = _forward_blocks(hidden.shape[0], logits_of, target, shard, k, b, ignore_index,
                                                   options, scale.expand(hidden.shape[0]), take=take)
            ctx.grads = _finish_linear_grads(grads, bias, shard)
        else:
            loss_rows, row_stats = _forward_blocks(hidden.shape[0], logits_of, target, shard, k, b, ignore_index,
                                                   options)
        ctx.save_for_backward(hidden, weight, bias, target, row_stats, scale, count)
        ctx.mark_non_differentiable(row_stats)
        return _reduce(loss_rows, count, reduction, divisor), row_stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_stats):
        hidden, weight, bias, target, row_stats, scale, count = ctx.saved_tensors
        nones = (None,) * 9
        if ctx.reduction != "none":
            grad_loss = torch.where(count > 0, grad_loss, torch.zeros_like(grad_loss))
        if ctx.grads is not None:
            grads, ctx.grads = ctx.grads, None
            for g in grads:
                if g is not None:
                    scale_unless_one(g, grad_loss)
            return tuple(grads) + nones
        row_grads = grad_loss if ctx.reduction == "none" else (grad_loss * scale).expand(hidden.shape[0])
        grads, take = _linear_grads(hidden, weight, ctx.needs_input_grad[:3])
        _backward_blocks(hidden.shape[0], _linear_blocks(hidden, weight, bias), target, row_stats,
                         row_grads.contiguous(), ctx.shard, ctx.k, ctx.b, ctx.ignore_index, ctx.options, take=take)
        return tuple(_finish_linear_grads(grads, bias, ctx.shard)) + nones


def _linear_blocks(hidden, weight, bias):
    def logits_of(start, stop):
        h = hidden[start:stop]
        return torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())
    return logits_of


def _linear_grads(hidden, weight, needs):
    """Gradient buffers of (hidden, weight, bias) and the per-block accumulator that fills them."""
    need_hidden, need_weight, need_bias = needs
    acc = stats_dtype(hidden.dtype)
    grads = [torch.zeros_like(hidden) if need_hidden else None, torch.zeros_like(weight) if need_weight else None,
             weight.new_zeros(weight.shape[0], dtype=acc) if need_bias else None]

    def take(start, stop, g):
        g = g.to(hidden.dtype)  # computed in the stats dtype: the matmuls take the head's
        if need_hidden:
            torch.mm(g, weight, out=grads[0][start:stop])
        if need_weight:
            grads[1].addmm_(g.t(), hidden[start:stop])
        if need_bias:
            grads[2].add_(g.sum(0, dtype=acc))
    return grads, take


def _finish_linear_grads(grads, bias, shard):
    grad_hidden, grad_weight, grad_bias = grads
    if grad_hidden is not None:
        dist.all_reduce(grad_hidden, group=shard.group)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return [grad_hidden, grad_weight, grad_bias]


# --------------------------------------------------------------------------- local shards (Megatron style)


def _local_shard(process_group, vocab_start, width, vocab_size, n_rows, dtype):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab-parallel PRSL needs an initialised torch.distributed process group")
    group = process_group if process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    if vocab_size is None:  # every shard's width, summed: one collective of one number
        total = torch.tensor([width], dtype=torch.int64)
        dist.all_reduce(total, group=group)
        vocab_size = int(total)
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or not 0 <= vocab_start <= vocab_size - width:
        raise ValueError(f"vocab_start must be an int with 0 <= vocab_start <= vocab_size - V_local = "
                         f"{vocab_size} - {width}, got {vocab_start!r}")
    return VocabShard(group, world, vocab_start, width, int(vocab_size),
                      block_rows(n_rows, int(vocab_size), world, stats_dtype(dtype)))


def _check_common(k, b, ignore_index, reduction, vocab, divisor):
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k <= vocab - 1:
        raise ValueError(f"k must be an int in [0, V-1] = [0, {vocab - 1}] (V = the whole vocabulary, "
                         f"{vocab}), got k={k!r}")
    check_b(b)
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if divisor is not None:
        if reduction != "sum":
            raise ValueError(f"divisor needs reduction='sum', got reduction={reduction!r}")
        if torch.is_tensor(divisor) and (divisor.numel() != 1 or divisor.is_complex()):
            raise ValueError(f"divisor must be a real scalar, got a tensor of shape {tuple(divisor.shape)}")
        if not torch.is_tensor(divisor) and (isinstance(divisor, bool) or not isinstance(divisor, (int, float))):
            raise TypeError(f"divisor must be a number or a 0-d tensor, got {type(divisor).__name__}")


def _stats(row_stats, return_stats):
    return RowStats.from_columns(row_stats) if return_stats else None


def vocab_parallel_prsl_loss(logits, target, k, b, *, vocab_start, process_group=None, vocab_size=None,
                             ignore_index=IGNORE_INDEX, reduction="mean", check_target=True, return_stats=False,
                             label_smoothing=0.0, z_loss=0.0, softcap=None, divisor=None):
    """PRSL of logits sharded over the vocabulary, from this rank's shard (Megatron's form).

    Args:
        logits: ``(..., V_local)``, this rank's columns ``[vocab_start, vocab_start + V_local)`` of the
            ``(..., V)`` logits; the shards of the ranks of ``process_group`` tile ``[0, V)``
            (widths may differ, one may be empty).
        target: ``logits.shape[:-1]`` integers in ``[0, V)`` (or ``ignore_index``), the same on every
            rank.
        vocab_start: where this shard begins. ``vocab_size``: ``V`` (default: the sum of the shards'
            widths, one extra all-reduce).
        process_group: the group the vocabulary is sharded over (default: the world).
        The rest: as :func:`prsl_kernels.prsl_loss` (``k`` up to ``V - 1``, larger than a shard is fine).

    Every rank must call it, with the same rows. Returns the loss, the same on every rank (and
    :class:`RowStats` if asked, the same on every rank); the gradient is that of this shard.
    """
    shard = _local_shard(process_group, vocab_start, logits.shape[-1], vocab_size, _rows(target), logits.dtype)
    _check_common(k, b, ignore_index, reduction, shard.vocab, divisor)
    options = check_options(label_smoothing, z_loss, softcap)
    return _prsl_on_shard(logits, target, shard, k, b, ignore_index, reduction, check_target, return_stats, options,
                          divisor)


def _rows(target):
    return math.prod(target.shape)


def _prsl_on_shard(logits, target, shard, k, b, ignore_index, reduction, check_target, return_stats, options,
                   divisor):
    check_inputs(logits.new_zeros(()).expand(*logits.shape[:-1], shard.vocab), target, k, b, ignore_index,
                 reduction, "auto")
    if check_target:
        check_target_range(target, shard.vocab, ignore_index)
    divisor = _divisor(divisor, logits)
    logits2d = logits.reshape(math.prod(logits.shape[:-1]), logits.shape[-1])  # -1 is ambiguous on an empty shard
    k_eff = int(k) if b != 0 else 0  # b == 0: plain CE, no selection (as the fused kernels)
    grad_now = torch.is_grad_enabled() and logits.requires_grad
    loss, row_stats = VocabParallelPRSLFunction.apply(logits2d, target.reshape(-1).long(), shard, k_eff, float(b),
                                                      int(ignore_index), options, reduction, divisor, grad_now)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return (loss, _stats(row_stats, True)) if return_stats else loss


def _divisor(divisor, like):
    if divisor is None or not torch.is_tensor(divisor):
        return divisor
    return divisor.reshape(()).to(device=like.device, dtype=stats_dtype(like.dtype))


def vocab_parallel_linear_prsl_loss(hidden, weight, target, k, b, *, vocab_start, process_group=None,
                                    vocab_size=None, bias=None, ignore_index=IGNORE_INDEX, reduction="mean",
                                    check_target=True, return_stats=False, label_smoothing=0.0, z_loss=0.0,
                                    softcap=None, divisor=None):
    """PRSL of ``F.linear(hidden, weight, bias)`` with the LM head split by rows of its weight.

    ``weight`` (``(V_local, H)``) and ``bias`` (``(V_local,)``) are this rank's rows
    ``[vocab_start, vocab_start + V_local)``; ``hidden`` (``(..., H)``) and ``target`` are the same on
    every rank. The logits are made one block of rows at a time and never leave the rank. The
    gradient of ``hidden`` is summed over the group (all-reduced, as a column-parallel linear layer
    does in its backward), so every rank gets all of it; those of ``weight`` and ``bias`` are this
    shard's. Other arguments: as :func:`vocab_parallel_prsl_loss`.
    """
    shard = _local_shard(process_group, vocab_start, weight.shape[0], vocab_size, _rows(target), hidden.dtype)
    _check_common(k, b, ignore_index, reduction, shard.vocab, divisor)
    options = check_options(label_smoothing, z_loss, softcap)
    return _linear_on_shard(hidden, weight, bias, target, shard, k, b, ignore_index, reduction, check_target,
                            return_stats, options, divisor)


def _linear_on_shard(hidden, weight, bias, target, shard, k, b, ignore_index, reduction, check_target, return_stats,
                     options, divisor):
    if weight.shape[0]:
        check_linear_inputs(hidden, weight, bias, target, None)
    else:  # an empty shard (V smaller than the world's even split): the checks want a row
        check_linear_inputs(hidden, weight.new_zeros(()).expand(1, *weight.shape[1:]), None, target, None)
    check_inputs(hidden.new_zeros(()).expand(*hidden.shape[:-1], shard.vocab), target, k, b, ignore_index,
                 reduction, "auto")
    if check_target:
        check_target_range(target, shard.vocab, ignore_index)
    k_eff = int(k) if b != 0 else 0
    grad_now = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    loss, row_stats = VocabParallelLinearPRSLFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, target.reshape(-1).long(), shard, k_eff, float(b),
        int(ignore_index), options, reduction, _divisor(divisor, hidden), grad_now)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return (loss, _stats(row_stats, True)) if return_stats else loss


# --------------------------------------------------------------------------- DTensors (parallelize_module)


def _vocab_dim(tensor, dim, what):
    """The mesh dimension that shards ``tensor``'s ``dim`` (the vocabulary); every other one must replicate."""
    sharded = None
    for i, placement in enumerate(tensor.placements):
        if placement.is_shard() and placement.dim % tensor.ndim == dim % tensor.ndim and sharded is None:
            sharded = i
        elif not placement.is_replicate():
            raise NotImplementedError(
                f"vocab-parallel PRSL: {what} must be sharded over the vocabulary on one mesh dimension and "
                f"replicated on the others (ColwiseParallel); got placements {tensor.placements}")
    return sharded


def _dtensor_shard(tensor, dim, mesh_dim, n_rows):
    """This rank's columns under DTensor's even split (``torch.chunk``: ``ceil(V / world)`` each, the
    last ones shorter or empty)."""
    mesh, vocab = tensor.device_mesh, tensor.shape[dim]
    world, coordinate = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    width = -(-vocab // world)
    start = min(coordinate * width, vocab)
    local_width = tensor.to_local().shape[dim]
    if local_width != min(width, vocab - start):
        raise NotImplementedError(f"vocab-parallel PRSL: expected DTensor's even split of V = {vocab} over "
                                  f"{world} ranks ({min(width, vocab - start)} columns here), got {local_width}")
    return VocabShard(mesh.get_group(mesh_dim), world, start, min(width, vocab - start), vocab,
                      block_rows(n_rows, vocab, world, stats_dtype(tensor.dtype)))


def _replicated_local(x, what):
    """A plain tensor, or the local value of a DTensor replicated on every mesh dimension."""
    if not is_dtensor(x):
        return x
    if not all(p.is_replicate() for p in x.placements):
        raise NotImplementedError(f"vocab-parallel PRSL: {what} must be a plain tensor or a Replicate DTensor, "
                                  f"got placements {x.placements}")
    return x.to_local()


def _replicate(loss, like):
    mesh = like.device_mesh
    return DTensor.from_local(loss, mesh, [Replicate()] * mesh.ndim, run_check=False)


def dtensor_prsl_loss(logits, target, k, b, options, *, ignore_index=IGNORE_INDEX, reduction="mean", backend="auto",
                      check_target=True, return_stats=False, inplace_backward=False, divisor=None,
                      replicated_loss):
    """:func:`prsl_kernels.prsl_loss` of a DTensor: logits sharded over the vocabulary (``Shard(-1)`` on
    one mesh dimension, the others ``Replicate``), or replicated. The loss comes back as a ``Replicate``
    DTensor, the gradient with the logits' placements, the statistics as plain tensors (the same on
    every rank). ``backend`` and ``inplace_backward`` do not apply to sharded logits (torch ops on
    each shard). ``options``: the validated :class:`~prsl_kernels.validation.Options`.
    ``replicated_loss``: the caller's ``prsl_loss``, which computes replicated logits on every
    rank (passed in: this module sits below ``loss.py`` and never imports it)."""
    if not is_dtensor(logits):
        raise NotImplementedError("vocab-parallel PRSL: the target is a DTensor but the logits are not; pass the "
                                  "logits as the DTensor the LM head returns (use_local_output=False)")
    target = _replicated_local(target, "target")
    mesh_dim = _vocab_dim(logits, -1, "logits")
    if mesh_dim is None:  # replicated everywhere: every rank computes the whole loss
        out = replicated_loss(logits.to_local(), target, k, b, ignore_index=ignore_index, reduction=reduction,
                              backend=backend, check_target=check_target, return_stats=return_stats,
                              divisor=divisor, **options.as_kwargs())
        return (_replicate(out[0], logits), out[1]) if return_stats else _replicate(out, logits)
    vocab = logits.shape[-1]
    _check_common(k, b, ignore_index, reduction, vocab, divisor)
    shard = _dtensor_shard(logits, -1, mesh_dim, _rows(target))
    out = _prsl_on_shard(logits.to_local(), target, shard, k, b, ignore_index, reduction, check_target, return_stats,
                         options, divisor)
    return (_replicate(out[0], logits), out[1]) if return_stats else _replicate(out, logits)


def dtensor_linear_prsl_loss(hidden, weight, target, k, b, options, *, bias=None, ignore_index=IGNORE_INDEX,
                             reduction="mean", backend="auto", chunk_size=None, check_target=True, return_stats=False):
    """:func:`prsl_kernels.linear_prsl_loss` with a tensor-parallel head: ``weight`` a DTensor
    ``Shard(0)`` on one mesh dimension (``ColwiseParallel``'s ``lm_head.weight``), ``bias`` ``Shard(0)``
    or None, ``hidden`` and ``target`` plain tensors (the same on every rank) or ``Replicate`` DTensors.
    The loss comes back as a ``Replicate`` DTensor; ``weight`` and ``bias`` get gradients with their
    placements, ``hidden`` all of its gradient. ``backend`` does not apply; ``chunk_size`` sets the
    rows per block (the same on every rank). ``options``: the validated
    :class:`~prsl_kernels.validation.Options`."""
    if not is_dtensor(weight):
        raise NotImplementedError("vocab-parallel PRSL: hidden or bias is a DTensor but the weight is not; pass "
                                  "the tensor-parallel head's weight DTensor (Shard(0))")
    hidden_local = _replicated_local(hidden, "hidden")
    target = _replicated_local(target, "target")
    vocab = weight.shape[0]
    _check_common(k, b, ignore_index, reduction, vocab, None)
    mesh_dim = _vocab_dim(weight, 0, "the LM head's weight")
    if mesh_dim is None:
        raise NotImplementedError("vocab-parallel PRSL: a replicated head weight DTensor; pass weight.to_local() "
                                  "to linear_prsl_loss")
    if bias is not None and (not is_dtensor(bias) or _vocab_dim(bias, 0, "the LM head's bias") != mesh_dim):
        raise NotImplementedError("vocab-parallel PRSL: the bias must be sharded like the weight (Shard(0))")
    shard = _dtensor_shard(weight, 0, mesh_dim, _rows(target))
    if chunk_size is not None:
        shard = VocabShard(shard.group, shard.world, shard.start, shard.width, shard.vocab, int(chunk_size))
    out = _linear_on_shard(hidden_local, weight.to_local(), None if bias is None else bias.to_local(), target,
                           shard, k, b, ignore_index, reduction, check_target, return_stats, options, None)
    return (_replicate(out[0], weight), out[1]) if return_stats else _replicate(out, weight)


def local_value(x):
    """A plain tensor as is; a DTensor's local tensor (differentiable)."""
    return x.to_local() if is_dtensor(x) else x


def dtensor_linear_argmax(hidden, weight, bias=None):
    """``F.linear(hidden, weight, bias).argmax(-1)`` for a vocab-sharded head (``weight`` a ``Shard(0)``
    DTensor), without the logits crossing the group: per block of rows each shard's best value and
    its global column, all-gathered (``2 * world`` numbers per row); the first of the largest wins,
    as ``torch.argmax``. ``hidden``: the same on every rank (plain or ``Replicate``)."""
    hidden = _replicated_local(hidden, "hidden").detach()
    flat = hidden.reshape(-1, hidden.shape[-1])
    shard = _dtensor_shard(weight, 0, _vocab_dim(weight, 0, "the LM head's weight"), flat.shape[0])
    w, c = weight.to_local().detach(), None if bias is None else bias.to_local().detach()
    ids = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    for start, stop in _blocks(flat.shape[0], shard):
        logits = torch.nn.functional.linear(flat[start:stop], w, c).to(torch.float64)
        send = torch.full((stop - start, 2), float("-inf"), dtype=torch.float64, device=flat.device)
        if shard.width:
            best = logits.argmax(-1)
            send[:, 0] = logits.gather(1, best[:, None]).squeeze(1)
            send[:, 1] = best + shard.start
        gathered = _all_gather(send, shard).view(shard.world, stop - start, 2)
        winner = (gathered[..., 0] == gathered[..., 0].amax(0)).to(torch.int8).argmax(0)  # the first rank
        ids[start:stop] = gathered[..., 1].gather(0, winner[None]).squeeze(0).long()
    return ids.reshape(hidden.shape[:-1])


__all__ = ["vocab_parallel_prsl_loss", "vocab_parallel_linear_prsl_loss", "dtensor_prsl_loss",
           "dtensor_linear_prsl_loss", "dtensor_linear_argmax", "is_dtensor", "local_value", "VocabShard",
           "VocabParallelPRSLFunction", "VocabParallelLinearPRSLFunction"]
