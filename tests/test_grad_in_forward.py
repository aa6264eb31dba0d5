"""The gradient made in the forward (one read of the logits from memory instead of two):
``prsl::forward_grad`` on C++ and Triton (compiled on CUDA, else the interpreter),
``prsl_loss``'s use of it for mean / sum, and ``inplace_backward``.

The Triton kernels write, per row, exactly what the backward kernel writes from the same
row statistics (the same code, in the same order): compared bit for bit. The C++ kernel
without softcap takes p_j from the first pass's exponentials (exp(z - shift) exp(shift - lse):
two roundings instead of one), so it is compared with the backward within a few float32
ulps before the final rounding; with softcap it is the backward's code, bit for bit. The
loss and the statistics are the forward's, bit for bit, everywhere. The API-level
gradients are also checked against the closed-form reference.
"""

import pytest
import torch

import reference as ref
from conftest import backend_device
from prsl_kernels import cpp_kernels, prsl_loss
from prsl_kernels import triton_kernels as tk

OPTIONS = [(0.0, 0.0, 0.0), (0.1, 1e-3, 5.0)]


@pytest.fixture(autouse=True, scope="module")
def _cpp_built():
    assert cpp_kernels.available(), cpp_kernels.build_error()


def _rows(n, vocab, dtype, gen, ignore_index=-100):
    logits = (torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, vocab, (n,), generator=gen)
    target[0] = logits[0].float().argmax()
    target[n - 1] = ignore_index
    return logits, target


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# C++ without softcap: p from the kept exponentials, a few float32 ulps before the final rounding.
KEPT_EXP_RTOL = {torch.float64: 1e-14, torch.float32: 2e-6, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -10}


def _assert_same_as_forward_then_backward(mod, logits, target, k, b, options, gen):
    """forward_grad into a fresh buffer and in place equal forward + backward (bit for bit, or for
    C++ without softcap within KEPT_EXP_RTOL); the fresh and in-place gradients are identical."""
    n = logits.shape[0]
    grad_rows = torch.rand(n, generator=gen, dtype=torch.float64).to(_acc(logits.dtype)) + 0.25
    device = backend_device("triton" if mod is tk else "cpp")
    logits, target, grad_rows = logits.to(device), target.to(device), grad_rows.to(device)
    loss, stats = mod.forward(logits, target, k, b, -100, *options)
    grad = mod.backward(grad_rows, logits, target, stats, b, -100, *options)
    out = torch.full(logits.shape, 7.0, dtype=logits.dtype, device=device)  # no zeros: every element must be written
    loss2, stats2 = mod.forward_grad(logits, target, grad_rows, out, k, b, -100, *options)
    assert torch.equal(loss2, loss) and torch.equal(stats2, stats)
    if mod is cpp_kernels and options[2] == 0.0:
        scale = grad.double().abs().max()
        torch.testing.assert_close(out.double(), grad.double(), rtol=KEPT_EXP_RTOL[logits.dtype],
                                   atol=float(scale) * KEPT_EXP_RTOL[logits.dtype])
        grad = out
    assert torch.equal(out, grad)
    inplace = logits.clone()
    loss3, stats3 = mod.forward_grad(inplace, target, grad_rows, inplace, k, b, -100, *options)
    assert torch.equal(loss3, loss) and torch.equal(stats3, stats)
    assert torch.equal(inplace, grad)
    assert torch.all(grad[-1] == 0)  # the ignored row
    return grad


