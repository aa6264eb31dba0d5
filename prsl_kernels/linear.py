"""Fused linear + PRSL: ``linear_prsl_loss`` and the ``LinearPRSLLoss`` module.

The loss of ``prsl_loss(F.linear(hidden, weight, bias), target, k, b)`` without
ever holding the N x V logits or their N x V gradient (at N = 4096, V = 128K bf16 those are
2 GiB, more than the rest of a small model's step). Rows are taken
in chunks of ``C``; per chunk:

    logits_c = hidden_c @ weight.T + bias              one matmul into a reused C x V buffer
    loss_c, row_stats_c = prsl::forward_grad(logits_c, ..., grad_out=logits_c)
                                                         the fused kernels of this package: each
                                                         row's gradient overwrites its logits in
                                                         the forward kernel, while the row is in
                                                         cache (grad_c below is that buffer)
    grad_hidden_c = grad_c @ weight                      N x H in all
    grad_weight  += grad_c.T @ hidden_c                   V x H, accumulated over chunks
    grad_bias    += grad_c.sum(0)

For ``reduction="mean"``/``"sum"`` the upstream gradient of every row is the
same scalar, so the gradients are computed in the forward with unit (sum) or
``1/count`` (mean) row gradients and only scaled by the upstream scalar in the
backward (N x H and V x H, not N x V); the chunk's gradient is written over its logits,
so the peak beyond the inputs and the gradients is one C x V buffer. For
``reduction="none"`` (and a second backward through a retained graph) the forward keeps
the row statistics and the backward recomputes each chunk's logits and, with the same
kernel, its gradient over them (one C x V buffer too).

bf16/fp16: each matmul accumulates in fp32 inside (MKL / cuBLAS) and rounds its
output once; ``grad_weight`` is accumulated in the weight's dtype by ``addmm_``
(one rounding per chunk), as Liger's fused linear cross-entropy does, rather than
in an fp32 copy that would add 2 x V x H bytes. The bias gradient (V numbers) is
accumulated in fp32.

Deterministic: chunks run in a fixed order, every matmul and kernel is
deterministic. No host synchronisation on the hot path (``check_target`` aside,
as in ``prsl_loss``).
"""

from __future__ import annotations

import torch

from . import backends
from .function import scale_unless_one
from .loss import prsl_loss
from .spec import IGNORE_INDEX, RowStats, reduce_rows, stats_dtype
from .validation import Options, check_inputs, check_linear_inputs, check_options, check_target_range
from .vocab_parallel import dtensor_linear_prsl_loss, is_dtensor

# Bytes of one C x V chunk buffer (one live at once: the chunk's gradient overwrites its logits
# in the forward kernel, in the forward for mean / sum, in the backward for reduction="none").
# CPU: 64 MiB for 32/64-bit logits, 32 MiB for 16-bit ones. Per chunk, grad_W +=
# grad.T @ hidden[c] reads and writes all of V x H, so fewer, larger chunks pay off where
# the matmuls are fast: measured on the project's 2-core EPYC (fp32, k = 20, N = 4096,
# H = 768, V = 50257, quiet machine) 32 MiB chunks cost 1.19x the unfused CPU time and
# 64 MiB chunks 1.07x, at a peak of 0.18x the unfused one. 16-bit rows are where large
# vocabularies make memory the point (two 32 MiB buffers are 6% of the logits at N = 4096,
# V = 128K bf16; 64 MiB would be 12%) and where CPU matmuls are slow anyway. CUDA: the caching allocator recycles
# it; 48 MiB keeps C large enough (192 rows at V = 128K bf16) that re-reading the weight
# per chunk stays affordable, and the two buffers under 10% of the logits they replace
# at N = 4096, V = 128K bf16 (the memory this op exists to save; 64 MiB measured 1.2-2x the unfused time
# on an H200 at 256-328 rows, so smaller chunks trade time for memory).
CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 48 << 20}
_CPU_16BIT_CHUNK_BYTES = 32 << 20
_MIN_CHUNK_ROWS = 8
# What autocast casts for F.linear (float64 stays float64).
_AUTOCAST_FROM = (torch.float32, torch.float16, torch.bfloat16)


