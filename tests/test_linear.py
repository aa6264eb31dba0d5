"""Fused linear + PRSL (prsl_kernels/linear.py) against F.linear + the reference.

float64 runs compare with the reference to float64 rounding (the chunked matmuls
sum the same H products in possibly another order); float32 to the float32
rounding of those sums; bf16 is judged as Cut Cross-Entropy's tests do: its error
against a float64 ground truth must be no worse than that of the unfused bf16 path.
"""

import pytest
import torch
import torch.nn.functional as F

from prsl_kernels import LinearPRSLLoss, cpp_kernels, linear_prsl_loss, prsl_loss
from prsl_kernels.linear import CHUNK_BYTES, default_chunk_size
from reference import prsl_loss_reference

requires_cpp = pytest.mark.skipif(not cpp_kernels.available(),
                                  reason=f"C++ extension unavailable: {cpp_kernels.build_error()}")
pytestmark = requires_cpp

F64 = dict(rtol=1e-10, atol=1e-12)
# float32: each logit is a sum of H products (rounding ~ sqrt(H) * 2^-24 relative), and the
# weight gradient sums N chunk products: 1e-4 relative is ~100x that, 1e-6 absolute covers
# entries that cancel to ~0.
F32 = dict(rtol=1e-4, atol=1e-6)


def _data(seed, shape=(23,), hidden=12, vocab=41, dtype=torch.float64, n_ignored=3, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, hidden, generator=g, dtype=torch.float64) * scale
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) / hidden ** 0.5 * 2
    bias = torch.randn(vocab, generator=g, dtype=torch.float64) * 0.5
    t = torch.randint(0, vocab, shape, generator=g)
    flat = t.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[:n_ignored]] = -100
    return h.to(dtype), w.to(dtype), bias.to(dtype), t, g


def _fused(h, w, t, k, b, bias=None, upstream=None, **kw):
    leaves = [x.detach().clone().requires_grad_(True) for x in (h, w) + ((bias,) if bias is not None else ())]
    loss = linear_prsl_loss(leaves[0], leaves[1], t, k, b, bias=leaves[2] if bias is not None else None, **kw)
    grads = torch.autograd.grad(loss, leaves, upstream)
    return loss.detach(), grads


def _unfused(h, w, t, k, b, bias=None, upstream=None, backend="reference", **kw):
    leaves = [x.detach().clone().requires_grad_(True) for x in (h, w) + ((bias,) if bias is not None else ())]
    logits = F.linear(leaves[0], leaves[1], leaves[2] if bias is not None else None)
    if backend == "reference":
        loss = prsl_loss_reference(logits, t, k, b, **kw)
    else:
        loss = prsl_loss(logits, t, k, b, backend=backend, **kw)
    grads = torch.autograd.grad(loss, leaves, upstream)
    return loss.detach(), grads


def _assert_same(got, want, tol):
    torch.testing.assert_close(got[0], want[0], **tol)
    assert len(got[1]) == len(want[1])
    for g, w in zip(got[1], want[1]):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 1, 5, 23, 64])  # default, divides N=23 or not, == N, > N
