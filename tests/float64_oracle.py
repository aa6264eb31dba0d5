"""The float64 oracle the randomised and short-row tests hold every backend to.

Every backend accumulates in float32 (float64 for float64 logits), so it is held to
what that arithmetic can resolve, not to more: each logit's probability
``p_j = exp(z_j - lse)`` is known to about ``eps * (|z| + |lse|)`` relative, the
cross-entropy ``lse - z_s`` to about ``eps * |z|`` absolute, and the gradient of
the penalty ``b * u_j / D`` to that times ``p_max / D`` (a distance between nearly
equal probabilities is ill-conditioned in any precision). The gradient is then
rounded once to the logits' dtype. The oracle computes the same formulas in
float64 on the same (already rounded) logit values, so both sides agree on every
tie, on A and T, and on tau exactly.

The row statistics (``Oracle.stats``): tau, |T| and ``correct`` are selections of
those values, hence equal; lse is held to the cross-entropy's bound; the entropy
``H = log S - T / S`` (T / S = sum_j p_j (z_j - m), m the row maximum) to
``eps * ((scale) (1 + H) + log(V + 1))``: each ``z_j - m`` is known to ``eps * scale``
absolute and each weight ``p_j`` to ``eps * scale`` relative, so their p-weighted
mean, which is at most H, to ``eps * scale * (1 + H)``; log S as lse. D and S are
held through the loss and the gradient.
"""

import math

import torch

import reference as ref

# Unit roundoff of the accumulation (float32; float64 for float64 logits) and of the
# gradient's storage dtype, and the smallest step of that dtype (fp16's subnormals).
ACC_EPS = {torch.float64: 2.0 ** -53}
OUT_EPS = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24,
           torch.float64: 2.0 ** -53}
OUT_TINY = {torch.float16: 2.0 ** -24, torch.bfloat16: 2.0 ** -133, torch.float32: 2.0 ** -149,
            torch.float64: 2.0 ** -1074}
# float32's smallest normal: a kernel may flush a probability below it to zero (ex2.approx.ftz).
ACC_TINY = {torch.float64: 2.0 ** -1022}
# Rounding steps the bounds leave implicit (a log, an exp, a sum of a few terms).
SLACK = 16.0


def acc_eps(dtype):
    return ACC_EPS.get(dtype, 2.0 ** -24)


def acc_tiny(dtype):
    return ACC_TINY.get(dtype, 2.0 ** -126)