def default_chunk_size(n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk: as many as fit the device's chunk budget (``CHUNK_BYTES``; 32 MiB for
    16-bit logits on CPU), a multiple of 8, at least 8 and at most ``n_rows``. On CUDA the budget shrinks to a
    sixteenth of the free memory when that is smaller (read on the device's first call,
    outside ``torch.compile``, and kept)."""
    elem = torch.empty((), dtype=dtype).element_size()
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"])
    if device.type != "cuda" and elem == 2:
        budget = _CPU_16BIT_CHUNK_BYTES
    if device.type == "cuda" and not torch.compiler.is_compiling():
        budget = min(budget, _cuda_free_budget(device))
    rows = max(_MIN_CHUNK_ROWS, budget // (vocab * elem) // 8 * 8)
    return max(1, min(rows, n_rows))


# A sixteenth of each CUDA device's free memory, read on its first call: mem_get_info is a driver
# call (and a context query) that every training step would otherwise repeat for the same answer.
_CUDA_FREE_BUDGET = {}


def _cuda_free_budget(device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CUDA_FREE_BUDGET:
        free, _ = torch.cuda.mem_get_info(index)
        _CUDA_FREE_BUDGET[index] = free // 16
    return _CUDA_FREE_BUDGET[index]


def linear_prsl_loss(hidden, weight, target, k, b, *, bias=None, ignore_index=IGNORE_INDEX, reduction="mean",
                     backend="auto", chunk_size=None, check_target=True, return_stats=False, label_smoothing=0.0,
                     z_loss=0.0, softcap=None):
    """PRSL of ``F.linear(hidden, weight, bias)`` without materialising the logits.

    Args:
        hidden: ``(..., H)`` float16/bfloat16/float32/float64 (e.g. a decoder's last hidden states).
        weight: ``(V, H)``, the ``nn.Linear`` layout of an LM head, same dtype and device as ``hidden``.
        target: integer tensor of shape ``hidden.shape[:-1]``.
        k, b: as in :func:`prsl_kernels.prsl_loss` (``0 <= k <= V-1``; ``k = 0`` or ``b = 0`` is
            plain fused linear cross-entropy).
        bias: optional ``(V,)``.
        ignore_index, reduction, backend, check_target, return_stats: as in :func:`prsl_loss`.
        label_smoothing, z_loss, softcap: the options of :func:`prsl_loss` (spec, "Options"),
            applied to the chunk's logits inside the same fused kernels.
        chunk_size: rows per chunk (default: :func:`default_chunk_size`); peak memory beyond
            inputs and gradients is about ``chunk_size * V`` elements.

    Returns:
        The loss (float32, or float64 for float64 inputs), and :class:`RowStats` if asked.
        Gradients flow to ``hidden``, ``weight`` and ``bias``. ``backend="reference"`` (or a CPU
        without the C++ kernel) computes the unfused reference instead, materialising the logits.
        Under ``torch.autocast`` the matmul inputs are cast to the autocast dtype first, as
        ``F.linear`` would cast them.
    """
    device_type = hidden.device.type if isinstance(hidden, torch.Tensor) else "cpu"
    if torch.is_autocast_enabled(device_type):
        low = torch.get_autocast_dtype(device_type)
        hidden, weight, bias = (x.to(low) if isinstance(x, torch.Tensor) and x.dtype in _AUTOCAST_FROM else x
                                for x in (hidden, weight, bias))
        with torch.autocast(device_type, enabled=False):
            return linear_prsl_loss(hidden, weight, target, k, b, bias=bias, ignore_index=ignore_index,
                                    reduction=reduction, backend=backend, chunk_size=chunk_size,
                                    check_target=check_target, return_stats=return_stats,
                                    label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    options = check_options(label_smoothing, z_loss, softcap)
    if any(is_dtensor(x) for x in (hidden, weight, bias, target)):  # tensor parallelism: a vocab-sharded head
        return dtensor_linear_prsl_loss(hidden, weight, target, k, b, options, bias=bias, ignore_index=ignore_index,
                                        reduction=reduction, backend=backend, chunk_size=chunk_size,
                                        check_target=check_target, return_stats=return_stats)
    check_linear_inputs(hidden, weight, bias, target, k)
    vocab = weight.shape[0]
    logits_like = hidden.new_zeros(()).expand(*hidden.shape[:-1], vocab)  # no memory: for the shared checks
    check_inputs(logits_like, target, k, b, ignore_index, reduction, backend)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if check_target:
        check_target_range(target, vocab, ignore_index)
    k, b, ignore_index = int(k), float(b), int(ignore_index)
    path = backends.resolve(backend, hidden.device)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    n_rows = hidden2d.shape[0]
    if path == "reference" or n_rows == 0:
        return prsl_loss(torch.nn.functional.linear(hidden, weight, bias), target, k, b, ignore_index=ignore_index,
                         reduction=reduction, backend="reference" if path == "reference" else backend,
                         check_target=False, return_stats=return_stats, **options.as_kwargs())

    target1d = target.reshape(-1).long()
    chunk = chunk_size or default_chunk_size(n_rows, vocab, hidden.dtype, hidden.device)
    k_eff = k if b != 0 else 0  # b == 0 is plain cross-entropy: the kernels skip the selection
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if needs_grad:
        loss, row_stats = LinearPRSLFunction.apply(hidden2d, weight, bias, target1d, k_eff, b, ignore_index, path,
                                                   chunk, reduction, options)
    else:
        loss_rows, row_stats = _forward_chunks(hidden2d, weight, bias, target1d, k_eff, b, ignore_index, path,
                                               chunk, options)[:2]
        loss = reduce_rows(loss_rows, target1d, ignore_index, reduction)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    if not return_stats:
        return loss
    return loss, RowStats.from_columns(row_stats)


def _chunk_logits(hidden_c, weight, bias, out):
    """``hidden_c @ weight.T (+ bias)`` written into ``out`` (a view of the reused buffer)."""
    if bias is None:
        return torch.mm(hidden_c, weight.t(), out=out)
    return torch.addmm(bias, hidden_c, weight.t(), out=out)


def _forward_chunks(hidden, weight, bias, target, k, b, ignore_index, path, chunk, options, grad_scale=None,
                    needs=(False, False, False)):
    """Loss rows and row stats over all chunks; with ``grad_scale`` (a 0-d tensor, the
    gradient of every row's loss) also the gradients of hidden, weight and bias, each
    None unless ``grad_scale`` is given and its flag in ``needs`` (hidden, weight, bias)
    is set. ``options``: the validated :class:`~prsl_kernels.validation.Options`."""
    forward_kernel, _ = backends.kernels(path)
    forward_grad_kernel = backends.forward_grad_kernel(path)
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    buffer = hidden.new_empty((min(chunk, n_rows), vocab))
    losses, stats = [], []
    grad_hidden = grad_weight = grad_bias = None
    want = grad_scale is not None
    need_hidden, need_weight, need_bias = needs
    if want and need_hidden:
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    op_options = options.op_args()
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        hidden_c, target_c = hidden[start:stop], target[start:stop]
        logits_c = _chunk_logits(hidden_c, weight, bias, buffer[:stop - start])
        if not want:
            loss_c, stats_c = forward_kernel(logits_c, target_c, k, b, ignore_index, *op_options)
        else:  # the gradient overwrites the chunk's logits (ours: nobody else reads them)
            grad_rows = grad_scale.expand(stop - start).contiguous()
            loss_c, stats_c = forward_grad_kernel(logits_c, target_c, grad_rows, logits_c, k, b, ignore_index,
                                                  *op_options)
            grad_hidden, grad_weight, grad_bias = _accumulate(logits_c, hidden_c, weight, start, stop, grad_hidden,
                                                              grad_weight, grad_bias, need_hidden, need_weight,
                                                              need_bias)
        losses.append(loss_c)
        stats.append(stats_c)
    return torch.cat(losses), torch.cat(stats), grad_hidden, grad_weight, grad_bias


def _accumulate(grad_c, hidden_c, weight, start, stop, grad_hidden, grad_weight, grad_bias, need_hidden,
                need_weight, need_bias):
    """The two gradient matmuls of one chunk (and the bias sum)."""
    if need_hidden:
        torch.mm(grad_c, weight, out=grad_hidden[start:stop])
    if need_weight:
        if grad_weight is None:
            grad_weight = torch.mm(grad_c.t(), hidden_c)
        else:
            grad_weight.addmm_(grad_c.t(), hidden_c)
    if need_bias:
        part = grad_c.sum(0, dtype=stats_dtype(grad_c.dtype))
        grad_bias = part if grad_bias is None else grad_bias.add_(part)
    return grad_hidden, grad_weight, grad_bias


class LinearPRSLFunction(torch.autograd.Function):
    """Autograd for the fused op: ``(hidden[N, H], weight[V, H], bias[V] | None, target[N])
    -> (loss, row_stats[N, NUM_ROW_STATS])``, loss a scalar for mean/sum, ``(N,)`` for ``"none"``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, k, b, ignore_index, path, chunk, reduction, options):
        needs = ctx.needs_input_grad[:3]
        ctx.b, ctx.ignore_index, ctx.path, ctx.chunk, ctx.reduction = b, ignore_index, path, chunk, reduction
        ctx.k = k
        ctx.options = options
        ctx.grads = None
        if reduction == "none":
            loss_rows, row_stats, *_ = _forward_chunks(hidden, weight, bias, target, k, b, ignore_index, path,
                                                       chunk, options)
            ctx.save_for_backward(hidden, weight, bias, target, None, None)
            ctx.mark_non_differentiable(row_stats)
            return loss_rows, row_stats
        count = (target != ignore_index).sum()
        # Row gradient of the reduced loss: 1 (sum) or 1 / count (mean), as prsl_loss's backward sees it.
        # With every row ignored the mean is 0 / 0 = NaN (as F.cross_entropy) but every row's gradient
        # is exactly zero: clamping keeps the forward's gradients finite zeros.
        scale = torch.ones((), dtype=stats_dtype(hidden.dtype), device=hidden.device)
        if reduction == "mean":
            scale = scale / count.clamp_min(1)
        loss_rows, row_stats, grad_hidden, grad_weight, grad_bias = _forward_chunks(
            hidden, weight, bias, target, k, b, ignore_index, path, chunk, options, grad_scale=scale, needs=needs)
        loss = loss_rows.sum() if reduction == "sum" else loss_rows.sum() / count
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)  # accumulated in fp32
        # Kept off save_for_backward: the first backward scales them in place and hands them
        # over, so autograd adopts them as .grad without a copy. The inputs are saved too
        # (references only) for a second backward through a retained graph, which recomputes.
        ctx.grads = [grad_hidden, grad_weight, grad_bias]
        ctx.save_for_backward(hidden, weight, bias, target, scale, count)
        ctx.mark_non_differentiable(row_stats)
        return loss, row_stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_stats):
        hidden, weight, bias, target, scale, count = ctx.saved_tensors
        if ctx.grads is not None:  # mean / sum, first backward: scale the forward's gradients
            grads, ctx.grads = ctx.grads, None  # drop our references: autograd can adopt the tensors
            # All rows ignored: the gradients are exact zeros, and stay so even when the caller divided
            # the loss by a zero token count (an inf or NaN upstream; 0 * inf would be NaN).
            grad_loss = torch.where(count > 0, grad_loss, torch.zeros_like(grad_loss))
            # Scaled in place unless the upstream gradient is exactly 1 (loss.backward() on the loss itself),
            # decided on the device: otherwise a read and a write of all of V x H (and N x H) for nothing.
            for g in grads:
                if g is not None:
                    scale_unless_one(g, grad_loss)
            grad_hidden, grad_weight, grad_bias = grads
        else:  # reduction="none", or a second backward through a retained graph: recompute
            grad_rows = grad_loss if scale is None else (grad_loss * scale).expand(hidden.shape[0])
            grad_hidden, grad_weight, grad_bias = _backward_chunks(ctx, grad_rows, hidden, weight, bias, target)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None, None


