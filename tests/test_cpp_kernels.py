"""The C++ CPU kernels (csrc/prsl_cpu.cpp) against the reference and the spec's maths.

Both sides see the same (possibly rounded) logits and both accumulate in float32
(float64 for float64 input), so losses and row statistics agree to float32
rounding whatever the input dtype; gradients differ by the rounding of the
gradient itself to the logits' dtype.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from prsl_kernels import backends, cpp_kernels, ops, prsl_loss
from prsl_kernels.spec import DIST, LSE, SPREAD_SUM, TAU, TIE_COUNT, stats_dtype
from reference import grad_closed_form, prsl_loss_reference, row_stats_reference

requires_cpp = pytest.mark.skipif(not cpp_kernels.available(),
                                  reason=f"C++ extension unavailable: {cpp_kernels.build_error()}")

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# Loss / stats tolerances (both sides accumulate in the stats dtype) and gradient
# tolerances (the kernel's gradient is rounded once to the logits' dtype).
STAT_TOL = {torch.float64: dict(rtol=1e-11, atol=1e-12)}
GRAD_TOL = {torch.float16: dict(rtol=2e-3, atol=2e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=2e-6),
            torch.float32: dict(rtol=1e-4, atol=1e-7), torch.float64: dict(rtol=1e-10, atol=1e-13)}


def _stat_tol(dtype):
    return STAT_TOL.get(dtype, dict(rtol=2e-5, atol=2e-6))


def _data(n, v, seed, dtype=torch.float32, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    return z, t, g


def _check_rows(z, t, k, b, ignore_index=-100, grad_rows=None):
    """Kernel loss rows, stats and gradient against the reference on counted rows."""
    loss, stats = cpp_kernels.forward(z, t, k, b, ignore_index)
    counted = t != ignore_index
    want_loss = prsl_loss_reference(z, t, k, b, ignore_index=ignore_index, reduction="none")
    lse, tau, dist, spread, ties, *_ = row_stats_reference(z, t, k, ignore_index)
    tol = _stat_tol(z.dtype)
    torch.testing.assert_close(loss, want_loss, **tol)
    for col, want in ((LSE, lse), (TAU, tau), (DIST, dist), (SPREAD_SUM, spread)):
        torch.testing.assert_close(stats[counted, col], want[counted], **tol)
    if k > 0:
        assert torch.equal(stats[counted, TIE_COUNT], ties[counted])
    if grad_rows is None:
        grad_rows = torch.ones_like(loss)
    grad = cpp_kernels.backward(grad_rows, z, t, stats, b, ignore_index)
    assert grad.dtype == z.dtype and grad.shape == z.shape and grad.is_contiguous()
    want_grad = grad_closed_form(z, t, k, b, ignore_index, grad_rows=grad_rows)
    torch.testing.assert_close(grad.to(want_grad.dtype), want_grad, **GRAD_TOL[z.dtype])
    assert not grad[~counted].any()


def test_extension_available():
    if os.environ.get("PRSL_DISABLE_CPP") == "1":
        pytest.skip("PRSL_DISABLE_CPP=1")
    assert cpp_kernels.available(), cpp_kernels.build_error()


# -------------------------------------------------------------------------- the matrix
# V = 37 has fewer than k+1 blocks for every k > 0 (all finite logits become
# candidates); V = 1001 takes the segment-bound path for k <= 31 and the
# all-candidates path for k = 100 and V-1.
@requires_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v, k", [(v, k) for v in (37, 1001) for k in (0, 1, 6, 20, 100, v - 1) if k <= v - 1])
@pytest.mark.parametrize("b", [0.0, 1e-4, 0.5, -0.3])
def test_matrix_against_reference(dtype, v, k, b):
    z, t, g = _data(12, v, seed=v * 7 + k, dtype=dtype)
    # Row 0's target is its largest logit (inside any top-k), row 1's its smallest.
    t[0] = z[0].float().argmax()
    t[1] = z[1].float().argmin()
    t[5] = -100
    grad_rows = torch.randn(12, generator=g, dtype=torch.float64).to(stats_dtype(dtype))
    _check_rows(z, t, k, b, grad_rows=grad_rows)


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 6, 20])
def test_ties_are_all_counted(dtype, k):
    # Integer logits in a narrow range: tau is tied many times over, far beyond k.
    g = torch.Generator().manual_seed(11 + k)
    z = torch.randint(-4, 3, (10, 1500), generator=g).to(dtype)
    t = torch.randint(0, 1500, (10,), generator=g)
    _check_rows(z, t, k, 0.5)
    _, stats = cpp_kernels.forward(z, t, k, 0.5, -100)
    assert (stats[:, TIE_COUNT] > k).all()


@requires_cpp
@pytest.mark.parametrize("k", [6, 100])
def test_sorted_and_constant_rows(k):
    # Worst cases for the segment bound: ascending rows make almost every logit a
    # candidate, constant rows tie all V-1 non-targets at tau.
    z, t, _ = _data(6, 5000, seed=13)
    z[0] = z[0].sort().values
    z[1] = z[1].sort(descending=True).values
    z[2] = 0.75
    z[3, ::2] = 1.5
    _check_rows(z, t, k, 0.5)
    _, stats = cpp_kernels.forward(z, t, k, 0.5, -100)
    assert stats[2, TIE_COUNT] == 4999 and stats[2, DIST] == 0


@requires_cpp
def test_bf16_rounding_ties():
    # bf16 keeps 8 bits of mantissa: randn logits collide often near the top.
    z, t, _ = _data(8, 2000, seed=5, dtype=torch.bfloat16, scale=1.0)
    _check_rows(z, t, 20, 0.5)
    _, stats = cpp_kernels.forward(z, t, 20, 0.5, -100)
    assert (stats[:, TIE_COUNT] > 1).any()


@requires_cpp
@pytest.mark.parametrize("k", [1, 6, 20])
def test_masked_vocabulary(k):
    z, t, g = _data(8, 3000, seed=21 + k)
    z[0, torch.randperm(3000, generator=g)[:2500]] = float("-inf")  # scattered mask
    z[1, 200:1800] = float("-inf")  # whole segments masked: their maxima are -inf
    z[2, :] = float("-inf")  # fewer than k finite non-targets: tau = -inf
    z[2, :3] = torch.tensor([1.0, 2.0, 0.5])
    t[2] = 1
    z[3, :] = float("-inf")  # the target is the only finite logit
    z[3, 7] = 0.25
    t[3] = 7
    z[4, 10:] = float("-inf")  # exactly 10 finite: tau = -inf when k > 9
    t[4] = 2
    z[5, 60:] = float("-inf")  # one segment holds every finite logit: all of them are candidates
    _check_rows(z, t, k, 0.5)
    _, stats = cpp_kernels.forward(z, t, k, 0.5, -100)
    if k > 2:  # row 2 has two finite non-target logits
        assert stats[2, TAU] == float("-inf") and stats[2, TIE_COUNT] == 3000 - 3
    assert stats[3, DIST] == 0 and stats[3, TIE_COUNT] == 2999


@requires_cpp
def test_nan_and_inf_rows_give_nan_loss():
    z, t, _ = _data(4, 300, seed=8)
    z[0, 17] = float("nan")
    z[1, 40] = float("inf")
    z[2, t[2]] = float("nan")
    z.requires_grad_()
    loss = prsl_loss(z, t, 6, 0.5, reduction="none", backend="cpp")
    assert loss[:3].isnan().all()
    torch.testing.assert_close(loss[3:], prsl_loss_reference(z.detach()[3:], t[3:], 6, 0.5, reduction="none"))
    loss[3].backward()
    torch.testing.assert_close(z.grad[3], grad_closed_form(z.detach()[3:], t[3:], 6, 0.5)[0])


# -------------------------------------------------------------------------- through the API
@requires_cpp
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_api_reductions_and_ignore_index(reduction, ignore_index):
    z, t, g = _data(20, 57, seed=31)
    t[::4] = ignore_index
    z_ref = z.clone().requires_grad_()
    z.requires_grad_()
    got = prsl_loss(z, t, 6, 0.4, ignore_index=ignore_index, reduction=reduction, backend="cpp")
    want = prsl_loss_reference(z_ref, t, 6, 0.4, ignore_index=ignore_index, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)
    upstream = torch.randn(got.shape, generator=g)
    got.backward(upstream)
    want.backward(upstream)
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-4, atol=1e-7)
    assert not z.grad[t == ignore_index].any()


@requires_cpp
def test_api_all_rows_ignored_mean_is_nan():
    z, t, _ = _data(3, 20, seed=2)
    t[:] = -100
    assert prsl_loss(z, t, 4, 0.5, backend="cpp").isnan()


@requires_cpp
def test_strided_rows_and_leading_dims():
    g = torch.Generator().manual_seed(41)
    wide = torch.randn(2, 5, 300, generator=g, dtype=torch.float64).float()
    z = wide[..., 13:270]  # unit stride along V, rows strided by 300
    assert z.stride(-1) == 1 and z.stride(-2) == 300
    t = torch.randint(0, 257, (2, 5), generator=g)
    z.requires_grad_()
    z_ref = z.detach().clone().requires_grad_()
    got = prsl_loss(z, t, 9, 0.5, reduction="none", backend="cpp")
    want = prsl_loss_reference(z_ref, t, 9, 0.5, reduction="none")
    assert got.shape == (2, 5)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)
    upstream = torch.randn(2, 5, generator=g)
    got.backward(upstream)
    want.backward(upstream)
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-4, atol=1e-7)
    # The kernel itself on the strided 2-D view (no copy by the caller).
    flat_view = wide.reshape(10, 300)[:, 13:270]
    _check_rows(flat_view, t.reshape(-1), 9, 0.5)


@requires_cpp
def test_return_stats_through_api():
    z, t, _ = _data(6, 400, seed=43)
    _, stats = prsl_loss(z, t, 20, 0.5, backend="cpp", return_stats=True)
    for got, want in zip(stats, row_stats_reference(z, t, 20)[:5]):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)


@requires_cpp
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_gradcheck_float64(reduction):
    z, t, _ = _data(4, 40, seed=51, dtype=torch.float64)
    t[2] = -100
    z.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: prsl_loss(x, t, 5, 0.7, reduction=reduction, backend="cpp"), (z,), eps=1e-6, atol=1e-7)


# -------------------------------------------------------------------------- determinism
@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_identical_across_runs_and_thread_counts(dtype):
    z, t, g = _data(192, 1031, seed=61, dtype=dtype)  # several row tasks per thread
    t[7] = -100
    grad_rows = torch.randn(192, generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            loss, stats = cpp_kernels.forward(z, t, 20, 0.5, -100)
            results.append((loss, stats, cpp_kernels.backward(grad_rows, z, t, stats, 0.5, -100)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@requires_cpp
def test_rows_are_split_over_torchs_threads():
    # at::parallel_for forks only in an extension compiled with OpenMP: without
    # -fopenmp every call silently runs on one thread, still bit-identical.
    info = cpp_kernels.build_info()
    assert info["openmp"] == ("parallel backend: OpenMP" in torch.__config__.parallel_info()), info


# -------------------------------------------------------------------------- errors, dispatch, fallback
@requires_cpp
def test_bad_inputs_raise_before_the_kernel():
    z, t, _ = _data(4, 10, seed=71)
    with pytest.raises(ValueError, match="k must be in"):
        prsl_loss(z, t, 10, 0.5, backend="cpp")
    with pytest.raises(ValueError, match="target values"):
        prsl_loss(z, torch.tensor([0, 1, 10, 2]), 3, 0.5, backend="cpp")
    with pytest.raises(TypeError, match="logits"):
        prsl_loss(z.long(), t, 3, 0.5, backend="cpp")
    with pytest.raises(TypeError, match="target"):
        prsl_loss(z, t.float(), 3, 0.5, backend="cpp")
    with pytest.raises(ValueError, match="shape"):
        prsl_loss(z, t[:3], 3, 0.5, backend="cpp")


@requires_cpp
def test_kernel_rejects_out_of_range_target_when_check_is_skipped():
    z, t, _ = _data(64, 10, seed=72)
    t[40] = 10
    with pytest.raises(RuntimeError, match="out of range"):
        prsl_loss(z, t, 3, 0.5, backend="cpp", check_target=False)
    with pytest.raises(RuntimeError, match="unit stride"):
        cpp_kernels.forward(z.t().contiguous().t(), t, 3, 0.5, -100)


@requires_cpp
def test_auto_on_cpu_uses_the_cpp_kernels():
    assert backends.resolve("auto", torch.device("cpu")) == "ops"
    z, t, _ = _data(5, 64, seed=81)
    via_op = ops.forward(z, t, 6, 0.5, -100, 0.0, 0.0, 0.0)
    direct = cpp_kernels.forward(z, t, 6, 0.5, -100)
    assert all(torch.equal(a, b) for a, b in zip(via_op, direct))
    _, stats = prsl_loss(z, t, 6, 0.5, backend="auto", return_stats=True)
    assert torch.equal(stats.lse, direct[1][:, LSE])


def test_disabled_extension_falls_back_with_one_warning():
    script = textwrap.dedent("""
        import warnings, torch
        from prsl_kernels import prsl_loss, cpp_kernels
        from reference import prsl_loss_reference
        z = torch.randn(4, 30); t = torch.randint(0, 30, (4,))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = prsl_loss(z, t, 5, 0.5)
            b = prsl_loss(z, t, 5, 0.5)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "C++" in messages[0] and "PRSL_DISABLE_CPP" in messages[0], messages
        torch.testing.assert_close(a, prsl_loss_reference(z, t, 5, 0.5))
        assert not cpp_kernels.available()
        try:
            prsl_loss(z, t, 5, 0.5, backend="cpp")
        except RuntimeError as exc:
            assert "PRSL_DISABLE_CPP" in str(exc)
        else:
            raise AssertionError("backend='cpp' did not raise")
        print("ok")
    """)
    env = dict(os.environ, PRSL_DISABLE_CPP="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rows_whose_threshold_is_negative(dtype):
    """Rows whose k-th largest non-target logit (tau) is negative, or whose every logit is."""
    z, t, _ = _data(5, 3000, seed=77, dtype=torch.float64)
    k = 20
    z[0] -= 30.0
    z[1] -= z[1].sort(descending=True).values[k // 2]
    z[2] = -z[2].abs() - 0.5
    z[3] *= 0.01
    z = z.to(dtype)
    _check_rows(z, t, k, 0.5)
    tau = row_stats_reference(z, t, k)[1]
    assert (tau[:3] < 0).all()