def test_matches_reference_fp64(reduction, with_bias, chunk_size):
    h, w, bias, t, g = _data(10 + 2 * with_bias + (chunk_size or 0))
    bias = bias if with_bias else None
    upstream = torch.randn(t.shape, generator=g, dtype=torch.float64) if reduction == "none" else None
    got = _fused(h, w, t, 6, 0.7, bias, upstream, reduction=reduction, chunk_size=chunk_size)
    want = _unfused(h, w, t, 6, 0.7, bias, upstream, reduction=reduction)
    assert got[0].dtype == torch.float64
    _assert_same(got, want, F64)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_fp64(reduction):
    h, w, bias, t, _ = _data(20, shape=(7,), hidden=4, vocab=9, n_ignored=1)
    inputs = tuple(x.clone().requires_grad_(True) for x in (h, w, bias))
    fn = lambda h, w, bias: linear_prsl_loss(h, w, t, 3, 0.8, bias=bias, reduction=reduction, chunk_size=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


def test_3d_and_non_contiguous_hidden():
    h, w, bias, t, g = _data(30, shape=(3, 5), hidden=10, vocab=29)
    h_t = h.transpose(0, 1).contiguous().transpose(0, 1)  # same values, strides (10, 30, 1)
    assert not h_t.is_contiguous()
    upstream = torch.randn(3, 5, generator=g, dtype=torch.float64)
    for reduction, up in (("mean", None), ("none", upstream)):
        got = _fused(h_t, w, t, 4, 1.3, bias, up, reduction=reduction, chunk_size=4)
        want = _unfused(h, w, t, 4, 1.3, bias, up, reduction=reduction)
        assert got[0].shape == want[0].shape
        _assert_same(got, want, F64)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fp32_matches_unfused_cpp(reduction):
    h, w, bias, t, g = _data(40, shape=(4, 33), hidden=48, vocab=301, dtype=torch.float32, scale=2.0)
    upstream = torch.randn(t.shape, generator=g) if reduction == "none" else None
    got = _fused(h, w, t, 20, 0.5, bias, upstream, reduction=reduction, chunk_size=40)
    want = _unfused(h, w, t, 20, 0.5, bias, upstream, backend="cpp", reduction=reduction)
    assert got[0].dtype == torch.float32
    _assert_same(got, want, F32)


def _rel_err(x, truth):
    return ((x.double() - truth).norm() / truth.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_error_no_worse_than_unfused(dtype):
    """Same-dtype unfused path and the fused one against a float64 ground truth on the same
    (rounded) inputs: the fused path may differ in where it rounds (per-chunk weight-gradient
    accumulation), not by more than twice the unfused path's own error, plus 2^-9 (half a
    bf16 ulp) of slack for the per-chunk rounding of the weight gradient's running sum."""
    h, w, bias, t, _ = _data(50, shape=(96,), hidden=64, vocab=257, dtype=dtype, scale=2.0)
    truth = _unfused(h.double(), w.double(), t, 20, 0.5, bias.double())
    fused = _fused(h, w, t, 20, 0.5, bias, chunk_size=16)
    unfused = _unfused(h, w, t, 20, 0.5, bias, backend="cpp")
    assert fused[0].dtype == torch.float32
    assert all(g.dtype == dtype for g in fused[1])
    slack = 2.0 ** -9
    assert _rel_err(fused[0], truth[0]) <= 2 * _rel_err(unfused[0], truth[0]) + slack
    for got, ref, want in zip(fused[1], unfused[1], truth[1]):
        assert _rel_err(got, want) <= 2 * _rel_err(ref, want) + slack


@pytest.mark.parametrize("k, b", [(0, 0.5), (6, 0.0)])
def test_k0_or_b0_is_fused_cross_entropy(k, b):
    h, w, bias, t, _ = _data(60)
    got = _fused(h, w, t, k, b, bias, chunk_size=7)
    leaves = [x.clone().requires_grad_(True) for x in (h, w, bias)]
    want_loss = F.cross_entropy(F.linear(*leaves), t)
    want = (want_loss.detach(), torch.autograd.grad(want_loss, leaves))
    _assert_same(got, want, F64)


def test_return_stats_and_module_form():
    h, w, bias, t, _ = _data(70, shape=(2, 9))
    loss, stats = linear_prsl_loss(h, w, t, 5, 0.9, bias=bias, chunk_size=4, return_stats=True)
    want_loss, want_stats = prsl_loss(F.linear(h, w, bias), t, 5, 0.9, return_stats=True)
    torch.testing.assert_close(loss, want_loss, **F64)
    for got, want in zip(stats, want_stats):
        assert got.shape == (18,)
        torch.testing.assert_close(got, want, **F64)
    module = LinearPRSLLoss(5, 0.9, chunk_size=4)
    torch.testing.assert_close(module(h, w, t, bias), loss, **F64)
    assert "chunk_size=4" in repr(module)


def test_only_the_needed_gradients_and_no_grad():
    h, w, bias, t, _ = _data(80)
    x = h.clone().requires_grad_(True)  # frozen head: only hidden needs a gradient
    loss = linear_prsl_loss(x, w, t, 4, 0.6, bias=bias, chunk_size=6)
    loss.backward()
    y = h.clone().requires_grad_(True)
    prsl_loss_reference(F.linear(y, w, bias), t, 4, 0.6).backward()
    torch.testing.assert_close(x.grad, y.grad, **F64)
    with torch.no_grad():
        torch.testing.assert_close(linear_prsl_loss(h, w, t, 4, 0.6, bias=bias, chunk_size=6), loss.detach(), **F64)


def test_retained_graph_second_backward_recomputes():
    h, w, bias, t, _ = _data(90)
    leaves = [x.clone().requires_grad_(True) for x in (h, w, bias)]
    loss = linear_prsl_loss(*leaves[:2], t, 5, 0.5, bias=leaves[2], chunk_size=8)
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss * 3, leaves)
    for a, b in zip(first, second):
        torch.testing.assert_close(b, 3 * a, **F64)


def test_all_rows_ignored_and_empty_batch():
    h, w, bias, t, _ = _data(100, shape=(4,), n_ignored=4)
    assert torch.isnan(linear_prsl_loss(h, w, t, 3, 0.5, bias=bias))  # like F.cross_entropy
    assert linear_prsl_loss(h, w, t, 3, 0.5, bias=bias, reduction="sum") == 0
    empty = linear_prsl_loss(h[:0], w, t[:0], 3, 0.5, reduction="none")
    assert empty.shape == (0,)


def test_deterministic():
    h, w, bias, t, _ = _data(110, shape=(64,), hidden=32, vocab=203, dtype=torch.float32)
    first = _fused(h, w, t, 20, 0.5, bias, chunk_size=24)
    second = _fused(h, w, t, 20, 0.5, bias, chunk_size=24)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


def test_default_chunk_size():
    vocab = 50257
    rows = default_chunk_size(100000, vocab, torch.float32, torch.device("cpu"))
    assert rows % 8 == 0 and rows * vocab * 4 <= CHUNK_BYTES["cpu"]
    assert default_chunk_size(5, vocab, torch.float32, torch.device("cpu")) == 5
    assert default_chunk_size(100000, 10 ** 7, torch.float32, torch.device("cpu")) == 8  # floor of 8 rows


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_interpreter(reduction, triton_device):
    """The Triton kernels (compiled on CUDA, else the CPU interpreter) under the same chunked driver."""
    h, w, bias, t, g = _data(120, shape=(6,), hidden=8, vocab=37, dtype=torch.float32, n_ignored=1, scale=2.0)
    upstream = torch.randn(t.shape, generator=g) if reduction == "none" else None
    on = [x if x is None else x.to(triton_device) for x in (h, w, t, bias, upstream)]
    got = _fused(*on[:3], 5, 0.5, *on[3:], reduction=reduction, chunk_size=4, backend="triton")
    want = _unfused(h.double(), w.double(), t, 5, 0.5, bias.double(),
                    None if upstream is None else upstream.double(), reduction=reduction)
    torch.testing.assert_close(got[0].double().cpu(), want[0], **F32)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a.double().cpu(), b, **F32)


