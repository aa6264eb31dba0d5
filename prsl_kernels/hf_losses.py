"""PRSL as a Hugging Face loss: the token losses behind ``model.loss_function``,
``Trainer(compute_loss_func=...)`` and :func:`prsl_kernels.hf_patch.apply_prsl`.

Alignment: in a causal LM (GPT-2, OPT, BLIP-2's OPT) ``logits[:, t]`` predicts
``labels[:, t + 1]``; in a ``VisionEncoderDecoderModel`` (decoder fed
``[bos] + text``) ``logits[:, t]`` predicts ``labels[:, t]``. We shift the
*labels* (``labels[:, 1:]`` padded with ``ignore_index``), never the logits,
so no ``N x V`` copy of the logits is made.

Normalisation follows Hugging Face's ``ForCausalLMLoss``: with
``num_items_in_batch`` (the number of counted tokens over all the micro-batches
of one optimiser step) the loss is ``sum / num_items_in_batch``, so gradient
accumulation is exact; without it, the mean over counted tokens.

Only the public API (``prsl_loss``, ``linear_prsl_loss``) is used here.
"""

from __future__ import annotations

import torch

from .linear import linear_prsl_loss
from .loss import prsl_loss
from .spec import IGNORE_INDEX, stats_dtype
from .validation import Options, check_b, check_options, check_target_range
from .vocab_parallel import is_dtensor, local_value


