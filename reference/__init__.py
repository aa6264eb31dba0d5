"""Pure-PyTorch reference of PRSL: the executable form of ``docs/spec.md``.

Imported as ``reference`` from a checkout (repo root on the path) and from an install alike. Autograd gives every gradient here;
nothing is hand-derived except ``grad_closed_form``, which writes the spec's
closed form out so tests can hold the autograd result (and the kernels) to it.
Memory is O(N*V) on purpose: this is the readable version, not the fast one.
"""

import torch

from prsl_kernels.spec import IGNORE_INDEX


def _rows(logits, target, softcap=None):
    """Flat rows in the accumulation dtype, soft-capped first when ``softcap`` is set."""
    vocab = logits.shape[-1]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.reshape(-1, vocab).to(acc)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z, target.reshape(-1).long()


def row_stats_reference(logits, target, k, ignore_index=IGNORE_INDEX, softcap=None):
    """Per-row ``(lse, tau, dist, spread_sum, tie_count, p, above, ties, z_target, correct, z)``.

    ``above`` is A, ``ties`` is T (both exclude the target). With ``k == 0``
    A and T are empty, ``tau = +inf`` and ``dist = spread_sum = 0``.
    Works under autograd: ``p_min`` is the mean of ``p`` over T, which gives
    the spec's symmetric sub-gradient through ties. ``softcap`` (spec,
    "Options") caps the logits first: everything is computed on the capped
    ``z`` (returned last). ``correct`` is 1 where the target's (capped) logit
    equals the row's maximum, ties included, 0 on NaN rows.
    """
    z, t = _rows(logits, target, softcap)
    counted = t != ignore_index
    t_safe = torch.where(counted, t, torch.zeros_like(t))
    # torch.logsumexp returns +inf for a row holding +inf; the spec (like
    # F.cross_entropy) makes such a row NaN.
    lse = torch.logsumexp(z, dim=-1).masked_fill(torch.isposinf(z).any(-1), float("nan"))
    z_target = z.gather(1, t_safe[:, None]).squeeze(1)
    correct = ((z_target.detach() >= z.detach().max(-1).values) & (lse.detach() == lse.detach())).to(z.dtype)
    p = torch.exp(z - lse[:, None])
    is_target = torch.zeros_like(z, dtype=torch.bool).scatter_(1, t_safe[:, None], True)
    if k == 0:
        tau = torch.full_like(lse, float("inf"))
        above = torch.zeros_like(is_target)
        ties = torch.zeros_like(is_target)
        zero = torch.zeros_like(lse)
        return lse, tau, zero, zero, zero.detach().clone(), p, above, ties, z_target, correct, z
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
    return lse, tau, dist, spread_sum, tie_count, p, above, ties, z_target, correct, z


def _reduce(loss_rows, counted, reduction, shape):
    if reduction == "none":
        return loss_rows.reshape(shape)
    if reduction == "sum":
        return loss_rows.sum()
    if reduction == "mean":
        return loss_rows.sum() / counted.sum()
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def loss_rows_reference(logits, target, k, b, ignore_index=IGNORE_INDEX, *, label_smoothing=0.0, z_loss=0.0,
                        softcap=None):
    """Flat per-row loss (0 on ignored rows) and the row statistics (spec.ROW_STATS order).

    Without options the loss is ``CE + b * D``; with them (spec, "Options"), on the
    soft-capped logits, ``(1 - eps) CE + eps (lse - mean_j z_j) + lam lse^2 + b * D``.
    """
    lse, tau, dist, spread, ties, _, _, _, z_target, correct, z = row_stats_reference(
        logits, target, k, ignore_index, softcap)
    counted = target.reshape(-1) != ignore_index
    if label_smoothing or z_loss:
        eps = label_smoothing
        ce = (1 - eps) * (lse - z_target) + eps * (lse - z.mean(-1)) + z_loss * lse * lse
    else:
        ce = lse - z_target
    loss_rows = torch.where(counted, ce + b * dist, torch.zeros_like(lse))
    correct = torch.where(counted, correct, torch.zeros_like(correct))
    entropy = torch.where(counted, entropy_reference(z.detach(), lse.detach()), torch.zeros_like(lse))
    return loss_rows, (lse, tau, dist, spread, ties, correct, entropy)


def entropy_reference(z, lse):
    """``-sum_j p_j log p_j`` per row of (capped) logits ``z`` with log-sum-exp ``lse``.

    ``log p_j = z_j - lse`` (not ``log(p_j)``, which loses the small p's digits); a ``-inf`` logit
    has ``p_j = 0`` and adds 0, not ``0 * -inf``. A NaN lse (NaN or +inf in the row) or an all
    ``-inf`` row (p = 0 / 0) gives NaN.
    """
    log_p = z - lse[:, None]
    p = torch.exp(log_p)
    return torch.where(p == 0, torch.zeros_like(p), -p * log_p).sum(-1)


def prsl_loss_reference(logits, target, k, b, ignore_index=IGNORE_INDEX, reduction="mean", *, label_smoothing=0.0,
                        z_loss=0.0, softcap=None):
    """``CE + b * D`` per token (spec, "Per token"; options: spec, "Options"), reduced like F.cross_entropy."""
    loss_rows, _ = loss_rows_reference(logits, target, k, b, ignore_index, label_smoothing=label_smoothing,
                                       z_loss=z_loss, softcap=softcap)
    return _reduce(loss_rows, target.reshape(-1) != ignore_index, reduction, target.shape)


def grad_closed_form(logits, target, k, b, ignore_index=IGNORE_INDEX, grad_rows=None, *, label_smoothing=0.0,
                     z_loss=0.0, softcap=None):
    """The spec's closed-form ``dloss_row/dz`` times ``grad_rows`` (default 1), shaped like logits.

    dloss/dz_j = p_j (1 - b D + 2 lam lse) - (1 - eps) [j == s] - eps / V + b p_j g_j, with
    g_j = u_j / D on A, -(S / D) / |T| on T, 0 elsewhere, and g = 0 when D == 0; times
    ``1 - tanh(z_orig / c)^2`` when soft-capped.
    """
    with torch.no_grad():
        lse, tau, dist, spread, tie_count, p, above, ties, _, _, z = row_stats_reference(
            logits, target, k, ignore_index, softcap)
        _, t = _rows(logits, target)
        counted = t != ignore_index
        t_safe = torch.where(counted, t, torch.zeros_like(t))
        has_d = dist > 0
        safe_d = torch.where(has_d, dist, torch.ones_like(dist))
        p_min = torch.exp(tau - lse)
        g = torch.where(above, (p - p_min[:, None]) / safe_d[:, None], torch.zeros_like(p))
        g = torch.where(ties, (-(spread / safe_d) / tie_count.clamp_min(1))[:, None], g)
        g = torch.where(has_d[:, None], g, torch.zeros_like(g))
        one_hot = torch.zeros_like(p).scatter_(1, t_safe[:, None], 1.0)
        eps, vocab = label_smoothing, z.shape[-1]
        keep = 1 - b * dist + 2 * z_loss * lse if z_loss else 1 - b * dist
        grad = p * keep[:, None] - (1 - eps) * one_hot - eps / vocab + b * p * g
        if softcap:
            z_orig, _ = _rows(logits, target)
            grad = grad * (1 - torch.tanh(z_orig / softcap) ** 2)
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
    "entropy_reference",
    "prsl_released_loss_reference",
]