# ---------------------------------------------------------------- C++


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("k", [0, 6, 100])
def test_cpp_forward_grad_is_forward_then_backward(dtype, options, k):
    gen = torch.Generator().manual_seed(hash((str(dtype), options, k)) % 2**31)
    logits, target = _rows(9, 1003, dtype, gen)
    logits[2] = torch.randint(-3, 3, (1003,), generator=gen).to(dtype)  # heavy ties
    _assert_same_as_forward_then_backward(cpp_kernels, logits, target, k, 1.5, options, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_kept_exponentials_on_masked_and_very_negative_rows(dtype):
    """Rows whose first blocks are all -inf and whose logits sit far below 0 (lse < -88: exp(-lse)
    overflows float32): the kept exponentials' scale must stay finite, the gradient equal the
    backward kernel's."""
    gen = torch.Generator().manual_seed(9)
    logits = (torch.randn(4, 300, generator=gen) * 2 - 200.0).to(dtype)
    logits[:, :100] = float("-inf")
    target = torch.randint(100, 300, (4,), generator=gen)
    grad_rows = torch.rand(4, generator=gen) + 0.5
    loss, stats = cpp_kernels.forward(logits, target, 6, 2.0, -100)
    want = cpp_kernels.backward(grad_rows, logits, target, stats, 2.0, -100)
    out = torch.empty_like(logits)
    cpp_kernels.forward_grad(logits, target, grad_rows, out, 6, 2.0, -100)
    assert torch.isfinite(out).all() and torch.all(out[:, :100] == 0)
    torch.testing.assert_close(out.double(), want.double(), rtol=KEPT_EXP_RTOL[dtype],
                               atol=KEPT_EXP_RTOL[dtype] * float(want.double().abs().max()))


def test_cpp_forward_grad_strided_rows_and_overlap_check():
    gen = torch.Generator().manual_seed(5)
    storage = torch.randn(6, 520, generator=gen)
    logits = storage[:, 3:503]  # row stride 520, rows start anywhere
    target = torch.randint(0, 500, (6,), generator=gen)
    loss, stats = cpp_kernels.forward(logits, target, 6, 2.0, -100)
    grad_rows = torch.rand(6, generator=gen)
    want = cpp_kernels.backward(grad_rows, logits, target, stats, 2.0, -100)
    fresh = torch.empty(6, 500)
    cpp_kernels.forward_grad(logits, target, grad_rows, fresh, 6, 2.0, -100)
    torch.testing.assert_close(fresh, want, rtol=2e-6, atol=2e-6 * float(want.abs().max()))
    view = storage.clone()[:, 3:503]
    cpp_kernels.forward_grad(view, target, grad_rows, view, 6, 2.0, -100)
    assert torch.equal(view, fresh)
    with pytest.raises(RuntimeError, match="grad_out"):
        cpp_kernels.forward_grad(logits, target, grad_rows, storage[:, :500], 6, 2.0, -100)  # overlaps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 20, 100])
def test_cpp_candidates_at_the_row_ends_and_block_edges(dtype, k):
    """The largest logits placed where pass 2's bookkeeping has edges: the first block, block
    boundaries (32-column blocks, 4-block tests), the padded last block (V = 1003 is not a
    multiple of 32) and the target's own vector. The gradient pass writes unlisted blocks from
    the kept exponentials alone and blends the listed ones: it must equal the backward kernel,
    and the statistics the reference's."""
    gen = torch.Generator().manual_seed(1000 + k)
    vocab = 1003
    logits, target = _rows(6, vocab, dtype, gen)
    edges = torch.tensor([0, 1, 31, 32, 127, 128, 129, 991, 992, 1000, 1001, 1002])
    for row in range(5):
        top = edges[torch.randperm(len(edges), generator=gen)[: min(k + 2, len(edges))]]
        logits[row, top] = (8.0 + torch.rand(len(top), generator=gen, dtype=torch.float64)).to(dtype)
    logits[1, 990:] = float("-inf")  # the padded last block masked
    target[2] = 1002  # the target in the padded last block, among the largest
    target[3] = 32
    _assert_same_as_forward_then_backward(cpp_kernels, logits, target, k, 1.5, OPTIONS[0], gen)
    grad = torch.empty_like(logits)
    cpp_kernels.forward_grad(logits, target, torch.ones(6), grad, k, 1.5, -100)
    counted = target != -100
    _, stats = cpp_kernels.forward(logits, target, k, 1.5, -100)
    _, tau, _, _, ties, *_ = ref.row_stats_reference(logits.double(), target, k)
    assert torch.equal(stats[counted, 1].double(), tau[counted])  # tau is one of the logits
    assert torch.equal(stats[counted, 4].double(), ties[counted])
    closed = ref.grad_closed_form(logits.double(), target, k, 1.5)
    torch.testing.assert_close(grad.double(), closed, rtol=2.0 ** -7 if dtype != torch.float32 else 1e-5,
                               atol=1e-7)


# ---------------------------------------------------------------- Triton (compiled on CUDA, else interpreted)


@pytest.mark.parametrize("dtype,vocab,k,block", [
    (torch.float32, 300, 6, 64), (torch.bfloat16, 300, 20, 64), (torch.float64, 300, 6, 64),
    (torch.float32, 300, 0, 64), (torch.float16, 700, 200, 256)])  # the last: the exact kernel only
@pytest.mark.parametrize("options", OPTIONS)
def test_triton_forward_grad_is_forward_then_backward(dtype, vocab, k, block, options):
    gen = torch.Generator().manual_seed(vocab + k)
    logits, target = _rows(5, vocab, dtype, gen)
    with tk.block_width(block):
        _assert_same_as_forward_then_backward(tk, logits, target, k, 2.0, options, gen)


def test_triton_backward_splits_long_rows_over_programs_and_may_write_in_place():
    """Rows of many tiles: the backward's programs split a row's tiles evenly (33 tiles over 5
    programs), each with its masked ends and prefetched interior; k > MAX_K takes the torch
    statistics and the backward kernel, which forward_grad runs in place over the logits."""
    gen = torch.Generator().manual_seed(8)
    vocab = 2100
    logits, target = _rows(3, vocab, torch.float32, gen)
    grad_rows = torch.rand(3, generator=gen) + 0.5
    device = backend_device("triton")
    logits, target, grad_rows = logits.to(device), target.to(device), grad_rows.to(device)
    for k in (20, tk.MAX_K + 3):
        loss, stats = tk.forward(logits, target, k, 0.5, -100, block_v=64)
        grad = tk.backward(grad_rows, logits, target, stats, 0.5, -100, block_v=64)
        want = ref.grad_closed_form(logits, target, k, 0.5, grad_rows=grad_rows)
        torch.testing.assert_close(grad.to(want.dtype), want, rtol=1e-5, atol=1e-9)
        inplace = logits.clone()
        tk.forward_grad(inplace, target, grad_rows, inplace, k, 0.5, -100, block_v=64)
        assert torch.equal(inplace, grad)


def test_triton_flagged_rows_get_their_gradient_from_the_exact_kernel():
    """Rows the two-pass kernel cannot settle (heavy ties, fewer than k finite groups) are
    skipped by its gradient loop and written by the exact kernel, with the exact statistics;
    an out-of-range target (check_target=False) gives a NaN row, as in the backward."""
    gen = torch.Generator().manual_seed(21)
    vocab, k = 3000, 20
    device = backend_device("triton")
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(6, vocab, generator=gen) * 2).to(dtype)
        target = torch.randint(0, vocab, (6,), generator=gen)
        logits[3] = torch.randint(-3, 3, (vocab,), generator=gen).to(dtype)
        logits[4, 10:] = float("-inf")
        target[4] = 2
        target[5] = vocab + 5
        logits, target = logits.to(device), target.to(device)
        _, _, flags = tk.forward_with_flags(logits, target, k, 0.5, -100)
        assert flags.tolist() == [0, 0, 0, 1, 1, 0]
        grad_rows = (torch.rand(6, generator=gen) + 0.5).to(device)
        out = torch.zeros_like(logits)
        tk.forward_grad(logits, target, grad_rows, out, k, 0.5, -100)
        want = ref.grad_closed_form(logits[:5], target[:5], k, 0.5, grad_rows=grad_rows[:5])
        torch.testing.assert_close(out[:5].to(want.dtype), want, rtol=2.0 ** -8, atol=1e-7)
        assert torch.isnan(out[5]).all()


