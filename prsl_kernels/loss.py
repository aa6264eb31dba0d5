"""Public API: ``prsl_loss`` and the ``PRSLLoss`` module."""

from typing import NamedTuple

import torch

from . import backends
from .function import PRSLFunction, PRSLGradInForwardFunction
from .spec import IGNORE_INDEX, NUM_ROW_STATS, stats_dtype
from .validation import check_inputs, check_options, check_target_range
from .vocab_parallel import dtensor_prsl_loss, is_dtensor


class RowStats(NamedTuple):
    """Per-row statistics (spec), flat over the leading dims; no gradient flows through them.

    ``correct`` is 1.0 where the target's logit (soft-capped, if ``softcap`` is on) equals the
    row's maximum, else 0.0: a target tied with another class for the maximum counts as correct
    (no index tie-break); ignored rows and rows holding a NaN give 0. Token accuracy is
    ``correct.sum() / (target != ignore_index).sum()``.

    ``entropy`` is ``-sum_j p_j log p_j`` of the row's (soft-capped) softmax, computed in the
    forward's first pass (no extra read of the logits); 0.0 on ignored rows, NaN where the loss is
    NaN (a NaN or +inf logit, or every logit -inf), so a mean over a batch shows a NaN row.
    The mean entropy of a batch is ``entropy.sum() / (target != ignore_index).sum()``.
    """
    lse: torch.Tensor
    tau: torch.Tensor
    dist: torch.Tensor
    spread_sum: torch.Tensor
    tie_count: torch.Tensor
    correct: torch.Tensor
    entropy: torch.Tensor

    @classmethod
    def from_columns(cls, row_stats):
        """From the kernels' ``(N, NUM_ROW_STATS)`` tensor (columns in spec.ROW_STATS order)."""
        return cls(*(row_stats[:, i] for i in range(NUM_ROW_STATS)))


def prsl_loss(logits, target, k, b, *, ignore_index=IGNORE_INDEX, reduction="mean", backend="auto",
              check_target=True, return_stats=False, label_smoothing=0.0, z_loss=0.0, softcap=None,
              inplace_backward=False, divisor=None):
    """Partially Recentralization Softmax Loss: ``CE + b * D`` per token.

    Args:
        logits: ``(..., V)`` float16/bfloat16/float32/float64.
        target: integer tensor of shape ``logits.shape[:-1]``.
        k: number of largest non-target probabilities penalised, ``0 <= k <= V-1``.
        b: penalty weight (any real; ``b > 0`` restricts the top-k spread).
        ignore_index: target value whose rows count neither in loss nor gradient.
        reduction: ``"mean"`` (over counted rows), ``"sum"`` or ``"none"``.
        backend: ``"auto"``, ``"triton"``, ``"cpp"`` or ``"reference"``.
        check_target: verify targets lie in ``[0, V)``: on the CPU a ``ValueError`` naming the
            first bad position (``target[2, 5]``); on CUDA an asynchronous device assert (no host
            sync). Unchecked, an out-of-range target is still never read: its row is NaN (Triton)
            or the call raises (C++).
        return_stats: also return :class:`RowStats` (e.g. to log CE and ``b * D`` apart, or the
            token accuracy from ``correct``).
        label_smoothing: ``eps`` in [0, 1]; the CE term becomes
            ``(1 - eps) (lse - z_s) + eps (lse - mean_j z_j)``, as ``F.cross_entropy(label_smoothing=eps)``.
        z_loss: ``lam >= 0``; adds ``lam * lse^2`` per row (PaLM's auxiliary loss).
        softcap: ``None`` (off) or ``c > 0``; every logit is first replaced by ``c * tanh(z / c)``
            (Gemma 2), and everything (lse, the top-k selection, stats) uses the capped values.
            The options are computed inside the fused kernels (spec, "Options"); all off is
            bit-identical to the plain loss.
        inplace_backward: with ``reduction="mean"``/``"sum"`` and a gradient to compute, write the
            gradient over the logits' storage (flash-attention's name): no N x V gradient buffer
            is allocated, and **the logits tensor holds the gradient after the call** (its
            version counter is bumped, so an op that saved the same logits for its own backward
            raises there instead of using the overwritten values). A second backward through a
            retained graph raises. Ignored by the reference backend, under ``torch.compile``
            and when no gradient is needed; with ``reduction="none"`` it raises.
        divisor: with ``reduction="sum"``, return the sum divided by this (a number or a one-element
            tensor, e.g. Hugging Face's ``num_items_in_batch``, the counted tokens of all the
            micro-batches of one optimiser step). The same value as dividing the returned sum,
            but the divisor is folded into the gradient the forward writes, so
            ``loss.backward()`` scales nothing (dividing afterwards costs one more pass over the
            N x V gradient in the backward).

    With ``reduction="mean"``/``"sum"`` and a gradient to compute, the fused backends write the
    gradient in the forward, each row right after its statistics while it is still in cache
    (one read of the logits from memory instead of two); the backward then only hands it
    over, scaling it in place when the upstream gradient is not exactly 1 (checked on the
    device; ``loss.backward()`` gives 1). The gradient buffer therefore exists from the
    forward on, which is when the old backward would have allocated it anyway when the loss
    is the last op before ``backward()``.

    Returns:
        The loss (float32, or float64 for float64 logits), and the stats if asked.
    """
    if is_dtensor(logits) or is_dtensor(target):  # tensor parallelism: logits sharded over the vocabulary
        return dtensor_prsl_loss(logits, target, k, b, ignore_index=ignore_index, reduction=reduction, backend=backend,
                                 check_target=check_target, return_stats=return_stats,
                                 label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                                 inplace_backward=inplace_backward, divisor=divisor)
    check_inputs(logits, target, k, b, ignore_index, reduction, backend)
    options = check_options(label_smoothing, z_loss, softcap)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    if inplace_backward and reduction == "none":
        raise ValueError("inplace_backward=True needs reduction='mean' or 'sum': with 'none' the upstream gradient "
                         "of each row is only known in the backward, after the logits would have been overwritten")
    if divisor is not None:
        if reduction != "sum":
            raise ValueError(f"divisor needs reduction='sum', got reduction={reduction!r}")
        if torch.is_tensor(divisor):
            if divisor.numel() != 1 or divisor.is_complex():
                raise ValueError(f"divisor must be a real scalar, got a tensor of shape {tuple(divisor.shape)}")
            divisor = _divisor_on(divisor, logits)
        elif not isinstance(divisor, (int, float)) or isinstance(divisor, bool):
            raise TypeError(f"divisor must be a number or a 0-d tensor, got {type(divisor).__name__}")
    vocab = logits.shape[-1]
    if check_target:
        check_target_range(target, vocab, ignore_index)
    k, b, ignore_index = int(k), float(b), int(ignore_index)
    path = backends.resolve(backend, logits.device)

    if path == "reference":
        loss_rows, stats = _reference_rows(logits, target, k, b, ignore_index, options)
    else:
        logits2d = logits.reshape(-1, vocab)
        if logits2d.stride(-1) != 1:
            logits2d = logits2d.contiguous()
        target1d, k_eff = target.reshape(-1).long(), k if b != 0 else 0  # b == 0: plain CE, no selection
        if (reduction != "none" and torch.is_grad_enabled() and logits.requires_grad
                and not torch.compiler.is_compiling()):
            inplace = inplace_backward and logits2d.data_ptr() == logits.data_ptr()
            loss, row_stats = PRSLGradInForwardFunction.apply(logits2d, target1d, k_eff, b, ignore_index, path,
                                                              options, reduction, inplace, divisor)
            return (loss, RowStats.from_columns(row_stats)) if return_stats else loss
        loss_rows, row_stats = PRSLFunction.apply(logits2d, target1d, k_eff, b, ignore_index, path, options)
        stats = RowStats.from_columns(row_stats)
        loss_rows = loss_rows.reshape(target.shape)

    loss = reduce_rows(loss_rows, target, ignore_index, reduction)
    if divisor is not None:
        loss = loss / divisor
    return (loss, stats) if return_stats else loss


