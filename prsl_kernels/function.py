"""The one autograd Function behind every fused backend.

Forward saves the logits, the targets and the (N, NUM_ROW_STATS) row statistics; backward
rebuilds the gradient from them in one streaming pass (spec, "Gradient"), so
no top-k indices and no N x V intermediate survive the forward.
"""

import torch

from . import backends


class PRSLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, k, b, ignore_index, path, options=(0.0, 0.0, 0.0)):
        # options: (label_smoothing, z_loss, softcap), validated floats, 0.0 = off.
        forward_kernel, _ = backends.kernels(path)
        loss_rows, row_stats = forward_kernel(logits, target, k, b, ignore_index, *options)
        ctx.save_for_backward(logits, target, row_stats)
        ctx.b, ctx.ignore_index, ctx.path, ctx.options = b, ignore_index, path, options
        ctx.mark_non_differentiable(row_stats)
        return loss_rows, row_stats

    @staticmethod
    def backward(ctx, grad_rows, _grad_stats):
        logits, target, row_stats = ctx.saved_tensors
        _, backward_kernel = backends.kernels(ctx.path)
        grad_logits = backward_kernel(grad_rows.contiguous(), logits, target, row_stats, ctx.b,
                                      ctx.ignore_index, *ctx.options)
        return grad_logits, None, None, None, None, None, None
