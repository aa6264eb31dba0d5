"""Constants of the PRSL specification (``docs/spec.md``), defined once.

Every backend returns, besides the per-row loss, the per-row statistics from
which the backward pass rebuilds the gradient in one streaming pass (the first
five), then the token accuracy and the entropy (not used by the backward; appended
after the five, so that the backward kernels' column reads never move):

    lse        log-sum-exp of the row
    tau        k-th largest non-target logit (+inf when k == 0 or b == 0)
    dist       D = sqrt(sum_{j in A} (p_j - p_min)^2)
    spread_sum S = sum_{j in A} (p_j - p_min)
    tie_count  |T|, the number of non-target logits equal to tau
    correct    1 where the target's logit equals the row's maximum (ties with
               other classes count as correct), else 0; 0 on ignored and NaN rows
    entropy    H = -sum_j p_j log p_j of the row's softmax (p_j = 0 terms count 0),
               from pass 1's online sums; 0 on ignored rows, NaN where lse is not
               finite (a NaN or +inf logit, or every logit -inf): a real-valued
               statistic, it is NaN exactly where the loss is, so that a logged mean
               cannot hide a NaN row (unlike ``correct``, a flag that is 0 there)

With options (spec, "Options") all of them are of the soft-capped logits.
They are stored as columns of one ``(N, NUM_ROW_STATS)`` tensor in the stats
dtype (float32, or float64 for float64 logits), column order as below.
"""

from typing import NamedTuple

import torch

IGNORE_INDEX = -100
REDUCTIONS = ("none", "mean", "sum")
BACKENDS = ("auto", "triton", "cpp", "reference")

ROW_STATS = ("lse", "tau", "dist", "spread_sum", "tie_count", "correct", "entropy")
NUM_ROW_STATS = len(ROW_STATS)
LSE, TAU, DIST, SPREAD_SUM, TIE_COUNT, CORRECT, ENTROPY = range(NUM_ROW_STATS)


def stats_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """The accumulation / loss dtype: float64 for float64 logits, else float32."""
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


class RowStats(NamedTuple):
    """Per-row statistics (columns as ``ROW_STATS``), flat over the leading dims; no gradient flows
    through them.

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
        """From the kernels' ``(N, NUM_ROW_STATS)`` tensor (columns in ``ROW_STATS`` order)."""
        return cls(*(row_stats[:, i] for i in range(NUM_ROW_STATS)))


def reduce_rows(loss_rows, target, ignore_index, reduction):
    """The spec's reductions (``REDUCTIONS``) of per-row losses (shaped like ``target``)."""
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows.sum() / (target != ignore_index).sum()  # as F.cross_entropy: all ignored -> nan
