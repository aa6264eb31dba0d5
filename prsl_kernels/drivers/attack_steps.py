"""L-inf BIM, PGD and APGD as pure functions of a loss closure.

* BIM: Kurakin et al., "Adversarial examples in the physical world", ICLR 2017 workshop, as the
  paper attacks (torchattacks' update): signed-gradient steps from the clean image, each projected
  onto the eps-ball and the valid range (:func:`bim_step`).
* PGD: Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018:
  a uniform random start in the eps-ball, then signed-gradient steps with projection.
* APGD: Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
  parameter-free attacks", ICML 2020, Algorithm 1, with the details of the authors' reference
  implementation (fra31/auto-attack, ``autoattack/autopgd_base.py``,
  ``APGDAttack.attack_single_run``, ``norm='Linf'``; torchattacks' ``APGD`` is a copy of it):
  step size ``eta = 2 eps`` per sample; first step ``x1 = P(x0 + eta sign(g))``, then
  ``z = P(x_k + eta sign(g))``, ``x_{k+1} = P(x_k + m (z - x_k) + (1 - m)(x_k - x_{k-1}))``;
  the highest-loss point of each sample is kept (strictly higher replaces it) and returned. At
  each checkpoint, per sample, ``eta`` is halved and the iterate (and its gradient) restarts
  from the best point if

  1. at most ``rho * k`` of the ``k`` steps since the last checkpoint increased the loss
     (AutoAttack's ``<=``; the paper writes ``<``; each step's loss is compared with the loss
     evaluated one step before, which after a restart is the loss of the replaced iterate), or
  2. the step size was not halved at the last checkpoint and the best loss did not increase
     since it (never at the first checkpoint, as in AutoAttack).

  Checkpoints are AutoAttack's: the first after ``max(int(0.22 N), 1)`` steps, each next
  interval ``max(int(0.03 N), 1)`` shorter, down to ``max(int(0.06 N), 1)``. This is the paper's
  ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` schedule rounded per interval; it equals the
  paper's ``w_j = ceil(p_j N)`` at AutoAttack's N = 100 (22, 41, 57, 70, 80, 87, 93, 99) and can
  differ by a step or so at other N (N = 10: every step from 2 on, rather than 3, 5, 6, ...).

What is exact:

* every iterate and every returned point satisfies ``(x - x0).abs() <= eps`` and
  ``lo <= x <= hi`` in floating point, with no tolerance. ``x0 + eps`` can round to a float
  further than ``eps`` from ``x0``; the ball's bounds are then moved one ulp towards ``x0``,
  inside (and, away from 0, the farthest float inside; see :func:`linf_ball`). Otherwise the
  projection is BIM's (:func:`bim_step`): clip to the ball, then to ``bounds``.
* APGD's iterates are AutoAttack's, with the same floating-point expressions, except:

  - the first step's loss is compared with the start's loss (the paper's
    ``f(x^(1)) > f(x^(0))``). AutoAttack compares it with 0 (it reads ``loss_steps[-1]`` before
    that slot is written): for CE the first step then always counts as an increase, for a
    negated (targeted) loss never;
  - losses are compared in their own dtype (AutoAttack stores the history in float32);
  - the ball's bounds are moved by one ulp where ``x0 +- eps`` rounds outwards (above), and the
    random start is projected onto the ball as well as ``bounds`` (AutoAttack only clamps it
    to [0, 1]); this changes coordinates on the ball's boundary by one ulp. Rarely, where two
    losses tie to the last bit, such an ulp flips a strict comparison and so the trajectory;
  - the last iterate's loss is evaluated without a gradient (AutoAttack computes one and never
    uses it): ``steps + 1`` loss evaluations, ``steps`` gradients.

  The random start is AutoAttack's L-inf one, ``x0 + eps * t / max|t|`` per sample with ``t``
  uniform in [-1, 1] (every sample starts with one coordinate on the ball's surface), without
  AutoAttack's ``+ 1e-12`` in the denominator (torchattacks omits it too). It is used because
  it is what AutoAttack's results were obtained with; drawn in ``x0``'s dtype, it reproduces
  torchattacks' start bit for bit from the same seed when that is torch's default dtype.
* The returned point is the best-loss point (AutoAttack's ``x_best``), not the first
  misclassified one: the closure knows nothing of classification.

PGD's and APGD's ``loss_fn(x)`` must return per-sample losses of shape ``(B,)`` to be ascended (a
targeted attack passes a negated loss; BIM's returns a scalar, such as their sum), each depending on
its own sample only: one backward of their sum gives every sample's gradient. Gradients are taken
with respect to ``x`` only.
"""

from __future__ import annotations

import torch

__all__ = ["apgd", "bim", "bim_step", "linf_ball", "pgd", "random_start"]


