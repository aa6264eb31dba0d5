"""The two PRSL operators, registered with ``torch.library`` so that they
dispatch by device (C++ on CPU, Triton on CUDA) and trace under
``torch.compile(fullgraph=True)`` through their fake implementations.

    prsl::forward(logits[N, V], target[N] int64, k, b, ignore_index,
                  label_smoothing, z_loss, softcap)
        -> (loss_rows[N], row_stats[N, NUM_ROW_STATS])      (stats dtype; columns
           spec.ROW_STATS: lse, tau, dist, spread_sum, tie_count, correct, entropy)
    prsl::backward(grad_rows[N], logits, target, row_stats, b, ignore_index,
                   label_smoothing, z_loss, softcap)
        -> grad_logits[N, V]                                 (logits dtype)

The options (spec, "Options") are validated floats, 0.0 meaning off; with all
three off the kernels run exactly the code they ran before the options existed.
They have no defaults in the schemas on purpose: a traced graph then always
names them, so a compiled graph cached before they existed (five arguments,
five stats columns) is never mistaken for one of these ops.

    prsl::forward_grad(logits, target, grad_rows[N], grad_out![N, V], k, b, ignore_index,
                       label_smoothing, z_loss, softcap)
        -> (loss_rows[N], row_stats[N, NUM_ROW_STATS])
        the forward, and the gradient of sum_i grad_rows[i] * loss_i written into
        grad_out (which may be logits itself: the in-place gradient) in the same
        kernel, while each row is still in cache

``logits`` has unit stride along V (rows may be strided); ``k == 0`` is passed
when ``b == 0`` as well, so that kernels skip the selection. Device kernels are
registered by ``cpp_kernels`` and ``triton_kernels`` when they can run.
"""

import torch
from torch import Tensor

from .spec import NUM_ROW_STATS, stats_dtype


@torch.library.custom_op("prsl::forward", mutates_args=())
def forward(logits: Tensor, target: Tensor, k: int, b: float, ignore_index: int, label_smoothing: float,
            z_loss: float, softcap: float) -> tuple[Tensor, Tensor]:
    raise NotImplementedError(
        f"prsl::forward has no kernel for device '{logits.device.type}' "
        "(CPU needs the C++ extension, CUDA needs triton); use backend='reference'")


@forward.register_fake
def _(logits, target, k, b, ignore_index, label_smoothing, z_loss, softcap):
    n = logits.shape[0]
    dtype = stats_dtype(logits.dtype)
    return logits.new_empty((n,), dtype=dtype), logits.new_empty((n, NUM_ROW_STATS), dtype=dtype)


@torch.library.custom_op("prsl::backward", mutates_args=())
def backward(grad_rows: Tensor, logits: Tensor, target: Tensor, row_stats: Tensor, b: float,
             ignore_index: int, label_smoothing: float, z_loss: float, softcap: float) -> Tensor:
    raise NotImplementedError(
        f"prsl::backward has no kernel for device '{logits.device.type}'; use backend='reference'")


@backward.register_fake
def _(grad_rows, logits, target, row_stats, b, ignore_index, label_smoothing, z_loss, softcap):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("prsl::forward_grad", mutates_args=("grad_out",))
def forward_grad(logits: Tensor, target: Tensor, grad_rows: Tensor, grad_out: Tensor, k: int, b: float,
                 ignore_index: int, label_smoothing: float, z_loss: float, softcap: float) -> tuple[Tensor, Tensor]:
    raise NotImplementedError(
        f"prsl::forward_grad has no kernel for device '{logits.device.type}'; use backend='reference'")


@forward_grad.register_fake
def _(logits, target, grad_rows, grad_out, k, b, ignore_index, label_smoothing, z_loss, softcap):
    n = logits.shape[0]
    dtype = stats_dtype(logits.dtype)
    return logits.new_empty((n,), dtype=dtype), logits.new_empty((n, NUM_ROW_STATS), dtype=dtype)
