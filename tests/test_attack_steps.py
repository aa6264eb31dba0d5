"""L-inf PGD / APGD (``drivers.attack_steps``) on a small fixed random classifier (float64 MLP
on 3x8x8 "images", 10 classes, CE loss): the eps-ball and [lo, hi] are never left (checked with
plain ``<=``, no tolerance); both attacks raise the loss; APGD returns each sample's best
iterate; APGD's iterates equal a literal single-sample transcription of Algorithm 1 of Croce &
Hein (ICML 2020) as AutoAttack runs it; PGD without random start is BIM. A test compares
APGD with torchattacks' copy of AutoAttack (torchattacks is installed by the set-up with
``--no-deps``, constraints/no-deps.txt; skipped where it is absent). A few seconds on 2 cores."""

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prsl_kernels.drivers import attack_steps
from prsl_kernels.drivers.attack_steps import bim_step
from prsl_kernels.drivers.attack_steps import apgd, linf_ball, pgd

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B = 16


class Sin(nn.Module):
    """A rough activation: steps of size ~eps land on unrelated losses."""

    def forward(self, x):
        return torch.sin(40 * x)


def make_problem(seed=0, dtype=torch.float64, batch=B, rough=False):
    """(net, x0, y): a 2-layer tanh MLP with frozen weights, images in [0, 1] with some pixels
    exactly on the bounds, random labels. ``rough``: a sin(40 .) hidden layer, so that steps of
    size ~eps often lower the loss and step sizes get halved."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(192, 32), Sin() if rough else nn.Tanh(), nn.Linear(32, 10)).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
            p.requires_grad_(False)
    x0 = torch.rand(batch, 3, 8, 8, generator=g, dtype=dtype)
    x0[:, 0, 0] = 0.0
    x0[:, 1, 0] = 1.0
    y = torch.randint(0, 10, (batch,), generator=g)
    return net, x0, y


def ce_loss(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


def capped_negative_ce(logits, y):
    """Negative everywhere (like a targeted attack's negated CE) and flat above a cap: equal
    losses at different points, and a first step compared with 0 would never count as an
    increase (AutoAttack's quirk, which we do not follow)."""
    return ce_loss(logits, y).clamp(max=6.0) - 10.0


class RecordingCE:
    """Per-sample loss closure (CE by default) that records every point it is evaluated at, and
    the losses. ``one_by_one``: run the network on each sample alone, so each sample's loss and
    gradient are bitwise those of a single-sample evaluation (a batched matmul can differ in the
    last bit)."""

    def __init__(self, net, y, one_by_one=False, criterion=ce_loss):
        self.net, self.y, self.one_by_one, self.criterion = net, y, one_by_one, criterion
        self.xs, self.losses = [], []

    def __call__(self, x):
        if self.one_by_one:
            loss = torch.cat([self.criterion(self.net(x[i:i + 1]), self.y[i:i + 1]) for i in range(x.shape[0])])
        else:
            loss = self.criterion(self.net(x), self.y)
        self.xs.append(x.detach().clone())
        self.losses.append(loss.detach().clone())
        return loss


def ce(net, x, y):
    with torch.no_grad():
        return F.cross_entropy(net(x), y, reduction="none")


def assert_inside(x, x0, eps, lo=0.0, hi=1.0):
    # In float64 against eps as given: the ball holds in exact arithmetic, not only in x's dtype.
    assert bool(((x.double() - x0.double()).abs() <= eps).all()), float((x.double() - x0.double()).abs().max() - eps)
    assert bool((x >= lo).all()) and bool((x <= hi).all())


# --------------------------------------------------------------------------- eps-ball and bounds


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linf_ball_is_exact_and_maximal(dtype):
    x0 = torch.rand(100_000, generator=torch.Generator().manual_seed(0), dtype=dtype)
    for eps in (4 / 255, 8 / 255, 0.3):
        lo, hi = linf_ball(x0, eps)
        exact = x0.double()
        assert bool(((hi.double() - exact).abs() <= eps).all()) and bool(((lo.double() - exact).abs() <= eps).all())
        # The next float outwards is outside: no float of the ball is cut off (float32: everywhere,
        # its differences are exact in float64; float64: where the subtraction is exact, x0 >= 2 eps).
        far = x0 >= 2 * eps if dtype == torch.float64 else torch.ones_like(x0, dtype=torch.bool)
        assert bool(((torch.nextafter(hi, hi + 1).double() - exact).abs() > eps)[far].all())
        assert bool(((torch.nextafter(lo, lo - 1).double() - exact).abs() > eps)[far].all())
        # Plain x0 + eps would not do: it rounds outside the ball for a good share of pixels.
        assert bool(((x0 + eps - x0).abs() > eps).any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [4 / 255, 8 / 255])
def test_iterates_stay_in_ball_and_bounds(dtype, eps):
    net, x0, y = make_problem(1, dtype)
    for attack in (lambda f: pgd(f, x0, eps, eps / 3, 12, generator=torch.Generator().manual_seed(2)),
                   lambda f: apgd(f, x0, eps, 12, generator=torch.Generator().manual_seed(2))):
        f = RecordingCE(net, y)
        x = attack(f)
        assert x.dtype == dtype and x.shape == x0.shape and not x.requires_grad
        for xi in f.xs + [x]:
            assert_inside(xi, x0, eps)


def test_per_channel_bounds_broadcast():
    """Normalised space: bounds are per-channel tensors, e.g. (0 - mean) / std."""
    net, x01, y = make_problem(2)
    mean = torch.tensor([0.48, 0.46, 0.41], dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor([0.27, 0.26, 0.28], dtype=torch.float64).view(3, 1, 1)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    x0 = (x01 - mean) / std
    eps = 0.5
    for attack in (lambda f: pgd(f, x0, eps, 0.2, 6, bounds=(lo, hi)),
                   lambda f: apgd(f, x0, eps, 6, bounds=(lo, hi))):
        f = RecordingCE(net, y)
        x = attack(f)
        for xi in f.xs + [x]:
            assert_inside(xi, x0, eps, lo, hi)
        assert bool((x == lo).any()) and bool((x == hi).any())  # the bounds were reached


# --------------------------------------------------------------------------- the loss goes up


def test_both_raise_the_loss_and_apgd_keeps_its_best_point():
    net, x0, y = make_problem(3)
    eps, steps = 8 / 255, 20
    clean = ce(net, x0, y)
    x_pgd = pgd(lambda x: F.cross_entropy(net(x), y, reduction="none"), x0, eps, 2.5 * eps / steps, steps,
                generator=torch.Generator().manual_seed(4))
    f = RecordingCE(net, y)
    x_apgd = apgd(f, x0, eps, steps, generator=torch.Generator().manual_seed(4))
    loss_pgd, loss_apgd = ce(net, x_pgd, y), ce(net, x_apgd, y)
    assert loss_pgd.mean() > clean.mean() and loss_apgd.mean() > clean.mean()

    # The returned point is, per sample, the first evaluated point of highest loss.
    losses = torch.stack(f.losses)                            # (steps + 1, B): start, then iterates
    assert losses.shape == (steps + 1, B)
    best = losses.argmax(0)
    for b in range(B):
        assert torch.equal(x_apgd[b], f.xs[best[b]][b])
    assert bool((loss_apgd >= losses.max(0).values - 1e-12).all())

    # APGD's best point beats PGD's last iterate on average and for most samples (here: all).
    assert loss_apgd.mean() > loss_pgd.mean()
    assert (loss_apgd >= loss_pgd).float().mean() >= 0.75


# --------------------------------------------------------------------------- APGD vs Algorithm 1


def paper_checkpoints(n):
    """w_j = ceil(p_j n) for p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    p = [Fraction(0), Fraction(22, 100)]
    while p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)))
    return [math.ceil(q * n) for q in p[1:]]


def autoattack_checkpoints(n):
    """AutoAttack's ``counter3 == k`` bookkeeping (autopgd_base.py), as iteration counts."""
    k, k_min, k_decr = max(int(0.22 * n), 1), max(int(0.06 * n), 1), max(int(0.03 * n), 1)
    out, counter = [], 0
    for i in range(n):
        counter += 1
        if counter == k:
            out.append(i + 1)
            counter, k = 0, max(k - k_decr, k_min)
    return out


def test_checkpoints_are_autoattacks_and_the_papers_at_100_steps():
    for n in range(1, 301):
        assert list(attack_steps._apgd_checkpoints(n)) == autoattack_checkpoints(n), n
    assert autoattack_checkpoints(100) == paper_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert paper_checkpoints(10) == [3, 5, 6, 7, 8, 9, 10, 10]    # AutoAttack: 2, 3, ..., 10


def reference_apgd(f, x0, x_start, eps, n_iter, W, lo=0.0, hi=1.0, rho=0.75, alpha=0.75):
    """Algorithm 1 of Croce & Hein (2020) for ONE sample, as AutoAttack runs it.

    ``f(x) -> (loss: float, grad)``. ``W``: checkpoints (iteration counts). Returns the
    evaluated points x^(0..n_iter) and x_max. AutoAttack's reading: the step-size check runs
    right after x^(w_j) is computed; condition 1 counts f(x^(i+1)) > f(x^(i)) over the last
    interval with f of each point as evaluated (before a restart replaces it), and triggers at
    <= rho * interval; condition 2 never triggers at the first checkpoint."""
    def P(x):
        return torch.clamp(torch.min(torch.max(x, x0 - eps), x0 + eps), lo, hi)

    eta = 2 * eps
    x = [P(x_start)]                                          # x[k] = x^(k)
    fx, g = f(x[0])
    evaluated, fs = [x[0]], [fx]
    x_max, f_max, g_max = x[0], fx, g
    w_last, reduced_last, f_max_last = 0, True, f_max
    for k in range(n_iter):
        a = alpha if k > 0 else 1.0                           # k = 0: x^(1) = P(x^(0) + eta sign grad)
        x_km1 = x[k - 1] if k > 0 else x[0]
        z = P(x[k] + eta * torch.sign(g))
        x.append(P(x[k] + a * (z - x[k]) + (1 - a) * (x[k] - x_km1)))
        fx, g = f(x[k + 1])
        evaluated.append(x[k + 1])
        fs.append(fx)
        if fx > f_max:
            x_max, f_max, g_max = x[k + 1], fx, g
        if k + 1 in W:
            w = k + 1
            increases = sum(fs[i + 1] > fs[i] for i in range(w_last, w))
            condition1 = increases <= rho * (w - w_last)
            condition2 = not reduced_last and f_max == f_max_last
            reduced_last, f_max_last, w_last = condition1 or condition2, f_max, w
            if condition1 or condition2:
                eta = eta / 2
                x[k + 1], g = x_max, g_max
    return evaluated, x_max


def single_sample_loss(net, y, criterion):
    def f(x):
        x = x.detach().requires_grad_(True)
        loss = criterion(net(x[None]), y[None])[0]
        (grad,) = torch.autograd.grad(loss, x)
        return loss.item(), grad
    return f


def plain_ball(x0, eps):
    """The ball's bounds as AutoAttack (and the transcription) compute them, without the one-ulp
    tightening of ``linf_ball``."""
    return x0 - eps, x0 + eps


@pytest.mark.parametrize("steps,eps,random_start,rough", [(10, 8 / 255, True, False), (30, 4 / 255, False, False),
                                                          (100, 8 / 255, True, False), (10, 8 / 255, True, True),
                                                          (40, 16 / 255, False, True)])
def test_apgd_matches_single_sample_transcription(steps, eps, random_start, rough, monkeypatch):
    net, x0, y = make_problem(5, rough=rough)
    criterion = capped_negative_ce if rough else ce_loss
    seed = 6
    if random_start:   # AutoAttack's start, x0 + eps * t / max|t| per sample, t uniform in [-1, 1]
        t = 2 * torch.rand(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=x0.dtype) - 1
        starts = x0 + eps * t / t.abs().flatten(1).max(1).values.view(-1, 1, 1, 1)
    else:
        starts = x0
    W = autoattack_checkpoints(steps)
    reference = [reference_apgd(single_sample_loss(net, y[b], criterion), x0[b], starts[b], eps, steps, W)
                 for b in range(B)]

    def run():
        f = RecordingCE(net, y, one_by_one=True, criterion=criterion)
        x_best = apgd(f, x0, eps, steps, random_start=random_start, generator=torch.Generator().manual_seed(seed))
        assert len(f.xs) == steps + 1
        return torch.stack(f.xs, 1), x_best                  # (B, steps + 1, ...), (B, ...)

    # As implemented, the ball's bounds are one ulp tighter where x0 +- eps rounds outwards.
    # A one-ulp change can flip a strict comparison of two losses that tie to the last bit (in
    # scratch runs: 1 sample in 2560), and where such ties fall depends on the CPU's tanh / exp
    # (AVX2 or AVX-512): at most one of the 16 samples may take another path.
    iterates, x_best = run()
    apart = [b for b, (evaluated, x_max) in enumerate(reference)
             if (iterates[b] - torch.stack(evaluated)).abs().max() > 1e-12 or (x_best[b] - x_max).abs().max() > 1e-12]
    assert len(apart) <= 1, apart
    # With the transcription's plain clip to [x0 - eps, x0 + eps], bit for bit.
    monkeypatch.setattr(attack_steps, "linf_ball", plain_ball)
    iterates, x_best = run()
    for b, (evaluated, x_max) in enumerate(reference):
        assert torch.equal(iterates[b], torch.stack(evaluated)), b
        assert torch.equal(x_best[b], x_max), b


def test_apgd_start_is_reproducible_and_on_the_sphere():
    net, x0, y = make_problem(7)
    x0 = 0.25 + 0.5 * x0                                      # away from the bounds

    def loss(x):
        return F.cross_entropy(net(x), y, reduction="none")

    eps = 8 / 255
    a = apgd(loss, x0, eps, 0, generator=torch.Generator().manual_seed(1))
    b = apgd(loss, x0, eps, 0, generator=torch.Generator().manual_seed(1))
    c = apgd(loss, x0, eps, 0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # One coordinate per sample at +-eps (up to the ball's one-ulp tightening).
    assert torch.allclose((a - x0).flatten(1).abs().amax(1), torch.full((B,), eps, dtype=x0.dtype), rtol=0, atol=1e-15)
    assert torch.equal(apgd(loss, x0, eps, 0, random_start=False), x0)


# --------------------------------------------------------------------------- PGD is BIM


def bim_reference(net, y, x0, eps, alpha, steps):
    x = x0
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(net(x), y, reduction="none").sum(), x)
        x = bim_step(x.detach(), x0, grad, eps, alpha, bounds=(0.0, 1.0))
    return x


def test_pgd_without_random_start_is_bim(monkeypatch):
    net, x0, y = make_problem(8)
    eps, alpha, steps = 8 / 255, 1 / 255, 15

    def loss(x):
        return F.cross_entropy(net(x), y, reduction="none")

    theirs = bim_reference(net, y, x0, eps, alpha, steps)
    ours = pgd(loss, x0, eps, alpha, steps, random_start=False)
    # Differences come only from the ball's bounds, one ulp tighter where x0 + eps rounds outwards.
    assert (ours - theirs).abs().max() <= 4 * torch.finfo(x0.dtype).eps
    # With BIM's own (rounded) bounds it is BIM exactly.
    monkeypatch.setattr(attack_steps, "linf_ball", plain_ball)
    assert torch.equal(pgd(loss, x0, eps, alpha, steps, random_start=False), theirs)


def test_pgd_random_start_is_reproducible():
    net, x0, y = make_problem(9)

    def loss(x):
        return F.cross_entropy(net(x), y, reduction="none")

    a = pgd(loss, x0, 8 / 255, 2 / 255, 3, generator=torch.Generator().manual_seed(0))
    b = pgd(loss, x0, 8 / 255, 2 / 255, 3, generator=torch.Generator().manual_seed(0))
    c = pgd(loss, x0, 8 / 255, 2 / 255, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_loss_shape_is_checked():
    net, x0, y = make_problem(0)
    with pytest.raises(ValueError, match="per-sample"):
        pgd(lambda x: F.cross_entropy(net(x), y), x0, 8 / 255, 2 / 255, 1)


# --------------------------------------------------------------------------- torchattacks (set-up, --no-deps)


@pytest.mark.parametrize("rough,steps", [(False, 20), (True, 10)])
def test_apgd_equals_torchattacks_bit_for_bit(rough, steps, monkeypatch):
    """torchattacks.APGD (a copy of AutoAttack's APGDAttack) from the same seeded start. Two
    documented departures are switched off to compare exactly: our ball's one-ulp tightening,
    and AutoAttack comparing the first step's loss with 0 rather than with the start's loss
    (which changes the rough problem's trajectories)."""
    torchattacks = pytest.importorskip("torchattacks")
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)   # torchattacks draws its start and keeps losses in it
    try:
        net, x0, y = make_problem(10, rough=rough)
        eps, seed = 8 / 255, 11
        monkeypatch.setattr(attack_steps, "linf_ball", plain_ball)
        f = RecordingCE(net, y)
        ours = apgd(f, x0, eps, steps, generator=torch.Generator().manual_seed(seed))

        g = RecordingCE(net, y)
        atk = torchattacks.APGD(LoggingNet(net, g), norm="Linf", eps=eps, steps=steps, n_restarts=1, loss="ce")
        first_window = atk.check_oscillation

        def check_oscillation(losses, j, k, y5, k3=0.75):
            if j - k + 1 == 0:                       # first window: compare with the start's loss
                losses = losses.copy()
                losses[-1] = g.losses[0].numpy()
            return first_window(losses, j, k, y5, k3)

        atk.check_oscillation = check_oscillation
        torch.manual_seed(seed)
        theirs, _, _, _ = atk.attack_single_run(x0, y)
    finally:
        torch.set_default_dtype(old_dtype)
    assert len(g.xs) == len(f.xs) == steps + 1
    for k in range(steps + 1):
        assert torch.equal(f.xs[k], g.xs[k]), k
    assert torch.equal(ours, theirs)


class LoggingNet(nn.Module):
    """The classifier, recording (through a RecordingCE) every input torchattacks evaluates."""

    def __init__(self, net, recorder):
        super().__init__()
        self.net, self.recorder = net, recorder

    def forward(self, x):
        self.recorder(x)
        return self.net(x)
