"""The autograd Functions behind every fused backend.

``PRSLFunction`` (any reduction, or no gradient): the forward saves the logits, the
targets and the (N, NUM_ROW_STATS) row statistics; the backward rebuilds the gradient
from them in one streaming pass (spec, "Gradient"), so no top-k indices and no N x V
intermediate survive the forward. Memory traffic: read the logits twice (the second
time mostly from L2), then read them again and write the gradient.

``PRSLGradInForwardFunction`` (``"mean"`` / ``"sum"`` with a gradient): the row
gradient of a reduced loss is one scalar (1, or 1 / count), so the forward kernels
write the gradient of each row right after its statistics, while the row is still in
L2: one read of the logits from memory and one write of the gradient in all. The
upstream scalar is applied in the backward, only when it is not exactly 1 (a
device-side check: no host synchronisation; otherwise one extra read + write pass).
With ``inplace`` the gradient overwrites the logits' storage (no N x V buffer at all).
The C++ kernel takes p_j from its first pass's exponentials here (spec-exact, last bits
differ from ``PRSLFunction``'s backward); the Triton kernels write what the backward writes.
"""

import torch

from . import backends
from .spec import stats_dtype


class PRSLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, k, b, ignore_index, path, options):
        # options: a validation.Options, unpacked into the ops' floats here and nowhere above.
        forward_kernel, _ = backends.kernels(path)
        loss_rows, row_stats = forward_kernel(logits, target, k, b, ignore_index, *options.op_args())
        ctx.save_for_backward(logits, target, row_stats)
        ctx.b, ctx.ignore_index, ctx.path, ctx.options = b, ignore_index, path, options
        ctx.mark_non_differentiable(row_stats)
        return loss_rows, row_stats

    @staticmethod
    def backward(ctx, grad_rows, _grad_stats):
        logits, target, row_stats = ctx.saved_tensors
        _, backward_kernel = backends.kernels(ctx.path)
        grad_logits = backward_kernel(grad_rows.contiguous(), logits, target, row_stats, ctx.b,
                                      ctx.ignore_index, *ctx.options.op_args())
        return grad_logits, None, None, None, None, None, None


class PRSLGradInForwardFunction(torch.autograd.Function):
    """``(logits[N, V], target[N]) -> (loss, row_stats)``, ``loss`` the mean or sum over counted rows."""

    @staticmethod
    def forward(ctx, logits, target, k, b, ignore_index, path, options, reduction, inplace, divisor=None):
        if inplace and logits.shape[0] > 1 and logits.stride(0) < logits.shape[1]:
            # Rows that share memory (an expanded tensor: row stride 0) would each be overwritten by
            # another row's gradient while that row is still being read.
            raise ValueError(f"prsl_loss(inplace_backward=True): the rows of logits overlap in memory (row stride "
                             f"{logits.stride(0)} < V = {logits.shape[1]}, e.g. an expanded tensor), so the "
                             "gradient cannot overwrite them; pass contiguous logits or inplace_backward=False")
        count = (target != ignore_index).sum()
        # The row gradient of the reduced loss, as PRSLFunction's backward would receive it. With
        # every row ignored the mean is 0 / 0 = NaN (as F.cross_entropy) and every gradient row is 0.
        # A divisor of the sum (Hugging Face's num_items_in_batch) goes into it too, so that
        # loss.backward() hands over an upstream gradient of exactly 1: no scaling pass.
        scale = torch.ones((), dtype=stats_dtype(logits.dtype), device=logits.device)
        if reduction == "mean":
            scale = scale / count.clamp_min(1)
        elif divisor is not None:
            scale = scale / divisor
        grad = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
        loss_rows, row_stats = backends.forward_grad_kernel(path)(
            logits, target, scale.expand(logits.shape[0]).contiguous(), grad, k, b, ignore_index, *options.op_args())
        if inplace:
            # Anything else that saved these logits for its backward now fails loudly there.
            torch.autograd.graph.increment_version(logits)
        loss = loss_rows.sum() if reduction == "sum" else loss_rows.sum() / count
        if divisor is not None:
            loss = loss / divisor
        ctx.grad, ctx.inplace, ctx.k = grad, inplace, k
        ctx.b, ctx.ignore_index, ctx.path, ctx.options = b, ignore_index, path, options
        # References only (the logits were kept alive by PRSLFunction too): a second backward
        # through a retained graph recomputes from them.
        ctx.save_for_backward(None if inplace else logits, target, scale, count)
        ctx.mark_non_differentiable(row_stats)
        return loss, row_stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_stats):
        logits, target, scale, count = ctx.saved_tensors
        # All rows ignored: the gradient is exactly zero, whatever the caller did with the NaN loss.
        grad_loss = torch.where(count > 0, grad_loss, torch.zeros_like(grad_loss))
        if ctx.grad is not None:  # the first backward: hand the forward's gradient over
            grad, ctx.grad = ctx.grad, None  # no reference kept: autograd can adopt it as .grad
            scale_unless_one(grad, grad_loss)
            return grad, None, None, None, None, None, None, None, None, None
        if ctx.inplace:
            raise RuntimeError("prsl_loss(inplace_backward=True): the logits were overwritten by the gradient in "
                               "the forward and handed to the first backward; a second backward through the graph "
                               "(retain_graph=True) cannot recompute it. Use inplace_backward=False.")
        # Recomputed by the same kernel as the first time (the C++ one takes p from its first pass's
        # exponentials, the backward kernel from exp(z - lse)), so that backward is reentrant.
        grad_rows = (grad_loss * scale).expand(logits.shape[0]).contiguous()
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        backends.forward_grad_kernel(ctx.path)(logits, target, grad_rows, grad, ctx.k, ctx.b, ctx.ignore_index,
                                               *ctx.options.op_args())
        return grad, None, None, None, None, None, None, None, None, None


def scale_unless_one(grad, scale):
    """``grad *= scale`` in place, skipped when the 0-d ``scale`` is exactly 1 (``loss.backward()``
    on the loss itself): decided on the device for CUDA tensors (no host synchronisation)."""
    if torch.compiler.is_compiling():
        grad.mul_(scale)  # traced: a host read of the scale would break the graph (inductor fuses the multiply)
    elif grad.is_cuda:
        from .triton_kernels import scale_unless_one as device_scale

        device_scale(grad, scale)
    elif float(scale) != 1.0:
        grad.mul_(scale)  # a 0-d float32 factor: multiplied in float32, rounded once