def align_labels(labels: torch.Tensor, shift: bool, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Targets aligned with the logits: ``labels`` itself, or shifted left by one for causal LMs."""
    if not shift:
        return labels
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)


def _normalise(loss_sum, count, num_items_in_batch):
    denom = num_items_in_batch if num_items_in_batch is not None else count
    if torch.is_tensor(denom):
        denom = denom.to(loss_sum.device)
    return loss_sum / denom


class PRSLTokenLoss:
    """Token-level PRSL from ``(logits, labels)``; keeps detached running sums of CE and the penalty.

    ``loss = CE + b * D`` summed over counted tokens, divided by ``num_items_in_batch``
    when given (else by the counted tokens). ``variant="released"`` computes the
    authors' released-code penalty instead (reference PyTorch, for comparison;
    ``k`` is then the window end, ``start`` its start). ``k == 0`` or ``b == 0``
    is plain cross-entropy.

    The options ``label_smoothing``, ``z_loss`` and ``softcap`` are those of
    :func:`prsl_loss` (fused kernels; "ce" is then the loss minus ``b * D``).

    ``check_target`` (default on): labels outside ``[0, V)`` that are not ``ignore_index``
    raise, naming the user's ``labels[batch, position]`` (on CUDA: an asynchronous device
    assert, no host sync). Off, such a label gives a NaN loss (Triton) or an error from
    the kernel (C++).

    The running sums (``ce_sum``, ``penalty_sum``, ``tokens``, correct tokens, entropy) are
    device tensors, accumulated without host syncs; :meth:`pop_stats` reads and
    resets them.
    """

    def __init__(self, k: int, b: float, *, shift: bool, ignore_index: int = IGNORE_INDEX, backend: str = "auto",
                 variant: str = "paper", start: int = 0, check_target: bool = True, label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: float | None = None):
        if variant not in ("paper", "released"):
            raise ValueError(f"variant must be 'paper' or 'released', got {variant!r}")
        if int(k) < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        check_b(b)
        self.options = check_options(label_smoothing, z_loss, softcap)
        if variant == "released" and not self.options.is_off:
            raise ValueError("label_smoothing / z_loss / softcap are not available with variant='released'")
        self.k, self.b, self.shift, self.ignore_index = int(k), float(b), bool(shift), int(ignore_index)
        if not isinstance(check_target, bool):
            raise TypeError(f"check_target must be a bool, got {type(check_target).__name__}")
        self.backend, self.variant, self.start, self.check_target = backend, variant, int(start), check_target
        self._sums = None

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None, *,
                 aligned: bool = False) -> torch.Tensor:
        """``aligned=True``: ``labels`` already line up with ``logits`` (HF's ``shift_labels``)."""
        targets = self._targets(labels, logits.device, logits.shape[-1], aligned)
        if (self.k == 0 or self.b == 0) and self.options.is_off and not is_dtensor(logits):
            # Plain cross-entropy: torch's own kernel, the baseline a user would compare against.
            loss_sum = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                         ignore_index=self.ignore_index, reduction="sum")
            loss_sum = loss_sum.to(stats_dtype(logits.dtype))  # the loss dtype of prsl_loss
            count = (targets != self.ignore_index).sum()
            self._record(loss_sum, loss_sum.new_zeros(()), count, *self._logged_sums(logits, targets))
            return _normalise(loss_sum, count, num_items_in_batch)
        if self.variant == "released":
            loss_sum, ce_sum, penalty_sum, count = self._released(logits, targets)
            correct_sum, entropy_sum = self._logged_sums(logits, targets)
            loss = _normalise(loss_sum, count, num_items_in_batch)
        else:
            counted = (targets != self.ignore_index).reshape(-1)
            count = counted.sum()
            denom = num_items_in_batch if num_items_in_batch is not None else count
            # The divisor goes into the kernels' gradient (no scaling pass in the backward).
            loss, stats = prsl_loss(logits, targets, self.k, self.b, ignore_index=self.ignore_index,
                                    reduction="sum", divisor=denom, backend=self.backend,
                                    check_target=False, return_stats=True, **self.options.as_kwargs())
            loss = local_value(loss)  # vocab-sharded logits (tensor parallelism): the same on every rank
            penalty_sum = self.b * (stats.dist * counted).sum()
            # The logged sums: the loss times its divisor (0, not NaN, when every label is ignored).
            loss_sum = torch.where(count > 0, loss.detach() * torch.as_tensor(denom).to(loss.device), 0.0)
            ce_sum = loss_sum - penalty_sum
            correct_sum = stats.correct.sum()  # 0 on ignored rows
            entropy_sum = stats.entropy.sum()  # 0 on ignored rows
        self._record(ce_sum, penalty_sum, count, correct_sum, entropy_sum)
        return loss

    def _targets(self, labels, device, vocab, aligned):
        """The targets of the logits' rows: ``labels`` on ``device``, shifted unless ``aligned``.

        The labels are checked (``check_target``) as the caller gave them, before the shift,
        so that an error names the user's ``labels[batch, position]``, not a flattened row.
        """
        targets = labels.to(device)
        if self.check_target:
            check_target_range(targets, vocab, self.ignore_index, "shift_labels" if aligned else "labels")
        return targets if aligned else align_labels(targets, self.shift, self.ignore_index)

    def _logged_sums(self, logits, targets):
        """``(correct tokens, entropy sum)`` of the counted rows, as ``RowStats.correct`` and
        ``RowStats.entropy``, for the paths whose loss does not run the fused kernels: one forward
        of the fused kernel with k = 0 (one read of the logits, O(N) memory, no graph)."""
        with torch.no_grad():
            _, stats = prsl_loss(logits.detach(), targets, 0, 0.0, ignore_index=self.ignore_index,
                                 reduction="none", backend=self.backend, check_target=False, return_stats=True)
            return stats.correct.sum(), stats.entropy.sum()  # both 0 on ignored rows

    def _released(self, logits, targets):
        from reference import prsl_released_loss_reference

        counted = targets != self.ignore_index
        count = counted.sum()
        flat_logits, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        ce_sum = torch.nn.functional.cross_entropy(flat_logits.float(), flat_targets,
                                                   ignore_index=self.ignore_index, reduction="sum")
        # The released loss is mean CE + b * (a penalty over the batch's rows); written as a
        # sum over counted rows it is ce_sum + b * penalty * count.
        total = prsl_released_loss_reference(flat_logits, flat_targets, self.start, self.k, self.b,
                                             ignore_index=self.ignore_index)
        ce_mean = ce_sum / count.clamp_min(1)
        penalty_batch = total - ce_mean
        loss_sum = ce_sum + penalty_batch * count
        return loss_sum, ce_sum.detach(), (penalty_batch * count).detach(), count

    def _record(self, ce_sum, penalty_sum, count, correct_sum, entropy_sum):
        vals = torch.stack([ce_sum.detach().float(), torch.as_tensor(penalty_sum).detach().float().to(ce_sum.device),
                            count.detach().float().to(ce_sum.device), correct_sum.detach().float().to(ce_sum.device),
                            entropy_sum.detach().float().to(ce_sum.device)])
        self._sums = vals if self._sums is None else self._sums + vals

    def pop_stats(self) -> dict | None:
        """``{"ce": mean CE, "penalty": mean b*D, "tokens": n, "accuracy": token accuracy, "entropy": mean
        softmax entropy}`` since the last call (None if no call). Accuracy: the target's logit is the
        row maximum (ties count); entropy: ``RowStats.entropy`` (of the soft-capped logits with
        ``softcap``) averaged over the counted tokens."""
        if self._sums is None:
            return None
        ce, pen, n, correct, entropy = self._sums.tolist()
        self._sums = None
        n = max(n, 1.0)
        return {"ce": ce / n, "penalty": pen / n, "tokens": int(n), "accuracy": correct / n, "entropy": entropy / n}