def test_compile_fullgraph_no_graph_break():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.lm_head = torch.nn.Linear(16, 16), torch.nn.Linear(16, 97)

        def forward(self, x, target):
            return linear_prsl_loss(self.body(x), self.lm_head.weight, target, 6, 0.5, bias=self.lm_head.bias,
                                    chunk_size=4, backend="cpp")

    torch.manual_seed(0)
    model = Head()
    g = torch.Generator().manual_seed(130)
    x, target = torch.randn(3, 5, 16, generator=g), torch.randint(0, 97, (3, 5), generator=g)
    target[1, 2] = -100
    explanation = torch._dynamo.explain(model)(x, target)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    results = []
    for m in (model, compiled):
        model.zero_grad()
        loss = m(x, target)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], **F32)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, **F32)


def test_bad_inputs():
    h, w, bias, t, _ = _data(140, shape=(4,), hidden=6, vocab=11)
    with pytest.raises(ValueError, match=r"hidden.shape\[-1\].*weight.shape\[1\]"):
        linear_prsl_loss(h[:, :5], w, t, 3, 0.5)
    with pytest.raises(TypeError, match="hidden and weight must have the same dtype"):
        linear_prsl_loss(h.float(), w, t, 3, 0.5)
    with pytest.raises(ValueError, match=r"bias must have shape \(V,\) = \(11,\)"):
        linear_prsl_loss(h, w, t, 3, 0.5, bias=bias[:10])
    with pytest.raises(TypeError, match="bias must have the weight's dtype"):
        linear_prsl_loss(h, w, t, 3, 0.5, bias=bias.float())
    with pytest.raises(ValueError, match="weight must be 2-D"):
        linear_prsl_loss(h, w[0], t, 3, 0.5)
    with pytest.raises(TypeError, match="hidden must be a floating-point tensor"):
        linear_prsl_loss(t, w, t, 3, 0.5)
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        linear_prsl_loss(h, w.long(), t, 3, 0.5)
    with pytest.raises(ValueError, match=r"target must have shape hidden.shape\[:-1\]"):
        linear_prsl_loss(h, w, t[:3], 3, 0.5)
    with pytest.raises(TypeError, match="target must be an integer tensor"):
        linear_prsl_loss(h, w, t.double(), 3, 0.5)
    with pytest.raises(ValueError, match=r"k must be in \[0, V-1\] = \[0, 10\] \(V = weight.shape\[0\]"):
        linear_prsl_loss(h, w, t, 11, 0.5)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_prsl_loss(h, w, t, 3, 0.5, chunk_size=0)
    with pytest.raises(ValueError, match="reduction"):
        linear_prsl_loss(h, w, t, 3, 0.5, reduction="avg")
    bad = t.clone()
    bad[0] = 11
    with pytest.raises(ValueError, match="target values must be in"):
        linear_prsl_loss(h, w, bad, 3, 0.5)


def test_autocast_casts_like_f_linear():
    """Under CPU autocast (bf16) the fused op sees what F.linear would compute in: the same loss
    as prsl_loss on the autocast logits, and float32 gradients for the float32 leaves."""
    h, w, bias, t, _ = _data(150, shape=(40,), hidden=16, vocab=300, dtype=torch.float32, scale=2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _fused(h, w, t, 6, 0.5, bias, chunk_size=16)
        want = _unfused(h, w, t, 6, 0.5, bias, backend="cpp")
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)  # same bf16 logits, fp32 loss
    for g, r in zip(got[1], want[1]):
        assert g.dtype == torch.float32
        assert _rel_err(g, r.double()) < 2.0 ** -6  # bf16 gradients, rounded at different points