def bim_step(x, x0, grad, eps, alpha, bounds=None):
    """One BIM step: ascend along ``sign(grad)``, project onto the L-inf ``eps``-ball around ``x0``,
    then onto the valid range ``bounds = (lo, hi)`` (tensors or floats; per channel in normalised
    space). With ``x0`` inside the range this is torchattacks' BIM update:
    ``clamp(min(max(x', max(x0 - eps, lo)), x0 + eps), max=hi)``."""
    x = x + alpha * grad.sign()
    # min/max rather than clamp(min=tensor) keeps broadcasting of per-channel bounds simple.
    x = torch.maximum(torch.minimum(x, x0 + eps), x0 - eps)
    if bounds is not None:
        lo, hi = bounds
        x = torch.maximum(torch.minimum(x, torch.as_tensor(hi, dtype=x.dtype, device=x.device)),
                          torch.as_tensor(lo, dtype=x.dtype, device=x.device))
    return x


def bim(loss_fn, x, x0, eps, alpha, steps, bounds=None):
    """``steps`` BIM steps from ``x`` (ascending ``loss_fn(x)``, a scalar whose gradient for each
    sample depends on that sample only, e.g. a sum over the batch)."""
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(x), x)
        x = bim_step(x.detach(), x0, grad, eps, alpha, bounds)
    return x.detach()


def linf_ball(x0, eps):
    """Elementwise ``(lo, hi)`` of the L-inf ``eps``-ball around ``x0``, exact in floating point:
    every float ``x`` with ``lo <= x <= hi`` satisfies ``(x - x0).abs() <= eps``.

    ``x0 + eps`` rounds to the float nearest the true sum. When that lies above the sum, its
    difference with ``x0`` can exceed ``eps``; the next float towards ``x0`` then lies below the
    true sum, so its difference rounds (monotonically) to at most ``eps``. Where ``x0 +- eps`` and
    ``x0`` are within a factor 2 of each other (the subtraction is then exact), these are the
    farthest floats inside the ball; elsewhere they may be a few ulps short of it.

    The test is made in float64 against ``eps`` as given (a Python float), so that it also
    holds in exact arithmetic for 16- and 32-bit images, whose own dtype would round ``eps``
    (4/255 in float32 is slightly larger than 4/255): a user checking saved float32 images in
    float64 finds them inside too."""
    exact = x0.double()
    # x0 +- eps in float64, rounded once to x0's dtype (to nearest: at most half an ulp of the
    # bound itself outside, so one ulp towards x0 brings it inside).
    lo, hi = (exact - eps).to(x0.dtype), (exact + eps).to(x0.dtype)
    hi = torch.where((hi.double() - exact).abs() > eps, torch.nextafter(hi, x0), hi)
    lo = torch.where((lo.double() - exact).abs() > eps, torch.nextafter(lo, x0), lo)
    return lo, hi


def _projector(x0, eps, bounds):
    """``P``: clip to the ``eps``-ball around ``x0``, then to ``bounds`` (as :func:`bim_step`)."""
    ball_lo, ball_hi = linf_ball(x0, eps)
    if bounds is None:
        return lambda x: torch.maximum(torch.minimum(x, ball_hi), ball_lo)
    lo, hi = (torch.as_tensor(b, dtype=x0.dtype, device=x0.device) for b in bounds)

    def project(x):
        x = torch.maximum(torch.minimum(x, ball_hi), ball_lo)
        # min/max rather than clamp(min=tensor) keeps broadcasting of per-channel bounds simple.
        return torch.maximum(torch.minimum(x, hi), lo)

    return project


def _uniform_pm1(x0, generator):
    """Uniform noise in [-1, 1] shaped like ``x0``, drawn on the generator's device (a CPU
    generator can then seed an attack on any device)."""
    device = generator.device if generator is not None else x0.device
    u = torch.rand(x0.shape, generator=generator, dtype=x0.dtype, device=device)
    return (2 * u - 1).to(x0.device)


def _per_sample(t, x0):
    """``t`` of shape (B,) viewed to broadcast against ``x0`` (B, ...)."""
    return t.view(t.shape[0], *([1] * (x0.dim() - 1)))


def _loss_and_grad(loss_fn, x, need_grad=True):
    """Per-sample losses at ``x`` and (optionally) their gradient with respect to ``x`` only."""
    x = x.detach().requires_grad_(need_grad)
    with torch.set_grad_enabled(need_grad):
        loss = loss_fn(x)
        if loss.shape != x.shape[:1]:
            raise ValueError(f"loss_fn must return per-sample losses of shape {tuple(x.shape[:1])}, "
                             f"got {tuple(loss.shape)}")
        grad = torch.autograd.grad(loss.sum(), x)[0] if need_grad else None
    return loss.detach(), grad


def _check(eps, steps):
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")


def random_start(x0, eps, attack, *, bounds=(0.0, 1.0), generator=None) -> torch.Tensor:
    """The random start of ``attack`` ("pgd": uniform in the ``eps``-ball; "apgd": AutoAttack's),
    projected onto the ball and ``bounds``: what ``random_start=True`` draws, for callers that
    draw it themselves (per image, say) and pass it as ``start``."""
    x0 = x0.detach()
    noise = x0 + eps * _uniform_pm1(x0, generator) if attack == "pgd" else _apgd_start(x0, eps, generator)
    return _projector(x0, eps, bounds)(noise)