def prsl_loss_function(k: int, b: float, *, shift: bool = True, ignore_index: int = IGNORE_INDEX,
                       backend: str = "auto", label_smoothing: float = 0.0, z_loss: float = 0.0,
                       softcap: float | None = None, check_target: bool = True) -> PRSLTokenLoss:
    """A drop-in for a model's ``loss_function`` (signature of HF's ``ForCausalLMLoss``).

    ``model.loss_function = prsl_loss_function(k, b)`` makes ``model(..., labels=labels).loss``
    PRSL for any HF causal LM (``shift=True``, the default). ``shift_labels``, when HF passes it,
    is used as the already aligned targets. The options are those of :func:`prsl_loss`.
    """
    token_loss = PRSLTokenLoss(k, b, shift=shift, ignore_index=ignore_index, backend=backend,
                               label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                               check_target=check_target)

    class _LossFunction:
        def __call__(self, logits, labels=None, vocab_size=None, num_items_in_batch=None,
                     ignore_index=ignore_index, shift_labels=None, **kwargs):
            if shift_labels is not None:
                return token_loss(logits, shift_labels, num_items_in_batch, aligned=True)
            return token_loss(logits, labels, num_items_in_batch)

        pop_stats = staticmethod(token_loss.pop_stats)
        token = token_loss

        def __repr__(self):
            return f"prsl_loss_function(k={token_loss.k}, b={token_loss.b}, shift={token_loss.shift})"

    return _LossFunction()


class PRSLComputeLoss(PRSLTokenLoss):
    """For ``Trainer(compute_loss_func=...)``: called as ``(outputs, labels, num_items_in_batch)``."""

    def __call__(self, outputs, labels, num_items_in_batch=None):
        if labels is None:
            raise ValueError("PRSLComputeLoss needs labels in the batch")
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        return super().__call__(logits, labels, num_items_in_batch)


class CEComputeLoss(PRSLComputeLoss):
    """Plain cross-entropy (``torch.nn.functional.cross_entropy``), logged like the PRSL runs."""

    def __init__(self, *, shift: bool, ignore_index: int = IGNORE_INDEX, backend: str = "auto", **options):
        # options (label_smoothing, z_loss, softcap): then the fused kernels with k = 0, not torch's CE.
        super().__init__(0, 0.0, shift=shift, ignore_index=ignore_index, backend=backend, **options)


class PRSLLinearTokenLoss(PRSLTokenLoss):
    """Token-level PRSL from hidden states and an LM head's weight, by ``linear_prsl_loss``.

    Same normalisation and running CE / penalty sums as :class:`PRSLTokenLoss`; the logits
    are never materialised. ``k == 0`` or ``b == 0`` is plain (fused) cross-entropy.
    """

    def __init__(self, k: int, b: float, *, shift: bool, ignore_index: int = IGNORE_INDEX, backend: str = "auto",
                 chunk_size: int | None = None, check_target: bool = True, **options):
        super().__init__(k, b, shift=shift, ignore_index=ignore_index, backend=backend, check_target=check_target,
                         **options)
        self.chunk_size = chunk_size

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None, *,
                 bias: torch.Tensor | None = None, aligned: bool = False,
                 model_softcap: float | None = None) -> torch.Tensor:
        """``hidden (..., T, H)``, ``weight (V, H)``; ``aligned=True``: ``labels`` already line up.
        ``model_softcap``: the cap the model itself puts on its logits (Gemma 2's config), applied
        by the kernel as the ``softcap`` option (never together with a user's ``softcap``)."""
        targets = self._targets(labels, hidden.device, weight.shape[0], aligned)
        options = self.options
        if model_softcap is not None:  # never together with a user's softcap (apply_prsl refuses that)
            options = Options(options.label_smoothing, options.z_loss, model_softcap)
        loss_sum, stats = linear_prsl_loss(hidden, weight, targets, self.k, self.b, bias=bias,
                                           ignore_index=self.ignore_index, reduction="sum", backend=self.backend,
                                           chunk_size=self.chunk_size, check_target=False,
                                           return_stats=True, **options.as_kwargs())
        loss_sum = local_value(loss_sum)  # a tensor-parallel head: the same on every rank
        counted = (targets != self.ignore_index).reshape(-1)
        penalty_sum = self.b * (stats.dist * counted).sum() if self.k and self.b else loss_sum.new_zeros(())
        count = counted.sum()
        self._record(loss_sum.detach() - penalty_sum, penalty_sum, count, stats.correct.sum(), stats.entropy.sum())
        return _normalise(loss_sum, count, num_items_in_batch)


__all__ = ["align_labels", "PRSLTokenLoss", "PRSLLinearTokenLoss", "PRSLComputeLoss", "CEComputeLoss",
           "prsl_loss_function"]