def _divisor_on(divisor, logits):
    """A one-element ``divisor`` tensor as the loss uses it: on the logits' device in the stats
    dtype, or, held on the host for logits elsewhere (Hugging Face's ``num_items_in_batch`` often
    is), a Python number: read on the host at no cost, where copying it to the device would be a
    blocking copy that waits for the device's queue."""
    if divisor.device.type == "cpu" and logits.device.type != "cpu" and not torch.compiler.is_compiling():
        return divisor.item()
    return divisor.reshape(()).to(device=logits.device, dtype=stats_dtype(logits.dtype))


def reduce_rows(loss_rows, target, ignore_index, reduction):
    """The spec's reductions of per-row losses (shaped like ``target``)."""
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows.sum() / (target != ignore_index).sum()  # as F.cross_entropy: all ignored -> nan


def _reference_rows(logits, target, k, b, ignore_index, options=(0.0, 0.0, 0.0)):
    from reference import loss_rows_reference

    eps, lam, cap = options
    loss_rows, stats = loss_rows_reference(logits, target, k, b, ignore_index, label_smoothing=eps, z_loss=lam,
                                           softcap=cap or None)
    return loss_rows.reshape(target.shape), RowStats(*(s.detach() for s in stats))


class PRSLLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`prsl_loss`; call as ``loss_fn(logits, target)``."""

    def __init__(self, k, b, ignore_index=IGNORE_INDEX, reduction="mean", backend="auto", *, label_smoothing=0.0,
                 z_loss=0.0, softcap=None, inplace_backward=False):
        super().__init__()
        check_options(label_smoothing, z_loss, softcap)
        self.k, self.b, self.inplace_backward = k, b, inplace_backward
        self.ignore_index, self.reduction, self.backend = ignore_index, reduction, backend
        self.label_smoothing, self.z_loss, self.softcap = label_smoothing, z_loss, softcap

    def forward(self, logits, target):
        return prsl_loss(logits, target, self.k, self.b, ignore_index=self.ignore_index,
                         reduction=self.reduction, backend=self.backend, label_smoothing=self.label_smoothing,
                         z_loss=self.z_loss, softcap=self.softcap, inplace_backward=self.inplace_backward)

    def extra_repr(self):
        options = "".join(f", {name}={value}" for name, value, off in (
            ("label_smoothing", self.label_smoothing, 0.0), ("z_loss", self.z_loss, 0.0),
            ("softcap", self.softcap, None), ("inplace_backward", self.inplace_backward, False)) if value != off)
        return f"k={self.k}, b={self.b}, ignore_index={self.ignore_index}, reduction={self.reduction!r}{options}"