def _first_point(x0, eps, project, start, random, draw):
    """Where an attack starts: ``start`` (projected), else a random start, else ``x0``."""
    if start is not None:
        return project(start.detach())
    return project(draw() if random else x0)


def pgd(loss_fn, x0, eps, alpha, steps, *, bounds=(0.0, 1.0), random_start=True, generator=None,
        start=None) -> torch.Tensor:
    """L-inf PGD (Madry et al., 2018) ascending ``loss_fn``: a uniform random start in the
    ``eps``-ball (if ``random_start``; ``start``, when given, replaces it, e.g. to continue from an
    earlier round), then ``steps`` steps ``x <- P(x + alpha * sign(grad))``.
    Returns the last iterate. With ``random_start=False`` this is :func:`bim` from ``x0``, up to
    the one-ulp tightening of the ball's bounds (see :func:`linf_ball`)."""
    _check(eps, steps)
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    x0 = x0.detach()
    project = _projector(x0, eps, bounds)
    x = _first_point(x0, eps, project, start, random_start, lambda: x0 + eps * _uniform_pm1(x0, generator))
    with torch.no_grad():
        for _ in range(steps):
            _, grad = _loss_and_grad(loss_fn, x)
            x = project(x + alpha * grad.sign())
    return x


def _apgd_checkpoints(steps):
    """AutoAttack's checkpoints ``{w_j: w_j - w_{j-1}}`` (iterations after which the step size is
    checked, and the length of the interval they close)."""
    k = max(int(0.22 * steps), 1)
    k_min, k_decr = max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    checkpoints, w = {}, k
    while w <= steps:
        checkpoints[w] = k
        k = max(k - k_decr, k_min)
        w += k
    return checkpoints


def _apgd_start(x0, eps, generator):
    """AutoAttack's L-inf start ``x0 + eps * t / max|t|`` (per sample, ``t`` uniform in [-1, 1])."""
    t = _uniform_pm1(x0, generator)
    # clamp_min only guards the (probability-zero) all-zero draw.
    t_max = t.abs().flatten(1).amax(1).clamp_min(torch.finfo(t.dtype).tiny)
    return x0 + eps * t / _per_sample(t_max, x0)


def apgd(loss_fn, x0, eps, steps, *, bounds=(0.0, 1.0), random_start=True, generator=None, rho=0.75,
         momentum=0.75, start=None) -> torch.Tensor:
    """L-inf APGD (Croce & Hein, 2020; AutoAttack's APGD-CE schedule) ascending ``loss_fn`` for
    ``steps`` iterations from AutoAttack's random start (or ``x0``; or ``start`` when given, e.g.
    an earlier round's point: the schedule restarts there). Returns each sample's
    highest-loss point among the start and all iterates. See the module docstring for the exact
    algorithm and where it departs from AutoAttack."""
    _check(eps, steps)
    x0 = x0.detach()
    project = _projector(x0, eps, bounds)
    x = _first_point(x0, eps, project, start, random_start, lambda: _apgd_start(x0, eps, generator))
    loss, grad = _loss_and_grad(loss_fn, x, need_grad=steps > 0)
    x_best, grad_best, loss_best = x, grad, loss
    eta = torch.full(_per_sample(loss, x0).shape, 2 * eps, dtype=x0.dtype, device=x0.device)
    x_prev, loss_prev = x, loss
    n_increased = torch.zeros(loss.shape, dtype=torch.long, device=loss.device)
    best_at_check = loss_best
    # AutoAttack starts with "reduced at the last checkpoint", so condition 2 cannot fire at the first.
    reduced_at_check = torch.ones(loss.shape, dtype=torch.bool, device=loss.device)
    checkpoints = _apgd_checkpoints(steps)

    with torch.no_grad():
        for i in range(steps):
            # The first step uses the same expression with momentum 1 (x_prev = x), as AutoAttack,
            # so its rounding matches too.
            m = momentum if i > 0 else 1.0
            z = project(x + eta * grad.sign())
            x, x_prev = project(x + (z - x) * m + (x - x_prev) * (1 - m)), x
            last = i == steps - 1
            loss, grad = _loss_and_grad(loss_fn, x, need_grad=not last)

            n_increased += loss > loss_prev
            loss_prev = loss
            better = loss > loss_best
            loss_best = torch.where(better, loss, loss_best)
            x_best = torch.where(_per_sample(better, x0), x, x_best)
            grad_best = torch.where(_per_sample(better, x0), grad, grad_best) if not last else None
            if last or i + 1 not in checkpoints:
                continue

            k = checkpoints[i + 1]
            oscillating = n_increased <= rho * k
            stalled = ~reduced_at_check & (loss_best <= best_at_check)
            reduce = oscillating | stalled
            reduced_at_check, best_at_check = reduce, loss_best
            n_increased = torch.zeros_like(n_increased)

            r = _per_sample(reduce, x0)
            eta = torch.where(r, eta / 2, eta)
            x = torch.where(r, x_best, x)
            grad = torch.where(r, grad_best, grad)
    return x_best
