"""The reference is the executable spec: hold it to the spec's closed form and to hand maths."""

import math

import pytest
import torch
import torch.nn.functional as F

from reference import (grad_closed_form, prsl_loss_reference, prsl_released_loss_reference,
                            row_stats_reference)


def _logits(n, v, seed, dtype=torch.float64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)


def _targets(n, v, seed):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, v, (n,), generator=g)


@pytest.mark.parametrize("k", [1, 3, 8, 16])
@pytest.mark.parametrize("b", [0.5, -0.3, 2.0])
def test_autograd_matches_closed_form(k, b):
    n, v = 9, 17
    z = _logits(n, v, seed=k).requires_grad_()
    t = _targets(n, v, seed=k)
    t[2] = -100
    w = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.5
    (prsl_loss_reference(z, t, k, b, reduction="none") * w).sum().backward()
    torch.testing.assert_close(z.grad, grad_closed_form(z, t, k, b, grad_rows=w), rtol=1e-10, atol=1e-12)
    assert z.grad[2].abs().max() == 0  # ignored row


def test_closed_form_with_ties_and_neg_inf():
    # Integer logits give many ties at tau; -inf entries are a masked vocabulary.
    g = torch.Generator().manual_seed(0)
    z = torch.randint(-3, 4, (12, 15), generator=g).double()
    z[3, :10] = float("-inf")          # only 4 finite non-targets left in row 3 (fewer than k)
    t = _targets(12, 15, seed=0)
    t[3] = 12
    for k in (1, 4, 7, 14):
        zz = z.clone().requires_grad_()
        prsl_loss_reference(zz, t, k, 0.7, reduction="sum").backward()
        torch.testing.assert_close(zz.grad, grad_closed_form(z, t, k, 0.7), rtol=1e-10, atol=1e-12)
        assert torch.isfinite(zz.grad).all()


def test_hand_computed_row():
    # V = 5, target 0; non-target probabilities sorted: p1 > p2 > p3 > p4.
    z = torch.tensor([[0.0, 2.0, 1.0, 0.5, -1.0]], dtype=torch.float64)
    t = torch.tensor([0])
    p = torch.softmax(z[0], 0)
    k = 3  # K = {1, 2, 3}, p_min = p3
    d = math.sqrt((p[1] - p[3]) ** 2 + (p[2] - p[3]) ** 2)
    expected = -math.log(p[0]) + 0.25 * d
    assert prsl_loss_reference(z, t, k, 0.25).item() == pytest.approx(expected, rel=1e-12)
    lse, tau, dist, spread, ties, *_ = row_stats_reference(z, t, k)
    assert tau.item() == 0.5 and ties.item() == 1
    assert spread.item() == pytest.approx(float(p[1] + p[2] - 2 * p[3]), rel=1e-12)
    assert dist.item() == pytest.approx(d, rel=1e-12)


def test_target_is_never_in_topk():
    # The target is the largest logit: K must be taken from the others.
    z = torch.tensor([[5.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    t = torch.tensor([0])
    p = torch.softmax(z[0], 0)
    expected = -math.log(p[0]) + 1.0 * float(p[1] - p[2])
    assert prsl_loss_reference(z, t, 2, 1.0).item() == pytest.approx(expected, rel=1e-12)


def test_ties_do_not_change_d():
    # D is the same whichever tied element is "picked" as the k-th.
    z = torch.tensor([[0.3, 2.0, 1.0, 1.0, 1.0, -2.0]], dtype=torch.float64)
    t = torch.tensor([0])
    p = torch.softmax(z[0], 0)
    for k in (2, 3, 4):
        assert prsl_loss_reference(z, t, k, 1.0).item() == pytest.approx(
            -math.log(p[0]) + float(p[1] - p[2]), rel=1e-12)
        assert row_stats_reference(z, t, k)[4].item() == 3


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_k0_or_b0_is_cross_entropy(reduction):
    z = _logits(10, 23, seed=3)
    t = _targets(10, 23, seed=3)
    t[::3] = -7
    want = F.cross_entropy(z, t, ignore_index=-7, reduction=reduction)
    for k, b in ((0, 1.0), (5, 0.0)):
        got = prsl_loss_reference(z, t, k, b, ignore_index=-7, reduction=reduction)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_all_ignored_mean_is_nan_like_torch():
    z = _logits(4, 6, seed=1)
    t = torch.full((4,), -100)
    assert torch.isnan(prsl_loss_reference(z, t, 2, 0.5))
    assert torch.isnan(F.cross_entropy(z, t))


def test_gradcheck_reference():
    z = _logits(5, 11, seed=7).requires_grad_()
    t = _targets(5, 11, seed=7)
    assert torch.autograd.gradcheck(lambda x: prsl_loss_reference(x, t, 4, 0.8, reduction="sum"), (z,))


def test_low_precision_inputs_accumulate_in_float32():
    z = _logits(6, 40, seed=2, dtype=torch.bfloat16)
    t = _targets(6, 40, seed=2)
    got = prsl_loss_reference(z, t, 5, 0.5)
    assert got.dtype == torch.float32
    want = prsl_loss_reference(z.double(), t, 5, 0.5)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_released_variant_by_hand():
    z = _logits(3, 8, seed=4)
    t = _targets(3, 8, seed=4)
    start, end, b = 0, 3, 1e-2
    means = []
    for i in range(3):
        others = torch.cat([z[i, :t[i]], z[i, t[i] + 1:]])
        means.append(others.sort(descending=True).values[start:end].mean())
    means = torch.stack(means)
    expected = F.cross_entropy(z, t) - b * torch.log_softmax(means, 0).sum()
    got = prsl_released_loss_reference(z, t, start, end, b)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="start"):
        prsl_released_loss_reference(z, t, 3, 3, b)


def test_nan_and_pos_inf_rows_are_nan_like_torch():
    z = _logits(3, 9, seed=8)
    t = torch.tensor([1, 2, 3])
    z[0, 4] = float("inf")
    z[1, 5] = float("nan")
    got = prsl_loss_reference(z, t, 3, 0.5, reduction="none")
    want = F.cross_entropy(z, t, reduction="none")
    assert torch.isnan(got[:2]).all() and torch.isnan(want[:2]).all()
    assert torch.isfinite(got[2])