def test_triton_scale_unless_one_skips_an_exact_one(triton_device):
    x = torch.randn(3, 5000).to(triton_device)
    before = x.clone()
    tk.scale_unless_one(x, torch.tensor(1.0, device=triton_device))
    assert torch.equal(x, before)
    tk.scale_unless_one(x, torch.tensor(0.375, device=triton_device))  # a power-of-two multiple: exact in float32
    assert torch.equal(x, before * 0.375)


# ---------------------------------------------------------------- prsl_loss


def _grads(logits, target, k, b, backend, reduction, upstream, inplace=False, **kw):
    x = logits.clone().requires_grad_(True)
    y = x * 1.0 if inplace else x  # a non-leaf that the in-place gradient may overwrite
    loss = prsl_loss(y, target, k, b, reduction=reduction, backend=backend, inplace_backward=inplace, **kw)
    (loss * upstream).backward()
    return loss.detach(), x.grad, y.detach()


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_prsl_loss_gradient_made_in_the_forward(backend, dtype, reduction):
    """mean / sum: the loss equals the per-row path's reduction bit for bit; with an upstream
    gradient of exactly 1 the gradient does too, otherwise it is scaled once more (one more
    rounding in 16-bit); both match the closed form; inplace_backward leaves the gradient in
    the logits' storage."""
    gen = torch.Generator().manual_seed(11)
    logits, target = _rows(24, 400, dtype, gen)
    target[3:6] = -100
    device = backend_device(backend)
    logits, target = logits.to(device), target.to(device)
    count = (target != -100).sum()
    rows = prsl_loss(logits, target, 6, 2.0, reduction="none", backend=backend)
    want_loss = rows.sum() if reduction == "sum" else rows.sum() / count
    for upstream in (1.0, 0.3):
        per_row = torch.full((24,), upstream / (count.item() if reduction == "mean" else 1.0), dtype=torch.float64,
                             device=device)
        closed = ref.grad_closed_form(logits, target, 6, 2.0, grad_rows=per_row)
        x = logits.clone().requires_grad_(True)
        r = prsl_loss(x, target, 6, 2.0, reduction="none", backend=backend)
        (r.sum() if reduction == "sum" else r.sum() / count).mul(upstream).backward()
        old = x.grad
        for inplace in (False, True):
            loss, grad, y = _grads(logits, target, 6, 2.0, backend, reduction, upstream, inplace)
            assert torch.equal(loss, want_loss)
            if upstream == 1.0 and backend == "triton":
                assert torch.equal(grad, old)
            elif upstream == 1.0:  # C++: p from the kept exponentials
                torch.testing.assert_close(grad, old, rtol=KEPT_EXP_RTOL[dtype],
                                           atol=KEPT_EXP_RTOL[dtype] * float(old.abs().max()))
            else:
                torch.testing.assert_close(grad, old, rtol=2.0 ** -7 if dtype == torch.bfloat16 else 1e-6,
                                           atol=1e-9)
            rtol = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(grad.to(closed.dtype), closed, rtol=rtol, atol=1e-7)
            if inplace:
                assert torch.equal(y, grad)  # the logits tensor holds the gradient
            else:
                assert torch.equal(y, logits)  # the default never changes the logits


