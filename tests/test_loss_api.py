"""The public API: functional and module forms, reductions, stats, dtypes, and backends agreeing."""

import pytest
import torch

import prsl_kernels
from prsl_kernels import PRSLLoss, prsl_loss
from prsl_kernels.backends import cpp_available, triton_interpreter_on
from reference import prsl_loss_reference, row_stats_reference


def _data(shape, v, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(*shape, v, generator=g, dtype=torch.float64) * 2).to(dtype)
    t = torch.randint(0, v, shape, generator=g)
    return z, t


def _backends():
    found = ["reference"]
    if cpp_available():
        found.append("cpp")
    if triton_interpreter_on():
        found.append("triton")
    return found


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_module_equals_functional(reduction):
    z, t = _data((3, 5), 29, seed=1)
    t[0, 1] = -100
    fn = PRSLLoss(k=4, b=0.3, reduction=reduction, backend="reference")
    torch.testing.assert_close(fn(z, t), prsl_loss(z, t, 4, 0.3, reduction=reduction, backend="reference"))
    assert "k=4" in repr(fn)


def test_return_stats_match_reference():
    z, t = _data((6,), 40, seed=2)
    loss, stats = prsl_loss(z, t, 7, 0.5, backend="reference", return_stats=True)
    lse, tau, dist, spread, ties, *_ = row_stats_reference(z, t, 7)
    for got, want in zip(stats, (lse, tau, dist, spread, ties)):
        torch.testing.assert_close(got, want)
    assert not stats.dist.requires_grad


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype, want", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                         (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_loss_dtype(backend, dtype, want):
    z, t = _data((4,), 33, seed=3, dtype=dtype)
    z.requires_grad_()
    loss = prsl_loss(z, t, 5, 0.5, backend=backend)
    assert loss.dtype == want
    loss.backward()
    assert z.grad.dtype == dtype


@pytest.mark.parametrize("backend", _backends())
def test_backends_agree_on_3d_input(backend):
    z, t = _data((2, 7), 53, seed=4)
    t[1, 3] = -100
    w = torch.randn(2, 7, generator=torch.Generator().manual_seed(9))
    zr = z.clone().requires_grad_()
    (prsl_loss_reference(zr, t, 6, 0.7, reduction="none") * w).sum().backward()
    zb = z.clone().requires_grad_()
    loss = prsl_loss(zb, t, 6, 0.7, reduction="none", backend=backend)
    assert loss.shape == t.shape
    (loss * w).sum().backward()
    torch.testing.assert_close(loss, prsl_loss_reference(z, t, 6, 0.7, reduction="none"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zb.grad, zr.grad, rtol=1e-5, atol=1e-6)


def test_public_names():
    assert prsl_kernels.IGNORE_INDEX == -100
    assert set(prsl_kernels.__all__) >= {"prsl_loss", "PRSLLoss", "RowStats", "IGNORE_INDEX"}