class Oracle:
    """Loss rows, gradient (of ``sum_r w_r loss_r``) and their tolerances for one batch."""

    def __init__(self, logits, target, k, b, ignore_index=-100):
        n, vocab = logits.reshape(-1, logits.shape[-1]).shape
        z = logits.reshape(n, vocab).double()
        t = target.reshape(-1)
        self.dtype, self.vocab, self.k, self.b = logits.dtype, vocab, k, b
        self.counted = t != ignore_index
        lse, tau, dist, _, _, p, above, ties, _, _, _ = ref.row_stats_reference(z, t, k, ignore_index)
        self.loss_rows, self.row_stats = ref.loss_rows_reference(z, t, k, b, ignore_index)
        self.grad_unit = ref.grad_closed_form(z, t, k, b, ignore_index).reshape(n, vocab)
        finite = torch.where(torch.isfinite(z), z.abs(), torch.zeros_like(z))
        scale = finite.amax(-1) + torch.where(torch.isfinite(lse), lse.abs(), torch.zeros_like(lse)) + 1.0
        eps = acc_eps(self.dtype)
        selected = above | ties
        p_sel = torch.where(selected, p, torch.zeros_like(p)).amax(-1)
        has_d = dist > 0
        # |b| * (the error of u_j / D and of (S / D) / |T|): about (k + 1) p_max / D steps of eps * scale.
        ill = torch.where(has_d, abs(b) * (2 * k + 2) * p_sel / torch.where(has_d, dist, torch.ones_like(dist)),
                          torch.zeros_like(dist))
        well = 1.0 + abs(b) * (1.0 + math.sqrt(k + 1))
        self.grad_tol_unit = SLACK * eps * scale[:, None] * p * (well + selected * ill[:, None]) \
            + SLACK * acc_tiny(self.dtype) * (1.0 + abs(b))
        self.loss_tol = SLACK * eps * (scale + math.log(vocab + 1)) * (1.0 + abs(b) * math.sqrt(k + 1) * p_sel) \
            + SLACK * eps * self.loss_rows.abs()
        self.loss_tol = torch.where(self.counted, self.loss_tol, torch.zeros_like(self.loss_tol))
        entropy = self.row_stats[-1]
        self.entropy_tol = SLACK * eps * (scale * (1.0 + entropy.abs()) + math.log(vocab + 1))
        self.lse_tol = SLACK * eps * (scale + math.log(vocab + 1))

    def stats(self, got):
        """The worst ``(ratio to tolerance, column name)`` of a backend's :class:`RowStats` on the
        counted rows (ignored rows hold fillers: 0 in the kernels). tau / |T| only with a penalty
        (k == 0 or b == 0 skips the selection: tau = +inf there)."""
        from prsl_kernels.spec import ROW_STATS

        rows = self.counted
        exact = math.inf  # any difference in a selection fails
        tolerances = {"lse": self.lse_tol, "entropy": self.entropy_tol, "correct": exact, "tau": exact,
                      "tie_count": exact}
        if not (self.k and self.b):
            del tolerances["tau"], tolerances["tie_count"]
        worst = (0.0, None)
        for name, want in zip(ROW_STATS, self.row_stats):
            if name not in tolerances:
                continue  # dist, spread_sum: through the loss and the gradient
            have = getattr(got, name)
            if tolerances[name] is exact:
                same = (have.double()[rows] == want[rows]) | (have.double()[rows].isnan() & want[rows].isnan())
                ratio = 0.0 if bool(same.all()) else math.inf
            else:
                ratio = worst_ratio(have[rows], want[rows], tolerances[name][rows])[0]
            worst = max(worst, (ratio, name), key=lambda x: x[0])
        return worst

    def loss(self, reduction):
        """(loss, tolerance) for a reduction (float64)."""
        if reduction == "none":
            return self.loss_rows, self.loss_tol
        total, tol = self.loss_rows.sum(), self.loss_tol.sum() + SLACK * acc_eps(self.dtype) * \
            self.loss_rows.abs().sum() * math.log2(len(self.loss_rows) + 1)
        if reduction == "sum":
            return total, tol
        count = self.counted.sum()
        return total / count, tol / count

    def grad(self, grad_rows, rescale=1.0):
        """(gradient, tolerance) of ``sum_r grad_rows[r] * loss_r`` (float64, flat rows), the
        tolerance including the rounding to the logits' dtype; ``rescale``: the largest factor
        (the upstream gradient of a reduced loss) applied after a first rounding."""
        w = grad_rows.reshape(-1, 1).double()
        want = self.grad_unit * w
        # The last few float32 operations round at the result's own magnitude too (what is left
        # for float32 / float64 logits); a 16-bit result is rounded twice when an upstream scale
        # is applied to the forward's gradient, hence 2 of its steps.
        two_roundings = (1 + OUT_EPS[self.dtype]) ** 2 - 1
        tol = self.grad_tol_unit * w.abs() + (two_roundings + SLACK * acc_eps(self.dtype)) * want.abs() \
            + OUT_TINY[self.dtype] * (1.0 + abs(rescale))
        return want, tol


def worst_ratio(got, want, tol):
    """max |got - want| / tol (inf where one side is inf and the other is not, NaN-safe),
    and the flat index where it is reached."""
    got, want = got.double().reshape(-1), want.double().reshape(-1)
    same = (got == want) | (torch.isnan(got) & torch.isnan(want))
    err = torch.where(same, torch.zeros_like(got), (got - want).abs())
    err = torch.where(torch.isnan(err), torch.full_like(err, math.inf), err)
    ratio = err / tol.reshape(-1).double().clamp_min(1e-300)
    if ratio.numel() == 0:
        return 0.0, 0
    i = int(ratio.argmax())
    return float(ratio[i]), i


def run_backend(backend, logits, target, k, b, reduction, upstream, inplace=False, ignore_index=-100,
                with_stats=False):
    """``(loss, grad)`` of ``prsl_loss(...).backward(upstream)`` on a fresh leaf holding ``logits``
    (its memory layout kept: padded row strides stay padded); ``with_stats``: ``(loss, grad, RowStats)``."""
    from prsl_kernels import prsl_loss

    x = torch.empty_strided(logits.shape, logits.stride(), dtype=logits.dtype)
    with torch.no_grad():
        x.copy_(logits)
    x.requires_grad_(True)
    loss, stats = prsl_loss(x, target, k, b, ignore_index=ignore_index, reduction=reduction, backend=backend,
                            inplace_backward=inplace, return_stats=True)
    loss.backward(upstream)
    return (loss.detach(), x.grad, stats) if with_stats else (loss.detach(), x.grad)


def row_weights(reduction, upstream, target, ignore_index=-100):
    """The gradient each row's loss receives from ``upstream`` under a reduction."""
    n = target.numel()
    if reduction == "none":
        return upstream.reshape(-1).double()
    if reduction == "sum":
        return upstream.double().expand(n)
    return upstream.double().expand(n) / (target.reshape(-1) != ignore_index).sum()