def _backward_chunks(ctx, grad_rows, hidden, weight, bias, target):
    """reduction='none' (or a second backward): recompute each chunk's logits, then the gradient over
    them by the forward's own kernel (``forward_grad``, as the mean / sum forward computes it, so a
    second backward gives what the first gave), and the matmuls."""
    forward_grad_kernel = backends.forward_grad_kernel(ctx.path)
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    n_rows, vocab, chunk = hidden.shape[0], weight.shape[0], ctx.chunk
    grad_rows = grad_rows.contiguous()
    buffer = hidden.new_empty((min(chunk, n_rows), vocab))
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    grad_weight = grad_bias = None
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        hidden_c, target_c = hidden[start:stop], target[start:stop]
        logits_c = _chunk_logits(hidden_c, weight, bias, buffer[:stop - start])
        forward_grad_kernel(logits_c, target_c, grad_rows[start:stop], logits_c, ctx.k, ctx.b, ctx.ignore_index,
                            *ctx.options.op_args())  # the statistics come again with it (cheaper than saving N x NUM_ROW_STATS)
        grad_hidden, grad_weight, grad_bias = _accumulate(logits_c, hidden_c, weight, start, stop, grad_hidden,
                                                          grad_weight, grad_bias, need_hidden, need_weight,
                                                          need_bias)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)  # accumulated in fp32
    return grad_hidden, grad_weight, grad_bias



class LinearPRSLLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`linear_prsl_loss`; call as ``loss_fn(hidden, weight, target, bias=None)``."""

    def __init__(self, k, b, ignore_index=IGNORE_INDEX, reduction="mean", backend="auto", chunk_size=None, *,
                 label_smoothing=0.0, z_loss=0.0, softcap=None):
        super().__init__()
        self.options = check_options(label_smoothing, z_loss, softcap)
        self.k, self.b = k, b
        self.ignore_index, self.reduction, self.backend, self.chunk_size = ignore_index, reduction, backend, chunk_size

    def forward(self, hidden, weight, target, bias=None):
        return linear_prsl_loss(hidden, weight, target, self.k, self.b, bias=bias, ignore_index=self.ignore_index,
                                reduction=self.reduction, backend=self.backend, chunk_size=self.chunk_size,
                                **self.options.as_kwargs())

    def extra_repr(self):
        defaults = Options().as_kwargs()
        options = "".join(f", {name}={value}" for name, value in self.options.as_kwargs().items()
                          if value != defaults[name])
        return (f"k={self.k}, b={self.b}, ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"chunk_size={self.chunk_size}{options}")


__all__ = ["linear_prsl_loss", "LinearPRSLLoss", "LinearPRSLFunction", "default_chunk_size"]