def test_prsl_loss_gradient_in_forward_with_options_and_second_backward():
    gen = torch.Generator().manual_seed(12)
    logits, target = _rows(16, 300, torch.float64, gen)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=7.0)
    x = logits.clone().requires_grad_(True)
    loss = prsl_loss(x, target, 6, 2.0, backend="cpp", **kw)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.mul(0.5).backward()  # a second backward through the retained graph recomputes
    torch.testing.assert_close(x.grad, 1.5 * first, rtol=1e-12, atol=1e-15)
    want = ref.prsl_loss_reference(logits.clone().requires_grad_(True), target, 6, 2.0, **kw)
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(lambda z: prsl_loss(z, target[:4], 6, 2.0, backend="cpp", **kw),
                                    (logits[:4].clone().requires_grad_(True),))


def test_inplace_backward_is_loud_where_it_cannot_be_right():
    gen = torch.Generator().manual_seed(13)
    logits, target = _rows(8, 200, torch.float32, gen)
    # A second backward: the logits are gone.
    y = logits.clone().requires_grad_(True) * 1.0
    loss = prsl_loss(y, target, 6, 2.0, backend="cpp", inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
    # Another op saved the same logits for its backward (tanh saves its output): autograd raises.
    x = logits.clone().requires_grad_(True)
    loss = prsl_loss(torch.tanh(x), target, 6, 2.0, backend="cpp", inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with pytest.raises(ValueError, match="inplace_backward"):
        prsl_loss(logits, target, 6, 2.0, reduction="none", inplace_backward=True)
    with pytest.raises(TypeError, match="inplace_backward"):
        prsl_loss(logits, target, 6, 2.0, inplace_backward=1)
    # No gradient needed: nothing is overwritten.
    kept = logits.clone()
    prsl_loss(kept, target, 6, 2.0, backend="cpp", inplace_backward=True)
    assert torch.equal(kept, logits)


@pytest.mark.parametrize("inplace", [False, True])
def test_all_ignored_batch_gives_zero_gradients(inplace):
    logits = torch.randn(6, 50)
    target = torch.full((6,), -100)
    loss, grad, _ = _grads(logits, target, 3, 1.0, "cpp", "mean", 1.0, inplace)
    assert torch.isnan(loss) and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_divisor_is_folded_into_the_gradient(monkeypatch, backend):
    """reduction='sum' with a divisor (Hugging Face's num_items_in_batch) gives the sum divided by
    it, value and gradient, as dividing afterwards does; but the fused backends put the divisor into
    the gradient the forward writes, so the backward receives an upstream of exactly 1 and skips
    its scaling pass (spied), where dividing afterwards scales."""
    from prsl_kernels import function

    seen = []
    original = function.scale_unless_one
    monkeypatch.setattr(function, "scale_unless_one", lambda grad, scale: (seen.append(float(scale)),
                                                                           original(grad, scale)))
    gen = torch.Generator().manual_seed(31)
    logits, target = _rows(12, 300, torch.float32, gen)
    logits, target = logits.to(backend_device(backend)), target.to(backend_device(backend))
    divisor = torch.tensor(37)
    x = logits.clone().requires_grad_(True)
    after = prsl_loss(x, target, 6, 2.0, reduction="sum", backend=backend) / 37.0
    after.backward()
    y = logits.clone().requires_grad_(True)
    folded = prsl_loss(y, target, 6, 2.0, reduction="sum", divisor=divisor, backend=backend)
    folded.backward()
    torch.testing.assert_close(folded, after, rtol=1e-6, atol=0)
    torch.testing.assert_close(y.grad, x.grad, rtol=1e-5, atol=1e-9)
    closed = ref.grad_closed_form(logits, target, 6, 2.0, grad_rows=torch.full((12,), 1 / 37, dtype=torch.float64,
                                                                             device=logits.device))
    torch.testing.assert_close(y.grad.to(closed.dtype), closed, rtol=1e-5, atol=1e-9)
    if backend != "reference":
        assert seen[0] == pytest.approx(1 / 37) and seen[1] == 1.0
    z = logits.clone().requires_grad_(True)
    assert torch.equal(prsl_loss(z, target, 6, 2.0, reduction="sum", divisor=2.5, backend=backend).detach(),
                       prsl_loss(logits, target, 6, 2.0, reduction="sum", backend=backend) / 2.5)
    with pytest.raises(ValueError, match="divisor needs reduction='sum'"):
        prsl_loss(logits, target, 6, 2.0, divisor=2.0)
    with pytest.raises(TypeError, match="divisor"):
        prsl_loss(logits, target, 6, 2.0, reduction="sum", divisor="37")
    with pytest.raises(ValueError, match="divisor must be a real scalar"):
        prsl_loss(logits, target, 6, 2.0, reduction="sum", divisor=torch.ones(2))
