"""Pure-PyTorch reference of PRSL: the executable form of ``docs/spec.md``.

Installed as the package ``prsl_reference``. Autograd gives every gradient here;
nothing is hand-derived except ``grad_closed_form``, which writes the spec's
closed form out so tests can hold the autograd result (and the kernels) to it.
Memory is O(N*V) on purpose: this is the readable version, not the fast one.
"""

import torch

from prsl_kernels.spec import IGNORE_INDEX


def _rows(logits, target):
    vocab = logits.shape[-1]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.reshape(-1, vocab).to(acc), target.reshape(-1).long()


def row_stats_reference(logits, target, k, ignore_index=IGNORE_INDEX):
    """Per-row ``(lse, tau, dist, spread_sum, tie_count, p, above, ties, z_target)``.

    ``above`` is A, ``ties`` is T (both exclude the target). With ``k == 0``
    A and T are empty, ``tau = +inf`` and ``dist = spread_sum = 0``.
    Works under autograd: ``p_min`` is the mean of ``p`` over T, which gives
    the spec's symmetric sub-gradient through ties.
    """
    z, t = _rows(logits, target)
    counted = t != ignore_index
    t_safe = torch.where(counted, t, torch.zeros_like(t))
    # torch.logsumexp returns +inf for a row holding +inf; the spec (like
    # F.cross_entropy) makes such a row NaN.
    lse = torch.logsumexp(z, dim=-1).masked_fill(torch.isposinf(z).any(-1), float("nan"))
    z_target = z.gather(1, t_safe[:, None]).squeeze(1)
    p = torch.exp(z - lse[:, None])
    is_target = torch.zeros_like(z, dtype=torch.bool).scatter_(1, t_safe[:, None], True)
    if k == 0:
        tau = torch.full_like(lse, float("inf"))
        above = torch.zeros_like(is_target)
        ties = torch.zeros_like(is_target)
        zero = torch.zeros_like(lse)
        return lse, tau, zero, zero, zero.detach().clone(), p, above, ties, z_target
    z_nt = z.detach().masked_fill(is_target, float("-inf"))
    tau = z_nt.topk(k, dim=-1).values[:, -1]
    above = (z_nt > tau[:, None]) & ~is_target
    ties = (z_nt == tau[:, None]) & ~is_target
    tie_count = ties.sum(-1).to(z.dtype)
    p_min = (p * ties).sum(-1) / tie_count
    u = torch.where(above, p - p_min[:, None], torch.zeros_like(p))
    spread_sum = u.sum(-1)
    sq = (u * u).sum(-1)
    # sqrt has an infinite slope at 0: the spec sets g = 0 when D == 0.
    dist = torch.where(sq > 0, torch.where(sq > 0, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))
    return lse, tau, dist, spread_sum, tie_count, p, above, ties, z_target


def _reduce(loss_rows, counted, reduction, shape):
    if reduction == "none":
        return loss_rows.reshape(shape)
    if reduction == "sum":
        return loss_rows.sum()
    if reduction == "mean":
        return loss_rows.sum() / counted.sum()
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def loss_rows_reference(logits, target, k, b, ignore_index=IGNORE_INDEX):
    """Flat per-row ``CE + b * D`` (0 on ignored rows) and the five row statistics."""
    lse, tau, dist, spread, ties, _, _, _, z_target = row_stats_reference(logits, target, k, ignore_index)
    counted = target.reshape(-1) != ignore_index
    loss_rows = torch.where(counted, lse - z_target + b * dist, torch.zeros_like(lse))
    return loss_rows, (lse, tau, dist, spread, ties)


def prsl_loss_reference(logits, target, k, b, ignore_index=IGNORE_INDEX, reduction="mean"):
    """``CE + b * D`` per token (spec, "Per token"), reduced like F.cross_entropy."""
    loss_rows, _ = loss_rows_reference(logits, target, k, b, ignore_index)
    return _reduce(loss_rows, target.reshape(-1) != ignore_index, reduction, target.shape)


def grad_closed_form(logits, target, k, b, ignore_index=IGNORE_INDEX, grad_rows=None):
    """The spec's closed-form ``dloss_row/dz`` times ``grad_rows`` (default 1), shaped like logits.

    dloss/dz_j = p_j (1 - b D) - [j == s] + b p_j g_j, with g_j = u_j / D on A,
    -(S / D) / |T| on T, 0 elsewhere, and g = 0 when D == 0.
    """
    with torch.no_grad():
        lse, tau, dist, spread, tie_count, p, above, ties, _ = row_stats_reference(
            logits, target, k, ignore_index)
        z, t = _rows(logits, target)
        counted = t != ignore_index
        t_safe = torch.where(counted, t, torch.zeros_like(t))
        has_d = dist > 0
        safe_d = torch.where(has_d, dist, torch.ones_like(dist))
        p_min = torch.exp(tau - lse)
        g = torch.where(above, (p - p_min[:, None]) / safe_d[:, None], torch.zeros_like(p))
        g = torch.where(ties, (-(spread / safe_d) / tie_count.clamp_min(1))[:, None], g)
        g = torch.where(has_d[:, None], g, torch.zeros_like(g))
        one_hot = torch.zeros_like(p).scatter_(1, t_safe[:, None], 1.0)
        grad = p * (1 - b * dist)[:, None] - one_hot + b * p * g
        scale = counted.to(grad.dtype)
        if grad_rows is not None:
            scale = scale * grad_rows.reshape(-1).to(grad.dtype)
        return (grad * scale[:, None]).reshape(logits.shape)


def prsl_released_loss_reference(logits, target, start, end, b, ignore_index=IGNORE_INDEX):
    """The authors' released-code variant (spec, last section); for comparison only.

    Per counted row: the mean of the non-target logits ranked ``start .. end-1``
    (descending); then ``-sum(log_softmax)`` of those means taken across rows;
    loss = mean CE + b * that.
    """
    z, t = _rows(logits, target)
    counted = t != ignore_index
    if not 0 <= start < end <= z.shape[-1] - 1:
        raise ValueError(f"need 0 <= start < end <= V-1, got start={start}, end={end}")
    ce = torch.nn.functional.cross_entropy(z, t, ignore_index=ignore_index)
    zc, tc = z[counted], t[counted]
    if zc.shape[0] == 0:
        return ce
    z_nt = zc.masked_fill(torch.zeros_like(zc, dtype=torch.bool).scatter_(1, tc[:, None], True),
                          float("-inf"))
    window = z_nt.topk(end, dim=-1).values[:, start:end]
    means = window.mean(-1)
    penalty = -torch.log_softmax(means, dim=0).sum()
    return ce + b * penalty


__all__ = [
    "IGNORE_INDEX",
    "row_stats_reference",
    "loss_rows_reference",
    "prsl_loss_reference",
    "grad_closed_form",
    "prsl_released_loss_reference",
]
